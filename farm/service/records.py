"""The fine-tuning service's records in the registry's catalog: files, jobs, events, checkpoints.

Both sides of the service write here: ``farm gateway`` (the API: uploads, new jobs, cancel
requests) and ``farm service`` (the pools' driver: validation, scheduling, progress, results).
The catalog is the only thing they share, so a restarted service finds every job where the
last one left it. Every read a tenant can cause is scoped to that tenant (admins see all), and
an object of another tenant is answered exactly like a missing one (``None``).

A job's life: ``validating_files`` (created by the API) -> ``queued`` (the service checked its
files and stored the ``TenantJob`` it trains) -> ``running`` (a pool took it) -> ``succeeded``
| ``failed`` | ``cancelled``. Moves are conditional updates (``WHERE status = ...``), so a
cancel racing a start never leaves a job in two states.

The ``*_object`` functions give OpenAI's JSON shapes (``openai`` 2.x/3.x types ``FileObject``,
``FineTuningJob``, ``FineTuningJobEvent``, ``FineTuningJobCheckpoint``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select, update

from farm.registry.catalog import (Catalog, FileRow, FineTuningCheckpointRow, FineTuningEventRow, FineTuningJobRow,
                                   utcnow)

ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    """An unguessable object id (``file-...``, ``ftjob-...``): ids are never a way to probe."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _stamp(when: datetime | None) -> int | None:
    if when is None:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)  # SQLite drops the zone
    return int(when.timestamp())


@dataclass(frozen=True)
class Page:
    """One page of a list: OpenAI's ``{"object": "list", "data", "has_more"}``."""

    data: list[dict]
    has_more: bool

    def to_json(self, with_ids: bool = False) -> dict:
        out: dict[str, Any] = {"object": "list", "data": self.data, "has_more": self.has_more}
        if with_ids:  # the files list also names its first and last ids
            out["first_id"] = self.data[0]["id"] if self.data else None
            out["last_id"] = self.data[-1]["id"] if self.data else None
        return out


# -- OpenAI shapes -------------------------------------------------------------------------------
def file_object(row: FileRow) -> dict:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": _stamp(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def job_object(row: FineTuningJobRow) -> dict:
    """A job as ``GET /v1/fine_tuning/jobs/{id}`` answers it."""
    request = row.request or {}
    job = row.job or {}
    hyper: dict[str, Any] = {"batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"}
    method = dict(request.get("method") or {"type": "supervised"})
    section = method.get(method.get("type"))
    hyper.update(request.get("hyperparameters") or (section or {}).get("hyperparameters") or {})
    if job:  # what the farm resolved it to: the numbers it trains with
        train = job["settings"]["train"]
        hyper.update({"steps": train["max_steps"], "batch_size": train["batch_size"],
                      "learning_rate": train["learning_rate"]})
    return {
        "id": row.id, "object": "fine_tuning.job", "model": row.model, "created_at": _stamp(row.created_at),
        "finished_at": _stamp(row.finished_at), "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.tenant, "result_files": [], "status": row.status,
        "validation_file": row.validation_file, "training_file": row.training_file,
        "hyperparameters": hyper, "method": method, "trained_tokens": row.trained_tokens,
        "error": row.error, "seed": job["settings"]["train"]["seed"] if job else request.get("seed", 0) or 0,
        "estimated_finish": _stamp(row.estimated_finish) if row.status == "running" else None,
        "integrations": [], "metadata": request.get("metadata"), "suffix": request.get("suffix"),
        "user_provided_suffix": request.get("suffix"),
    }


def event_object(row: FineTuningEventRow) -> dict:
    return {"id": f"ftevent-{row.id}", "object": "fine_tuning.job.event", "created_at": _stamp(row.created_at),
            "level": row.level, "message": row.message, "data": row.data or {}, "type": row.type}


def checkpoint_object(row: FineTuningCheckpointRow) -> dict:
    return {"id": f"ftckpt-{row.id}", "object": "fine_tuning.job.checkpoint", "created_at": _stamp(row.created_at),
            "fine_tuned_model_checkpoint": row.model, "fine_tuning_job_id": row.job_id,
            "metrics": row.metrics, "step_number": row.step}


class ServiceRecords:
    """Files, jobs, events and checkpoints in ``catalog``; methods open short transactions."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.sessions = catalog.sessions

    # -- files -------------------------------------------------------------------------------
    def add_file(self, *, file_id: str, tenant: str, filename: str, purpose: str, size: int, sha256: str,
                 records: int, fmt: str, store_path: str) -> dict:
        with self.sessions.begin() as session:
            row = FileRow(id=file_id, tenant=tenant, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
                          records=records, format=fmt, store_path=store_path, status="processed",
                          created_at=utcnow())
            session.add(row)
        return file_object(row)

    def file(self, tenant: str | None, file_id: str) -> FileRow | None:
        """The caller's file (admins: anyone's); None when missing, deleted or another tenant's."""
        with self.sessions() as session:
            row = session.get(FileRow, file_id) if isinstance(file_id, str) and len(file_id) <= 40 else None
        if row is None or row.status != "processed" or (tenant is not None and row.tenant != tenant):
            return None
        return row

    def files(self, tenant: str | None, purpose: str | None = None, after: str | None = None,
              limit: int = 10000, order: str = "desc") -> Page:
        query = select(FileRow).where(FileRow.status == "processed")
        if tenant is not None:
            query = query.where(FileRow.tenant == tenant)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        return self._page(query, FileRow, after, limit, order, file_object, tenant)

    def stored_bytes(self, tenant: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(
                FileRow.tenant == tenant, FileRow.status == "processed")))

    def file_in_use(self, file_id: str) -> str | None:
        """An active job that reads ``file_id``, if any (such a file may not be deleted)."""
        with self.sessions() as session:
            return session.scalar(select(FineTuningJobRow.id).where(
                FineTuningJobRow.status.in_(ACTIVE),
                (FineTuningJobRow.training_file == file_id) | (FineTuningJobRow.validation_file == file_id)).limit(1))

    def delete_file(self, file_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(update(FileRow).where(FileRow.id == file_id).values(status="deleted"))

    # -- jobs: the API's side ----------------------------------------------------------------
    def create_job(self, *, job_id: str, tenant: str, model: str, base_model: str, request: dict,
                   training_file: str, validation_file: str | None) -> dict:
        with self.sessions.begin() as session:
            row = FineTuningJobRow(id=job_id, tenant=tenant, model=model, base_model=base_model, request=request,
                                   training_file=training_file, validation_file=validation_file,
                                   status="validating_files", cancel_requested=False, created_at=utcnow())
            session.add(row)
            session.flush()  # the job's row before its first event (which refers to it)
            session.add(FineTuningEventRow(job_id=job_id, level="info", type="message", created_at=utcnow(),
                                           message=f"Created fine-tuning job: {job_id}"))
        return job_object(row)

    def job(self, tenant: str | None, job_id: str) -> FineTuningJobRow | None:
        """The caller's job (admins: anyone's); None when missing or another tenant's."""
        with self.sessions() as session:
            row = session.get(FineTuningJobRow, job_id) if isinstance(job_id, str) and len(job_id) <= 40 else None
        if row is None or (tenant is not None and row.tenant != tenant):
            return None
        return row

    def jobs(self, tenant: str | None, after: str | None = None, limit: int = 20,
             metadata: dict[str, str] | None = None) -> Page:
        query = select(FineTuningJobRow)
        if tenant is not None:
            query = query.where(FineTuningJobRow.tenant == tenant)
        page = self._page(query, FineTuningJobRow, after, limit if not metadata else 10_000, "desc", job_object,
                          tenant)
        if metadata:  # JSON filters differ between SQLite and PostgreSQL: filter the page here
            data = [j for j in page.data if all((j["metadata"] or {}).get(k) == v for k, v in metadata.items())]
            return Page(data[:limit], len(data) > limit)
        return page

    def active_jobs(self, tenant: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count(FineTuningJobRow.id)).where(
                FineTuningJobRow.tenant == tenant, FineTuningJobRow.status.in_(ACTIVE))))

    def request_cancel(self, job_id: str) -> FineTuningJobRow:
        """Cancel: a job no pool has yet is cancelled at once; a running one is asked to stop
        (the service stops it after its current step and then marks it cancelled)."""
        with self.sessions.begin() as session:
            done = session.execute(update(FineTuningJobRow).where(
                FineTuningJobRow.id == job_id, FineTuningJobRow.status.in_(("validating_files", "queued"))).values(
                status="cancelled", cancel_requested=True, finished_at=utcnow())).rowcount
            if done:
                session.add(FineTuningEventRow(job_id=job_id, level="info", type="message", created_at=utcnow(),
                                               message="Fine-tuning job cancelled"))
            else:
                session.execute(update(FineTuningJobRow).where(
                    FineTuningJobRow.id == job_id, FineTuningJobRow.status == "running").values(cancel_requested=True))
            return session.get(FineTuningJobRow, job_id)

    # -- jobs: the service's side -------------------------------------------------------------
    def service_jobs(self, base_model: str, statuses: tuple[str, ...]) -> list[FineTuningJobRow]:
        """Jobs on ``base_model`` in ``statuses``, oldest first."""
        with self.sessions() as session:
            return list(session.scalars(select(FineTuningJobRow).where(
                FineTuningJobRow.base_model == base_model, FineTuningJobRow.status.in_(statuses))
                .order_by(FineTuningJobRow.created_at, FineTuningJobRow.id)))

    def move(self, job_id: str, from_: tuple[str, ...], to: str, event: str | None = None,
             level: str = "info", **values) -> bool:
        """Move a job ``from_`` one of those statuses ``to`` another, with ``values`` and an
        event; False (nothing changed) when it was no longer in them (cancelled meanwhile)."""
        if to in FINISHED:
            values.setdefault("finished_at", utcnow())
        with self.sessions.begin() as session:
            moved = session.execute(update(FineTuningJobRow).where(
                FineTuningJobRow.id == job_id, FineTuningJobRow.status.in_(from_)).values(status=to, **values)).rowcount
            if moved and event:
                session.add(FineTuningEventRow(job_id=job_id, level=level, type="message", message=event,
                                               created_at=utcnow()))
        return bool(moved)

    def set_values(self, job_id: str, **values) -> None:
        with self.sessions.begin() as session:
            session.execute(update(FineTuningJobRow).where(FineTuningJobRow.id == job_id).values(**values))

    def add_event(self, job_id: str, message: str, level: str = "info", kind: str = "message",
                  data: dict | None = None) -> None:
        with self.sessions.begin() as session:
            session.add(FineTuningEventRow(job_id=job_id, level=level, type=kind, message=message, data=data,
                                           created_at=utcnow()))

    def add_checkpoint(self, job_id: str, step: int, model: str, metrics: dict) -> None:
        with self.sessions.begin() as session:
            if session.scalar(select(FineTuningCheckpointRow.id).where(
                    FineTuningCheckpointRow.job_id == job_id, FineTuningCheckpointRow.step == step)) is None:
                session.add(FineTuningCheckpointRow(job_id=job_id, step=step, model=model, metrics=metrics,
                                                    created_at=utcnow()))

    # -- events and checkpoints (the API reads them) ------------------------------------------
    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> Page:
        """Newest first, as OpenAI lists them; ``after``: an event id of a previous page."""
        return self._numbered_page(FineTuningEventRow, job_id, "ftevent-", after, limit,
                                   FineTuningEventRow.id.desc(), event_object)

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> Page:
        """Latest step first; ``after``: a checkpoint id of a previous page."""
        return self._numbered_page(FineTuningCheckpointRow, job_id, "ftckpt-", after, limit,
                                   FineTuningCheckpointRow.step.desc(), checkpoint_object)

    def cancel_requested(self, job_ids: list[str]) -> list[str]:
        """Which of ``job_ids`` have a cancel request (the service stops those it is training)."""
        if not job_ids:
            return []
        with self.sessions() as session:
            return list(session.scalars(select(FineTuningJobRow.id).where(
                FineTuningJobRow.id.in_(job_ids), FineTuningJobRow.cancel_requested.is_(True))))

    # -- paging ----------------------------------------------------------------------------------
    def _numbered_page(self, row_type, job_id: str, prefix: str, after: str | None, limit: int, ordering,
                       shape) -> Page:
        """One job's rows with integer ids shown as ``<prefix><id>`` (events, checkpoints),
        starting below the id ``after`` names (a malformed one starts nothing)."""
        query = select(row_type).where(row_type.job_id == job_id)
        if after is not None:
            number = _number(after, prefix)
            query = query.where(row_type.id < (number if number is not None else 0))
        with self.sessions() as session:
            rows = list(session.scalars(query.order_by(ordering).limit(limit + 1)))
        return Page([shape(r) for r in rows[:limit]], len(rows) > limit)

    def _page(self, query, row_type, after: str | None, limit: int, order: str, shape, tenant: str | None) -> Page:
        """Rows by (created_at, id) in ``order``, starting after the object ``after`` (the
        caller's own: another tenant's id starts nothing)."""
        created, key = row_type.created_at, row_type.id
        if after is not None:
            with self.sessions() as session:
                anchor = session.get(row_type, after) if len(after) <= 40 else None
            if anchor is None or (tenant is not None and anchor.tenant != tenant):
                return Page([], False)
            if order == "desc":
                query = query.where((created < anchor.created_at) | ((created == anchor.created_at) & (key < anchor.id)))
            else:
                query = query.where((created > anchor.created_at) | ((created == anchor.created_at) & (key > anchor.id)))
        ordering = (created.desc(), key.desc()) if order == "desc" else (created.asc(), key.asc())
        with self.sessions() as session:
            rows = list(session.scalars(query.order_by(*ordering).limit(limit + 1)))
        return Page([shape(r) for r in rows[:limit]], len(rows) > limit)


def _number(text: str, prefix: str) -> int | None:
    digits = text.removeprefix(prefix)
    return int(digits) if text.startswith(prefix) and digits.isdigit() and len(digits) < 18 else None

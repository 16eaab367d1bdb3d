"""``tenant_sweep.py --service URL``: a sweep spec's tenants as jobs of a running ``farm service``.

    FARM_SERVICE_TOKEN=<admin token> python jobs/tenant_sweep.py --config spec.yaml \\
        --service http://gateway:8080 --service-model tiny

Instead of starting pools, the sweep uploads each tenant's data through the gateway's files API
(acting for the tenant with an admin token and ``OpenAI-Organization``), creates one job per
tenant with the spec's method, method settings, steps, batch size and seed, follows the jobs
to the end and prints their outcomes. The service's own defaults decide the rest (learning
rate, schedule, precision, data settings), as for any tenant of the service.

A tenant's dataset goes up as it is when it is one JSON Lines or Parquet file, so the API's
errors name its own lines; any other shape the farm reads (CSV, JSON arrays, compressed files,
folders, saved datasets) is converted to JSON Lines first, record by record. One tenant's bad
data or refused job is reported and costs no other tenant.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from farm.data import DataError, JsonText, RecordError, read_options, read_records
from farm.methods import method_info
from farm.spec import ResolvedSweep, TenantJob

TOKEN_ENV = "FARM_SERVICE_TOKEN"
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Submitted:
    tenant: str
    job_id: str | None = None
    status: str = "not submitted"
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: str | None = None


def job_request(job: TenantJob, model: str, training_file: str, validation_file: str | None) -> dict:
    """The ``POST /v1/fine_tuning/jobs`` body of one tenant of a spec."""
    settings = job.settings
    info = method_info(settings.method)
    section = {**settings.method_settings().model_dump(),
               "hyperparameters": {"max_steps": settings.train.max_steps, "batch_size": settings.train.batch_size}}
    body = {"model": model, "training_file": training_file, "suffix": job.adapter, "seed": settings.train.seed,
            "method": {"type": info.name, info.name: section}, "metadata": {"tenant_sweep": job.tenant}}
    if validation_file:
        body["validation_file"] = validation_file
    return body


def _as_upload(tenant: str, path: str, scratch: Path, options) -> tuple[str, Path]:
    """(file name, file) to upload: the dataset's own file, or its records as JSON Lines."""
    local = Path(path)
    if "://" not in path and local.is_file() and local.suffix in (".jsonl", ".parquet"):
        return local.name, local
    out = scratch / f"{tenant}.jsonl"
    with out.open("w") as handle:
        for location, record in read_records(path, tenant, options):
            if isinstance(record, RecordError):
                raise DataError(tenant, path, record.reason, location, record.field)
            handle.write((record.text if isinstance(record, JsonText) else json.dumps(record, ensure_ascii=False))
                         .replace("\n", " ") + "\n")
    return out.name, out


def submit_to_service(sweep: ResolvedSweep, tenants: list[str], address: str, model: str,
                      console: Console | None = None, poll_s: float = 2.0) -> int:
    """Submit ``tenants`` of ``sweep`` to the service behind ``address``, follow them to the
    end; returns 0 when every job succeeded, 1 otherwise, 2 without a token."""
    console = console or Console()
    token = os.environ.get(TOKEN_ENV)
    if not token:
        console.print(f"--service needs an admin token in ${TOKEN_ENV} (never on the command line)")
        return 2
    outcomes = {name: Submitted(name) for name in tenants}
    with httpx.Client(base_url=address.rstrip("/") + "/v1", timeout=600,
                      headers={"Authorization": f"Bearer {token}"}) as http, \
            tempfile.TemporaryDirectory(prefix="farm-submit-") as scratch:
        for name in tenants:
            _submit_one(http, sweep.job(name), model, Path(scratch), outcomes[name], console)
        waiting = [o for o in outcomes.values() if o.job_id]
        while waiting:
            time.sleep(poll_s)
            for outcome in list(waiting):
                answer = http.get(f"/fine_tuning/jobs/{outcome.job_id}", headers={"OpenAI-Organization": outcome.tenant})
                if answer.status_code != 200:
                    continue  # the gateway restarting: ask again next round
                job = answer.json()
                if job["status"] != outcome.status:
                    console.print(f"{outcome.tenant}: {job['status']}", markup=False, highlight=False)
                outcome.status = job["status"]
                if outcome.status in TERMINAL:
                    outcome.fine_tuned_model, outcome.trained_tokens = job["fine_tuned_model"], job["trained_tokens"]
                    outcome.error = (job.get("error") or {}).get("message")
                    waiting.remove(outcome)
    table = Table(title=f"{sweep.spec.name}: {len(tenants)} tenant(s) on the service at {address}")
    for column in ("tenant", "job", "status", "fine-tuned model", "trained tokens", "error"):
        table.add_column(column)
    for outcome in outcomes.values():
        table.add_row(outcome.tenant, outcome.job_id or "-", outcome.status, outcome.fine_tuned_model or "-",
                      f"{outcome.trained_tokens:,}" if outcome.trained_tokens else "-", outcome.error or "")
    console.print(table)
    return 0 if all(o.status == "succeeded" for o in outcomes.values()) else 1


def _submit_one(http: httpx.Client, job: TenantJob, model: str, scratch: Path, outcome: Submitted,
                console: Console) -> None:
    tenant, data = job.tenant, job.settings.data
    acting = {"OpenAI-Organization": tenant}
    try:
        ids = []
        for path in (data.path, data.eval_path):
            if path is None:
                ids.append(None)
                continue
            name, content = _as_upload(tenant, path, scratch, read_options(data))
            with content.open("rb") as handle:
                answer = http.post("/files", headers=acting, data={"purpose": "fine-tune"},
                                   files={"file": (name, handle)})
            if answer.status_code != 200:
                raise DataError(tenant, path, _message(answer))
            ids.append(answer.json()["id"])
        answer = http.post("/fine_tuning/jobs", headers=acting, json=job_request(job, model, ids[0], ids[1]))
        if answer.status_code != 200:
            raise RuntimeError(f"job refused: {_message(answer)}")
    except (DataError, RuntimeError, httpx.HTTPError) as exc:
        outcome.status, outcome.error = "refused", str(exc)
        console.print(f"{tenant}: refused: {exc}", markup=False, highlight=False)
        return
    outcome.job_id, outcome.status = answer.json()["id"], answer.json()["status"]
    console.print(f"{tenant}: job {outcome.job_id} created", markup=False, highlight=False)


def _message(answer: httpx.Response) -> str:
    try:
        return f"{answer.status_code}: {answer.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{answer.status_code}: {answer.text[:300]}"

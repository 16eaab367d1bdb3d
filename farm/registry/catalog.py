"""The registry's catalog: tenants, adapters, versions, aliases and API tokens in SQL.

SQLAlchemy over a SQLite file (the embedded default) or PostgreSQL (by URL, for a cluster).
A version row is inserted only after its files are complete in the store, so the catalog
never shows a half-written version. Version numbers are allocated as max+1 under a unique
constraint (a reservation row per number) and retried on conflict, so concurrent publishers
of one adapter get distinct numbers. Tokens are stored as sha256 hashes only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, create_engine, event, func, inspect, select, update)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(timezone.utc)



def _lost_races(attempts: int, errors: tuple[type[BaseException], ...]):
    """Attempts of a transaction that can lose a race to a concurrent writer (a unique key taken
    first, SQLite busy): ``errors`` retry it after a short random, growing wait (so racers spread
    out instead of colliding again), up to ``attempts`` times; then the last error is raised."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

    return Retrying(retry=retry_if_exception_type(errors), stop=stop_after_attempt(attempts),
                    wait=wait_random_exponential(multiplier=0.002, max=0.1), reraise=True)

class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    tenant: Mapped[TenantRow] = relationship()


class NumberRow(Base):
    """Allocated version numbers (a number is never reused, even if its publish failed)."""

    __tablename__ = "version_numbers"
    __table_args__ = (UniqueConstraint("adapter_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    serve_name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    base_model: Mapped[str] = mapped_column(String(500), index=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    servable_by_vllm: Mapped[bool] = mapped_column(Boolean, index=True)
    not_servable_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    sweep_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # files up to 4 GiB each
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)  # active | archived
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    manifest: Mapped[dict] = mapped_column(JSON)
    adapter: Mapped[AdapterRow] = relationship()


class MetricRow(Base):
    """One numeric metric of a version, in its own row so SQL can filter and sort on it."""

    __tablename__ = "version_metrics"
    # (name, value) first: metric filters and metric sorts scan one metric's values in order
    __table_args__ = (UniqueConstraint("version_id", "name"),
                      Index("ix_version_metrics_name_value", "name", "value", "version_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    value: Mapped[float] = mapped_column(Float)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PublishKeyRow(Base):
    """An idempotency key of a committed publish: a retry with the same key gets that version."""

    __tablename__ = "publish_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    tenant: Mapped[str] = mapped_column(String(63))
    adapter: Mapped[str] = mapped_column(String(63))
    number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TokenRow(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    tenant: Mapped[str | None] = mapped_column(String(63), nullable=True)  # None: admin
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UsageRow(Base):
    """Metered inference of one tenant's adapter (or base) on one base model, per hour.

    ``farm gateway`` adds to these counters (``Catalog.add_usage``); ``farm usage`` sums them.
    """

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("tenant", "model", "base_model", "hour"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(200))  # serve name, or the base's public name
    base_model: Mapped[str] = mapped_column(String(500))
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # fine-tuning jobs (farm service)


# -- the fine-tuning service's records (farm.service.records reads and writes them) -----------------
class FileRow(Base):
    """A file a tenant uploaded (``POST /v1/files``); its bytes are in the store under ``store_path``."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-<hex>
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    filename: Mapped[str] = mapped_column(String(255))  # as the caller named it: shown, never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(32))
    store_path: Mapped[str] = mapped_column(String(500))  # relative to the store's root
    status: Mapped[str] = mapped_column(String(16), default="processed")  # processed | deleted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class FineTuningJobRow(Base):
    """A fine-tuning job: the request as checked, its state, and the job the pools train."""

    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftjob-<hex>
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(200))        # the public base name the caller sent
    base_model: Mapped[str] = mapped_column(String(500), index=True)  # what the service trains on
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    request: Mapped[dict] = mapped_column(JSON)           # the checked request body
    job: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the TenantJob, once files are validated
    status: Mapped[str] = mapped_column(String(20), index=True)  # validating_files|queued|running|succeeded|failed|cancelled
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class FineTuningEventRow(Base):
    __tablename__ = "fine_tuning_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8))      # info | warn | error
    type: Mapped[str] = mapped_column(String(8))       # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class FineTuningCheckpointRow(Base):
    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))  # the serve name (final) or <job id>:step-<N>
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class UsageDelta:
    """Counters to add for one (tenant, model, base model, hour)."""

    tenant: str
    model: str
    base_model: str
    hour: datetime
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0


@dataclass(frozen=True)
class ServingTarget:
    """What a gateway needs to route one version: looked up in one query per request."""

    serve_name: str
    base_model: str
    servable_by_vllm: bool
    not_servable_reason: str | None
    status: str
    method: str


@dataclass(frozen=True)
class TokenInfo:
    """A token as ``farm registry token list`` shows it (never the token itself)."""

    id: int
    tenant: str | None
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked: bool


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or one tenant (which it sees only itself)."""

    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_engine(url: str):
    """An engine for ``url``; SQLite gets WAL and a busy timeout for concurrent writers."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class CatalogOutdated(RuntimeError):
    """The catalog's schema is behind this release: ``farm registry migrate`` upgrades it."""


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _alembic(connection):
    from pathlib import Path

    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The schema revision this release's code is written for."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic(None)).get_current_head()


def current_revision(engine) -> str | None:
    """The revision a database is at (None: no ``alembic_version``, a catalog from before migrations)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _create_at_head(engine) -> None:
    """Tables and revision stamp in ONE transaction: no other process sees tables without a stamp."""
    from alembic import command

    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction unless one is open: open one, and take
            # the write lock now, so a second creator waits and then finds everything done.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        Base.metadata.create_all(connection)
        command.stamp(_alembic(connection), "head")
        connection.commit()


def migrate_catalog(url: str) -> tuple[str | None, str]:
    """Upgrade the catalog at ``url`` to this release's schema; returns (before, after).

    A catalog made before migrations existed is taken to be at ``0001`` (its frozen schema).
    """
    from alembic import command

    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        if not tables:
            raise FileNotFoundError(f"no registry catalog at {_shown(url)}")
        before = current_revision(engine)
        with engine.begin() as connection:
            config = _alembic(connection)
            if before is None:
                command.stamp(config, "0001")
            command.upgrade(config, "head")
        return before, current_revision(engine)
    finally:
        engine.dispose()


class Catalog:
    """SQL side of the registry. Methods open their own short transactions."""

    def __init__(self, url: str, create: bool = True):
        """Open (``create``: and create when missing) the catalog at ``url``.

        ``create=False`` (reads): a SQLite file that does not exist is ``FileNotFoundError``.
        """
        self.url = url
        if not create and url.startswith("sqlite:///"):
            path = url[len("sqlite:///"):]
            if path and path != ":memory:" and not os.path.isfile(path):
                raise FileNotFoundError(f"no registry catalog at {path} (check --store / --catalog)")
        self.engine = make_engine(url)
        self._check_schema(create)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _check_schema(self, create: bool) -> None:
        """A new database gets the current schema; one behind this release is refused, named."""
        from sqlalchemy.exc import SQLAlchemyError

        tables = set(inspect(self.engine).get_table_names()) - {"alembic_version"}
        if not tables:
            if not create:
                raise FileNotFoundError(f"no registry catalog at {_shown(self.url)} (check --store / --catalog)")
            try:
                _create_at_head(self.engine)
            except SQLAlchemyError:  # another process made the same new catalog at the same moment
                pass
        current, head = current_revision(self.engine), head_revision()
        if current != head:
            raise CatalogOutdated(
                f"the registry catalog at {_shown(self.url)} has schema revision "
                f"{current or '0001 (made before migrations)'}, this release needs {head}: back it up, then run "
                f"`farm registry migrate` with the same --store/--catalog")

    # -- tenants and adapters ----------------------------------------------------------------
    def _get_or_create(self, session: Session, tenant: str, adapter: str) -> AdapterRow:
        for _ in range(5):
            tenant_row = session.scalar(select(TenantRow).where(TenantRow.name == tenant))
            if tenant_row is None:
                try:
                    with session.begin_nested():
                        tenant_row = TenantRow(name=tenant)
                        session.add(tenant_row)
                except IntegrityError:
                    continue  # another publisher created it: read it again
            row = session.scalar(select(AdapterRow).where(AdapterRow.tenant_id == tenant_row.id,
                                                          AdapterRow.name == adapter))
            if row is not None:
                return row
            try:
                with session.begin_nested():
                    row = AdapterRow(tenant_id=tenant_row.id, name=adapter)
                    session.add(row)
                return row
            except IntegrityError:
                continue
        raise RuntimeError(f"could not create {tenant}/{adapter} under concurrent publishers")

    def reserve_number(self, tenant: str, adapter: str) -> int:
        """Allocate the next version number of ``tenant/adapter`` (max + 1, retried on conflict:
        a concurrent publisher took this number, or SQLite was busy)."""
        for attempt in _lost_races(50, (IntegrityError, OperationalError)):
            with attempt, self.sessions.begin() as session:
                row = self._get_or_create(session, tenant, adapter)
                top = session.scalar(select(func.max(NumberRow.number)).where(NumberRow.adapter_id == row.id))
                number = (top or 0) + 1
                session.add(NumberRow(adapter_id=row.id, number=number))
        return number

    def published_with(self, key: str, tenant: str, adapter: str) -> int | None:
        """The version number a publish with idempotency ``key`` committed for tenant/adapter."""
        with self.engine.connect() as connection:
            return connection.execute(select(PublishKeyRow.number).where(
                PublishKeyRow.key_hash == hash_token(key), PublishKeyRow.tenant == tenant,
                PublishKeyRow.adapter == adapter)).scalar()

    def add_version(self, tenant: str, adapter: str, number: int, manifest: dict, size_bytes: int,
                    move_aliases: tuple[str, ...] = ("latest",), idempotency_key: str | None = None) -> None:
        """Record a complete version (its files are already in the store) and move aliases.

        ``idempotency_key`` is recorded in the same transaction (unique: a concurrent publish
        with the same key fails here and is answered with this one's version).
        """
        from farm.registry.names import serve_name

        with self.sessions.begin() as session:
            if idempotency_key is not None:
                session.add(PublishKeyRow(key_hash=hash_token(idempotency_key), tenant=tenant, adapter=adapter,
                                          number=number))
            row = self._get_or_create(session, tenant, adapter)
            if move_aliases:
                self._lock_adapter(session, row.id)  # before the insert: one lock order for all
            version = VersionRow(
                adapter_id=row.id, number=number, serve_name=serve_name(tenant, adapter, number),
                base_model=manifest["base_model"], method=manifest["method"],
                rank=manifest.get("method_settings", {}).get("r"),
                servable_by_vllm=manifest["servable_by_vllm"],
                not_servable_reason=manifest.get("not_servable_reason"),
                sweep_id=manifest.get("lineage", {}).get("sweep_id"),
                dataset_fingerprint=manifest.get("lineage", {}).get("dataset_fingerprint"),
                size_bytes=size_bytes, manifest=manifest,
                created_at=datetime.fromisoformat(manifest["created_at"]),
            )
            session.add(version)
            session.flush()
            for name, value in (manifest.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    session.add(MetricRow(version_id=version.id, name=name, value=float(value)))
            for alias in move_aliases:
                if alias == "latest":
                    # concurrent publishers may commit out of order: latest only moves forward
                    current = session.scalar(select(VersionRow.number).join(
                        AliasRow, AliasRow.version_id == VersionRow.id).where(
                        AliasRow.adapter_id == row.id, AliasRow.name == "latest"))
                    if current is not None and current > number:
                        continue
                self._point_alias(session, row.id, alias, version.id)

    # -- queries -----------------------------------------------------------------------------
    @staticmethod
    def _versions():
        return (select(VersionRow).join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
                .join(TenantRow, AdapterRow.tenant_id == TenantRow.id))

    def get_version(self, tenant: str, adapter: str, number: int | None = None,
                    alias: str | None = None) -> VersionRow | None:
        """One version by number or by alias (None when there is none)."""
        with self.sessions() as session:
            query = self._versions().where(TenantRow.name == tenant, AdapterRow.name == adapter)
            if alias is not None:
                query = query.join(AliasRow, AliasRow.version_id == VersionRow.id).where(AliasRow.name == alias)
            else:
                query = query.where(VersionRow.number == number)
            return session.scalar(query)

    def serving_target(self, tenant: str, adapter: str, number: int | None = None,
                       alias: str | None = None) -> ServingTarget | None:
        """The routing facts of one version by number or alias, in one query (None if none)."""
        query = (select(VersionRow.serve_name, VersionRow.base_model, VersionRow.servable_by_vllm,
                        VersionRow.not_servable_reason, VersionRow.status, VersionRow.method)
                 .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
                 .join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
                 .where(TenantRow.name == tenant, AdapterRow.name == adapter))
        if alias is not None:
            query = query.join(AliasRow, AliasRow.version_id == VersionRow.id).where(AliasRow.name == alias)
        else:
            query = query.where(VersionRow.number == number)
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return ServingTarget(*row) if row is not None else None

    def search(self, *, tenant: str | None = None, adapter: str | None = None,
               base_model: str | None = None, method: str | None = None,
               servable: bool | None = None, served_by: str | None = None, alias: str | None = None,
               sweep_id: str | None = None, status: str | None = "active", metric_filters: list[tuple[str, str, float]] = (),
               created_after: datetime | None = None, created_before: datetime | None = None,
               sort: str = "-created_at", limit: int = 50, offset: int = 0) -> tuple[list[VersionRow], int]:
        """Filtered, sorted, paginated versions and the total count before pagination.

        ``metric_filters`` are ``(metric, op, value)`` with op one of ``<``, ``<=``, ``>``,
        ``>=``, ``=``; ``sort`` is ``created_at``, ``version`` or ``metric:<name>``, with a
        leading ``-`` for descending. ``servable``: servable by vLLM or not; ``served_by``: a
        backend (``farm.methods.SERVING_BACKENDS``) that can serve the version.
        """
        from sqlalchemy.orm import aliased

        query = self._versions()
        conditions = []
        if tenant is not None:
            conditions.append(TenantRow.name == tenant)
        if adapter is not None:
            conditions.append(AdapterRow.name == adapter)
        if base_model is not None:
            conditions.append(VersionRow.base_model == base_model)
        if method is not None:
            conditions.append(VersionRow.method == method)
        if servable is not None:
            conditions.append(VersionRow.servable_by_vllm == servable)
        if served_by is not None:  # the same rule as farm.methods.servable_by, as a query
            from farm.methods import METHODS, SERVING_BACKENDS

            if served_by not in SERVING_BACKENDS:
                raise ValueError(f"served_by: one of {', '.join(SERVING_BACKENDS)}, got {served_by!r}")
            conditions.append(VersionRow.servable_by_vllm.is_(True) if served_by == "vllm"
                              else VersionRow.method.in_(list(METHODS)))
        if sweep_id is not None:
            conditions.append(VersionRow.sweep_id == sweep_id)
        if status is not None:
            conditions.append(VersionRow.status == status)
        if created_after is not None:
            conditions.append(VersionRow.created_at >= created_after)
        if created_before is not None:
            conditions.append(VersionRow.created_at < created_before)
        if alias is not None:
            query = query.join(AliasRow, AliasRow.version_id == VersionRow.id)
            conditions.append(AliasRow.name == alias)
        ops = {"<": "__lt__", "<=": "__le__", ">": "__gt__", ">=": "__ge__", "=": "__eq__"}
        for index, (name, op, value) in enumerate(metric_filters):
            if op not in ops:
                raise ValueError(f"metric filter operator {op!r}: use one of {', '.join(ops)}")
            metric = aliased(MetricRow, name=f"m{index}")
            query = query.join(metric, (metric.version_id == VersionRow.id) & (metric.name == name))
            conditions.append(getattr(metric.value, ops[op])(float(value)))
        query = query.where(*conditions)
        descending = sort.startswith("-")
        key = sort.lstrip("-")
        if key == "created_at":
            column = VersionRow.created_at
        elif key == "version":
            column = VersionRow.number
        elif key.startswith("metric:"):
            sort_metric = aliased(MetricRow, name="sort_metric")
            query = query.join(sort_metric, (sort_metric.version_id == VersionRow.id)
                               & (sort_metric.name == key[len("metric:"):]))
            column = sort_metric.value
        else:
            raise ValueError(f"sort {sort!r}: use created_at, version or metric:<name>, '-' for descending")
        with self.sessions() as session:
            rows = list(session.scalars(query.order_by(column.desc() if descending else column.asc(),
                                                       VersionRow.id.desc()).limit(limit).offset(offset)))
            if offset == 0 and len(rows) < limit:
                return rows, len(rows)  # the whole result fits on this page: no count query
            total = session.scalar(select(func.count()).select_from(
                query.with_only_columns(VersionRow.id).subquery()))
            return rows, int(total or 0)

    def aliases_for(self, version_ids: list[int]) -> dict[int, list[str]]:
        """Aliases of many versions in one query (a search page must not cost a query per row)."""
        found: dict[int, list[str]] = {vid: [] for vid in version_ids}
        if not version_ids:
            return found
        with self.sessions() as session:
            for version_id, name in session.execute(
                    select(AliasRow.version_id, AliasRow.name).where(AliasRow.version_id.in_(version_ids))):
                found[version_id].append(name)
        return {vid: sorted(names) for vid, names in found.items()}

    def has_adapter(self, tenant: str, adapter: str) -> bool:
        """Whether ``tenant`` has an adapter of that name (any version, any status)."""
        with self.sessions() as session:
            return session.scalar(select(AdapterRow.id).join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
                                  .where(TenantRow.name == tenant, AdapterRow.name == adapter)) is not None

    def aliases_of(self, version_id: int) -> list[str]:
        with self.sessions() as session:
            return sorted(session.scalars(select(AliasRow.name).where(AliasRow.version_id == version_id)))

    # -- aliases -----------------------------------------------------------------------------
    @staticmethod
    def _lock_adapter(session: Session, adapter_id: int) -> None:
        """Serialise alias changes of one adapter (row lock on PostgreSQL; SQLite writes are serial)."""
        # FOR NO KEY UPDATE: excludes other alias writers, not inserts that reference the row
        session.execute(select(AdapterRow.id).where(AdapterRow.id == adapter_id).with_for_update(key_share=True))

    @staticmethod
    def _point_alias(session: Session, adapter_id: int, alias: str, version_id: int) -> int | None:
        row = session.scalar(select(AliasRow).where(AliasRow.adapter_id == adapter_id, AliasRow.name == alias))
        previous = None
        if row is None:
            session.add(AliasRow(adapter_id=adapter_id, name=alias, version_id=version_id))
        else:
            previous = row.version_id
            row.version_id, row.updated_at = version_id, utcnow()
        return previous

    def set_alias(self, tenant: str, adapter: str, alias: str, number: int) -> tuple[int | None, int]:
        """Point ``alias`` at version ``number``; returns (previous number or None, number)."""
        with self.sessions.begin() as session:
            version = session.scalar(self._versions().where(
                TenantRow.name == tenant, AdapterRow.name == adapter, VersionRow.number == number))
            if version is None or version.status != "active":
                raise KeyError(f"{tenant}.{adapter}.v{number}")
            self._lock_adapter(session, version.adapter_id)
            previous = self._point_alias(session, version.adapter_id, alias, version.id)
            old = session.get(VersionRow, previous).number if previous else None
            return old, number

    def delete_alias(self, tenant: str, adapter: str, alias: str) -> int:
        """Remove an alias; returns the number it pointed at. KeyError if there is none."""
        with self.sessions.begin() as session:
            row = session.scalar(select(AliasRow).join(AdapterRow, AliasRow.adapter_id == AdapterRow.id)
                                 .join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
                                 .where(TenantRow.name == tenant, AdapterRow.name == adapter,
                                        AliasRow.name == alias))
            if row is None:
                raise KeyError(f"{tenant}.{adapter}@{alias}")
            number = session.get(VersionRow, row.version_id).number
            session.delete(row)
            return number

    # -- lifecycle ---------------------------------------------------------------------------
    def set_status(self, tenant: str, adapter: str, number: int, status: str) -> None:
        """Archive (or re-activate) a version; archiving drops the aliases pointing at it."""
        with self.sessions.begin() as session:
            version = session.scalar(self._versions().where(
                TenantRow.name == tenant, AdapterRow.name == adapter, VersionRow.number == number))
            if version is None:
                raise KeyError(f"{tenant}.{adapter}.v{number}")
            version.status = status
            if status != "active":
                for alias in session.scalars(select(AliasRow).where(AliasRow.version_id == version.id)):
                    session.delete(alias)

    def delete_version(self, tenant: str, adapter: str, number: int) -> None:
        """Remove a version's rows (metrics, aliases); the caller deletes its files after."""
        with self.sessions.begin() as session:
            version = session.scalar(self._versions().where(
                TenantRow.name == tenant, AdapterRow.name == adapter, VersionRow.number == number))
            if version is None:
                raise KeyError(f"{tenant}.{adapter}.v{number}")
            for table in (AliasRow, MetricRow):
                for row in session.scalars(select(table).where(table.version_id == version.id)):
                    session.delete(row)
            session.delete(version)

    def rebuild(self, versions: list[tuple[str, str, int, dict, int, str]],
                aliases: dict[tuple[str, str], dict[str, int]],
                taken: dict[tuple[str, str], set[int]] | None = None) -> None:
        """Replace every version, metric and alias row in ONE transaction (reindex).

        ``versions``: (tenant, adapter, number, manifest, size, status). A failure anywhere
        rolls back to the catalog as it was. Tokens, usage and allocated numbers stay, and every
        number in ``taken`` is allocated (a number is never reused).
        """
        from farm.registry.names import serve_name

        with self.sessions.begin() as session:
            for table in (AliasRow, MetricRow, VersionRow):
                session.query(table).delete()
            ids: dict[tuple[str, str, int], tuple[int, int]] = {}
            for tenant, adapter, number, manifest, size, status in versions:
                row = self._get_or_create(session, tenant, adapter)
                if session.scalar(select(NumberRow.id).where(NumberRow.adapter_id == row.id,
                                                             NumberRow.number == number)) is None:
                    session.add(NumberRow(adapter_id=row.id, number=number))
                lineage = manifest.get("lineage") or {}
                version = VersionRow(
                    adapter_id=row.id, number=number, serve_name=serve_name(tenant, adapter, number),
                    base_model=manifest["base_model"], method=manifest["method"],
                    rank=(manifest.get("method_settings") or {}).get("r"),
                    servable_by_vllm=manifest["servable_by_vllm"],
                    not_servable_reason=manifest.get("not_servable_reason"),
                    sweep_id=lineage.get("sweep_id"), dataset_fingerprint=lineage.get("dataset_fingerprint"),
                    size_bytes=size, manifest=manifest, status=status,
                    created_at=datetime.fromisoformat(manifest["created_at"]))
                session.add(version)
                session.flush()
                ids[(tenant, adapter, number)] = (row.id, version.id)
                for name, value in (manifest.get("metrics") or {}).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        session.add(MetricRow(version_id=version.id, name=name, value=float(value)))
            for (tenant, adapter), numbers in (taken or {}).items():  # folders that did not parse too
                row = self._get_or_create(session, tenant, adapter)
                have = set(session.scalars(select(NumberRow.number).where(NumberRow.adapter_id == row.id)))
                for number in sorted(numbers - have):
                    session.add(NumberRow(adapter_id=row.id, number=number))
            for (tenant, adapter), pointers in aliases.items():
                for alias, number in pointers.items():
                    adapter_id, version_id = ids[(tenant, adapter, number)]
                    session.add(AliasRow(adapter_id=adapter_id, name=alias, version_id=version_id))

    # -- tokens ------------------------------------------------------------------------------
    def create_token(self, tenant: str | None, label: str = "", expires_at: datetime | None = None) -> str:
        """A new API token for ``tenant`` (None: admin), valid until ``expires_at`` if given.

        256 random bits; only the token's sha256 is stored.
        """
        token = "farm_" + secrets.token_urlsafe(32)
        with self.sessions.begin() as session:
            session.add(TokenRow(token_hash=hash_token(token), tenant=tenant, label=label, expires_at=expires_at))
        return token

    def list_tokens(self) -> list[TokenInfo]:
        """Every token's id, owner, label, creation, expiry and revocation (never the token)."""
        with self.sessions() as session:
            rows = session.scalars(select(TokenRow).order_by(TokenRow.id))
            return [TokenInfo(r.id, r.tenant, r.label, r.created_at, r.expires_at, r.revoked) for r in rows]

    def revoke_token(self, token_id: int) -> bool:
        """Revoke a token by id (effective on the next lookup); False when there is no such id."""
        with self.sessions.begin() as session:
            result = session.execute(update(TokenRow).where(TokenRow.id == token_id).values(revoked=True))
            return result.rowcount > 0

    def add_token(self, token: str, tenant: str | None, label: str = "") -> None:
        """Record a token chosen elsewhere (for example FARM_REGISTRY_ADMIN_TOKEN) by its hash."""
        with self.sessions.begin() as session:
            if session.scalar(select(TokenRow).where(TokenRow.token_hash == hash_token(token))) is None:
                session.add(TokenRow(token_hash=hash_token(token), tenant=tenant, label=label))

    def has_admin_token(self) -> bool:
        """Whether any unrevoked admin token exists."""
        with self.sessions() as session:
            return session.scalar(select(TokenRow.id).where(TokenRow.tenant.is_(None),
                                                            TokenRow.revoked.is_(False)).limit(1)) is not None

    def principal(self, token: str) -> Principal | None:
        """Who a bearer token belongs to (None for unknown, revoked or expired tokens).

        One indexed query on a pooled connection, no ORM session: the registry API runs it on
        every request, so that a revocation counts from the next one.
        """
        with self.engine.connect() as connection:
            row = connection.execute(select(TokenRow.tenant, TokenRow.expires_at).where(
                TokenRow.token_hash == hash_token(token), TokenRow.revoked.is_(False))).first()
        if row is None:
            return None
        tenant, expires = row
        if expires is not None:
            expires = expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
            if expires <= utcnow():
                return None
        return Principal(tenant)

    # -- usage -------------------------------------------------------------------------------
    def add_usage(self, deltas: list[UsageDelta]) -> None:
        """Add metered counters (one transaction; rows are created on first use)."""
        if not deltas:
            return
        # another gateway created the same row first: add again
        for attempt in _lost_races(5, (IntegrityError,)):
            with attempt, self.sessions.begin() as session:
                for delta in deltas:
                    row = session.scalar(select(UsageRow).where(
                        UsageRow.tenant == delta.tenant, UsageRow.model == delta.model,
                        UsageRow.base_model == delta.base_model, UsageRow.hour == delta.hour))
                    if row is None:
                        row = UsageRow(tenant=delta.tenant, model=delta.model, base_model=delta.base_model,
                                       hour=delta.hour, requests=0, errors=0, prompt_tokens=0,
                                       completion_tokens=0, trained_tokens=0)
                        session.add(row)
                    row.requests += delta.requests
                    row.errors += delta.errors
                    row.prompt_tokens += delta.prompt_tokens
                    row.completion_tokens += delta.completion_tokens
                    row.trained_tokens += delta.trained_tokens

    def usage(self, tenant: str | None = None, since: datetime | None = None,
              until: datetime | None = None) -> list[dict[str, Any]]:
        """Summed usage per (tenant, model, base model) over ``[since, until)`` hours."""
        query = select(UsageRow.tenant, UsageRow.model, UsageRow.base_model,
                       func.sum(UsageRow.requests), func.sum(UsageRow.errors),
                       func.sum(UsageRow.prompt_tokens), func.sum(UsageRow.completion_tokens),
                       func.sum(UsageRow.trained_tokens))
        if tenant is not None:
            query = query.where(UsageRow.tenant == tenant)
        if since is not None:
            query = query.where(UsageRow.hour >= since)
        if until is not None:
            query = query.where(UsageRow.hour < until)
        query = query.group_by(UsageRow.tenant, UsageRow.model, UsageRow.base_model).order_by(
            UsageRow.tenant, UsageRow.model)
        with self.engine.connect() as connection:
            return [{"tenant": t, "model": m, "base_model": b, "requests": int(r), "errors": int(e),
                     "prompt_tokens": int(p), "completion_tokens": int(c), "trained_tokens": int(x or 0)}
                    for t, m, b, r, e, p, c, x in connection.execute(query)]

    def stats(self) -> dict[str, Any]:
        with self.sessions() as session:
            return {"tenants": session.scalar(select(func.count(TenantRow.id))),
                    "versions": session.scalar(select(func.count(VersionRow.id)))}

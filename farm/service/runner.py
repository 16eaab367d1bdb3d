"""``farm service``: warm pools that train the fine-tuning API's jobs, fairly, durably.

    farm gateway --config gateway.yaml          # the API tenants call (farm.service.api)
    ray job submit -- farm service --config service.yaml     # or run it directly: local Ray

The gateway writes files and jobs into the registry's catalog; this driver reads them from
there, so the two never talk directly and either can restart alone. Its loop, every
``poll_s``:

1. **validate** new jobs (``validating_files``) on a thread: the training file through the
   farm's whole data pipeline with the base's tokenizer (lengths, split, rows), then the request
   becomes a ``TenantJob`` (``farm.service.requests``) stored in the job's row -> ``queued``;
2. **schedule** fairly: while a pool is free, tenants take turns (``next_job``: fewest jobs
   running, then longest since its last start; at most ``running_per_tenant`` each), so one
   tenant's hundred jobs never starve another's one; a started job goes to the pools' queue
   -> ``running``. Checking files takes turns the same way;
3. **follow** the pools: step events become the job's metrics events, a cancel request stops
   the job after its current step, a finished job is published to the registry (its serve
   name is the job's ``fine_tuned_model``, servable at once), metered to its tenant (trained
   tokens) -> ``succeeded``; a failed one gets its error -> ``failed``.

The pools are the sweep's single-tenant pools (``farm.train.adapter.ray_pool_loop``): long-
running Ray Train trainers whose workers keep the base loaded between jobs. Each job's
checkpoints go to ``<storage>/pooled/<job id>/``: a job that was running when the service
stopped (or was killed) goes back to ``queued`` at the next start and resumes from its newest
checkpoint, to the adapter an uninterrupted run makes.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
import time
from collections import Counter, deque
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import yaml
from pydantic import Field, ValidationError

from farm.spec import (BaseModelSpec, JobSettings, RegistrySpec, ResourceSpec, StrictModel, TenantJob,
                       _resolve_base_model, resolve_path)

logger = logging.getLogger("farm.service")

DEFAULT_ADAPTER = "ft"  # the registry adapter name of a job without a suffix


class ServiceConfig(StrictModel):
    """``service.yaml``: what the service trains on, how, and with how many pools."""

    base_model: BaseModelSpec = Field(..., description="the base every job trains on; the gateway's base with "
                                                       "the same base_model offers it")
    registry: RegistrySpec = Field(..., description="the registry the gateway reads: jobs, files, adapters")
    storage: str = Field(".farm/service", description="checkpoints and handed-off adapters (folder or s3://...)")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="each pool's workers")
    pools: int = Field(1, ge=1, description="pools training at once (each trains one job at a time)")
    running_per_tenant: int = Field(1, ge=1, description="most jobs of one tenant training at once")
    defaults: JobSettings = Field(default_factory=JobSettings, description="settings a request leaves open")
    max_steps: int = Field(10_000, ge=1, description="most optimizer steps one job may ask for (max_steps, or "
                           "n_epochs x its training rows): one tenant cannot hold a pool for days")
    poll_s: float = Field(0.2, gt=0, le=10, description="seconds between the loop's rounds")


class ServiceConfigError(ValueError):
    """A service file that does not parse, with the field path and reason."""


def load_service_config(path: Path) -> ServiceConfig:
    """Read ``service.yaml``; local paths in it are relative to the file; a catalog URL left
    out comes from ``$FARM_REGISTRY_CATALOG`` (as for the gateway: it carries a password)."""
    from farm.serving.gateway_config import with_catalog_from_env

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ServiceConfigError(f"{path}: {exc}") from None
    try:
        config = ServiceConfig.model_validate(with_catalog_from_env(raw) if isinstance(raw, dict) else raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ServiceConfigError(f"{path}: {problems}") from None
    folder = Path(path).resolve().parent
    registry = config.registry.model_copy(update={"store": resolve_path(config.registry.store, folder)})
    return config.model_copy(update={"base_model": _resolve_base_model(config.base_model, folder),
                                     "registry": registry, "storage": resolve_path(config.storage, folder)})


def next_job(queued: list, running: Counter, per_tenant: int, last_start: dict[str, float] | None = None):
    """The fair pick among ``queued`` jobs (oldest first; each has ``tenant``).

    Tenants take turns: first the tenant with the fewest jobs ``running``, then the one whose
    last job started longest ago (``last_start``: tenant -> time; a tenant never started
    comes first), then the one whose oldest job waited longest. Tenants at ``per_tenant``
    running jobs wait. So a tenant with one job starts it at the next free slot even behind
    another tenant's hundred. None when nobody may start one.
    """
    last_start = last_start or {}
    first: dict[str, object] = {}
    for job in queued:
        first.setdefault(job.tenant, job)
    allowed = [(running[tenant], last_start.get(tenant, float("-inf")), index, job)
               for index, (tenant, job) in enumerate(first.items()) if running[tenant] < per_tenant]
    return min(allowed, key=lambda item: item[:3])[3] if allowed else None


class FineTuningService:
    """The driver: pools on Ray, the catalog's jobs, and the loop that joins them."""

    def __init__(self, config: ServiceConfig):
        from farm.registry import open_registry
        from farm.service.records import ServiceRecords

        self.config = config
        self.registry = open_registry(config.registry.store, config.registry.catalog)
        self.records = ServiceRecords(self.registry.catalog)
        self.base = config.base_model.name_or_path
        self.storage = config.storage.rstrip("/")
        self.tenants_dir = f"{self.storage}/pooled"
        self.handed_off = Path(self.storage if "://" not in self.storage else "/tmp/farm-service") / "handed-off"
        self.inflight: dict[str, dict] = {}  # job id -> {"tenant", "job"}: in the pools' queue or training
        self.last_step: dict[str, int] = {}
        self.last_start: dict[str, float] = {}  # tenant -> when its last job started (turns)
        self._validating: set[str] = set()
        self._checked: queue_module.Queue = queue_module.Queue()
        # Jobs waiting for the checker, per tenant, served round-robin: checking is fair too.
        self._to_check: dict[str, deque] = {}
        self._check_turns: deque[str] = deque()
        self._check_ready = threading.Condition()
        self._pools: dict = {}  # Ray ref -> pool name
        self._pool_count = 0

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Put jobs a stopped service left running back in line, start the checker and the pools."""
        from farm.pools import queue_actor
        from farm.trainers import pool_task, progress_board

        for row in self.records.service_jobs(self.base, ("running",)):
            self.records.move(row.id, ("running",), "queued", "The service restarted: the job resumes from its "
                                                              "latest checkpoint when a pool takes it")
        threading.Thread(target=self._check_files, name="farm-service-check", daemon=True).start()
        self.queue = queue_actor([])
        self.board = progress_board()
        self._task = pool_task(_pool_task)
        for _ in range(self.config.pools):
            self._start_pool()

    def _start_pool(self) -> None:
        from farm.trainers import trainer_resources

        self._pool_count += 1
        name = f"service-pool-{self._pool_count}"
        ref = self._task.remote(trainer_resources(self.config.resources), self.storage, name, self.queue,
                                self.config.resources.max_retries, self.board, self.config.poll_s)
        self._pools[ref] = name

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set (SIGTERM, Ctrl-C)."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.round()
            except Exception:  # one bad round (a database blip) must not end the service
                logger.exception("service round failed; retrying")
            stop.wait(max(0.0, self.config.poll_s - (time.monotonic() - started)))

    def round(self) -> None:
        import ray

        self._queue_new_checks()
        self._take_checked()
        state = ray.get(self.queue.state.remote())
        self._follow_progress()
        self._hand_off(state)
        self._cancel_requested()
        self._pools_ended(state)
        self._schedule()

    # -- 1. validation -----------------------------------------------------------------------
    def _queue_new_checks(self) -> None:
        for row in self.records.service_jobs(self.base, ("validating_files",)):
            if row.id not in self._validating:
                self._validating.add(row.id)
                self.records.add_event(row.id, "Validating training file: " + row.training_file)
                with self._check_ready:
                    if row.tenant not in self._to_check:
                        self._to_check[row.tenant] = deque()
                        self._check_turns.append(row.tenant)
                    self._to_check[row.tenant].append(row)
                    self._check_ready.notify()

    def _next_check(self):
        """The next job to check: tenants take turns (one tenant's 100 new jobs do not hold
        up another's one here either)."""
        with self._check_ready:
            while not self._check_turns:
                self._check_ready.wait()
            tenant = self._check_turns.popleft()
            rows = self._to_check[tenant]
            row = rows.popleft()
            if rows:
                self._check_turns.append(tenant)
            else:
                del self._to_check[tenant]
            return row

    def _check_files(self) -> None:
        """The checker thread: one job's files at a time (tokenizing can take a while)."""
        from farm.models import load_tokenizer

        tokenizer = None
        while True:
            row = self._next_check()
            try:
                tokenizer = tokenizer or load_tokenizer(self.config.base_model)
                self._checked.put((row, self.resolve_job(row, tokenizer), None))
            except _JobRefused as exc:
                self._checked.put((row, None, exc.error))
            except Exception as exc:  # a checker bug fails this job only, with the reason
                logger.exception("checking %s failed", row.id)
                self._checked.put((row, None, {"code": "server_error", "param": None,
                                               "message": f"the service could not check the files: "
                                                          f"{type(exc).__name__}: {exc}"}))

    def resolve_job(self, row, tokenizer) -> TenantJob:
        """The ``TenantJob`` a job trains: its files through the data pipeline, its request
        over the service's defaults; ``_JobRefused`` with OpenAI's error object otherwise."""
        from farm.data import DataError, load_tenant_data
        from farm.service.requests import RequestError, read_request

        training = self.records.file(row.tenant, row.training_file)
        if training is None:
            raise _JobRefused("invalid_training_file", "training_file", f"file {row.training_file} was deleted")
        uri = self.registry.store.tenant_file_uri(training.store_path)
        data = self.config.defaults.data.model_copy(update={"path": uri, "format": "auto"})
        if row.validation_file is not None:
            validation = self.records.file(row.tenant, row.validation_file)
            if validation is None:
                raise _JobRefused("invalid_validation_file", "validation_file",
                                  f"file {row.validation_file} was deleted")
            data = data.model_copy(update={"eval_path": self.registry.store.tenant_file_uri(validation.store_path)})
        defaults = self.config.defaults.model_copy(update={"data": data})
        try:
            loaded = load_tenant_data(row.tenant, data, tokenizer)
        except DataError as exc:  # name the tenant's file by its id, never by where the store keeps it
            param = "validation_file" if row.validation_file and exc.source == data.eval_path else "training_file"
            file_id = row.validation_file if param == "validation_file" else row.training_file
            where = f"{file_id} {exc.location}" if exc.location else file_id
            what = f"field '{exc.field}': " if exc.field else ""
            raise _JobRefused(f"invalid_{param}", param, f"{where}: {what}{exc.reason}") from None
        try:
            settings = read_request(row.request).settings(defaults, loaded.report.train_rows)
        except RequestError as exc:
            raise _JobRefused("invalid_request", exc.param, str(exc)) from None
        if settings.train.max_steps > self.config.max_steps:
            raise _JobRefused("invalid_request", "hyperparameters",
                              f"hyperparameters: {settings.train.max_steps:,} steps ({loaded.report.train_rows:,} training "
                              f"rows) are more than this service trains in one job ({self.config.max_steps:,}); ask for "
                              "fewer epochs or split the file")
        adapter = row.request.get("suffix") or DEFAULT_ADAPTER
        return TenantJob(tenant=row.tenant, adapter=adapter, base_model=self.config.base_model, settings=settings,
                         output_dir="(set by the pool)", run_id=row.id)

    def _take_checked(self) -> None:
        while not self._checked.empty():
            row, job, error = self._checked.get()
            self._validating.discard(row.id)
            if error is not None:
                self.records.move(row.id, ("validating_files",), "failed", f"Files could not be validated: "
                                  f"{error['message']}", level="error", error=error)
                continue
            self.records.move(row.id, ("validating_files",), "queued", "Files validated, moving job to queued state",
                              job=job.model_dump())

    # -- 2. scheduling -----------------------------------------------------------------------
    def _schedule(self) -> None:
        free = self.config.pools - len(self.inflight)
        if free <= 0:
            return
        queued = self.records.service_jobs(self.base, ("queued",))
        running = Counter(job["tenant"] for job in self.inflight.values())
        while free > 0 and queued:
            row = next_job(queued, running, self.config.running_per_tenant, self.last_start)
            if row is None:
                return
            queued.remove(row)
            now = datetime.now(timezone.utc)
            if not self.records.move(row.id, ("queued",), "running", "Fine-tuning job started", started_at=now):
                continue  # cancelled meanwhile
            self.queue.add.remote([row.job])
            self.inflight[row.id] = {"tenant": row.tenant, "job": row.job}
            self.last_start[row.tenant] = time.monotonic()
            running[row.tenant] += 1
            free -= 1

    # -- 3. following the pools ----------------------------------------------------------------
    def _follow_progress(self) -> None:
        import ray

        events, _ = ray.get(self.board.snapshot.remote())
        for job_id, event in events.items():
            if job_id not in self.inflight or event["step"] <= self.last_step.get(job_id, 0):
                continue
            self.last_step[job_id] = event["step"]
            self.records.add_event(
                job_id, f"Step {event['step']}/{event['max_steps']}: training loss={event['loss']:.4f}",
                kind="metrics", data={"step": event["step"], "total_steps": event["max_steps"],
                                      "train_loss": event["loss"], "at": event["time"]})
            finish = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, event["eta_s"]))
            self.records.set_values(job_id, estimated_finish=finish)

    def _hand_off(self, state: dict) -> None:
        from farm.train.ray_support import final_checkpoint

        for job_id in [j for j in self.inflight if j in state["done"]]:
            final = final_checkpoint(f"{self.tenants_dir}/{job_id}")
            if final is None:
                continue  # its upload is still being checked complete: next round
            try:
                self._succeed(job_id, final)
            except Exception as exc:
                logger.exception("publishing %s failed", job_id)
                self.records.move(job_id, ("running",), "failed", "Publishing the adapter failed", level="error",
                                  error={"code": "server_error", "param": None, "message": f"publishing failed: {exc}"})
            self._forget(job_id)
        for job_id in [j for j in self.inflight if j in state["errors"]]:
            status, error = state["statuses"].get(job_id, "failed"), state["errors"][job_id]
            if status == "cancelled":
                self.records.move(job_id, ("running",), "cancelled", "Fine-tuning job cancelled")
            else:
                code = "invalid_training_file" if status == "invalid" else "training_failed"
                self.records.move(job_id, ("running",), "failed", f"Fine-tuning job failed: {error}", level="error",
                                  error={"code": code, "param": "training_file" if status == "invalid" else None,
                                         "message": error})
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        """A job that left the pools: its slot is free, its progress entries go."""
        self.inflight.pop(job_id, None)
        self.last_step.pop(job_id, None)
        self.board.forget.remote(job_id)
        self.queue.forget.remote(job_id)

    def _succeed(self, job_id: str, final) -> None:
        from farm.registry.catalog import UsageDelta
        from farm.sweep import _publish_adapter, publish_outcome

        entry = self.inflight[job_id]
        job = TenantJob.model_validate(entry["job"])
        folder = self.handed_off / job_id
        result = _publish_adapter(final, folder)
        serve = publish_outcome(self.registry, job, folder, sweep_id=job_id, lineage={"fine_tuning_job": job_id},
                                idempotency_key=job_id)  # a retry after a crash gets the same version
        losses = dict(tuple(x) for x in result.get("losses", []))
        for step in self._checkpoint_steps(job_id):
            self.records.add_checkpoint(job_id, step, f"{serve}:ckpt-step-{step}",
                                        {"step": step, "train_loss": losses.get(step)})
        self.records.add_checkpoint(job_id, result["steps"], serve, {
            "step": result["steps"], "train_loss": losses.get(result["steps"]),
            "valid_loss": result["eval_loss_after"], "full_valid_loss": result["eval_loss_after"]})
        self.records.add_event(job_id, f"New fine-tuned model created: {serve}")
        now = datetime.now(timezone.utc)
        self.registry.catalog.add_usage([UsageDelta(job.tenant, serve, job.base_model.name_or_path,
                                                    now.replace(minute=0, second=0, microsecond=0),
                                                    trained_tokens=int(result["tokens"]))])
        self.records.move(job_id, ("running",), "succeeded", "The job has successfully completed",
                          fine_tuned_model=serve, trained_tokens=int(result["tokens"]))

    def _checkpoint_steps(self, job_id: str) -> list[int]:
        from farm.train.ray_support import checkpoint_folders

        names = checkpoint_folders(f"{self.tenants_dir}/{job_id}")
        return [int(n.removeprefix("checkpoint-")) for n in names if n.removeprefix("checkpoint-").isdigit()]

    def _cancel_requested(self) -> None:
        for job_id in self.records.cancel_requested(list(self.inflight)):
            self.queue.cancel.remote(job_id)

    def _pools_ended(self, state: dict) -> None:
        """A pool whose retries ran out: its unfinished job fails with the reason, a new pool
        takes its place (the service keeps its pools warm)."""
        import ray

        if not self._pools:
            return
        ready, _ = ray.wait(list(self._pools), num_returns=len(self._pools), timeout=0)
        for ref in ready:
            name = self._pools.pop(ref)
            outcome = ray.get(ref)
            for job_id, pool in state["taken"].items():
                if pool == name and job_id in self.inflight and job_id not in state["done"]:
                    reason = outcome.get("error") or "its pool ended"
                    self.records.move(job_id, ("running",), "failed", f"Fine-tuning job failed: {reason}",
                                      level="error", error={"code": "training_failed", "param": None,
                                                            "message": reason})
                    self._forget(job_id)
            logger.warning("%s ended (%s); starting another", name, outcome.get("error"))
            self._start_pool()


class _JobRefused(Exception):
    def __init__(self, code: str, param: Optional[str], message: str):
        super().__init__(message)
        self.error = {"code": code, "param": param, "message": message}


def _pool_task(resources, storage: str, name: str, queue, max_retries: int, board, poll_s: float) -> dict:
    """Ray task body of one service pool: a single-tenant pool that never idles out."""
    from farm.trainers import run_pool

    return run_pool(False, {}, queue, 1, resources, storage, name, max_retries, board,
                    options={"cancellable": True, "poll_s": min(poll_s, 0.5)})


def run_service(config: ServiceConfig, stop: threading.Event | None = None) -> None:
    """Start the pools on the connected Ray cluster and serve jobs until ``stop`` (or SIGTERM)."""
    import signal

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    service = FineTuningService(config)
    service.start()
    logger.info("farm service: %d pool(s) on %s, jobs from %s", config.pools, service.base,
                config.registry.catalog or config.registry.store)
    service.run(stop)


def service_cmd(config: Path, verbose: bool = False) -> int:
    """``farm service --config service.yaml``: join the Ray cluster (or start a local one) and
    serve until SIGTERM or Ctrl-C. Exit code 2: the file is invalid."""
    import sys

    import ray

    try:
        settings = load_service_config(config)
    except ServiceConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    farm_logger = logging.getLogger("farm")
    if not farm_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        farm_logger.addHandler(handler)
    farm_logger.setLevel(logging.INFO)
    # Like the sweep: no dashboard for a local instance (its processes compete with the pools).
    ray.init(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
             include_dashboard=False)
    try:
        run_service(settings)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
    return 0

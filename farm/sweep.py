"""Orchestrate a tenant sweep on Ray: validate, launch, watch, collect, hand off, report.

    ray job submit --working-dir . -- python jobs/tenant_sweep.py --config jobs/configs/demo.yaml

The driver (this module) is the single writer of the sweep's output folder. For each tenant
it launches one Ray Train ``TorchTrainer`` from a zero-CPU Ray task, so trainers run side by
side and the cluster's resources decide how many train at once. Each trainer has its own
``ScalingConfig`` (workers, CPUs/GPUs per worker, fractions allowed), ``FailureConfig``
(worker-group restarts that resume from the last checkpoint) and ``RunConfig`` whose
``storage_path`` is shared storage (a folder every node sees, or ``s3://``), so a re-run of
the same sweep id resumes interrupted tenants and skips finished ones.

Layout of ``<output_dir>/<sweep_id>/``::

    <tenant>/adapter/          the final PEFT adapter (safetensors), copied by the driver
    <tenant>/result.json       metrics of the run that produced it (+ its registry serve name)
    report.json, report.md, loss_curves.png    every tenant any run of this sweep id ran (latest outcome)
    .ray/<tenant>/             Ray Train's run folder (checkpoints) unless --storage is given
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from farm.data import DataError, DataReport, load_tenant_data, pipeline_bytes
from farm.models import load_tokenizer
from farm.report import (SweepReport, TenantOutcome, merge_with_previous, print_report, replace_atomically,
                         write_report)
from farm.sizing import Capacity, DoesNotFit, Pack, cluster_capacity, plan_packs, size_baseline, size_adapter
from farm.methods import method_info
from farm.spec import ResolvedSweep, ResourceSpec, SpecError, TenantJob
from farm.sweep_progress import SweepProgress

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
# Trainers queued behind others wait for their workers; Ray Train's default start timeout
# (60 s) would fail them on a busy cluster. A job that can never fit is the planner's to refuse.
WORKER_START_TIMEOUT_S = "3600"


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (the spec says what to train)."""

    sweep_id: str
    tenants: tuple[str, ...] | None = None  # None: every tenant of the spec
    # Tenants training at once (a co-training pack counts its slots); None: as many as the cluster takes
    max_concurrent: int | None = None
    storage: str | None = None              # Ray Train storage root; default: <sweep dir>/.ray
    progress_every_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")


#: A work unit of the sweep: ("tenant", name) trains one tenant alone, ("pack", Pack) co-trains a pack.
Unit = tuple[str, object]


def unit_tenants(unit: Unit) -> int:
    """How many tenants a work unit trains at once: one alone, a pack's slots for a pack
    (its queue refills them as tenants finish, so never more)."""
    kind, item = unit
    return item.slots if kind == "pack" else 1


def admit(queue: list[Unit], training: int, limit: int) -> list[Unit]:
    """Take from ``queue`` (in order, first fit) the units that can start while ``training``
    tenants train, keeping tenants training at once within ``limit``; returns them, removed
    from ``queue``. A unit larger than the limit (the planner never makes one) starts alone
    once nothing trains, so the sweep cannot stall on it."""
    taken: list[Unit] = []
    for unit in list(queue):
        if training + unit_tenants(unit) <= limit:
            taken.append(unit)
            training += unit_tenants(unit)
            queue.remove(unit)
    if not taken and training == 0 and queue:
        taken.append(queue.pop(0))
    return taken


@dataclass(frozen=True)
class TrainerResources:
    """What one tenant's trainer asks Ray for (a plain object, tested without a cluster)."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    accelerator_type: str | None
    torch_threads: int
    backend: str = "auto"

    def scaling_config(self):
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker=self.resources_per_worker,
                             accelerator_type=self.accelerator_type)

    def torch_config(self):
        """NCCL when the workers have GPUs, gloo otherwise, unless the spec names one (a cluster
        whose GPUs are only logical, like the fake autoscaling cluster of the tests, needs gloo)."""
        from ray.train.torch import TorchConfig

        backend = self.backend if self.backend != "auto" else ("nccl" if self.use_gpu else "gloo")
        return TorchConfig(backend=backend)

    def demand(self) -> list[dict[str, float]]:
        """The bundles this trainer's workers ask for, as the autoscaler sees them."""
        bundle = {k: v for k, v in self.resources_per_worker.items() if k in ("CPU", "GPU")}
        if self.accelerator_type:
            bundle[f"accelerator_type:{self.accelerator_type}"] = 0.001  # Ray's own marker resource
        return [dict(bundle) for _ in range(self.num_workers)]


def trainer_resources(resources: ResourceSpec) -> TrainerResources:
    """Translate the spec's resources into a trainer's request.

    Fractional GPUs (for example 0.25) let Ray place several small LoRA jobs on one device;
    a job with several workers needs a whole device per worker, since NCCL refuses two ranks
    on one GPU ("Duplicate GPU detected").
    """
    gpus = resources.gpus_per_worker
    if gpus == "auto":
        raise ValueError("resources.gpus_per_worker 'auto' must be resolved by the planner (farm.sizing) first")
    if resources.workers > 1 and 0 < gpus < 1:
        raise ValueError(f"resources: {resources.workers} workers with gpus_per_worker={gpus} could "
                         "share one GPU, which NCCL refuses; use whole GPUs for multi-worker jobs")
    per_worker = {"CPU": resources.cpus_per_worker}
    if gpus:
        per_worker["GPU"] = gpus
    if resources.memory_per_worker:
        per_worker["memory"] = resources.memory_per_worker  # Ray packs workers by memory too
    return TrainerResources(num_workers=resources.workers, use_gpu=gpus > 0,
                            resources_per_worker=per_worker, accelerator_type=resources.accelerator_type,
                            torch_threads=max(1, int(resources.cpus_per_worker)), backend=resources.backend)


def sweep_dir(sweep: ResolvedSweep, sweep_id: str) -> Path:
    """The sweep's output folder: ``<output_dir>/<sweep_id>``."""
    return Path(sweep.spec.output_dir) / sweep_id


def finished_outcome(folder: Path, tenant: str) -> TenantOutcome | None:
    """A tenant's outcome from an earlier run of this sweep id, if its adapter is there."""
    result_file, adapter = folder / tenant / RESULT_FILE, folder / tenant / ADAPTER_DIR
    if not (result_file.is_file() and (adapter / "adapter_model.safetensors").is_file()):
        return None
    result = json.loads(result_file.read_text())
    return TenantOutcome(
        tenant=tenant, status="skipped", steps=result["steps"], tokens=result["tokens"],
        wall_seconds=0.0, eval_loss_before=result["eval_loss_before"],
        eval_loss_after=result["eval_loss_after"], adapter_bytes=result["adapter_bytes"],
        adapter_dir=str(adapter), serve_name=result.get("serve_name"),
        losses=[tuple(x) for x in result.get("losses", [])])


def publish_outcome(registry, job: TenantJob, folder: Path, sweep_id: str) -> str:
    """Publish a handed-off adapter with its metrics and lineage; returns its serve name.

    The serve name is written back into ``result.json``, so a re-run does not publish twice.
    """
    result_file = folder / RESULT_FILE
    result = json.loads(result_file.read_text())
    if result.get("serve_name"):
        return result["serve_name"]
    metrics = {key: result[key] for key in ("eval_loss_before", "eval_loss_after", "steps", "tokens",
                                            "train_seconds", "tokens_per_s", "trainable_params",
                                            "peak_memory_bytes", "padding_share") if key in result}
    info = registry.publish(
        job.tenant, job.adapter, folder / ADAPTER_DIR, base_model=job.base_model.name_or_path,
        metrics=metrics, method=job.settings.method,
        training={"method": job.settings.method, "method_settings": job.settings.method_settings().model_dump(),
                  "train": job.settings.train.model_dump(), "data": job.settings.data.model_dump(),
                  "precision": result.get("precision"), "device": result.get("device")},
        lineage={"dataset_fingerprint": result.get("dataset_fingerprint"), "sweep_id": sweep_id,
                 "dataset": job.settings.data.path, "resumed_from_step": result.get("resumed_from_step")})
    result["serve_name"] = info.serve_name
    replace_atomically(result_file, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return info.serve_name


def check_methods_can_run(sweep: ResolvedSweep, tenants: list[str], capacity: Capacity) -> None:
    """Refuse the spec (``SpecError``) when a tenant's method needs CUDA and its trainers
    would get no GPU (QLoRA on a CPU cluster, or with ``gpus_per_worker: 0``)."""
    problems = []
    for name in tenants:
        info = method_info(sweep.job(name).settings.method)
        if info.needs_cuda and capacity.kind != "gpu":
            problems.append(f"tenant {name!r}: method {info.name}: {info.needs_cuda}, and this sweep's "
                            f"workers get no GPU ({capacity.describe()}; resources.gpus_per_worker "
                            f"{sweep.spec.resources.gpus_per_worker!r})")
    if problems:
        raise SpecError(sweep.source, problems)


def validate_tenants(sweep: ResolvedSweep, tenants: list[str]) -> tuple[dict[str, str], dict[str, DataReport]]:
    """Check every tenant's data up front: (tenant -> error for the invalid ones, tenant ->
    data report for the others). Anything not used as is (skipped, dropped, truncated) is printed."""
    tokenizer = load_tokenizer(sweep.spec.base_model)
    errors: dict[str, str] = {}
    reports: dict[str, DataReport] = {}
    for name in tenants:
        try:
            report = reports[name] = load_tenant_data(name, sweep.job(name).settings.data, tokenizer).report
        except DataError as exc:
            errors[name] = str(exc)
            continue
        if report.skipped or report.dropped or report.truncated:
            logger.info(report.summary())
    return errors, reports


def _publish_adapter(checkpoint, destination: Path) -> dict:
    """Copy the final checkpoint's adapter and result into ``destination`` (atomic rename)."""
    destination.mkdir(parents=True, exist_ok=True)
    tmp = destination / f".tmp-{uuid.uuid4().hex[:8]}"
    with checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / ADAPTER_DIR, tmp)
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
    final = destination / ADAPTER_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    result["adapter_dir"] = str(final)
    # result.json last: a tenant counts as finished only once it is there.
    (destination / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt|Exit))(: .*)?$")


def error_summary(exc: BaseException) -> str:
    """The root cause of a failed trainer in a line or three: the innermost exception line
    of the worker's traceback (Ray wraps it in WorkerGroupError) and what follows it."""
    cause = exc
    while getattr(cause, "__cause__", None) is not None:
        cause = cause.__cause__
    lines = [line.rstrip() for line in str(cause).splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[index]):
            detail = [lines[index].strip()] + [line.strip() for line in lines[index + 1:index + 3]
                                                if not line.strip().startswith("For further information")]
            return " | ".join(detail)[:500]
    last = lines[-1].strip() if lines else ""
    return f"{type(cause).__name__}: {last}"[:500]


def _run_tenant(job: dict, resources: TrainerResources, storage: str, name: str,
                max_retries: int, keep: int, board) -> dict:
    """Ray task body: run one tenant's TorchTrainer and return its outcome (never raises)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from farm.train.adapter import ray_train_loop

    try:
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"job": job, "board": board, "threads": resources.torch_threads,
                               "run_dir": f"{storage.rstrip('/')}/{name}"},
            scaling_config=resources.scaling_config(), torch_config=resources.torch_config(),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_retries),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep)),
        )
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError after the retries, or set-up errors
        return {"ok": False, "error": error_summary(exc), "trace": traceback.format_exc()[-4000:]}
    return {"ok": True, "checkpoint": result.checkpoint, "result": result.return_value}


def _request_resources(bundles: list[dict], console: Console) -> None:
    """Tell the autoscaler the sweep's demand (an empty list releases it). Only a hint: on a
    cluster without an autoscaler it changes nothing."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as exc:  # no autoscaler support here; the trainers' own requests still count
        console.print(f"autoscaler demand not sent: {exc}", markup=False, highlight=False)
        return
    if bundles:
        console.print(f"asked the autoscaler for {len(bundles)} worker bundle(s) up front", markup=False, highlight=False)


def _pack_resources(single: TrainerResources, pack: Pack, packs: int, jobs: list[TenantJob]) -> TrainerResources:
    """A pack's worker request: the planner's memory for all its slots and the CPUs of the
    trainers it replaces (``slots`` x CPUs per worker), within one node and a fair share of the
    cluster's CPUs among the packs, so the shared forward pass has threads to run on."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    cpus = single.resources_per_worker["CPU"]
    share = max(cpus, int(ray.cluster_resources().get("CPU", 0) // max(packs, 1)))
    pack_cpus = max(cpus, min(cpus * pack.slots, max(nodes, default=cpus), share))
    per_worker = {**single.resources_per_worker, "CPU": pack_cpus}
    if "memory" in per_worker:
        # The plan holds one CPU's data pipeline; a pack with more CPUs also runs data workers.
        data = [job.settings.data for job in jobs]
        per_worker["memory"] = (pack.planned_bytes - max(pipeline_bytes(d) for d in data)
                                + max(pipeline_bytes(d, pack_cpus) for d in data))
    return dataclasses.replace(single, resources_per_worker=per_worker, torch_threads=max(1, int(pack_cpus)))


POOLED_DIR = "pooled"  # <storage>/pooled/<tenant>/: a pool's tenant's checkpoints and final adapter


def _run_pack(prototype: dict, queue, slots: int, resources: TrainerResources, storage: str, name: str,
              max_retries: int, board) -> dict:
    """Ray task body: one pool's TorchTrainer (one co-training worker) taking tenants from its
    group's ``queue`` until it runs dry. Returns the tenants that failed (never raises); each
    finished tenant's final adapter is on storage under ``<storage>/pooled/<tenant>``."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from farm.train.cotrain import ray_cotrain_loop

    errors: dict = {}
    failure = None
    try:
        trainer = TorchTrainer(
            ray_cotrain_loop,
            train_loop_config={"prototype": prototype, "queue": queue, "pool": name, "slots": slots, "board": board,
                               "threads": resources.torch_threads,
                               "tenants_dir": f"{storage.rstrip('/')}/{POOLED_DIR}"},
            scaling_config=resources.scaling_config(), torch_config=resources.torch_config(),
            run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_retries)))
        errors = (trainer.fit().return_value or {}).get("errors", {})
    except Exception as exc:  # the pool's retries ran out; tenants that finished before still count
        failure = error_summary(exc)
    return {"errors": errors, "error": failure}


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Latest step event of every tenant, written by rank-0 workers, read by the driver."""

        def __init__(self):
            self.events: dict[str, dict] = {}
            self.first_step: dict[str, float] = {}

        def update(self, tenant: str, event: dict) -> None:
            self.events[tenant] = event
            self.first_step.setdefault(tenant, event["time"])

        def snapshot(self) -> tuple[dict, dict]:
            return self.events, self.first_step

    return ProgressBoard.remote()


def run_sweep(sweep: ResolvedSweep, options: SweepOptions, console: Console | None = None) -> SweepReport:
    """Run (or resume) a sweep on the connected Ray cluster and write its report."""
    import ray

    from farm.pools import queue_actor
    from farm.train.ray_support import final_checkpoint

    # Job logs are not terminals: give the summary table room instead of 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    started = time.time()
    out = sweep_dir(sweep, options.sweep_id)
    out.mkdir(parents=True, exist_ok=True)
    names = list(options.tenants or sweep.jobs)
    for name in names:
        sweep.job(name)  # unknown tenant names fail here, before anything runs
    storage = options.storage.rstrip("/") + f"/{options.sweep_id}" if options.storage else str(out / ".ray")

    registry = None
    if sweep.spec.registry is not None:
        from farm.registry import open_registry

        registry = open_registry(sweep.spec.registry.store, sweep.spec.registry.catalog)

    def hand_off(name: str, outcome: TenantOutcome) -> None:
        """Publish to the registry (the driver is its single writer); failures are the tenant's."""
        if registry is None:
            return
        try:
            outcome.serve_name = publish_outcome(registry, sweep.job(name), out / name, options.sweep_id)
            console.print(f"{name}: published as {outcome.serve_name}", markup=False, highlight=False)
        except Exception as exc:  # a refused or failed publish fails this tenant only
            outcome.status, outcome.error = "failed", f"publish: {exc}"
            console.print(f"{name}: publish failed: {exc}", markup=False, highlight=False)

    outcomes: dict[str, TenantOutcome] = {}
    pending: list[str] = []
    for name in names:
        done = finished_outcome(out, name)
        if done is not None:
            outcomes[name] = done
            console.print(f"[cyan]{name}[/cyan]: finished in an earlier run of sweep "
                          f"{options.sweep_id}; skipped")
            if done.serve_name is None:
                hand_off(name, done)
        else:
            pending.append(name)
    # What the cluster offers decides whether methods that need CUDA can run at all: if not,
    # the whole spec is refused here, before any tenant's data is read or any trainer starts.
    capacity = cluster_capacity(sweep.spec.resources)
    check_methods_can_run(sweep, pending, capacity)
    errors, data_reports = validate_tenants(sweep, pending)
    for name, error in errors.items():
        outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=error)
        console.print(f"{name}: invalid, not started: {error}", markup=False, highlight=False)
        pending.remove(name)

    # The planner sizes every trainer before anything starts; a tenant no device can hold is
    # refused with the numbers, and the others go on.
    console.print(f"cluster: {capacity.describe()}", markup=False, highlight=False)
    resources: dict[str, TrainerResources] = {}
    for name in list(pending):
        try:
            sizing = size_adapter(sweep.job(name), sweep.spec.resources, capacity)
            resources[name] = trainer_resources(sizing.resources)
        except (DoesNotFit, ValueError) as exc:
            outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=str(exc))
            console.print(f"{name}: refused, not started: {exc}", markup=False, highlight=False)
            pending.remove(name)
            continue
        console.print(f"{name}: {sizing.note}", markup=False, highlight=False)

    board = _progress_board() if pending else None
    task = ray.remote(num_cpus=0, max_retries=0)(_run_tenant).options(
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_START_TIMEOUT_S}})
    running: dict = {}
    submitted: dict[str, float] = {}
    progress = SweepProgress(console, pending)
    # Work units: a tenant alone, or a pack of tenants co-trained by one worker (packing: auto).
    units: list[Unit] = [("tenant", name) for name in pending]
    packs: list[Pack] = []
    if sweep.spec.resources.packing == "auto":
        # A baseline tenant's LoRA run trains alone, so the comparison sets one job against one job.
        compared = set(sweep.spec.baseline.tenants) if sweep.spec.baseline else set()
        # Only co-trainable methods (farm.methods) share a batch; the others train alone.
        packable = [n for n in pending if method_info(sweep.job(n).settings.method).co_trainable
                    and sweep.spec.resources.workers == 1 and n not in compared]
        alone = [f"{n} ({sweep.job(n).settings.method})" for n in pending
                 if not method_info(sweep.job(n).settings.method).co_trainable]
        if alone:
            console.print(f"train alone, their methods cannot share a batch: {', '.join(alone)}",
                          markup=False, highlight=False)
        if len(packable) > 1:
            packs = plan_packs([sweep.job(n) for n in packable], capacity, options.max_concurrent)
            for pack in packs:
                console.print(pack.note, markup=False, highlight=False)
            units = [("tenant", n) for n in pending if n not in packable] + [("pack", p) for p in packs]
    # One queue per group of packs: its pools take the group's tenants in the planned order
    # (largest first, as plan_packs dealt them), whichever pool has a free slot.
    queues: dict[str, object] = {}
    group_tenants: dict[str, list[str]] = {}
    for group in dict.fromkeys(p.group for p in packs):
        lists = [p.tenants for p in packs if p.group == group]
        group_tenants[group] = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
        # closed: a sweep knows all its tenants, so its pools end as soon as their queue is empty
        queues[group] = queue_actor([sweep.job(t).model_dump() for t in group_tenants[group]], closed=True)
    tenants_dir = f"{storage}/{POOLED_DIR}"
    pack_task = ray.remote(num_cpus=0, max_retries=0)(_run_pack).options(
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_START_TIMEOUT_S}})

    first_step: dict[str, float] = {}  # tenant -> time of its first step (the progress board's)

    def finish_tenant(name: str, final, unit: str, pack: str | None = None) -> None:
        """Copy a finished tenant's final checkpoint into the sweep folder, report and publish it;
        its times count from the submission of ``unit`` (its trainer or its pool)."""
        result = _publish_adapter(final, out / name)
        delay = first_step[name] - submitted[unit] if name in first_step else None
        outcomes[name] = TenantOutcome(
            tenant=name, status="trained", steps=result["steps"], tokens=result["tokens"],
            wall_seconds=round(time.time() - submitted[unit], 2), eval_loss_before=result["eval_loss_before"],
            eval_loss_after=result["eval_loss_after"], adapter_bytes=result["adapter_bytes"],
            adapter_dir=result["adapter_dir"], resumed_from_step=result.get("resumed_from_step"),
            first_step_delay_s=round(delay, 2) if delay is not None else None,
            losses=[tuple(x) for x in result["losses"]], pack=pack, packed_with=result.get("packed_with", []),
            handed_off_s=round(time.time() - started, 2))
        progress.set(name, "trained")
        console.print(f"[green]{name}[/green]: done, eval loss "
                      f"{result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}")
        hand_off(name, outcomes[name])

    def fail_tenant(name: str, status: str, error: str, unit: str, pack: str | None = None) -> None:
        outcomes[name] = TenantOutcome(tenant=name, status=status, wall_seconds=round(time.time() - submitted[unit], 2),
                                       error=error, pack=pack)
        progress.set(name, status)
        console.print(f"{name}: {status}: {error}", markup=False, highlight=False)

    # --max-concurrent counts tenants training at once: a pack counts as many as its slots.
    limit = options.max_concurrent or sum(unit_tenants(u) for u in units) or 1
    if options.max_concurrent and units:
        console.print(f"at most {limit} tenant(s) train at once (--max-concurrent)", markup=False, highlight=False)
    if sweep.spec.resources.request_up_front and units:
        # The autoscaler sees queued work only as it is submitted; asking for the whole first
        # wave at once lets it add every node it needs in one go.
        demand = [bundle for kind, item in admit(list(units), 0, limit)
                  for bundle in resources[item if kind == "tenant" else item.tenants[0]].demand()]
        _request_resources(demand, console)

    with progress:  # a live table on a terminal; lines in a log
        queue = list(units)
        while queue or running:
            for kind, item in admit(queue, sum(unit_tenants(u) for u in running.values()), limit):
                if kind == "tenant":
                    name = item
                    job: TenantJob = sweep.job(name)
                    ref = task.remote(job.model_dump(), resources[name], storage, name, sweep.spec.resources.max_retries,
                                      job.settings.train.keep_checkpoints, board)
                    console.print(f"{name}: submitted ({resources[name].num_workers} worker(s), "
                                  f"{resources[name].resources_per_worker} each)")
                else:
                    pack = item
                    name = pack.name
                    pack_resources = _pack_resources(resources[pack.tenants[0]], pack, len(packs), [sweep.job(t) for t in pack.tenants])
                    per_worker = pack_resources.resources_per_worker
                    ref = pack_task.remote(sweep.job(pack.tenants[0]).model_dump(), queues[pack.group], pack.slots,
                                           pack_resources, storage, name, sweep.spec.resources.max_retries, board)
                    console.print(f"{name}: submitted (a pool of {pack.group}: {', '.join(group_tenants[pack.group])}; "
                                  f"{pack.slots} at a time, {per_worker} per worker)", markup=False, highlight=False)
                running[ref] = (kind, item)
                submitted[name] = time.time()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=options.progress_every_s)
            events, steps_started = ray.get(board.snapshot.remote())
            first_step.update(steps_started)
            progress.update(events)
            # A pool's tenants are handed off the moment their final adapter is on storage, while the
            # pool trains the others: they do not wait for the pool to end.
            # The queue hears of a tenant's end once its final adapter is uploaded, so storage is only
            # looked at for those (and checked complete), not polled for every tenant on every tick.
            for group in {item.group for kind, item in running.values() if kind == "pack"}:
                state = ray.get(queues[group].state.remote())
                for tenant in state["done"]:
                    final = None if tenant in outcomes else final_checkpoint(f"{tenants_dir}/{tenant}")
                    if final is not None:
                        finish_tenant(tenant, final, state["taken"][tenant], pack=state["taken"][tenant])
            for ref in ready:
                kind, item = running.pop(ref)
                outcome = ray.get(ref)
                if kind == "tenant":
                    if outcome["ok"]:
                        finish_tenant(item, outcome["checkpoint"], item)
                    else:
                        fail_tenant(item, "failed", outcome["error"], item)
                    continue
                # A pool: hand off what it finished, report what it took and did not; once no pool of
                # its group is left, a tenant still waiting had nobody to train it.
                name = item.name
                state = ray.get(queues[item.group].state.remote())
                group_left = any(k == "pack" and i.group == item.group for k, i in [*running.values(), *queue])
                for tenant in group_tenants[item.group]:
                    if tenant in outcomes:
                        continue  # handed off while the pool ran
                    mine = state["taken"].get(tenant) == name
                    final = final_checkpoint(f"{tenants_dir}/{tenant}")
                    if final is not None and (mine or tenant not in state["taken"]):
                        finish_tenant(tenant, final, name, pack=name)
                    elif mine or (tenant not in state["taken"] and not group_left):
                        error = state["errors"].get(tenant) or outcome.get("errors", {}).get(tenant) or \
                            outcome.get("error") or ("its pool ended without it" if mine else "no pool was left to take it")
                        status = state["statuses"].get(tenant) or \
                            ("invalid" if tenant in outcome.get("errors", {}) else "failed")
                        fail_tenant(tenant, status, error, name, pack=name if mine else None)

    if sweep.spec.resources.request_up_front and pending:
        _request_resources([], console)  # release: idle nodes may now be removed
    comparison = []
    if sweep.spec.baseline is not None:
        comparison = run_baselines(sweep, [n for n in names if n in sweep.spec.baseline.tenants], out, storage,
                                   capacity, outcomes, console)
    from farm.baseline import method_label

    for name in names:  # sweeps may mix methods: every line says which one
        outcomes[name].method = method_label(sweep.job(name))
        if name in data_reports:  # what its data became, as `farm data check` shows it
            outcomes[name].data = data_reports[name].to_json()
    # The report covers every tenant this sweep id has run: this run's tenants replace their
    # earlier lines, the others keep theirs (errors included), read from the earlier report.json.
    compared = [n for n in names if sweep.spec.baseline and n in sweep.spec.baseline.tenants]
    report = merge_with_previous(
        SweepReport(options.sweep_id, time.time() - started, [outcomes[n] for n in names], comparison),
        out, compared)
    print_report(report, console)
    paths = write_report(report, out)
    console.print("report: " + ", ".join(str(p) for p in paths.values()))
    return report


def run_baselines(sweep: ResolvedSweep, tenants: list[str], out: Path, storage: str, capacity: Capacity,
                  outcomes: dict[str, TenantOutcome], console: Console) -> list:
    """Run the spec's full fine-tuning baselines one after another and compare each with the
    tenant's LoRA run. A baseline that fails or cannot fit is reported and costs no other tenant."""
    from farm.baseline import FULL_DIR, BaselineRun, baseline_job, comparison_row, run_baseline

    baseline = sweep.spec.baseline
    lora_workers = sweep.spec.resources.workers
    rows = []
    for name in tenants:
        job = sweep.job(name)
        done = out / name / FULL_DIR / RESULT_FILE
        try:
            workers, plan = size_baseline(job, baseline, capacity, lora_workers)
            full_job = baseline_job(job, baseline, workers, lora_workers)
        except (DoesNotFit, ValueError) as exc:
            console.print(f"{name}: baseline refused: {exc}", markup=False, highlight=False)
            outcomes[name].baseline_error = str(exc)
            continue
        if done.is_file():
            result = json.loads(done.read_text())
            console.print(f"{name}: full fine-tuning baseline finished in an earlier run; reused")
        else:
            console.print(f"{name}: full fine-tuning baseline, ZeRO-{baseline.zero_stage}, {workers} workers, "
                          f"planned {plan.total_gb:.2f} GB per worker", markup=False, highlight=False)
            run = BaselineRun(storage=storage, destination=out / name, resources=sweep.spec.resources,
                              workers=workers, max_retries=sweep.spec.resources.max_retries)
            outcome = run_baseline(full_job, baseline, run)
            if not outcome["ok"]:
                console.print(f"{name}: baseline failed: {outcome['error']}", markup=False, highlight=False)
                outcomes[name].baseline_error = outcome["error"]
                continue
            result = outcome["result"]
        lora_file = out / name / RESULT_FILE
        if lora_file.is_file():
            rows.append(comparison_row(job, json.loads(lora_file.read_text()), lora_workers))
        rows.append(comparison_row(full_job, result))
    return rows

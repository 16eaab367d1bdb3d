"""Orchestrate a tenant sweep on Ray: validate, launch, watch, collect, hand off, report.

    ray job submit --working-dir . -- python jobs/tenant_sweep.py --config jobs/configs/demo.yaml

The driver (this module) is the single writer of the sweep's output folder. Every tenant
trains in a warm pool (``farm.pools``): a long-running Ray Train ``TorchTrainer``, launched
from a zero-CPU Ray task, whose workers load the base once and take tenants from their group's
queue: co-training pools for small LoRA tenants (``packing: auto``), single-tenant pools for
every other method and for multi-worker tenants. The pools start before any tenant's data is
read; the driver checks the data on a thread meanwhile and queues each valid tenant. Each pool
has its own ``ScalingConfig`` (workers, CPUs/GPUs per worker, fractions allowed) and
``FailureConfig`` (worker-group restarts; every unfinished tenant resumes from its newest
checkpoint), and each tenant's checkpoints go to shared storage (a folder every node sees, or
``s3://``), so a re-run of the same sweep id resumes interrupted tenants and skips finished
ones. A tenant is handed off (copied, published, reported) the moment it finishes.

Layout of ``<output_dir>/<sweep_id>/``::

    <tenant>/adapter/          the final PEFT adapter (safetensors), copied by the driver
    <tenant>/result.json       metrics of the run that produced it (+ its registry serve name)
    report.json, report.md, loss_curves.png    every tenant any run of this sweep id ran (latest outcome)
    .ray/pooled/<tenant>/      its checkpoints and final adapter on storage, unless --storage is given
    .ray/<pool>/               Ray Train's run folder of each pool
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from farm.atomic import replace_file, replacing_folder
from farm.data import DataError, DataReport, load_tenant_data, pipeline_bytes
from farm.models import load_tokenizer
from farm.report import (SweepReport, TenantOutcome, merge_with_previous, print_report, write_report)
from farm.sizing import Capacity, DoesNotFit, Pack, cluster_capacity, plan_packs, size_baseline, size_adapter
from farm.incremental import select_changed, stage_warm_start, training_record
from farm.methods import method_info
from farm.spec import ResolvedSweep, SpecError, TenantJob
from farm.sweep_progress import SweepProgress
from farm.sweep_quality import QUALITY_FILE, QualityStage, promote_if_passed, run_matrix, wants_quality
from farm.trainers import POOLED_DIR, TrainerResources, pool_task, progress_board, trainer_resources

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (the spec says what to train)."""

    sweep_id: str
    tenants: tuple[str, ...] | None = None  # None: every tenant of the spec
    # Tenants training at once (a co-training pack counts its slots); None: as many as the cluster takes
    max_concurrent: int | None = None
    storage: str | None = None              # Ray Train storage root; default: <sweep dir>/.ray
    progress_every_s: float = 5.0
    changed_only: bool = False              # train only tenants changed since their newest version

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")


def admit(queue: list[Pack], training: int, limit: int) -> list[Pack]:
    """Take from ``queue`` (in order, first fit) the pools that can start while ``training``
    tenants train, keeping tenants training at once within ``limit`` (a pool counts its slots:
    its queue refills them as tenants finish, so never more); returns them, removed from
    ``queue``. A pool larger than the limit (the planner never makes one) starts alone once
    nothing trains, so the sweep cannot stall on it."""
    taken: list[Pack] = []
    for pool in list(queue):
        if training + pool.slots <= limit:
            taken.append(pool)
            training += pool.slots
            queue.remove(pool)
    if not taken and training == 0 and queue:
        taken.append(queue.pop(0))
    return taken


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
        losses=[tuple(x) for x in result.get("losses", [])],
        quality=json.loads((folder / tenant / QUALITY_FILE).read_text()) if (folder / tenant / QUALITY_FILE).is_file() else None)


def publish_outcome(registry, job: TenantJob, folder: Path, sweep_id: str, lineage: dict | None = None,
                    idempotency_key: str | None = None) -> str:
    """Publish a handed-off adapter with its metrics and lineage (``lineage``: more of it);
    returns its serve name.

    The serve name is written back into ``result.json``, so a re-run does not publish twice;
    ``idempotency_key`` (the service's job id) makes a retry after a crash between the publish
    and that write get the same version too.
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
        training={**training_record(job), "precision": result.get("precision"), "device": result.get("device")},
        lineage={"dataset_fingerprint": result.get("dataset_fingerprint"), "sweep_id": sweep_id,
                 "dataset": job.settings.data.path, "resumed_from_step": result.get("resumed_from_step"),
                 **({"init_from": job.init_version} if job.init_version else {}), **(lineage or {})},
        idempotency_key=idempotency_key)
    result["serve_name"] = info.serve_name
    replace_file(result_file, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
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


def _publish_adapter(checkpoint, destination: Path) -> dict:
    """Copy the final checkpoint's adapter and result into ``destination`` (atomic rename)."""
    final = destination / ADAPTER_DIR
    with replacing_folder(final) as tmp, checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / ADAPTER_DIR, tmp, dirs_exist_ok=True)
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
    result["adapter_dir"] = str(final)
    # result.json last: a tenant counts as finished only once it is there.
    (destination / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


class UpFrontDemand:
    """The sweep's first wave shown to the autoscaler at once, as placement groups this driver owns.

    The autoscaler sees a trainer's demand only once its workers are requested, seconds after
    each pool starts; asking for the whole first wave up front lets it add every node in one
    go. ``ray.autoscaler.sdk.request_resources`` would do that too, but its request stands
    until someone clears it, so a driver that dies would hold GPU nodes forever. A placement
    group belongs to its job instead: Ray removes it when the driver ends, however it ends.
    Each group is removed here as soon as it is placed (the nodes are up and the pools' own
    workers take them), and every one left when the sweep ends or fails (``release``).
    """

    def __init__(self, groups: list[list[dict]], console: Console):
        from ray.util.placement_group import placement_group

        created = [placement_group(bundles, strategy="PACK") for bundles in groups if bundles]
        self.placed = {group.ready(): group for group in created}  # ready ref -> group, until removed
        console.print(f"asked the autoscaler for {sum(len(b) for b in groups)} worker bundle(s) up front",
                      markup=False, highlight=False)

    def settle(self) -> None:
        """Remove the groups that are placed: their nodes exist, the pools' workers claim them."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self.placed:
            return
        ready, _ = ray.wait(list(self.placed), num_returns=len(self.placed), timeout=0)
        for ref in ready:
            remove_placement_group(self.placed.pop(ref))

    def release(self) -> None:
        """Remove every group still waiting: no demand outlives the sweep."""
        from ray.util.placement_group import remove_placement_group

        for group in self.placed.values():
            try:
                remove_placement_group(group)
            except Exception:  # already gone with a failed cluster connection: nothing stands
                pass
        self.placed.clear()


def _pack_resources(single: TrainerResources, pack: Pack, packs: int, jobs: list[TenantJob],
                    device_bytes: int | None = None) -> TrainerResources:
    """A pack's worker request: the planner's memory for all its slots and the CPUs of the
    trainers it replaces (``slots`` x CPUs per worker), within one node and a fair share of the
    cluster's CPUs among the packs, so the shared forward pass has threads to run on. On GPUs
    its share of a device is its own plan's (``slots`` adapters on one base), not its first
    tenant's: the whole device when the device's size is unknown."""
    import ray

    from farm.sizing import MAX_JOBS_PER_DEVICE

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    cpus = single.resources_per_worker["CPU"]
    share = max(cpus, int(ray.cluster_resources().get("CPU", 0) // max(packs, 1)))
    pack_cpus = max(cpus, min(cpus * pack.slots, max(nodes, default=cpus), share))
    per_worker = {**single.resources_per_worker, "CPU": pack_cpus}
    if per_worker.get("GPU"):
        per_device = max(1, min(MAX_JOBS_PER_DEVICE, device_bytes // pack.planned_bytes)) \
            if device_bytes and pack.planned_bytes else 1
        per_worker["GPU"] = round(1 / per_device, 4)
    if "memory" in per_worker:
        # The plan holds one CPU's data pipeline; a pack with more CPUs also runs data workers.
        data = [job.settings.data for job in jobs]
        per_worker["memory"] = (pack.planned_bytes - max(pipeline_bytes(d) for d in data)
                                + max(pipeline_bytes(d, pack_cpus) for d in data))
    return dataclasses.replace(single, resources_per_worker=per_worker, torch_threads=max(1, int(pack_cpus)))


def pools_that_fit(resources: TrainerResources, cluster: dict[str, float]) -> int | None:
    """How many trainers of this shape the cluster's resources hold at once (at least one), or
    None when the cluster has none yet of a resource they need (an autoscaling cluster scaled to
    zero: the autoscaler decides). Node boundaries are ignored: Ray's placement has the last word."""
    fits = []
    for key, need in resources.resources_per_worker.items():
        if need <= 0:
            continue
        if cluster.get(key, 0) <= 0:
            return None
        fits.append(int(cluster[key] // (need * resources.num_workers)))
    return max(1, min(fits)) if fits else None


def plan_single_pools(names: list[str], resources: dict[str, TrainerResources], cluster: dict[str, float],
                      max_training: int | None, first_index: int = 1) -> tuple[list[Pack], dict[str, TrainerResources]]:
    """Single-tenant pools for the tenants that train alone (methods that cannot share a batch,
    several workers, baseline tenants, ``packing: off``): one group per trainer shape (workers,
    CPUs, GPUs, accelerator), as many pools per group as the cluster holds at once (within
    ``max_training``, tenants training at once), each asking for the largest memory its group's
    tenants need. Returns the pools and each pool's resources."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        r = resources[name]
        shape = (r.num_workers, r.use_gpu, r.accelerator_type, r.torch_threads, r.backend,
                 tuple(sorted((k, v) for k, v in r.resources_per_worker.items() if k != "memory")))
        groups.setdefault(shape, []).append(name)
    pools: list[Pack] = []
    pool_resources: dict[str, TrainerResources] = {}
    for group_index, members in enumerate(groups.values(), start=1):
        memory = max(resources[n].resources_per_worker.get("memory", 0) for n in members)
        per_worker = {**resources[members[0]].resources_per_worker, **({"memory": memory} if memory else {})}
        shape = dataclasses.replace(resources[members[0]], resources_per_worker=per_worker)
        count = min(len(members), pools_that_fit(shape, cluster) or len(members), max_training or len(members))
        for i in range(count):
            name = f"pool-{first_index + len(pools)}"
            tenants = tuple(members[i::count])
            pools.append(Pack(name, tenants, 1, int(memory), f"{name}: {', '.join(tenants)} (one at a time)",
                              group=f"alone-{group_index}", co_train=False))
            pool_resources[name] = shape
    return pools, pool_resources


def _interleave(lists: list) -> list:
    """The lists' items taken round-robin: the first of each, then the second of each, ..."""
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


def _validate_in_background(sweep: ResolvedSweep, order: list[str]):
    """Check the tenants' data in ``order`` on a driver thread while the pools start; returns a
    queue that receives ``(tenant, error or None, DataReport or None)`` per tenant, then ``None``
    once all are checked."""
    import queue as queue_module
    import threading

    results: queue_module.Queue = queue_module.Queue()

    def check() -> None:
        try:
            tokenizer = load_tokenizer(sweep.spec.base_model)
            for name in order:
                try:
                    report = load_tenant_data(name, sweep.job(name).settings.data, tokenizer).report
                except DataError as exc:
                    results.put((name, str(exc), None))
                    continue
                except Exception as exc:  # a reader bug must not hang the sweep: this tenant fails alone
                    results.put((name, f"{type(exc).__name__}: {exc}", None))
                    continue
                if report.skipped or report.dropped or report.truncated:
                    logger.info(report.summary())
                results.put((name, None, report))
        except Exception as exc:  # the tokenizer itself: every tenant left is refused with the reason
            for name in order:
                results.put((name, f"data checks could not run: {type(exc).__name__}: {exc}", None))
        finally:
            results.put(None)

    thread = threading.Thread(target=check, name="farm-validate", daemon=True)
    thread.start()
    return results


def run_sweep(sweep: ResolvedSweep, options: SweepOptions, console: Console | None = None) -> SweepReport:
    """Run (or resume) a sweep on the connected Ray cluster and write its report.

    Steps: skip tenants finished by an earlier run of the sweep id; size every other tenant and
    plan the pools (co-training packs, single-tenant pools); start the pools on open queues;
    check the tenants' data meanwhile, adding each valid one to its pool's queue; hand off each
    tenant the moment its final adapter is on storage; run the baselines; write the report.
    """
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

    def publish(name: str, outcome: TenantOutcome, quality: dict | None = None) -> None:
        """Publish to the registry (the driver is its single writer), with the tenant's quality
        figures and gate decision in its lineage, and move the gated alias if the gate passed;
        failures are the tenant's."""
        if registry is None:
            return
        try:
            lineage = None
            if quality is not None:
                lineage = {"quality": {key: quality.get(key) for key in ("prompts", "checks", "eval_loss", "engine")},
                           "promotion": quality.get("decision")}
            outcome.serve_name = publish_outcome(registry, sweep.job(name), out / name, options.sweep_id, lineage)
            console.print(f"{name}: published as {outcome.serve_name}", markup=False, highlight=False)
            if quality is not None:
                promote_if_passed(registry, sweep.job(name), outcome.serve_name, quality, console)
        except Exception as exc:  # a refused or failed publish fails this tenant only
            outcome.status, outcome.error = "failed", f"publish: {exc}"
            console.print(f"{name}: publish failed: {exc}", markup=False, highlight=False)

    resources: dict[str, TrainerResources] = {}

    def quality_task_options(name: str) -> dict:
        """A scoring task asks for what one worker of the tenant's trainer asks for."""
        planned = resources.get(name)
        if planned is None:  # finished in an earlier run: sized nowhere this run
            return {"num_cpus": 1}
        per_worker = planned.resources_per_worker
        task = {"num_cpus": per_worker.get("CPU", 1), "num_gpus": per_worker.get("GPU", 0)}
        if planned.accelerator_type:
            task["accelerator_type"] = planned.accelerator_type
        return task

    scoring = QualityStage(sweep, registry, out, console, publish, quality_task_options)

    def hand_off(name: str, outcome: TenantOutcome) -> None:
        """Score the tenant first when its spec asks for quality evals (published once scored),
        else publish it now."""
        if wants_quality(sweep.job(name)):
            scoring.submit(name, outcome)
        else:
            publish(name, outcome)

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
    if options.changed_only:
        if registry is None:
            raise SpecError(sweep.source, ["registry: --changed-only compares each tenant with its newest version, "
                                           "so the spec needs a registry"])
        pending, unchanged = select_changed(sweep, pending, registry, console)
        outcomes.update(unchanged)
    # What the cluster offers decides whether methods that need CUDA can run at all: if not,
    # the whole spec is refused here, before any tenant's data is read or any trainer starts.
    capacity = cluster_capacity(sweep.spec.resources)
    check_methods_can_run(sweep, pending, capacity)

    # The planner sizes every trainer before anything starts (from the spec alone: no data is
    # read yet); a tenant no device can hold is refused with the numbers, and the others go on.
    console.print(f"cluster: {capacity.describe()}", markup=False, highlight=False)
    resolved: dict[str, TenantJob] = {}  # jobs whose shard_base the planner resolved
    for name in list(pending):
        try:
            sizing = size_adapter(sweep.job(name), sweep.spec.resources, capacity)
            resources[name] = trainer_resources(sizing.resources)
            train = sweep.job(name).settings.train
            if train.shard_base != sizing.shard_base:
                settings = sweep.job(name).settings
                resolved[name] = sweep.job(name).model_copy(update={"settings": settings.model_copy(
                    update={"train": train.model_copy(update={"shard_base": sizing.shard_base})})})
        except (DoesNotFit, ValueError) as exc:
            outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=str(exc))
            console.print(f"{name}: refused, not started: {exc}", markup=False, highlight=False)
            pending.remove(name)
            continue
        console.print(f"{name}: {sizing.note}", markup=False, highlight=False)
    for name in list(pending):  # train.init_from: the alias's version, staged where the workers read
        job = resolved.get(name, sweep.job(name))
        if job.settings.train.init_from is None:
            continue
        try:
            if registry is None:
                raise ValueError("train.init_from needs the spec's registry")
            resolved[name] = stage_warm_start(registry, job, storage)
        except Exception as exc:  # this tenant only: the others train
            outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=str(exc))
            console.print(f"{name}: refused, not started: {exc}", markup=False, highlight=False)
            pending.remove(name)
            continue
        if resolved[name].init_version:
            console.print(f"{name}: warm start from {resolved[name].init_version}", markup=False, highlight=False)
    # From here on every job says the layout it trains with (the pools' workers read it).
    sweep = sweep.model_copy(update={"jobs": {**sweep.jobs, **resolved}})

    pools, pool_resources = _plan_pools(sweep, pending, resources, capacity, options, console)
    # One open queue per group: its pools start now and take the group's tenants in the planned
    # order as their data passes the checks, whichever pool has a free slot.
    group_order = {group: _interleave([p.tenants for p in pools if p.group == group])
                   for group in dict.fromkeys(p.group for p in pools)}
    group_of = {tenant: group for group, tenants in group_order.items() for tenant in tenants}
    queues = {group: queue_actor([]) for group in group_order}
    queued: dict[str, list[str]] = {group: [] for group in group_order}  # tenants added to each queue
    tenants_dir = f"{storage}/{POOLED_DIR}"
    board = progress_board() if pools else None
    launch = pool_task()
    running: dict = {}
    submitted: dict[str, float] = {}
    first_step: dict[str, float] = {}  # tenant -> time of its first step (the progress board's)
    progress = SweepProgress(console, pending)

    def finish_tenant(name: str, final, pool: Pack, taken_at: float | None) -> None:
        """Copy a finished tenant's final checkpoint into the sweep folder, report and publish it.
        Its wall time counts from when its pool took it; its first-step delay from its pool's start."""
        result = _publish_adapter(final, out / name)
        delay = first_step[name] - submitted[pool.name] if name in first_step else None
        outcomes[name] = TenantOutcome(
            tenant=name, status="trained", steps=result["steps"], tokens=result["tokens"],
            wall_seconds=round(time.time() - (taken_at or submitted[pool.name]), 2),
            eval_loss_before=result["eval_loss_before"],
            eval_loss_after=result["eval_loss_after"], adapter_bytes=result["adapter_bytes"],
            adapter_dir=result["adapter_dir"], resumed_from_step=result.get("resumed_from_step"),
            first_step_delay_s=round(delay, 2) if delay is not None else None,
            losses=[tuple(x) for x in result["losses"]], pack=pool.name if pool.co_train else None,
            packed_with=result.get("packed_with", []), handed_off_s=round(time.time() - started, 2))
        progress.set(name, "trained")
        console.print(f"[green]{name}[/green]: done, eval loss "
                      f"{result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}")
        hand_off(name, outcomes[name])

    def fail_tenant(name: str, status: str, error: str, pool: Pack | None, taken_at: float | None = None) -> None:
        since = taken_at or (submitted[pool.name] if pool is not None else started)
        outcomes[name] = TenantOutcome(tenant=name, status=status, wall_seconds=round(time.time() - since, 2),
                                       error=error, pack=pool.name if pool is not None and pool.co_train else None)
        progress.set(name, status)
        console.print(f"{name}: {status}: {error}", markup=False, highlight=False)

    # --max-concurrent counts tenants training at once: a pool counts as many as its slots.
    limit = options.max_concurrent or sum(p.slots for p in pools) or 1
    if options.max_concurrent and pools:
        console.print(f"at most {limit} tenant(s) train at once (--max-concurrent)", markup=False, highlight=False)
    demand = None
    if sweep.spec.resources.request_up_front and pools:
        demand = UpFrontDemand([pool_resources[pool.name].demand() for pool in admit(list(pools), 0, limit)], console)
    try:
        # Data checks run on a driver thread while the pools start: their start-up overlaps it.
        checked = _validate_in_background(sweep, _interleave(list(group_order.values()))) if pools else None
        data_reports: dict[str, DataReport] = {}
        checking = pools != []

        def drain_checks() -> None:
            nonlocal checking
            while checking and not checked.empty():
                item = checked.get()
                if item is None:  # every tenant checked: no more will come, pools end once idle
                    checking = False
                    for queue in queues.values():
                        queue.close.remote()
                    break
                name, error, report = item
                if error is not None:
                    outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=error)
                    progress.set(name, "invalid")
                    console.print(f"{name}: invalid, not started: {error}", markup=False, highlight=False)
                    continue
                data_reports[name] = report
                queues[group_of[name]].add.remote([sweep.job(name).model_dump()])
                queued[group_of[name]].append(name)

        waiting = list(pools)
        with progress:  # a live table on a terminal; lines in a log
            while (waiting or running) and (checking or any(n not in outcomes for n in pending)):
                for pool in admit(waiting, sum(p.slots for p in running.values()), limit):
                    ref = launch.remote(pool.co_train, sweep.job(pool.tenants[0]).model_dump(), queues[pool.group],
                                           pool.slots, pool_resources[pool.name], storage, pool.name,
                                           sweep.spec.resources.max_retries, board)
                    what = f"a co-training pool of {pool.group}, {pool.slots} at a time" if pool.co_train else \
                        f"a single-tenant pool of {pool.group}, {pool_resources[pool.name].num_workers} worker(s)"
                    console.print(f"{pool.name}: submitted ({what}: {', '.join(group_order[pool.group])}; "
                                  f"{pool_resources[pool.name].resources_per_worker} per worker)",
                                  markup=False, highlight=False)
                    running[ref] = pool
                    submitted[pool.name] = time.time()
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2 if checking else options.progress_every_s)
                if demand is not None:
                    demand.settle()
                scoring.poll()
                drain_checks()
                events, steps_started = ray.get(board.snapshot.remote())
                first_step.update(steps_started)
                progress.update(events)
                # Tenants are handed off the moment their final adapter is on storage, while their pool
                # trains the others. The queue hears of a tenant's end once its final adapter is
                # uploaded, so storage is only looked at for those (and checked complete).
                live = {p.name: p for p in running.values()}
                for group in {p.group for p in running.values()}:
                    state = ray.get(queues[group].state.remote())
                    for tenant in state["done"]:
                        final = None if tenant in outcomes else final_checkpoint(f"{tenants_dir}/{tenant}")
                        pool = live.get(state["taken"].get(tenant))
                        if final is not None and pool is not None:
                            finish_tenant(tenant, final, pool, state["taken_at"].get(tenant))
                for ref in ready:
                    pool = running.pop(ref)
                    _pool_ended(pool, ray.get(ref), ray.get(queues[pool.group].state.remote()),
                                group_left=checking or any(p.group == pool.group for p in [*running.values(), *waiting]),
                                tenants=queued[pool.group], outcomes=outcomes, tenants_dir=tenants_dir,
                                finish=finish_tenant, fail=fail_tenant)
        for name in pending:  # a group whose pools all ended before its tenants came (cannot happen
            if name not in outcomes:  # while queues are open, but never leave a tenant without a line)
                fail_tenant(name, "failed", "no pool was left to take it", None)
    finally:  # however the loop ends, no demand of this sweep stands
        if demand is not None:
            demand.release()
    scoring.drain()  # every tenant still being scored is published before the report
    matrix = run_matrix(sweep, outcomes, quality_task_options(next(iter(resources), "")), console)
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
        SweepReport(options.sweep_id, time.time() - started, [outcomes[n] for n in names], comparison,
                    matrix=matrix),
        out, compared)
    print_report(report, console)
    paths = write_report(report, out)
    console.print("report: " + ", ".join(str(p) for p in paths.values()))
    return report


def _plan_pools(sweep: ResolvedSweep, pending: list[str], resources: dict[str, TrainerResources],
                capacity: Capacity, options: SweepOptions, console: Console) -> tuple[list[Pack], dict]:
    """Every pending tenant's pool: co-training packs for the co-trainable ones (``packing:
    auto``), single-tenant pools for the others; returns the pools and each one's resources."""
    import ray

    packs: list[Pack] = []
    alone = list(pending)
    if sweep.spec.resources.packing == "auto":
        # A baseline tenant's LoRA run trains alone, so the comparison sets one job against one job.
        compared = set(sweep.spec.baseline.tenants) if sweep.spec.baseline else set()
        # Only co-trainable methods (farm.methods) share a batch; the others train alone.
        packable = [n for n in pending if method_info(sweep.job(n).settings.method).co_trainable
                    and resources[n].num_workers == 1 and n not in compared]
        others = [f"{n} ({sweep.job(n).settings.method})" for n in pending
                  if not method_info(sweep.job(n).settings.method).co_trainable]
        if others:
            console.print(f"train alone, their methods cannot share a batch: {', '.join(others)}",
                          markup=False, highlight=False)
        if len(packable) > 1:
            packs = plan_packs([sweep.job(n) for n in packable], capacity, options.max_concurrent)
            for pack in packs:
                console.print(pack.note, markup=False, highlight=False)
            packed = {t for p in packs for t in p.tenants}
            alone = [n for n in pending if n not in packed]
    pool_resources = {p.name: _pack_resources(resources[p.tenants[0]], p, len(packs), [sweep.job(t) for t in p.tenants],
                                              capacity.device_bytes if capacity.kind == "gpu" else None)
                      for p in packs}
    singles, single_resources = plan_single_pools(alone, resources, ray.cluster_resources(), options.max_concurrent)
    for pool in singles:
        console.print(pool.note, markup=False, highlight=False)
    return packs + singles, {**pool_resources, **single_resources}


def _pool_ended(pool: Pack, outcome: dict, state: dict, group_left: bool, tenants: list[str],
                outcomes: dict[str, TenantOutcome], tenants_dir: str, finish, fail) -> None:
    """A pool's trainer returned: hand off what it finished, fail what it took and did not; once
    no pool of its group is left (or coming), a tenant still waiting had nobody to train it."""
    from farm.train.ray_support import final_checkpoint

    for tenant in tenants:
        if tenant in outcomes:
            continue  # handed off while the pool ran
        mine = state["taken"].get(tenant) == pool.name
        final = final_checkpoint(f"{tenants_dir}/{tenant}")
        if final is not None and (mine or tenant not in state["taken"]):
            finish(tenant, final, pool, state["taken_at"].get(tenant))
        elif mine or (tenant not in state["taken"] and not group_left):
            error = state["errors"].get(tenant) or outcome.get("errors", {}).get(tenant) or \
                outcome.get("error") or ("its pool ended without it" if mine else "no pool was left to take it")
            status = state["statuses"].get(tenant) or ("invalid" if tenant in outcome.get("errors", {}) else "failed")
            fail(tenant, status, error, pool if mine else None, state["taken_at"].get(tenant))


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

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
    run = _SweepRun(sweep, options, console)
    run.skip_finished()
    run.size_tenants()
    run.plan_pools()
    run.run_pools()
    return run.finish()


class _SweepRun:
    """One run of ``run_sweep``: the state its steps share, and one method per step (in the
    order ``run_sweep`` calls them) or per part of a step."""

    def __init__(self, sweep: ResolvedSweep, options: SweepOptions, console: Console | None):
        # Job logs are not terminals: give the summary table room instead of 80 columns.
        self.console = console or Console(width=None if sys.stdout.isatty() else 180)
        self.started = time.time()
        self.options = options
        # Replaced once the planner resolved each job's layout (``size_tenants``).
        self.sweep = sweep
        self.out = sweep_dir(sweep, options.sweep_id)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = list(options.tenants or sweep.jobs)
        for name in self.names:
            sweep.job(name)  # unknown tenant names fail here, before anything runs
        self.storage = options.storage.rstrip("/") + f"/{options.sweep_id}" if options.storage \
            else str(self.out / ".ray")
        self.tenants_dir = f"{self.storage}/{POOLED_DIR}"
        self.registry = None
        if sweep.spec.registry is not None:
            from farm.registry import open_registry

            self.registry = open_registry(sweep.spec.registry.store, sweep.spec.registry.catalog)
        self.resources: dict[str, TrainerResources] = {}  # tenant -> its trainer's request, once sized
        self.scoring = QualityStage(sweep, self.registry, self.out, self.console, self.publish,
                                    self.quality_task_options)
        self.outcomes: dict[str, TenantOutcome] = {}  # every tenant with its line in the report
        self.pending: list[str] = []  # tenants this run trains
        self.capacity: Capacity | None = None  # what the cluster offers (size_tenants)
        # The pools (plan_pools) and their groups: one queue per group, its tenants in order.
        self.pools: list[Pack] = []
        self.pool_resources: dict[str, TrainerResources] = {}
        self.group_order: dict[str, list[str]] = {}
        self.group_of: dict[str, str] = {}
        # While the pools run (run_pools).
        self.queues: dict = {}  # group -> its TenantQueue actor
        self.queued: dict[str, list[str]] = {}  # tenants added to each queue
        self.board = None  # the progress board actor
        self.launch = None  # the pool task
        self.progress: SweepProgress | None = None
        self.limit = 1  # tenants training at once
        self.demand: UpFrontDemand | None = None
        self.waiting: list[Pack] = []  # pools not started yet
        self.running: dict = {}  # pool task ref -> its pool
        self.submitted: dict[str, float] = {}  # pool -> when it started
        self.first_step: dict[str, float] = {}  # tenant -> time of its first step (the progress board's)
        self.checked = None  # the data checks' results (a queue)
        self.checking = False  # data checks still to come
        self.data_reports: dict[str, DataReport] = {}

    # -- handing off ---------------------------------------------------------------------------

    def publish(self, name: str, outcome: TenantOutcome, quality: dict | None = None) -> None:
        """Publish to the registry (the driver is its single writer), with the tenant's quality
        figures and gate decision in its lineage, and move the gated alias if the gate passed;
        failures are the tenant's."""
        if self.registry is None:
            return
        try:
            lineage = None
            if quality is not None:
                lineage = {"quality": {key: quality.get(key) for key in ("prompts", "checks", "eval_loss", "engine")},
                           "promotion": quality.get("decision")}
            outcome.serve_name = publish_outcome(self.registry, self.sweep.job(name), self.out / name,
                                                 self.options.sweep_id, lineage)
            self.console.print(f"{name}: published as {outcome.serve_name}", markup=False, highlight=False)
            if quality is not None:
                promote_if_passed(self.registry, self.sweep.job(name), outcome.serve_name, quality, self.console)
        except Exception as exc:  # a refused or failed publish fails this tenant only
            outcome.status, outcome.error = "failed", f"publish: {exc}"
            self.console.print(f"{name}: publish failed: {exc}", markup=False, highlight=False)

    def quality_task_options(self, name: str) -> dict:
        """A scoring task asks for what one worker of the tenant's trainer asks for."""
        planned = self.resources.get(name)
        if planned is None:  # finished in an earlier run: sized nowhere this run
            return {"num_cpus": 1}
        per_worker = planned.resources_per_worker
        task = {"num_cpus": per_worker.get("CPU", 1), "num_gpus": per_worker.get("GPU", 0)}
        if planned.accelerator_type:
            task["accelerator_type"] = planned.accelerator_type
        return task

    def hand_off(self, name: str, outcome: TenantOutcome) -> None:
        """Score the tenant first when its spec asks for quality evals (published once scored),
        else publish it now."""
        if wants_quality(self.sweep.job(name)):
            self.scoring.submit(name, outcome)
        else:
            self.publish(name, outcome)

    def finish_tenant(self, name: str, final, pool: Pack, taken_at: float | None) -> None:
        """Copy a finished tenant's final checkpoint into the sweep folder, report and publish it.
        Its wall time counts from when its pool took it; its first-step delay from its pool's start."""
        result = _publish_adapter(final, self.out / name)
        delay = self.first_step[name] - self.submitted[pool.name] if name in self.first_step else None
        self.outcomes[name] = TenantOutcome(
            tenant=name, status="trained", steps=result["steps"], tokens=result["tokens"],
            wall_seconds=round(time.time() - (taken_at or self.submitted[pool.name]), 2),
            eval_loss_before=result["eval_loss_before"],
            eval_loss_after=result["eval_loss_after"], adapter_bytes=result["adapter_bytes"],
            adapter_dir=result["adapter_dir"], resumed_from_step=result.get("resumed_from_step"),
            first_step_delay_s=round(delay, 2) if delay is not None else None,
            losses=[tuple(x) for x in result["losses"]], pack=pool.name if pool.co_train else None,
            packed_with=result.get("packed_with", []), handed_off_s=round(time.time() - self.started, 2))
        self.progress.set(name, "trained")
        self.console.print(f"[green]{name}[/green]: done, eval loss "
                           f"{result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}")
        self.hand_off(name, self.outcomes[name])

    def fail_tenant(self, name: str, status: str, error: str, pool: Pack | None, taken_at: float | None = None) -> None:
        """Report a tenant that did not train; its wall time counts from when its pool took it (or
        started, or from the sweep's start when no pool is to blame)."""
        since = taken_at or (self.submitted[pool.name] if pool is not None else self.started)
        self.outcomes[name] = TenantOutcome(tenant=name, status=status, wall_seconds=round(time.time() - since, 2),
                                            error=error, pack=pool.name if pool is not None and pool.co_train else None)
        self.progress.set(name, status)
        self.console.print(f"{name}: {status}: {error}", markup=False, highlight=False)

    # -- step 1: what this run trains ----------------------------------------------------------

    def skip_finished(self) -> None:
        """Take the outcomes of the tenants an earlier run of this sweep id finished (handing off
        any it did not publish); every other tenant is pending (only the changed ones with
        ``changed_only``)."""
        for name in self.names:
            done = finished_outcome(self.out, name)
            if done is not None:
                self.outcomes[name] = done
                self.console.print(f"[cyan]{name}[/cyan]: finished in an earlier run of sweep "
                                   f"{self.options.sweep_id}; skipped")
                if done.serve_name is None:
                    self.hand_off(name, done)
            else:
                self.pending.append(name)
        if self.options.changed_only:
            if self.registry is None:
                raise SpecError(self.sweep.source, ["registry: --changed-only compares each tenant with its newest "
                                                    "version, so the spec needs a registry"])
            self.pending, unchanged = select_changed(self.sweep, self.pending, self.registry, self.console)
            self.outcomes.update(unchanged)

    # -- step 2: size the tenants, stage warm starts -------------------------------------------

    def size_tenants(self) -> None:
        """Size every pending tenant's trainer and stage its warm start (a tenant that cannot be
        sized or staged is refused), then switch to the jobs as the planner resolved them."""
        # What the cluster offers decides whether methods that need CUDA can run at all: if not,
        # the whole spec is refused here, before any tenant's data is read or any trainer starts.
        self.capacity = cluster_capacity(self.sweep.spec.resources)
        check_methods_can_run(self.sweep, self.pending, self.capacity)
        resolved = self._size_trainers()
        self._stage_warm_starts(resolved)
        # From here on every job says the layout it trains with (the pools' workers read it).
        self.sweep = self.sweep.model_copy(update={"jobs": {**self.sweep.jobs, **resolved}})

    def _size_trainers(self) -> dict[str, TenantJob]:
        """Each pending tenant's trainer request; returns the jobs whose ``shard_base`` the
        planner resolved."""
        # The planner sizes every trainer before anything starts (from the spec alone: no data is
        # read yet); a tenant no device can hold is refused with the numbers, and the others go on.
        self.console.print(f"cluster: {self.capacity.describe()}", markup=False, highlight=False)
        resolved: dict[str, TenantJob] = {}  # jobs whose shard_base the planner resolved
        for name in list(self.pending):
            job = self.sweep.job(name)
            try:
                sizing = size_adapter(job, self.sweep.spec.resources, self.capacity)
                self.resources[name] = trainer_resources(sizing.resources)
                train = job.settings.train
                if train.shard_base != sizing.shard_base:
                    resolved[name] = job.model_copy(update={"settings": job.settings.model_copy(
                        update={"train": train.model_copy(update={"shard_base": sizing.shard_base})})})
            except (DoesNotFit, ValueError) as exc:
                self._refuse(name, exc)
                continue
            self.console.print(f"{name}: {sizing.note}", markup=False, highlight=False)
        return resolved

    def _stage_warm_starts(self, resolved: dict[str, TenantJob]) -> None:
        """``train.init_from``: stage the alias's version where the workers read it (into ``resolved``)."""
        for name in list(self.pending):
            job = resolved.get(name, self.sweep.job(name))
            if job.settings.train.init_from is None:
                continue
            try:
                if self.registry is None:
                    raise ValueError("train.init_from needs the spec's registry")
                resolved[name] = stage_warm_start(self.registry, job, self.storage)
            except Exception as exc:  # this tenant only: the others train
                self._refuse(name, exc)
                continue
            if resolved[name].init_version:
                self.console.print(f"{name}: warm start from {resolved[name].init_version}",
                                   markup=False, highlight=False)

    def _refuse(self, name: str, exc: Exception) -> None:
        """A pending tenant that cannot start: invalid, and no longer pending."""
        self.outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=str(exc))
        self.console.print(f"{name}: refused, not started: {exc}", markup=False, highlight=False)
        self.pending.remove(name)

    # -- step 3: plan the pools ----------------------------------------------------------------

    def plan_pools(self) -> None:
        """Every pending tenant's pool, and each pool group's tenants in the order its queue hands them out."""
        self.pools, self.pool_resources = _plan_pools(self.sweep, self.pending, self.resources, self.capacity,
                                                      self.options, self.console)
        self.group_order = {group: _interleave([p.tenants for p in self.pools if p.group == group])
                            for group in dict.fromkeys(p.group for p in self.pools)}
        self.group_of = {tenant: group for group, tenants in self.group_order.items() for tenant in tenants}

    # -- step 4: run the pools -----------------------------------------------------------------

    def run_pools(self) -> None:
        """Start the pools on open queues, check the tenants' data meanwhile and queue the valid
        ones, hand off each tenant the moment it finishes, until every tenant has an outcome."""
        self._open_queues()
        self._set_limit_and_ask_up_front()
        try:
            # Data checks run on a driver thread while the pools start: their start-up overlaps it.
            self.checked = _validate_in_background(self.sweep, _interleave(list(self.group_order.values()))) \
                if self.pools else None
            self.checking = self.pools != []
            self.waiting = list(self.pools)
            with self.progress:  # a live table on a terminal; lines in a log
                while (self.waiting or self.running) and \
                        (self.checking or any(n not in self.outcomes for n in self.pending)):
                    self._watch_once()
            for name in self.pending:  # a group whose pools all ended before its tenants came (cannot happen
                if name not in self.outcomes:  # while queues are open, but never leave a tenant without a line)
                    self.fail_tenant(name, "failed", "no pool was left to take it", None)
        finally:  # however the loop ends, no demand of this sweep stands
            if self.demand is not None:
                self.demand.release()

    def _open_queues(self) -> None:
        """One open queue per pool group, the progress board, the pool task and the progress table."""
        from farm.pools import queue_actor

        # One open queue per group: its pools start now and take the group's tenants in the planned
        # order as their data passes the checks, whichever pool has a free slot.
        self.queues = {group: queue_actor([]) for group in self.group_order}
        self.queued = {group: [] for group in self.group_order}
        self.board = progress_board() if self.pools else None
        self.launch = pool_task()
        self.progress = SweepProgress(self.console, self.pending)

    def _set_limit_and_ask_up_front(self) -> None:
        """Set how many tenants train at once and, when the spec asks, show the autoscaler the
        first wave of pools at once."""
        # --max-concurrent counts tenants training at once: a pool counts as many as its slots.
        self.limit = self.options.max_concurrent or sum(p.slots for p in self.pools) or 1
        if self.options.max_concurrent and self.pools:
            self.console.print(f"at most {self.limit} tenant(s) train at once (--max-concurrent)",
                               markup=False, highlight=False)
        if self.sweep.spec.resources.request_up_front and self.pools:
            self.demand = UpFrontDemand([self.pool_resources[pool.name].demand()
                                         for pool in admit(list(self.pools), 0, self.limit)], self.console)

    def _watch_once(self) -> None:
        """One turn of the watch loop: start the pools that fit, wait a little for one to end,
        then take in the data checks, the progress and the tenants and pools that ended."""
        import ray

        self._start_admitted_pools()
        ready, _ = ray.wait(list(self.running), num_returns=1,
                            timeout=0.2 if self.checking else self.options.progress_every_s)
        if self.demand is not None:
            self.demand.settle()
        self.scoring.poll()
        self._drain_checks()
        self._update_progress()
        self._hand_off_done()
        for ref in ready:
            self._pool_ended(ref)

    def _start_admitted_pools(self) -> None:
        """Start the waiting pools that fit within the limit of tenants training at once."""
        for pool in admit(self.waiting, sum(p.slots for p in self.running.values()), self.limit):
            resources = self.pool_resources[pool.name]
            ref = self.launch.remote(pool.co_train, self.sweep.job(pool.tenants[0]).model_dump(),
                                     self.queues[pool.group], pool.slots, resources, self.storage, pool.name,
                                     self.sweep.spec.resources.max_retries, self.board)
            what = f"a co-training pool of {pool.group}, {pool.slots} at a time" if pool.co_train else \
                f"a single-tenant pool of {pool.group}, {resources.num_workers} worker(s)"
            self.console.print(f"{pool.name}: submitted ({what}: {', '.join(self.group_order[pool.group])}; "
                               f"{resources.resources_per_worker} per worker)", markup=False, highlight=False)
            self.running[ref] = pool
            self.submitted[pool.name] = time.time()

    def _drain_checks(self) -> None:
        """Queue each tenant whose data passed its checks and refuse the others; once every tenant
        is checked, close the queues."""
        while self.checking and not self.checked.empty():
            item = self.checked.get()
            if item is None:  # every tenant checked: no more will come, pools end once idle
                self.checking = False
                for queue in self.queues.values():
                    queue.close.remote()
                break
            name, error, report = item
            if error is not None:
                self.outcomes[name] = TenantOutcome(tenant=name, status="invalid", error=error)
                self.progress.set(name, "invalid")
                self.console.print(f"{name}: invalid, not started: {error}", markup=False, highlight=False)
                continue
            self.data_reports[name] = report
            group = self.group_of[name]
            self.queues[group].add.remote([self.sweep.job(name).model_dump()])
            self.queued[group].append(name)

    def _update_progress(self) -> None:
        """Take the progress board's latest step events (and each tenant's first step) into the table."""
        import ray

        events, steps_started = ray.get(self.board.snapshot.remote())
        self.first_step.update(steps_started)
        self.progress.update(events)

    def _hand_off_done(self) -> None:
        """Hand off every tenant a running pool finished."""
        import ray

        from farm.train.ray_support import final_checkpoint

        # Tenants are handed off the moment their final adapter is on storage, while their pool
        # trains the others. The queue hears of a tenant's end once its final adapter is
        # uploaded, so storage is only looked at for those (and checked complete).
        live = {p.name: p for p in self.running.values()}
        for group in {p.group for p in self.running.values()}:
            state = ray.get(self.queues[group].state.remote())
            for tenant in state["done"]:
                final = None if tenant in self.outcomes else final_checkpoint(f"{self.tenants_dir}/{tenant}")
                pool = live.get(state["taken"].get(tenant))
                if final is not None and pool is not None:
                    self.finish_tenant(tenant, final, pool, state["taken_at"].get(tenant))

    def _pool_ended(self, ref) -> None:
        """A pool's trainer returned: hand off what it finished, fail what it took and did not; once
        no pool of its group is left (or coming), a tenant still waiting had nobody to train it."""
        import ray

        pool = self.running.pop(ref)
        outcome = ray.get(ref)
        state = ray.get(self.queues[pool.group].state.remote())
        group_left = self.checking or any(p.group == pool.group for p in [*self.running.values(), *self.waiting])
        for tenant in self.queued[pool.group]:
            if tenant in self.outcomes:
                continue  # handed off while the pool ran
            self._settle_tenant(tenant, pool, outcome, state, group_left)

    def _settle_tenant(self, tenant: str, pool: Pack, outcome: dict, state: dict, group_left: bool) -> None:
        """One tenant of an ended pool's group still without an outcome: finished (its final
        adapter is on storage), failed (its pool took it, or no pool is left to), or still waiting."""
        from farm.train.ray_support import final_checkpoint

        mine = state["taken"].get(tenant) == pool.name
        final = final_checkpoint(f"{self.tenants_dir}/{tenant}")
        if final is not None and (mine or tenant not in state["taken"]):
            self.finish_tenant(tenant, final, pool, state["taken_at"].get(tenant))
        elif mine or (tenant not in state["taken"] and not group_left):
            error = state["errors"].get(tenant) or outcome.get("errors", {}).get(tenant) or \
                outcome.get("error") or ("its pool ended without it" if mine else "no pool was left to take it")
            status = state["statuses"].get(tenant) or ("invalid" if tenant in outcome.get("errors", {}) else "failed")
            self.fail_tenant(tenant, status, error, pool if mine else None, state["taken_at"].get(tenant))

    # -- step 5: baselines, matrix, report -----------------------------------------------------

    def finish(self) -> SweepReport:
        """Publish what is still being scored, run the evaluation matrix and the baselines, then
        print and write the report of every tenant this sweep id ran."""
        self.scoring.drain()  # every tenant still being scored is published before the report
        matrix = run_matrix(self.sweep, self.outcomes, self.quality_task_options(next(iter(self.resources), "")),
                            self.console)
        baseline = self.sweep.spec.baseline
        compared = [n for n in self.names if baseline and n in baseline.tenants]  # this run's baseline tenants
        comparison = []
        if baseline is not None:
            comparison = run_baselines(self.sweep, compared, self.out, self.storage, self.capacity, self.outcomes,
                                       self.console)
        self._describe_outcomes()
        # The report covers every tenant this sweep id has run: this run's tenants replace their
        # earlier lines, the others keep theirs (errors included), read from the earlier report.json.
        report = merge_with_previous(
            SweepReport(self.options.sweep_id, time.time() - self.started, [self.outcomes[n] for n in self.names],
                        comparison, matrix=matrix),
            self.out, compared)
        print_report(report, self.console)
        paths = write_report(report, self.out)
        self.console.print("report: " + ", ".join(str(p) for p in paths.values()))
        return report

    def _describe_outcomes(self) -> None:
        """Add each tenant's method and what its data became to its outcome."""
        from farm.baseline import method_label

        for name in self.names:  # sweeps may mix methods: every line says which one
            self.outcomes[name].method = method_label(self.sweep.job(name))
            if name in self.data_reports:  # what its data became, as `farm data check` shows it
                self.outcomes[name].data = self.data_reports[name].to_json()


def _plan_pools(sweep: ResolvedSweep, pending: list[str], resources: dict[str, TrainerResources],
                capacity: Capacity, options: SweepOptions, console: Console) -> tuple[list[Pack], dict]:
    """Every pending tenant's pool: co-training packs for the co-trainable ones (``packing:
    auto``), single-tenant pools for the others; returns the pools and each one's resources."""
    import ray

    packs = _plan_co_training(sweep, pending, resources, capacity, options, console) \
        if sweep.spec.resources.packing == "auto" else []
    packed = {t for p in packs for t in p.tenants}
    alone = [n for n in pending if n not in packed]
    pool_resources = {p.name: _pack_resources(resources[p.tenants[0]], p, len(packs), [sweep.job(t) for t in p.tenants],
                                              capacity.device_bytes if capacity.kind == "gpu" else None)
                      for p in packs}
    singles, single_resources = plan_single_pools(alone, resources, ray.cluster_resources(), options.max_concurrent)
    for pool in singles:
        console.print(pool.note, markup=False, highlight=False)
    return packs + singles, {**pool_resources, **single_resources}


def _plan_co_training(sweep: ResolvedSweep, pending: list[str], resources: dict[str, TrainerResources],
                      capacity: Capacity, options: SweepOptions, console: Console) -> list[Pack]:
    """The co-training packs of the pending tenants that can share a batch (``packing: auto``);
    says which tenants train alone for their method."""
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
    if len(packable) <= 1:
        return []
    packs = plan_packs([sweep.job(n) for n in packable], capacity, options.max_concurrent)
    for pack in packs:
        console.print(pack.note, markup=False, highlight=False)
    return packs


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

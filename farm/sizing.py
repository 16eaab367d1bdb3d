"""Size every trainer of a sweep with the memory planner (``farm.plan``) before anything starts.

The sweep asks three questions here:

- how much memory one tenant's adapter worker (LoRA or any other method of ``farm.methods``)
  needs, and therefore how many adapter jobs share one GPU (``resources.gpus_per_worker: auto`` becomes ``1/k``) or, on CPU nodes, how much of Ray's
  ``memory`` resource each worker reserves (so Ray packs CPU workers by memory too);
- how many workers a full fine-tuning baseline needs (``baseline.workers: null``);
- whether a job fits anywhere at all: if not, that tenant is refused with the numbers, before
  it starts, and the other tenants go on.

A device is a GPU on GPU clusters (its memory from ``resources.device_memory_gb``, else probed
on a GPU node) and a node's memory on CPU clusters (Ray's ``memory`` resource of the largest node).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from farm.data import pipeline_bytes
from farm.methods import method_info, planner_fields
from farm.plan import (GiB, MemoryPlan, ModelShape, PlanRequest, devices_needed, jobs_per_device, load_shape,
                       plan_memory)
from farm.spec import BaselineSpec, ResourceSpec, TenantJob

#: More than this many LoRA jobs on one GPU rarely pays: they contend for its compute.
MAX_JOBS_PER_DEVICE = 8
MIN_BASELINE_WORKERS = 2  # one worker would not exercise ZeRO's sharding at all


class DoesNotFit(ValueError):
    """A job that no device of the cluster can hold; the message gives the numbers."""


@dataclass(frozen=True)
class Capacity:
    """What one device of the cluster holds, and how many there are."""

    kind: str                 # "gpu" or "cpu"
    device_bytes: int | None  # None: unknown (no GPU node to probe and none given in the spec)
    devices: int              # GPUs in the cluster, or CPU worker slots
    source: str               # where device_bytes came from

    def describe(self) -> str:
        size = f"{self.device_bytes / GiB:.1f} GB" if self.device_bytes else "unknown size"
        return f"{self.devices} {self.kind} device(s) of {size} ({self.source})"


def _probe_gpu_memory(accelerator_type: str | None) -> int | None:
    """Total memory of one GPU, read on a GPU node by a short Ray task (None if that fails)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def total_memory() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)

    options = {"accelerator_type": accelerator_type} if accelerator_type else {}
    try:
        return ray.get(total_memory.options(**options).remote(), timeout=120)
    except Exception:  # no schedulable GPU right now, or no CUDA there
        return None


#: Memory of one GPU (GiB as the clouds state it) by Ray accelerator type: planning
#: ``gpus_per_worker: auto`` before any GPU node is up needs the size of those the autoscaler adds.
ACCELERATOR_GB = {"T4": 16, "A10G": 24, "L4": 24, "L40S": 48, "A100": 40, "A100-80G": 80, "H100": 80, "H200": 141}
#: Set by the cluster files on every node: the GPU types the autoscaler can add and at most how
#: many nodes of each, for example ``A10G:8,L4:2`` (a cluster scaled to zero shows no GPU to Ray).
GPU_NODES_ENV = "FARM_GPU_NODES"


def launchable_gpus(resources: ResourceSpec, environ=None) -> tuple[str, int] | None:
    """(accelerator type, most nodes) of the GPUs an autoscaler can add while none is up: the
    spec's ``accelerator_type`` if the cluster lists it (or lists nothing), else the cluster's
    first GPU type (``$FARM_GPU_NODES``); None when neither says a GPU can come."""
    import os

    listed: list[tuple[str, int]] = []
    for entry in (environ if environ is not None else os.environ).get(GPU_NODES_ENV, "").split(","):
        name, _, count = entry.strip().partition(":")
        if name and count.isdigit() and int(count) > 0:
            listed.append((name, int(count)))
    wanted = resources.accelerator_type
    if wanted:
        return next(((n, c) for n, c in listed if n == wanted), None if listed else (wanted, 1))
    return listed[0] if listed else None


def cluster_capacity(resources: ResourceSpec) -> Capacity:
    """The capacity of the connected Ray cluster as the spec's resources will use it.

    ``gpus_per_worker: auto`` plans for GPUs when the cluster has some, and also when it has
    none up yet but can add them (``launchable_gpus``: an autoscaling cluster scaled to zero),
    sized by ``device_memory_gb`` or the accelerator type's known memory.
    """
    import ray

    total = ray.cluster_resources()
    if resources.gpus_per_worker == "auto" and total.get("GPU", 0) <= 0:
        coming = launchable_gpus(resources)
        if coming is not None:
            name, nodes = coming
            gb = resources.device_memory_gb or ACCELERATOR_GB.get(name)
            return Capacity("gpu", int(gb * GiB) if gb else None, nodes,
                            f"none up yet: the autoscaler can add {nodes} {name} node(s)")
    wants_gpu = resources.gpus_per_worker == "auto" and total.get("GPU", 0) > 0 or \
        resources.gpus_per_worker not in ("auto", 0, 0.0)
    if wants_gpu:
        if resources.device_memory_gb:
            return Capacity("gpu", int(resources.device_memory_gb * GiB), int(total.get("GPU", 0)),
                            "resources.device_memory_gb")
        probed = _probe_gpu_memory(resources.accelerator_type) if total.get("GPU", 0) else None
        return Capacity("gpu", probed, int(total.get("GPU", 0)), "probed on a GPU node" if probed else "unknown")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    memory = max((int(n["Resources"].get("memory", 0)) for n in nodes), default=0) or None
    slots = int(total.get("CPU", 0) // resources.cpus_per_worker)
    return Capacity("cpu", memory, slots, "Ray memory resource of the largest node")


def adapter_request(job: TenantJob, capacity: Capacity, shape: ModelShape | None = None,
                    workers: int = 1) -> PlanRequest:
    """The planner request of one tenant's adapter worker (its method says what it trains) when
    it trains on ``workers`` workers (which shard the base with ``train.shard_base: fsdp``)."""
    settings = job.settings
    shape = shape or load_shape(job.base_model.name_or_path)
    method_fields = planner_fields(settings.method, settings.method_settings(), shape)
    return PlanRequest(**method_fields, devices=workers, shard_base=settings.train.shard_base == "fsdp",
                       batch=settings.train.batch_size, seq_len=settings.data.max_seq_len,
                       grad_accum=settings.train.grad_accum,
                       gradient_checkpointing=settings.train.gradient_checkpointing,
                       precision=_precision(job, capacity))


def _precision(job: TenantJob, capacity: Capacity) -> str:
    wanted = job.settings.train.precision
    if wanted == "auto":
        return "bf16" if capacity.kind == "gpu" else "fp32"
    return wanted


def _breakdown(plan: MemoryPlan) -> str:
    return ", ".join(f"{line.name} {line.bytes / GiB:.2f}" for line in plan.lines)


@dataclass(frozen=True)
class Sizing:
    """A tenant's trainer resources as the planner set them."""

    resources: ResourceSpec     # gpus_per_worker resolved to a number; workers raised for a sharded base
    planned_bytes: int          # per worker
    note: str                   # one line for the sweep's log
    shard_base: str = "none"    # train.shard_base resolved: none or fsdp


def size_adapter(job: TenantJob, resources: ResourceSpec, capacity: Capacity) -> Sizing:
    """Resources of one tenant's adapter trainer; raises ``DoesNotFit`` with the numbers.

    The layout: a fraction of a GPU or one device when the plan fits one (several data-parallel
    workers when ``resources.workers`` asks); with ``train.shard_base: auto`` on GPUs, a tenant
    that fits no single device gets its base sharded (FSDP) over the fewest workers, one GPU
    each, that hold it (``resources.workers`` at least), when its method allows it.
    """
    shape = load_shape(job.base_model.name_or_path)
    request = adapter_request(job, capacity, shape, workers=resources.workers)
    plan = plan_memory(shape, request)
    device = capacity.device_bytes
    shard = "fsdp" if job.settings.train.shard_base == "fsdp" else "none"
    sharded_note = ""
    if device is not None and plan.total_bytes > device and job.settings.train.shard_base == "auto" \
            and capacity.kind == "gpu" and not method_info(job.settings.method).no_sharded_base:
        most = max(capacity.devices, resources.workers)
        needed = devices_needed(shape, replace(request, shard_base=True), device, max_devices=max(most, 1))
        if needed is not None:
            whole = plan.total_gb
            shard, resources = "fsdp", resources.model_copy(update={"workers": max(needed, resources.workers),
                                                                    "gpus_per_worker": 1.0})
            plan = plan_memory(shape, replace(request, shard_base=True, devices=resources.workers))
            sharded_note = (f"; base sharded over {resources.workers} GPUs (FSDP): one device would need "
                            f"{whole:.2f} GB")
    if device is not None and plan.total_bytes > device:
        raise DoesNotFit(f"tenant {job.tenant!r}: a {job.settings.method} worker needs {plan.total_gb:.2f} GB "
                         f"({_breakdown(plan)}), more than the largest device holds: {capacity.describe()}")
    updates: dict = {}
    note = f"planned {plan.total_gb:.2f} GB per worker{sharded_note}"
    if capacity.kind == "gpu" and resources.gpus_per_worker == "auto":
        per_device = 1 if device is None or resources.workers > 1 else \
            max(1, min(MAX_JOBS_PER_DEVICE, jobs_per_device(plan, device)))
        updates["gpus_per_worker"] = round(1 / per_device, 4)
        note += f"; {per_device} job(s) per GPU"
    elif resources.gpus_per_worker == "auto":
        updates["gpus_per_worker"] = 0.0
    if capacity.kind == "cpu" and resources.memory_per_worker is None:
        # On CPU the worker's memory is the host's: the data pipeline shares it with the model.
        data = pipeline_bytes(job.settings.data, resources.cpus_per_worker)
        updates["memory_per_worker"] = plan.total_bytes + data
        note += f" + {data / GiB:.2f} GB data pipeline"
    return Sizing(resources.model_copy(update=updates), plan.total_bytes, note, shard)


def size_baseline(job: TenantJob, baseline: BaselineSpec, capacity: Capacity,
                  lora_workers: int = 1) -> tuple[int, MemoryPlan]:
    """Workers of a tenant's full fine-tuning baseline and the plan per worker.

    ``baseline.workers`` wins when given; otherwise the fewest workers (at least two, splitting
    the rows evenly) whose ZeRO partitions and share of the rows fit one device each. Raises
    ``DoesNotFit`` when no count up to the cluster's devices fits.
    """
    shape = load_shape(job.base_model.name_or_path)
    settings = job.settings
    rows = settings.train.batch_size * lora_workers  # rows per micro-batch, split over the workers

    def request(workers: int) -> PlanRequest:
        return PlanRequest(method="full", zero_stage=baseline.zero_stage, offload=baseline.offload, devices=workers,
                           batch=max(1, rows // workers), seq_len=settings.data.max_seq_len,
                           gradient_checkpointing=settings.train.gradient_checkpointing,
                           precision=_precision(job, capacity))

    device = capacity.device_bytes
    if baseline.workers is not None:
        plan = plan_memory(shape, request(baseline.workers))
        if device is not None and plan.total_bytes > device:
            raise DoesNotFit(f"tenant {job.tenant!r}: a full fine-tune with ZeRO-{baseline.zero_stage} on "
                             f"{baseline.workers} workers needs {plan.total_gb:.2f} GB per worker ({_breakdown(plan)}); "
                             f"devices hold {device / GiB:.1f} GB")
        return baseline.workers, plan
    if device is None:
        return MIN_BASELINE_WORKERS, plan_memory(shape, request(MIN_BASELINE_WORKERS))
    # More workers shrink both the ZeRO partitions and each worker's share of the rows; only
    # counts that split the rows evenly keep the LoRA run's batch.
    for workers in range(MIN_BASELINE_WORKERS, max(capacity.devices, MIN_BASELINE_WORKERS) + 1):
        if rows % workers == 0:
            plan = plan_memory(shape, request(workers))
            if plan.total_bytes <= device:
                return workers, plan
    most = plan_memory(shape, request(max(capacity.devices, MIN_BASELINE_WORKERS)))
    raise DoesNotFit(f"tenant {job.tenant!r}: a full fine-tune with ZeRO-{baseline.zero_stage} does not fit even "
                     f"on all {capacity.devices} devices: {most.total_gb:.2f} GB per worker ({_breakdown(most)}); "
                     f"devices hold {device / GiB:.1f} GB")


#: Tokens of one co-training step (all slots' micro-batches together) beyond which sharing a
#: forward pass stops paying: the gain of co-training is largest for small micro-batches
#: (issue 8's measurements: 1.07x at 4x512 tokens, 2.75x at 8x64 on 2 CPUs).
STEP_TOKEN_BUDGET = {"cpu": 8192, "gpu": 65536}
MAX_SLOTS = 8


@dataclass(frozen=True)
class Pack:
    """A pool's plan: tenants that one worker co-trains on one copy of the base, ``slots`` at a
    time (``co_train``), or, with ``co_train`` false, a single-tenant pool that trains its
    tenants one after another (any method; ``farm.sweep.plan_single_pools``)."""

    name: str
    tenants: tuple[str, ...]
    slots: int
    planned_bytes: int  # one worker with ``slots`` adapters at once
    note: str
    # Packs of one group (same pack key) are pools sharing one queue: ``tenants`` is the order
    # planned for this pack, but any pool of the group may take any of the group's tenants.
    group: str = ""
    co_train: bool = True


def pack_memory(plans: list[MemoryPlan]) -> int:
    """Memory of co-training these tenants at once: the base and runtime once, each tenant's
    adapter state and activations on top."""
    shared = {"weights", "runtime"}
    first = plans[0]
    return sum(line.bytes for line in first.lines if line.name in shared) + \
        sum(line.bytes for plan in plans for line in plan.lines if line.name not in shared)


def plan_packs(jobs: list[TenantJob], capacity: Capacity, max_training: int | None = None) -> list[Pack]:
    """Group tenants into co-training packs: same pack key (base, row layout), as many slots
    as fit one device by memory and the step-token budget, as many packs as the cluster has
    worker slots (each pack's queue refills its slots as tenants finish).

    ``max_training`` (the sweep's ``--max-concurrent``: tenants training at once) caps a pack's
    slots, since a pack trains that many tenants at once, and the number of packs per group to
    those that could train side by side within it (more would only wait, each holding its own
    copy of the base, while one pack's queue does the same work).
    """
    if max_training is not None and max_training < 1:
        raise ValueError(f"max_training must be at least 1, got {max_training}")

    groups: dict[tuple, list[TenantJob]] = {}
    for job in jobs:
        groups.setdefault(job.pack_key, []).append(job)
    packs: list[Pack] = []
    for group_index, group in enumerate(groups.values(), start=1):
        shape = load_shape(group[0].base_model.name_or_path)
        plans = {job.tenant: plan_memory(shape, adapter_request(job, capacity, shape)) for job in group}
        biggest = max(plans.values(), key=lambda plan: plan.total_bytes)
        tokens = max(job.settings.train.batch_size * job.settings.data.max_seq_len for job in group)
        slots = max(1, min(MAX_SLOTS, len(group), STEP_TOKEN_BUDGET[capacity.kind] // tokens,
                           max_training or MAX_SLOTS))
        if capacity.device_bytes is not None:
            while slots > 1 and pack_memory([biggest] * slots) > capacity.device_bytes:
                slots -= 1
        count = max(1, min(max(capacity.devices, 1), -(-len(group) // slots)))
        if max_training is not None:
            count = max(1, min(count, max_training // slots))
        # Largest tenants first, dealt round-robin, so packs finish at about the same time.
        order = sorted(group, key=lambda j: -j.settings.train.max_steps * j.settings.train.batch_size)
        queues = [order[i::count] for i in range(count)]
        for queue in queues:
            name = f"pack-{len(packs) + 1}"
            slot_count = min(slots, len(queue))
            memory = pack_memory([plans[j.tenant] for j in sorted(queue, key=lambda j: -plans[j.tenant].total_bytes)
                                  [:slot_count]])
            if capacity.kind == "cpu":  # host memory: tenants load their data one at a time
                memory += max(pipeline_bytes(j.settings.data) for j in queue)
            packs.append(Pack(name, tuple(j.tenant for j in queue), slot_count, memory,
                              f"{name}: {', '.join(j.tenant for j in queue)} ({slot_count} at a time, "
                              f"planned {memory / GiB:.2f} GB)", group=f"group-{group_index}"))
    return packs

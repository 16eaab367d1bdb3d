"""The Ray Train trainers the farm starts: what one asks Ray for, its one construction, what
its failure says, and the warm pool's Ray task that the sweep and the service both launch.

Every ``TorchTrainer`` of the farm (a sweep's pools, the service's pools, a full fine-tuning
baseline, the multi-worker benchmark, the pool tests) is built by ``TrainerResources.trainer``,
so the scaling, the collective backend (NCCL on GPUs, gloo otherwise), the threads per worker,
the retries and the checkpoint retention are decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from farm.spec import ResourceSpec

# Trainers queued behind others wait for their workers; Ray Train's default start timeout
# (60 s) would fail them on a busy cluster. A job that can never fit is the planner's to refuse.
WORKER_START_TIMEOUT_S = "3600"
POOLED_DIR = "pooled"  # <storage>/pooled/<tenant>/: a pool's tenant's checkpoints and final adapter


@dataclass(frozen=True)
class TrainerResources:
    """What one trainer asks Ray for (a plain object, tested without a cluster)."""

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

    def trainer(self, loop: Callable[[dict], object], config: dict, name: str, storage: str,
                max_retries: int = 0, keep_checkpoints: int | None = None):
        """A Ray Train ``TorchTrainer`` running ``loop`` on these workers; ``config`` reaches the
        loop with ``threads`` (torch threads per worker) added. Its run folder is
        ``<storage>/<name>``; a worker group that fails restarts up to ``max_retries`` times;
        ``keep_checkpoints`` (None: all) bounds what Ray Train keeps of the checkpoints the loop
        reports."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        return TorchTrainer(
            loop, train_loop_config={"threads": self.torch_threads, **config},
            scaling_config=self.scaling_config(), torch_config=self.torch_config(),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_retries),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)))


def cpu_workers(workers: int) -> TrainerResources:
    """``workers`` one-CPU gloo workers: the shape the benchmarks and tests train on."""
    return TrainerResources(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1},
                            accelerator_type=None, torch_threads=1, backend="gloo")


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


def error_summary(exc: BaseException) -> str:
    """The root cause of a failed trainer in a line or three.

    Ray Train raises ``ray.train.WorkerGroupError`` holding each failed rank's own exception in
    ``worker_failures``: the lowest rank's is the summary (its type, and its message's first
    lines). Anything else (a controller error, a failure before any worker ran) is summarised
    from its innermost cause the same way.
    """
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = failures[min(failures)]
    while exc.__cause__ is not None:
        exc = exc.__cause__
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    # pydantic's errors end with a documentation link: not the tenant's business
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    return " | ".join([f"{name}: {lines[0]}" if lines else name, *lines[1:3]])[:500]


def progress_board():
    """A ``ProgressBoard`` actor: the latest step event of every tenant, written by the pools'
    rank-0 workers, read by the sweep's driver and the service for their live views."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.events: dict[str, dict] = {}
            self.first_step: dict[str, float] = {}

        def update(self, tenant: str, event: dict) -> None:
            self.events[tenant] = event
            self.first_step.setdefault(tenant, event["time"])

        def forget(self, tenant: str) -> None:
            """A finished run's events go (a long-running service's board stays small)."""
            self.events.pop(tenant, None)
            self.first_step.pop(tenant, None)

        def snapshot(self) -> tuple[dict, dict]:
            return self.events, self.first_step

    return ProgressBoard.remote()


def run_pool(co_train: bool, prototype: dict, queue, slots: int, resources: TrainerResources, storage: str,
             name: str, max_retries: int, board, options: dict | None = None) -> dict:
    """Ray task body: one pool's TorchTrainer taking tenants from its group's ``queue`` until it
    is closed and empty: a co-training worker (``slots`` tenants at a time) or a single-tenant
    pool (one at a time, on one worker or several). Returns the tenants that failed (never
    raises); each finished tenant's final adapter is on storage under ``<storage>/pooled/<tenant>``.
    ``options`` go to the pool's loop as they are (the service's: ``cancellable``, ``poll_s``)."""
    from farm.train.adapter import ray_pool_loop
    from farm.train.cotrain import ray_cotrain_loop

    errors: dict = {}
    failure = None
    try:
        trainer = resources.trainer(
            ray_cotrain_loop if co_train else ray_pool_loop,
            # idle_s None: the sweep closes the queue once every tenant is checked; wait for that
            {"prototype": prototype, "queue": queue, "pool": name, "slots": slots, "board": board, "idle_s": None,
             "tenants_dir": f"{storage.rstrip('/')}/{POOLED_DIR}", **(options or {})},
            name, storage, max_retries)
        errors = (trainer.fit().return_value or {}).get("errors", {})
    except Exception as exc:  # the pool's retries ran out; tenants that finished before still count
        failure = error_summary(exc)
    return {"errors": errors, "error": failure}


def pool_task(function: Callable = run_pool):
    """``function`` (``run_pool`` or a wrapper of it) as a zero-CPU Ray task whose trainer may
    wait up to ``WORKER_START_TIMEOUT_S`` for its workers (the trainer's workers hold the CPUs)."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(function).options(
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_START_TIMEOUT_S}})

"""Recipe: fine-tune one tenant's PEFT adapter (any method of ``farm.methods``) on the frozen base.

    farm train --spec jobs/configs/demo.yaml --tenant acme

The recipe is method-agnostic: the method decides how the base is loaded (QLoRA: 4-bit) and
which PEFT config wraps it; training, eval, checkpoints (every trainable tensor by name) and
saving are the same for all.

Runs in one plain process (as above) or inside the workers of a sweep's single-tenant pool
(``ray_pool_loop``: a long-running Ray Train ``TorchTrainer`` that trains the tenants of its
queue one after another on a base it loads once); with several workers it is data parallel
(DDP over the process group Ray Train sets up). Shape of the
recipe: ``setup`` (placement, data, model, optimizer, resume) -> ``train`` (steps, eval,
checkpoints) -> ``save`` (the PEFT adapter as safetensors, atomically) -> result.

Exactness matters more than cleverness here: the loss of an optimizer step is normalised by
the number of target tokens in the whole step (all micro-batches, all workers), so gradient
accumulation and data parallelism give the gradient one big batch would; and a checkpoint
restores adapter, optimizer, scheduler, RNG and data position, so a resumed run ends on the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from farm.atomic import replacing_folder
from farm.data import DataError, TenantData, load_tenant_data
from farm.models import (BaseModelCache, Placement, build_peft_model, count_parameters, load_tokenizer,
                         load_trainable_state, select_device, select_placement, trainable_state, warm_start)
from farm.spec import TenantJob
from farm.train.common import (CheckpointIO, ConsoleProgress, InjectedWorkerFailure, JobCancelled, LocalCheckpoints,
                               Progress, StepLoop, TrainState, build_optimizer, build_scheduler, evaluate,
                               load_checkpoint, peak_memory_bytes, peer_lost, summed_loss, write_checkpoint)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
RESULT_FILE = "result.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one tenant's training produced; written as ``result.json`` beside the adapter."""

    tenant: str
    method: str
    steps: int
    tokens: int
    train_seconds: float
    wall_seconds: float
    tokens_per_s: float
    eval_loss_before: float
    eval_loss_after: float
    trainable_params: int
    total_params: int
    adapter_dir: str
    adapter_bytes: int
    peak_memory_bytes: int
    precision: str
    device: str
    padding_share: float
    dataset_fingerprint: str
    data_summary: str
    resumed_from_step: int | None = None
    stopped_early: bool = False  # early_stop_patience evals without improvement ended it before max_steps
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class AdapterRecipe(StepLoop):
    """One tenant's adapter fine-tune: ``setup()``, ``train()``, ``save()``.

    ``train_tenant`` runs all three; tests and the co-training recipe use the steps and the
    attributes (``model``, ``data``, ``state``) directly.
    """

    def __init__(self, job: TenantJob, progress: Progress | None = None, resume: bool = True,
                 checkpoints: CheckpointIO | None = None, bases: BaseModelCache | None = None):
        self.job = job
        # A pool's worker lends its base from one tenant to the next; alone, a fresh cache loads it.
        self.bases = bases or BaseModelCache()
        self.model = None
        self.spec = job.settings.train
        self.out = Path(job.output_dir)
        self.rank, self.world = _world()
        self.checkpoints = checkpoints or LocalCheckpoints(self.out / CHECKPOINT_DIR,
                                                           self.spec.keep_checkpoints, self.rank)
        self.progress = progress or ConsoleProgress(every=self.spec.log_every)
        self.resume = resume
        self.wall_start = time.perf_counter()
        self.resumed_from: int | None = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> "AdapterRecipe":
        """Place the job, load data and model, build optimizer and schedule, resume if asked."""
        spec = self.spec
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.placement: Placement = select_placement(spec.precision, select_device(local_rank))
        tokenizer = load_tokenizer(self.job.base_model)
        self.data: TenantData = load_tenant_data(self.job.tenant, self.job.settings.data, tokenizer)
        torch.manual_seed(spec.seed)  # same adapter init on every worker and every run
        self.model = build_peft_model(self.bases.borrow(self.job.base_model, self.placement, self.job.settings),
                                      self.job.settings, self.job.base_model.name_or_path)
        warm_start(self.model, self.job)  # train.init_from (a resumed run overwrites it below)
        if spec.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable, self.total = count_parameters(self.model)
        self.sharded = spec.shard_base == "fsdp" and self.world > 1
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            self._shard_base()
        self.optimizer = build_optimizer(self.model.parameters(), spec)
        self.scheduler = build_scheduler(self.optimizer, spec)
        self.state = TrainState()
        if self.resume:
            with self.checkpoints.latest() as checkpoint:
                if checkpoint is not None:
                    adapter_tensors, self.state = load_checkpoint(checkpoint, self.optimizer, self.scheduler)
                    load_trainable_state(self.model, adapter_tensors)
                    self.resumed_from = self.state.step
        if self.resumed_from is None:
            # Dropout draws differ per worker; the init above was the same everywhere.
            torch.manual_seed(spec.seed + 1 + self.rank)
        self.engine = self.model
        if self.world > 1 and not self.sharded:
            device = self.placement.device
            self.engine = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.state.eval_loss_before is None:
            self.state.eval_loss_before = self.evaluate()
        return self

    def _shard_base(self) -> None:
        """Shard the base and the adapter inside it across the workers with PyTorch FSDP2: each
        decoder layer is one unit (its weights are gathered for its forward and backward, then
        freed), the root holds the rest (embeddings, norm, head). Frozen and trainable
        parameters share the units; only the adapter's gradients are reduce-scattered, averaged
        over the workers like DDP's (the loss is scaled to match)."""
        from torch.distributed.fsdp import fully_shard

        root = self.model.get_base_model()
        layers = [m for m in root.modules() if type(m).__name__.endswith("DecoderLayer")]
        if not layers:
            raise ValueError(f"train.shard_base fsdp: no decoder layers found in {type(root).__name__}")
        for layer in layers:
            fully_shard(layer)
        fully_shard(root)

    def evaluate(self) -> float:
        """Mean eval loss per target token of the current adapter (every worker evaluates every
        row: with a sharded base a forward pass is collective)."""
        return evaluate(self.model, self.data.eval, self.spec.batch_size, self.placement.device,
                        self.placement.autocast)

    # -- train (the loop is StepLoop.train) --------------------------------------------------
    def _micro_step(self, batch: dict[str, torch.Tensor], step_targets: int, last: bool) -> float:
        # DDP and FSDP sync gradients on the last micro-batch of a step only.
        if self.sharded:
            self.model.get_base_model().set_requires_gradient_sync(last)
        with self.engine.no_sync() if (self.world > 1 and not self.sharded and not last) else nullcontext():
            loss = summed_loss(self.engine, batch, self.placement.autocast) / step_targets
            (loss * self.world).backward()  # DDP averages gradients over workers
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        if self.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _write_checkpoint(self, folder: Path) -> None:
        write_checkpoint(folder, trainable_state(self.model), self.optimizer, self.scheduler, self.state)

    # -- save ----------------------------------------------------------------------------------
    def save(self) -> TrainResult:
        """Final eval, the adapter saved atomically (rank 0), and the result (also as JSON)."""
        state, placement = self.state, self.placement
        eval_after = self.evaluate()
        state.evals.append((state.step, eval_after))
        adapter_dir = self.out / ADAPTER_DIR
        # A sharded adapter is gathered whole first (every worker takes part), then saved as usual.
        whole = trainable_state(self.model) if self.sharded else None
        if self.rank == 0:
            adapter_dir = save_adapter(self.model, self.out, state_dict=whole)
        result = TrainResult(
            tenant=self.job.tenant, method=self.job.settings.method, steps=state.step,
            tokens=state.tokens_seen, train_seconds=round(state.train_seconds, 3),
            wall_seconds=round(time.perf_counter() - self.wall_start, 3),
            tokens_per_s=round(state.tokens_seen / state.train_seconds, 1) if state.train_seconds else 0.0,
            eval_loss_before=state.eval_loss_before, eval_loss_after=eval_after,
            trainable_params=self.trainable, total_params=self.total, adapter_dir=str(adapter_dir),
            adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()) if adapter_dir.is_dir() else 0,
            peak_memory_bytes=peak_memory_bytes(placement.device), precision=placement.precision,
            device=str(placement.device), padding_share=round(self.data.train.padding_share, 4),
            dataset_fingerprint=self.data.report.fingerprint, data_summary=self.data.report.summary(),
            resumed_from_step=self.resumed_from, stopped_early=state.stopped_early,
            losses=state.losses, evals=state.evals,
        )
        if self.rank == 0:
            (self.out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
        self.checkpoints.finish(self.out, self._write_checkpoint, state.step,
                                {"step": state.step, "eval_loss": eval_after})
        return result


    def release(self) -> None:
        """Hand the base back to the cache (a pool's next tenant reuses it) and drop the rest."""
        model, self.model, self.engine = self.model, None, None
        self.optimizer = self.scheduler = None
        if model is not None:
            self.bases.give_back(model, self.job.settings)


def train_tenant(job: TenantJob, progress: Progress | None = None, resume: bool = True,
                 checkpoints: CheckpointIO | None = None) -> TrainResult:
    """Train ``job``'s adapter and save it under ``job.output_dir/adapter``.

    Resumes from the newest checkpoint (default: ``job.output_dir/checkpoints``) unless
    ``resume`` is false. Returns the result that is also written to ``job.output_dir/result.json``.
    """
    return AdapterRecipe(job, progress, resume, checkpoints).setup().train().save()


def ray_pool_loop(config: dict) -> dict:
    """Ray Train ``train_loop_per_worker`` of a single-tenant pool: its workers train the
    tenants of the pool's queue one after another, any method, on a base loaded once.

    ``config`` holds the ``queue`` actor and this ``pool``'s name, ``idle_s`` (how long to wait
    for tenants on an open queue; None: until it is closed), the torch ``threads``, the
    ``board`` actor for live progress and ``tenants_dir``, the folder on shared storage where
    each tenant's checkpoints and final adapter go (``<tenants_dir>/<tenant>/``). With several
    workers, rank 0 takes each tenant from the queue and every rank trains it (data parallel).
    A worker group that Ray Train restarts resumes the tenant it had taken from its newest
    complete checkpoint. One tenant's bad data or failing step ends that tenant only: its error
    goes to the queue and the pool takes the next. With ``cancellable`` (the fine-tuning
    service's pools) a job cancelled on the queue stops after its current step and is reported
    ``cancelled``. Jobs are named by ``TenantJob.key`` (the tenant, or a service's job id).
    Returns key -> error for those that failed.
    """
    import tempfile

    from farm.pools import QueueSource
    from farm.train.ray_support import BoardProgress, StorageCheckpoints

    torch.set_num_threads(config.get("threads", 1))
    rank, world = _world()
    tenants_dir = config["tenants_dir"].rstrip("/")
    local = tempfile.mkdtemp(prefix="farm-pool-")
    source = QueueSource(config["queue"], config["pool"], tenants_dir, local, idle_s=config.get("idle_s"),
                         poll_s=config.get("poll_s", 0.5))
    bases = BaseModelCache()
    errors: dict[str, str] = {}
    try:
        while (job := _next_for_all_ranks(source, rank, world, local)) is not None:
            key = job.key
            recipe = AdapterRecipe(job, progress=BoardProgress(config.get("board"), key), bases=bases,
                                   checkpoints=StorageCheckpoints(
                                       f"{tenants_dir}/{key}", job.settings.train.keep_checkpoints, rank,
                                       gather=job.settings.train.shard_base == "fsdp" and world > 1))
            if config.get("cancellable"):
                recipe.should_stop = functools.partial(source.is_cancelled, key)
            try:
                recipe.setup().train().save()
            except InjectedWorkerFailure:
                raise  # stands for a dying worker: Ray Train restarts the group
            except Exception as exc:  # this tenant's failure, not the pool's: record it, take the next
                if world > 1 and peer_lost(exc):
                    raise  # another worker died mid-collective: the group restarts and resumes this tenant
                status = "invalid" if isinstance(exc, DataError) else \
                    "cancelled" if isinstance(exc, JobCancelled) else "failed"
                errors[key] = f"{type(exc).__name__}: {exc}"[:2000]
                logger.warning("[%s] %s: %s", key, status, errors[key])
                if rank == 0:
                    source.failed(key, errors[key], status)
            else:
                if rank == 0:
                    source.finished(key)
            finally:
                recipe.release()
                shutil.rmtree(job.output_dir, ignore_errors=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return {"errors": errors, "base_loads": bases.loads}


def _next_for_all_ranks(source, rank: int, world: int, local: str) -> TenantJob | None:
    """Rank 0 takes the next tenant from the queue; every rank gets the same one (or None),
    with its output folder in its own ``local`` scratch folder."""
    job = source.next_job() if rank == 0 else None
    if world == 1:
        return job
    box = [job.model_dump() if job is not None else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    job = TenantJob.model_validate(box[0])
    return job.model_copy(update={"output_dir": f"{local}/{job.key}"})


def save_adapter(model, out: Path, state_dict: dict | None = None) -> Path:
    """Save the PEFT adapter (safetensors) to ``out/adapter`` via a temporary folder + rename;
    ``state_dict``: the model's adapter tensors when the model's own are shards."""
    final = out / ADAPTER_DIR
    with replacing_folder(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    return final

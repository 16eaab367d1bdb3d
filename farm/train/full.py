"""Recipe: full fine-tuning of one tenant with DeepSpeed ZeRO, the baseline LoRA is judged against.

Runs inside a Ray Train worker group (``run_baseline`` in ``farm.baseline`` starts it): Ray
Train sets up the process group (gloo on CPU, NCCL on GPUs) and ``deepspeed.initialize``
joins it. The DeepSpeed config is generated from the tenant's settings (``deepspeed_config``):
micro-batch, gradient accumulation, bf16 on GPUs that have it and fp32 elsewhere, clipping,
AdamW, the farm's learning-rate schedule, ZeRO stage and optional CPU offload.

Shape: ``setup`` (placement, data, model, engine, resume) -> ``train`` -> ``save`` (gather the
ZeRO shards into one transformers model folder, safetensors) -> result. The loss of an optimizer
step is normalised by the target tokens of the whole step over all micro-batches and workers,
exactly as in the LoRA recipe, so both see the same objective on the same rows.

Checkpoints are DeepSpeed's own sharded checkpoints: every rank writes its shard and reports it
to Ray Train, which merges the shards into one folder on storage. Rank 0 adds ``state.json``
(progress, and every rank's file sizes, gathered), so a folder whose upload was cut short is
never resumed from. DeepSpeed writes its shards with ``torch.save`` (pickle) and reads them
with ``weights_only=False``; they live only in the operator's own checkpoint storage, never in
the registry, and the consolidated model handed to anyone else is safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from farm.atomic import replacing_folder
from farm.data import TenantData, load_tenant_data
from farm.models import Placement, count_parameters, load_base_model, load_tokenizer, select_device, select_placement
from farm.spec import BaselineSpec, TenantJob
from farm.train.common import (CheckpointIO, Progress, StepEvent, StepLoop, TrainState, evaluate, make_batch,
                               peak_memory_bytes, summed_loss)
from farm.train.adapter import RESULT_FILE, TrainResult, _world

MODEL_DIR = "model"
PROBE_FILE = "probe.safetensors"
DS_TAG = "zero"  # the tag folder inside every checkpoint that holds DeepSpeed's shards


@dataclass
class FullResult(TrainResult):
    """A full fine-tune's result: the LoRA result's fields plus ZeRO settings and per-worker memory."""

    zero_stage: int = 0
    offload: str = "none"
    workers: int = 1
    model_dir: str = ""
    model_bytes: int = 0
    peak_memory_per_worker: list[int] = field(default_factory=list)


def deepspeed_config(job: TenantJob, baseline: BaselineSpec, placement: Placement) -> dict:
    """The DeepSpeed config of a baseline run, generated from the tenant's settings.

    ``train.batch_size`` is the micro-batch per worker. On CPU the optimizer is torch's AdamW
    (DeepSpeed's fused and CPU Adam need compiled ops); on GPUs DeepSpeed picks FusedAdam, or
    its CPU Adam when the optimizer is offloaded.
    """
    spec = job.settings.train
    zero: dict = {"stage": baseline.zero_stage}
    if baseline.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if baseline.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if baseline.zero_stage == 3:
        # Gather whole weights when saving: ZeRO-3 would otherwise save each rank's partition only.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params: dict = {"lr": baseline.learning_rate, "weight_decay": spec.weight_decay,
                              "betas": [0.9, 0.999], "eps": 1e-8}
    on_cpu = placement.device.type == "cpu"
    if on_cpu:
        optimizer_params["torch_adam"] = True
    config = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip or 0.0,
        "bf16": {"enabled": placement.dtype == torch.bfloat16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,  # progress is the farm's, not DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }
    if on_cpu and baseline.offload == "cpu":
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on host memory is the point
    return config


class FullRecipe(StepLoop):
    """One tenant's full fine-tune under DeepSpeed ZeRO: ``setup()``, ``train()``, ``save()``."""

    def __init__(self, job: TenantJob, baseline: BaselineSpec, checkpoints: CheckpointIO, progress: Progress):
        self.job, self.baseline = job, baseline
        self.spec = job.settings.train
        self.out = Path(job.output_dir)
        self.rank, self.world = _world()
        self.checkpoints, self.progress = checkpoints, progress
        self.wall_start = time.perf_counter()
        self.resumed_from: int | None = None

    def setup(self) -> "FullRecipe":
        """Place the job, load data and model, build the DeepSpeed engine, resume if a checkpoint exists."""
        import deepspeed

        from farm.train.common import build_scheduler

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.placement = select_placement(self.spec.precision, select_device(local_rank))
        tokenizer = load_tokenizer(self.job.base_model)
        self.data: TenantData = load_tenant_data(self.job.tenant, self.job.settings.data, tokenizer)
        self.ds_config = deepspeed_config(self.job, self.baseline, self.placement)
        self._hf_ds = None
        if self.baseline.zero_stage == 3:
            # Tells transformers to build the model under zero.Init: each rank then only ever
            # holds its partition, which is what lets ZeRO-3 fit a base one device cannot hold.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        torch.manual_seed(self.spec.seed)
        model = load_base_model(self.job.base_model, self.placement)
        if self.spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable, self.total = count_parameters(model)
        if self.baseline.zero_stage == 3:  # partitioned parameters report 0 elements
            self.trainable = self.total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=lambda optimizer: build_scheduler(optimizer, self.spec))
        self.state = TrainState()
        with self.checkpoints.latest() as checkpoint:
            if checkpoint is not None:
                self.engine.load_checkpoint(str(checkpoint), tag=DS_TAG)
                raw = json.loads((Path(checkpoint) / "state.json").read_text())["state"]
                self.state = TrainState(**{**raw, "losses": [tuple(x) for x in raw["losses"]],
                                           "evals": [tuple(x) for x in raw["evals"]]})
                self.resumed_from = self.state.step
        if self.state.eval_loss_before is None:
            self.state.eval_loss_before = self.evaluate()
        return self

    def evaluate(self) -> float:
        """Mean eval loss per target token. Every rank evaluates all rows: under ZeRO-3 a
        forward pass is collective, so all ranks must run the same ones."""
        return evaluate(self.engine, self.data.eval, self.spec.batch_size, self.placement.device, None)

    # -- train (the loop is StepLoop.train) --------------------------------------------------
    def _micro_step(self, batch: dict[str, torch.Tensor], step_targets: int, last: bool) -> float:
        loss = summed_loss(self.engine, batch, None) / step_targets
        # DeepSpeed divides by the accumulation steps and averages over workers; scaling back
        # gives the gradient of the whole step's per-token mean loss, as in the LoRA recipe.
        self.engine.backward(loss * self.world * self.spec.grad_accum)
        self.engine.step()  # steps optimizer and schedule at the accumulation boundary only
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        """Nothing left to do: ``engine.step()`` stepped at the last micro-batch."""

    def _write_checkpoint(self, folder: Path) -> None:
        """Every rank writes its DeepSpeed shard into ``folder``; rank 0 adds ``state.json``
        listing every rank's files with their sizes (gathered), written last."""
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)
        mine = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        every: list[dict] = [mine]
        if self.world > 1:
            every = [None] * self.world  # type: ignore[list-item]
            torch.distributed.all_gather_object(every, mine)
        if self.rank == 0:
            files = {name: size for part in every for name, size in part.items()}
            meta = {"state": asdict(self.state), "files": files, "zero_stage": self.baseline.zero_stage,
                    "world_size": self.world}
            (folder / "state.json").write_text(json.dumps(meta))

    def probe_batch(self) -> dict[str, torch.Tensor]:
        """A fixed batch (the first eval rows) whose logits tie the saved model to the engine."""
        rows = list(range(min(2, len(self.data.eval))))
        return make_batch(self.data.eval, rows, self.placement.device)

    def save(self) -> FullResult:
        """Final eval; the ZeRO shards gathered into one transformers folder (rank 0); result."""
        from safetensors.torch import save_file

        state = self.state
        eval_after = self.evaluate()
        state.evals.append((state.step, eval_after))
        # Logits of the trained engine on the probe batch, saved beside the model so anyone can
        # check that the consolidated weights are the trained ones.
        probe = self.probe_batch()
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(**{k: v for k, v in probe.items() if k != "labels"}, use_cache=False).logits
        model_dir = self._consolidate()
        if self.rank == 0:
            save_file({**{k: v.cpu().contiguous() for k, v in probe.items()}, "logits": logits.float().cpu().contiguous()},
                      str(self.out / PROBE_FILE))
        peaks = [peak_memory_bytes(self.placement.device)]
        if self.world > 1:
            peaks = [0] * self.world
            torch.distributed.all_gather_object(peaks, peak_memory_bytes(self.placement.device))
        result = FullResult(
            tenant=self.job.tenant, method="full", steps=state.step, tokens=state.tokens_seen,
            train_seconds=round(state.train_seconds, 3), wall_seconds=round(time.perf_counter() - self.wall_start, 3),
            tokens_per_s=round(state.tokens_seen / state.train_seconds, 1) if state.train_seconds else 0.0,
            eval_loss_before=state.eval_loss_before, eval_loss_after=eval_after,
            trainable_params=self.trainable, total_params=self.total, adapter_dir="", adapter_bytes=0,
            peak_memory_bytes=max(peaks), precision=self.placement.precision, device=str(self.placement.device),
            padding_share=round(self.data.train.padding_share, 4), dataset_fingerprint=self.data.report.fingerprint,
            data_summary=self.data.report.summary(), resumed_from_step=self.resumed_from,
            stopped_early=state.stopped_early, losses=state.losses, evals=state.evals, zero_stage=self.baseline.zero_stage, offload=self.baseline.offload,
            workers=self.world, model_dir=str(model_dir),
            model_bytes=sum(f.stat().st_size for f in model_dir.iterdir()) if self.rank == 0 else 0,
            peak_memory_per_worker=peaks)
        if self.rank == 0:
            (self.out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
        self.checkpoints.finish(self.out, self._write_checkpoint, state.step,
                                {"step": state.step, "eval_loss": eval_after})
        return result

    def _consolidate(self) -> Path:
        """Gather every parameter (all ranks take part) and let rank 0 write a normal
        transformers model folder: safetensors weights, config and tokenizer."""
        import deepspeed

        module = self.engine.module
        final = self.out / MODEL_DIR
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.baseline.zero_stage == 3):
            if self.rank == 0:
                state_dict = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
        if self.rank != 0:
            return final
        with replacing_folder(final) as tmp:
            module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            load_tokenizer(self.job.base_model).save_pretrained(str(tmp))
        return final


def ray_full_loop(config: dict) -> dict:
    """Ray Train ``train_loop_per_worker`` of a baseline: one tenant's full fine-tune.

    ``config`` holds the ``job`` and ``baseline`` (as dicts), the number of torch ``threads`` and
    the run's storage folder ``run_dir``. Rank 0 prints progress lines, which Ray forwards to the
    driver (and to ``ray job logs``). The final checkpoint carries the consolidated ``model/``,
    ``probe.safetensors`` and ``result.json``.
    """
    from farm.train.common import ConsoleProgress
    from farm.train.ray_support import RayCheckpoints

    torch.set_num_threads(config.get("threads", 1))
    job = TenantJob.model_validate(config["job"])
    baseline = BaselineSpec.model_validate(config["baseline"])
    job = job.model_copy(update={"output_dir": tempfile.mkdtemp(prefix=f"farm-full-{job.tenant}-")})
    rank, _ = _world()
    checkpoints = RayCheckpoints(job.settings.train.keep_checkpoints, rank, config.get("run_dir"),
                                 sharded=True, artifacts=(MODEL_DIR, PROBE_FILE, RESULT_FILE))
    progress = ConsoleProgress(every=job.settings.train.log_every) if rank == 0 else _Quiet()
    recipe = FullRecipe(job, baseline, checkpoints, progress)
    try:
        return asdict(recipe.setup().train().save())
    finally:
        shutil.rmtree(job.output_dir, ignore_errors=True)


class _Quiet:
    """Progress of ranks other than 0: nothing (rank 0 speaks for the group)."""

    def on_step(self, event: StepEvent) -> None:
        pass

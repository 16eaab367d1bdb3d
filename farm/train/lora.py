"""Recipe: fine-tune one tenant's LoRA adapter on the frozen base model.

    farm train --spec jobs/configs/demo.yaml --tenant acme

Runs in one plain process (as above) or inside a Ray Train worker (the sweep); with several
workers it is data parallel (DDP over the process group Ray Train sets up). Shape of the
recipe: ``setup`` (placement, data, model, optimizer, resume) -> ``train`` (steps, eval,
checkpoints) -> ``save`` (the PEFT adapter as safetensors, atomically) -> result.

Exactness matters more than cleverness here: the loss of an optimizer step is normalised by
the number of target tokens in the whole step (all micro-batches, all workers), so gradient
accumulation and data parallelism give the gradient one big batch would; and a checkpoint
restores adapter, optimizer, scheduler, RNG and data position, so a resumed run ends on the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from farm.data import DataReport, TenantData, load_tenant_data
from farm.models import (Placement, build_peft_model, count_parameters, load_base_model,
                         load_tokenizer, select_device, select_placement)
from farm.spec import TenantJob
from farm.train.common import (ConsoleProgress, Progress, StepEvent, Stopwatch, TrainState,
                               build_optimizer, build_scheduler, evaluate, latest_checkpoint,
                               load_checkpoint, make_batch, peak_memory_bytes, rows_for,
                               save_checkpoint, summed_loss)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
RESULT_FILE = "result.json"


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
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def train_tenant(job: TenantJob, progress: Progress | None = None, resume: bool = True,
                 checkpoint_root: Path | None = None) -> TrainResult:
    """Train ``job``'s adapter and save it under ``job.output_dir/adapter``.

    Resumes from the newest checkpoint under ``checkpoint_root`` (default
    ``job.output_dir/checkpoints``) unless ``resume`` is false. Returns the result that is
    also written to ``job.output_dir/result.json``.
    """
    wall_start = time.perf_counter()
    rank, world = _world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    settings, spec = job.settings, job.settings.train
    out = Path(job.output_dir)
    checkpoint_root = checkpoint_root or out / CHECKPOINT_DIR
    progress = progress or ConsoleProgress(every=spec.log_every)

    # -- setup ---------------------------------------------------------------------------------
    placement: Placement = select_placement(spec.precision, select_device(local_rank))
    tokenizer = load_tokenizer(job.base_model)
    data: TenantData = load_tenant_data(job.tenant, settings.data, tokenizer)
    torch.manual_seed(spec.seed)  # same adapter init on every worker and every run
    model = build_peft_model(load_base_model(job.base_model, placement), settings)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model.parameters(), spec)
    scheduler = build_scheduler(optimizer, spec)
    state = TrainState()
    resumed_from = None
    checkpoint = latest_checkpoint(checkpoint_root) if resume else None
    if checkpoint is not None:
        from peft import set_peft_model_state_dict

        adapter_tensors, state = load_checkpoint(checkpoint, optimizer, scheduler)
        set_peft_model_state_dict(model, adapter_tensors)
        resumed_from = state.step
    else:
        # Dropout draws differ per worker; the init above was the same everywhere.
        torch.manual_seed(spec.seed + 1 + rank)
    engine = model
    if world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[placement.device.index] if placement.device.type == "cuda" else None)
    if state.eval_loss_before is None:
        state.eval_loss_before = evaluate(model, data.eval, spec.batch_size, placement.device,
                                          placement.autocast)

    # -- train ---------------------------------------------------------------------------------
    model.train()
    n_rows = len(data.train)
    rows_per_micro = spec.batch_size * world
    watch = Stopwatch()
    watch.total = seconds_at_start = state.train_seconds
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < spec.max_steps:
        with watch:
            micro = [rows_for(n_rows, spec.seed, state.rows_consumed + m * rows_per_micro, rows_per_micro)
                     for m in range(spec.grad_accum)]
            # Normalise by the target tokens of the whole step, over all micro-batches and
            # workers; every worker counts them from the shared, deterministic data order.
            step_targets = sum(data.train.targets[i] for rows in micro for i in rows)
            loss_total = 0.0
            for index, rows in enumerate(micro):
                mine = rows[rank * spec.batch_size:(rank + 1) * spec.batch_size]
                batch = make_batch(data.train, mine, placement.device)
                last = index == len(micro) - 1
                with engine.no_sync() if (world > 1 and not last) else nullcontext():
                    loss = summed_loss(engine, batch, placement.autocast) / step_targets
                    (loss * world).backward()  # DDP averages gradients over workers
                loss_total += float(loss.detach())
                step_tokens = sum(data.train.lengths[i] for i in mine)
                window_tokens += step_tokens
                state.tokens_seen += step_tokens * world
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.rows_consumed += rows_per_micro * spec.grad_accum
        state.train_seconds = watch.total
        if world > 1:
            loss_total = _all_reduce_sum(loss_total, placement.device)
        state.losses.append((state.step, round(loss_total, 6)))
        eval_loss = None
        if spec.eval_every and state.step % spec.eval_every == 0 and state.step < spec.max_steps:
            eval_loss = evaluate(model, data.eval, spec.batch_size, placement.device, placement.autocast)
            state.evals.append((state.step, eval_loss))
        saved = None
        if state.step % spec.checkpoint_every == 0 and state.step < spec.max_steps and rank == 0:
            saved = save_checkpoint(checkpoint_root, _adapter_state(model), optimizer, scheduler,
                                    state, spec.keep_checkpoints)
        elapsed = time.perf_counter() - window_start
        steps_this_run = state.step - (resumed_from or 0)
        per_step = (watch.total - seconds_at_start) / steps_this_run
        progress.on_step(StepEvent(
            tenant=job.tenant, step=state.step, max_steps=spec.max_steps, loss=loss_total,
            learning_rate=scheduler.get_last_lr()[0],
            tokens_per_s=window_tokens * world / elapsed if elapsed > 0 else 0.0,
            eta_s=per_step * (spec.max_steps - state.step), checkpoint=saved, eval_loss=eval_loss))
        window_tokens, window_start = 0, time.perf_counter()

    # -- save ----------------------------------------------------------------------------------
    eval_after = evaluate(model, data.eval, spec.batch_size, placement.device, placement.autocast)
    state.evals.append((state.step, eval_after))
    adapter_dir = out / ADAPTER_DIR
    if rank == 0:
        adapter_dir = save_adapter(model, out)
    result = TrainResult(
        tenant=job.tenant, method=settings.method, steps=state.step, tokens=state.tokens_seen,
        train_seconds=round(state.train_seconds, 3), wall_seconds=round(time.perf_counter() - wall_start, 3),
        tokens_per_s=round(state.tokens_seen / state.train_seconds, 1) if state.train_seconds else 0.0,
        eval_loss_before=state.eval_loss_before, eval_loss_after=eval_after,
        trainable_params=trainable, total_params=total, adapter_dir=str(adapter_dir),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()) if adapter_dir.is_dir() else 0,
        peak_memory_bytes=peak_memory_bytes(placement.device), precision=placement.precision,
        device=str(placement.device), padding_share=round(data.train.padding_share, 4),
        dataset_fingerprint=data.report.fingerprint, data_summary=data.report.summary(),
        resumed_from_step=resumed_from, losses=state.losses, evals=state.evals,
    )
    if rank == 0:
        (out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def save_adapter(model, out: Path) -> Path:
    """Save the PEFT adapter (safetensors) to ``out/adapter`` via a temporary folder + rename."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / ADAPTER_DIR
    tmp = out / f".tmp-adapter-{uuid.uuid4().hex[:8]}"
    unwrapped = model.module if hasattr(model, "module") else model
    unwrapped.save_pretrained(str(tmp), safe_serialization=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _all_reduce_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor)


def data_report_only(job: TenantJob) -> DataReport:
    """Validate a tenant's data (read, schema, render) without loading the model."""
    tokenizer = load_tokenizer(job.base_model)
    return load_tenant_data(job.tenant, job.settings.data, tokenizer).report

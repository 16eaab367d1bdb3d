"""Pieces every training recipe shares: batches, loss, eval, optimizer, checkpoints, progress.

Checkpoints never use pickle: tensors (adapter, optimizer moments, RNG states) are written as
safetensors and everything else as JSON, so resuming cannot execute code from disk. A
checkpoint is written into a temporary folder and renamed into place, so a crash never leaves
a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from farm.atomic import replacing_folder
from farm.data import IGNORE_INDEX, Rows
from farm.models import as_sharded_like, full_tensor
from farm.spec import TrainSpec

# -- data order ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of rows in one epoch: a fixed permutation per (seed, epoch). Cached: every
    step asks for it, and shuffling the whole epoch each time showed up in profiles."""
    order = list(range(n_rows))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def rows_for(n_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Row indices ``start .. start+count`` of the endless stream of shuffled epochs.

    The data position of a run is one integer (rows consumed), so a checkpoint can restore
    it exactly and co-training can interleave tenants without changing any tenant's order.
    """
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, n_rows)
        order = epoch_order(n_rows, seed, epoch)
        take = min(count - len(out), n_rows - offset)
        out.extend(order[offset: offset + take])
        position += take
    return out


def make_batch(rows: Rows, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the given rows into model inputs on ``device``.

    Packed rows carry position ids and no attention mask (transformers then builds a
    block-diagonal mask from the position ids). Unpacked rows are trimmed to the longest row
    of the batch, so padding costs no compute beyond that.
    """
    arrays = rows.batch(indices)
    batch = {name: torch.from_numpy(arrays[name]) for name in ("input_ids", "labels", "position_ids")}
    if rows.attention_mask is not None:
        mask = torch.from_numpy(arrays["attention_mask"])
        width = int(mask.sum(dim=1).max())
        # Right-padded rows: the model's own positions (0, 1, ...) are the same; leaving them to
        # the model lets PEFT's prompt-learning methods place their virtual tokens first.
        batch = {k: v[:, :width] for k, v in batch.items() if k != "position_ids"}
        batch["attention_mask"] = mask[:, :width]
    return {k: v.to(device) for k, v in batch.items()}


def target_count(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss (after the next-token shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's target tokens (fp32 logits)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast(device_type=batch["input_ids"].device.type, dtype=autocast,
                        enabled=autocast is not None):
        logits = model(**inputs, use_cache=False).logits
    # Prompt tuning returns logits for its virtual tokens too, ahead of the row's own.
    return next_token_loss(logits[:, -batch["labels"].shape[1]:], batch["labels"])


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each position's logits against the next token (fp32)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model, rows: Rows, batch_size: int, device: torch.device,
             autocast: torch.dtype | None) -> float:
    """Mean cross-entropy per target token over all ``rows`` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = make_batch(rows, list(range(start, min(start + batch_size, len(rows)))), device)
        total += float(summed_loss(model, batch, autocast))
        count += target_count(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)


# -- optimisation ----------------------------------------------------------------------------


def build_optimizer(params, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the fused/foreach choice is torch's)."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=spec.learning_rate,
                             weight_decay=spec.weight_decay)


#: the spec's schedule -> transformers' scheduler name (each warms up linearly first)
HF_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec):
    """The spec's learning-rate schedule: ``warmup_steps`` of linear warm-up from 0, then cosine,
    linear or constant to ``max_steps``, as the transformers Trainer schedules it
    (``transformers.get_scheduler``), so a farm run and a Trainer run with the same settings
    step with the same rates. A ``LambdaLR``: its state is plain numbers (JSON-safe)."""
    from transformers import get_scheduler

    return get_scheduler(HF_SCHEDULES[spec.schedule], optimizer, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.max_steps)


# -- checkpoints -----------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything about a run's progress that is not a tensor."""

    step: int = 0
    rows_consumed: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    eval_loss_before: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_eval: float | None = None     # early stopping: the lowest periodic eval loss so far
    evals_since_best: int = 0
    stopped_early: bool = False

    def record_eval(self, step: int, eval_loss: float, spec: TrainSpec) -> None:
        """Record a periodic eval; stop early after ``early_stop_patience`` evals without an
        improvement of at least ``early_stop_min_delta``."""
        self.evals.append((step, eval_loss))
        if self.best_eval is None or eval_loss < self.best_eval - spec.early_stop_min_delta:
            self.best_eval, self.evals_since_best = eval_loss, 0
        else:
            self.evals_since_best += 1
        if spec.early_stop_patience is not None and self.evals_since_best >= spec.early_stop_patience:
            self.stopped_early = True


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):  # whole, gathered from every worker when sharded (FSDP)
                tensors[f"{index}.{name}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # A sharded parameter's moments are sharded the same way (the checkpoint holds them whole).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        for name, value in entry.items():
            if torch.is_tensor(value) and index < len(params):
                entry[name] = as_sharded_like(value, params[index])
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(folder: Path, adapter_state: dict[str, torch.Tensor], optimizer, scheduler,
                     state: TrainState) -> None:
    """Write a checkpoint's files into ``folder`` (which must exist); ``state.json`` last."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()},
              str(folder / "adapter.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(folder / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_tensors()
    save_file(rng_tensors, str(folder / "rng.safetensors"))
    # The size of every other file, so a reader can tell a complete checkpoint from one whose
    # copy to shared storage was cut short (uploads do not preserve write order).
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "state.json"}
    meta = {"state": asdict(state), "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "rng": rng_meta, "files": files}
    # state.json last: a folder is a checkpoint only once it is there.
    (folder / "state.json").write_text(json.dumps(meta))


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` (sorts by step)."""
    return f"checkpoint-{step:07d}"


class CheckpointIO(Protocol):
    """Where a recipe's checkpoints go: a local folder, or Ray Train's storage."""

    def latest(self) -> "contextmanager[Path | None]": ...

    def save(self, write: Callable[[Path], None], step: int, metrics: dict) -> Path | None: ...

    def finish(self, out: Path, write: Callable[[Path], None], step: int, metrics: dict) -> None: ...


class LocalCheckpoints:
    """Checkpoints in a local folder: written to a temporary name, renamed, pruned to ``keep``.

    Used when a recipe runs in a plain process (``farm train``). Only rank 0 writes.
    """

    def __init__(self, root: Path, keep: int, rank: int = 0):
        self.root, self.keep, self.rank = root, keep, rank

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        """The newest complete checkpoint folder, or None."""
        yield latest_checkpoint(self.root)

    def save(self, write: Callable[[Path], None], step: int, metrics: dict) -> Path | None:
        """Write a checkpoint with ``write(folder)``; returns its final folder (rank 0)."""
        if self.rank != 0:
            return None
        final = self.root / checkpoint_name(step)
        with replacing_folder(final) as tmp:
            write(tmp)
        for old in sorted(self.root.glob("checkpoint-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def finish(self, out: Path, write: Callable[[Path], None], step: int, metrics: dict) -> None:
        """The final adapter is already in ``out``; a plain process has nothing to hand over."""


def checkpoint_is_complete(fs, folder: str) -> bool:
    """True when ``folder`` (on pyarrow file system ``fs``) holds every file its state.json lists."""
    import pyarrow.fs as pafs

    try:
        with fs.open_input_stream(f"{folder}/state.json") as stream:
            files = json.loads(stream.read()).get("files", {})
    except (OSError, ValueError):
        return False
    infos = fs.get_file_info([f"{folder}/{name}" for name in files])
    return all(info.type == pafs.FileType.File and info.size == files[name]
               for name, info in zip(files, infos))


def newest_complete_checkpoint(fs, root: str) -> str | None:
    """The newest complete ``checkpoint-*`` folder directly under ``root``, or None."""
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = sorted((e.base_name for e in entries
                    if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint-")),
                   reverse=True)
    for name in names:
        if checkpoint_is_complete(fs, f"{root.rstrip('/')}/{name}"):
            return f"{root.rstrip('/')}/{name}"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint in a local folder, or None."""
    import pyarrow.fs as pafs

    found = newest_complete_checkpoint(pafs.LocalFileSystem(), str(root))
    return Path(found) if found else None


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], TrainState]:
    """Restore optimizer, scheduler and RNG from ``path``; returns (adapter tensors, state)."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    _restore_rng(load_file(str(path / "rng.safetensors")), meta["rng"])
    raw = meta["state"]
    state = TrainState(**{**raw, "losses": [tuple(x) for x in raw["losses"]],
                          "evals": [tuple(x) for x in raw["evals"]]})
    return load_file(str(path / "adapter.safetensors")), state


# -- the step loop ---------------------------------------------------------------------------


class StepLoop:
    """The optimizer-step loop every recipe shares: data order, loss normalisation, eval,
    checkpoints and progress. A recipe supplies ``_micro_step`` (forward and backward of one
    micro-batch) and ``_optimizer_step``, and sets the attributes used below in ``setup``.

    The loss of an optimizer step is normalised by the number of target tokens of the whole
    step (all micro-batches, all workers), counted by every worker from the shared,
    deterministic data order; so gradient accumulation and data parallelism give the gradient
    one big batch would.
    """

    spec: TrainSpec
    state: TrainState
    resumed_from: int | None
    #: asked on rank 0 after every step (a service's cancel): True stops the run with JobCancelled
    should_stop: Callable[[], bool] | None = None

    def _micro_step(self, batch: dict[str, torch.Tensor], step_targets: int, last: bool) -> float:
        """Forward and backward of one micro-batch; returns its share of the step's loss."""
        raise NotImplementedError

    def _optimizer_step(self) -> None:
        """Apply the accumulated gradients (optimizer, schedule, zero the gradients)."""
        raise NotImplementedError

    def _write_checkpoint(self, folder: Path) -> None:
        raise NotImplementedError

    def train(self):
        """Run optimizer steps until ``max_steps``, with eval, checkpoints and progress."""
        spec, state, data, device = self.spec, self.state, self.data, self.placement.device
        rank, world = self.rank, self.world
        self.engine.train()
        n_rows = len(data.train)
        rows_per_micro = spec.batch_size * world
        watch = Stopwatch()
        watch.total = seconds_at_start = state.train_seconds
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < spec.max_steps and not state.stopped_early:
            with watch:
                micro = [rows_for(n_rows, spec.seed, state.rows_consumed + m * rows_per_micro, rows_per_micro)
                         for m in range(spec.grad_accum)]
                step_targets = sum(data.train.targets[i] for rows in micro for i in rows)
                loss_total = 0.0
                for index, rows in enumerate(micro):
                    mine = rows[rank * spec.batch_size:(rank + 1) * spec.batch_size]
                    loss_total += self._micro_step(make_batch(data.train, mine, device), step_targets,
                                                   last=index == len(micro) - 1)
                    # Every worker knows the whole micro-batch's rows: count all of them, exactly.
                    step_tokens = sum(data.train.lengths[i] for i in rows)
                    window_tokens += step_tokens
                    state.tokens_seen += step_tokens
                self._optimizer_step()
            state.step += 1
            state.rows_consumed += rows_per_micro * spec.grad_accum
            state.train_seconds = watch.total
            if world > 1:
                loss_total = all_reduce_sum(loss_total, device)
            state.losses.append((state.step, round(loss_total, 6)))
            eval_loss = None
            if spec.eval_every and state.step % spec.eval_every == 0 and state.step < spec.max_steps:
                eval_loss = self.evaluate()
                state.record_eval(state.step, eval_loss, spec)
            saved = None
            if state.step % spec.checkpoint_every == 0 and state.step < spec.max_steps and not state.stopped_early:
                saved = self.checkpoints.save(self._write_checkpoint, state.step,
                                              {"step": state.step, "loss": loss_total})
            elapsed = time.perf_counter() - window_start
            per_step = (watch.total - seconds_at_start) / (state.step - (self.resumed_from or 0))
            self.progress.on_step(StepEvent(
                tenant=self.job.tenant, step=state.step, max_steps=spec.max_steps, loss=loss_total,
                learning_rate=self.scheduler.get_last_lr()[0],
                tokens_per_s=window_tokens / elapsed if elapsed > 0 else 0.0,
                eta_s=per_step * (spec.max_steps - state.step), checkpoint=saved, eval_loss=eval_loss))
            window_tokens, window_start = 0, time.perf_counter()
            if self.should_stop is not None:
                stop = self.should_stop() if rank == 0 else False
                if world > 1:  # every rank stops at the same step, or the others would hang in a collective
                    stop = all_reduce_sum(float(stop), device) > 0
                if stop:
                    raise JobCancelled(f"cancelled after step {state.step}")
            # Fault injection for the resume tests: the worker fails once, after the checkpoint of that step.
            fail_at = os.environ.get("FARM_FAIL_AT_STEP")
            if fail_at and state.step == int(fail_at) and self.resumed_from is None:
                raise InjectedWorkerFailure(f"FARM_FAIL_AT_STEP: injected failure after step {state.step}")
        return self


_PEER_LOST = re.compile(r"gloo/transport|ProcessGroupNCCL|NCCL (error|communicator)|Connection (closed|reset) by peer"
                        r"|DistBackendError|DistNetworkError", re.IGNORECASE)


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another worker of the group died
    (gloo raises a plain ``RuntimeError`` naming its transport, NCCL names itself; newer torch
    raises ``DistError``s). In a multi-worker pool that is the worker group's failure, for Ray
    Train to restart (and resume the tenant), not the tenant's."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    return bool(_PEER_LOST.search(str(exc)[:2000]))


class JobCancelled(RuntimeError):
    """The run was asked to stop (``StepLoop.should_stop``): not a failure of the tenant."""


class InjectedWorkerFailure(RuntimeError):
    """``FARM_FAIL_AT_STEP``'s failure: it stands for a worker that dies, not for a tenant's
    error, so pools let it through and Ray Train restarts the worker group (which resumes)."""


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a Python number over all workers of the process group."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor)


# -- progress --------------------------------------------------------------------------------


@dataclass
class StepEvent:
    """What a recipe reports after an optimizer step."""

    tenant: str
    step: int
    max_steps: int
    loss: float
    learning_rate: float
    tokens_per_s: float
    eta_s: float
    checkpoint: Path | None = None
    eval_loss: float | None = None


class Progress(Protocol):
    """Receives step events; Ray reporting and the console printer both implement it."""

    def on_step(self, event: StepEvent) -> None: ...


class ConsoleProgress:
    """Prints one progress line every ``every`` steps (and on checkpoints and the last step)."""

    def __init__(self, every: int = 10, stream=None):
        self.every = every
        self.stream = stream or sys.stdout

    def on_step(self, event: StepEvent) -> None:
        if event.step % self.every and event.step != event.max_steps and event.eval_loss is None:
            return
        line = (f"[{event.tenant}] step {event.step:>5}/{event.max_steps}  loss {event.loss:.4f}  "
                f"lr {event.learning_rate:.2e}  {event.tokens_per_s:,.0f} tok/s  "
                f"eta {_duration(event.eta_s)}")
        if event.eval_loss is not None:
            line += f"  eval {event.eval_loss:.4f}"
        print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on GPUs, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class Stopwatch:
    """Wall time of the training steps only (not start-up, eval or checkpoints)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start: float | None = None

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.total += time.perf_counter() - (self._start or time.perf_counter())

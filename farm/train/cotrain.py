"""Recipe: co-train several tenants' LoRA adapters on one shared, frozen copy of the base model.

    farm cotrain --spec jobs/configs/demo.yaml --tenants acme,globex,initech --slots 2

Small tenants waste a worker each: its own copy of the base, its own start-up, a device that
mostly idles. Here one process holds the base once and up to ``slots`` tenants' adapters at a
time. Every optimizer step takes one micro-batch from each active tenant, runs **one** forward
and backward pass through the base for all their rows, and routes every row through its own
tenant's adapter only (``AdapterRouter``: each LoRA layer adds adapter *t*'s update to the rows
of tenant *t*, as batched matmuls when the tenants' shapes agree). The loss is the sum over tenants of each tenant's loss
normalised by its own target tokens, so each adapter receives exactly the gradient its
isolated training would compute; then each tenant's own optimizer, schedule, clipping, step
count, eval and checkpoint move on as in ``farm.train.adapter``. A tenant that reaches its
``max_steps`` is saved and removed, and the next waiting tenant takes its slot: the base and
the process stay.

Exactness: in fp32 with ``lora.dropout: 0`` (dropout masks are random draws, which no two
schedules share), every co-trained adapter equals the one ``farm train`` produces after the
same steps, to float rounding; ``tests/train/test_cotrain.py`` checks 1e-5.

Only methods whose entry in ``farm.methods`` is ``co_trainable`` share a batch: plain LoRA,
whose update the router below adds per row slice. DoRA (its magnitude normalises the whole
updated weight), IA3 (it scales whole activations), prefix and prompt tuning (they change the
sequence itself) and QLoRA (one 4-bit base per tenant is the point of it) train alone, in the
sweep's single-tenant pools; the sweep's planner packs only co-trainable tenants.

Tenants that share a pack must share the base model and the row layout (``max_seq_len`` and
``packing``), so that their rows stack into one batch; ``TenantJob.pack_key`` says which can. PEFT's own
mixed-adapter batches (``adapter_names``) are refused in training mode and loop over adapters
with index lists in every layer; the router below does the same routing with row slices, and
with one ``bmm`` for all tenants where their shapes agree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from farm.atomic import replacing_folder
from farm.data import IGNORE_INDEX, DataError, TenantData, load_tenant_data
from farm.methods import co_trainable_methods, method_info
from farm.models import Placement, count_parameters, load_base_model, load_tokenizer, select_placement, warm_start
from farm.spec import TenantJob
from farm.train.common import (CheckpointIO, ConsoleProgress, LocalCheckpoints, Progress, StepEvent, Stopwatch,
                               TrainState, build_optimizer, build_scheduler, evaluate, load_checkpoint, make_batch,
                               next_token_loss, peak_memory_bytes, rows_for, write_checkpoint)
from farm.train.adapter import ADAPTER_DIR, CHECKPOINT_DIR, RESULT_FILE, TrainResult

logger = logging.getLogger(__name__)


class ListSource:
    """The tenants of a fixed pack, handed out in order (``farm train``'s and the tests' source)."""

    def __init__(self, jobs: list[TenantJob]):
        self.waiting = list(jobs)

    def take(self, count: int) -> list[TenantJob]:
        taken, self.waiting = self.waiting[:count], self.waiting[count:]
        return taken

    def finished(self, tenant: str) -> None:
        pass

    def failed(self, tenant: str, error: str, status: str = "failed") -> None:
        pass

    def wait_for_work(self) -> bool:
        return False  # a fixed list never grows


@dataclass
class Slot:
    """One active tenant in the pack: its data, optimizer, schedule, progress and checkpoints."""

    job: TenantJob
    data: TenantData
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    checkpoints: CheckpointIO
    trainable: int
    resumed_from: int | None
    started: float
    watch: Stopwatch

    @property
    def name(self) -> str:
        return self.job.tenant


class AdapterRouter:
    """Adds each tenant's low-rank update to its own rows, and only to them.

    While ``route(segments)`` is active (``segments``: ``(tenant, first_row, end_row)`` in row
    order, covering the batch), the PEFT model runs with its adapters disabled, so every LoRA
    layer computes the frozen base alone; a forward hook on each LoRA layer then adds
    ``B_t(A_t(x_t)) * scale_t`` for every tenant ``t`` that adapts that layer. When every
    tenant has the same number of rows and the same rank there (the common case of small
    tenants) and ``batched`` is on, the K updates are two batched matmuls (``bmm``) instead of K
    pairs of matmuls, which saves kernel launches on GPUs; otherwise it goes tenant by tenant,
    with exactly the arithmetic PEFT's own LoRA forward does on those rows (the fp32 exactness
    contract). ``bmm`` accumulates in another order, so its adapters differ from isolated
    training by float rounding amplified through Adam (about 1e-5 after a few steps): the
    co-trainer turns it on for bf16 runs, where runs are not bit-comparable anyway; on CPUs the
    shared base matmuls, not the adapter updates, are what co-training saves.
    """

    def __init__(self, model, batched: bool = False):
        self.model = model
        self.batched = batched
        self.segments: list[tuple[str, int, int]] | None = None
        self._hooked: dict[int, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Hook LoRA layers created since the last call (a new tenant may target new modules)."""
        from peft.tuners.lora import Linear

        for module in self.model.modules():
            if isinstance(module, Linear) and id(module) not in self._hooked:
                module.register_forward_hook(self._add_updates)
                self._hooked[id(module)] = module

    @contextmanager
    def route(self, segments: list[tuple[str, int, int]]):
        # The layers compute the base only and the hook adds the updates. PEFT's public
        # disable_adapter() would also switch the adapters' requires_grad off (and on exit leave
        # only its one "active" adapter trainable), so the flag is set on the layers directly.
        layers = list(self._hooked.values())
        self.segments = segments
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            self.segments = None
            for layer in layers:
                layer._disable_adapters = False

    def _add_updates(self, module, args, output):
        if self.segments is None:
            return None
        x = args[0]
        present = [seg for seg in self.segments if seg[0] in module.lora_A]
        if not present:
            return None
        dtype = module.lora_A[present[0][0]].weight.dtype
        sizes = {end - start for _, start, end in present}
        ranks = {module.r[name] for name, _, _ in present}
        plain = all(isinstance(module.lora_dropout[name], torch.nn.Identity) for name, _, _ in present)
        if self.batched and len(present) > 1 and len(present) == len(self.segments) and len(sizes) == 1 \
                and len(ranks) == 1 and plain:
            k = len(present)
            xs = x.to(dtype).reshape(k, -1, x.shape[-1])                                   # [k, rows*seq, in]
            a = torch.stack([module.lora_A[name].weight for name, _, _ in present])        # [k, r, in]
            b = torch.stack([module.lora_B[name].weight for name, _, _ in present])        # [k, out, r]
            scale = torch.tensor([module.scaling[name] for name, _, _ in present], dtype=dtype,
                                 device=x.device).view(k, 1, 1)
            update = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * scale
            return output + update.reshape(output.shape).to(output.dtype)
        pieces = []
        for name, start, end in self.segments:
            piece = output[start:end]
            if name in module.lora_A:
                lora_a, lora_b = module.lora_A[name], module.lora_B[name]
                update = lora_b(lora_a(module.lora_dropout[name](x[start:end].to(dtype)))) * module.scaling[name]
                piece = piece + update.to(output.dtype)
            pieces.append(piece)
        return torch.cat(pieces)


def _stack(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate tenants' batches row-wise; unpacked rows are right-padded to one width
    (pad tokens carry no loss and are masked out of attention)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "attention_mask": 0}
    keys = batches[0].keys()
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=fill[key]) for b in batches])
            for key in keys}


class CoTrainer:
    """Co-train the adapters of ``jobs`` (all in one pack), ``slots`` of them at a time.

    ``checkpoints_for(job)`` says where a tenant's checkpoints go (default: its output
    folder, as ``farm train``). ``run()`` returns tenant -> ``TrainResult`` for the tenants that
    finished and tenant -> error message for those that failed.
    """

    def __init__(self, jobs: list[TenantJob], slots: int, progress: Progress | None = None, resume: bool = True,
                 checkpoints_for: Callable[[TenantJob], CheckpointIO] | None = None, batched: bool | None = None,
                 source=None):
        if not jobs:
            raise ValueError("co-training needs at least one tenant")
        keys = {job.pack_key for job in jobs}
        if len(keys) > 1:
            raise ValueError(f"tenants {', '.join(j.tenant for j in jobs)} cannot share a pack: they differ in "
                             "base model, max_seq_len, packing, method or precision")
        if not method_info(jobs[0].settings.method).co_trainable:
            raise ValueError(f"method {jobs[0].settings.method!r} cannot be co-trained (co-trainable: "
                             f"{', '.join(co_trainable_methods())}); train it alone with `farm train`")
        self.jobs, self.slots = list(jobs), max(1, slots)
        # Where tenants come from: this fixed list, or a pool's queue (``take``, ``finished``,
        # ``failed``; farm.pools) whose tenants must all share the first job's pack key.
        self.source = source if source is not None else ListSource(self.jobs)
        self.key = jobs[0].pack_key
        self.progress = progress or ConsoleProgress(every=jobs[0].settings.train.log_every)
        self.resume = resume
        self.checkpoints_for = checkpoints_for or (
            lambda job: LocalCheckpoints(Path(job.output_dir) / CHECKPOINT_DIR, job.settings.train.keep_checkpoints))
        self.results: dict[str, TrainResult] = {}
        self.errors: dict[str, str] = {}
        self.packed_with: dict[str, list[str]] = {}  # tenant -> tenants it shared steps with
        self.step_seconds = 0.0  # time in training steps (all tenants), for throughput figures
        self.step_tokens = 0
        self.batched = batched  # the router's bmm path; None: on for bf16 runs (see AdapterRouter)
        self.model = None

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> "CoTrainer":
        first = self.jobs[0]
        self.placement: Placement = select_placement(first.settings.train.precision)
        self.tokenizer = load_tokenizer(first.base_model)
        self.base = load_base_model(first.base_model, self.placement)
        return self

    def _admit(self, job: TenantJob) -> Slot:
        """Load a tenant's data, add its adapter (seeded as ``farm train`` seeds it), build its
        optimizer and schedule, and resume it from its newest checkpoint."""
        from peft import get_peft_model, set_peft_model_state_dict

        data = load_tenant_data(job.tenant, job.settings.data, self.tokenizer)
        spec = job.settings.train
        config = method_info(job.settings.method).to_peft_config(job.settings.method_settings(),
                                                                 job.base_model.name_or_path)
        torch.manual_seed(spec.seed)  # the same adapter init as isolated training
        if self.model is None:
            self.model = get_peft_model(self.base, config, adapter_name=job.tenant)
            batched = self.placement.precision == "bf16" if self.batched is None else self.batched
            self.router = AdapterRouter(self.model, batched=batched)
        else:
            self.model.add_adapter(job.tenant, config)
            self.router.refresh()
        warm_start(self.model, job, job.tenant)  # train.init_from (a resumed run overwrites it below)
        params = [p for name, p in self.model.named_parameters()
                  if f"lora_A.{job.tenant}." in name or f"lora_B.{job.tenant}." in name]
        for param in params:
            param.requires_grad_(True)
        optimizer = build_optimizer(params, spec)
        scheduler = build_scheduler(optimizer, spec)
        state, resumed_from = TrainState(), None
        checkpoints = self.checkpoints_for(job)
        if self.resume:
            with checkpoints.latest() as checkpoint:
                if checkpoint is not None:
                    tensors, state = load_checkpoint(checkpoint, optimizer, scheduler)
                    set_peft_model_state_dict(self.model, tensors, adapter_name=job.tenant)
                    resumed_from = state.step
        slot = Slot(job=job, data=data, params=params, optimizer=optimizer, scheduler=scheduler, state=state,
                    checkpoints=checkpoints, trainable=sum(p.numel() for p in params), resumed_from=resumed_from,
                    started=time.perf_counter(), watch=Stopwatch())
        slot.watch.total = state.train_seconds
        if state.eval_loss_before is None:
            state.eval_loss_before = self._evaluate(slot)
        return slot

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, TrainResult | str]:
        """Train every tenant the source hands out; slots freed by finished tenants take the next."""
        if self.model is None and not hasattr(self, "base"):
            self.setup()
        active: dict[str, Slot] = {}
        finished: list[str] = []  # adapters still in the model; PEFT cannot remove its last one
        while True:
            while len(active) < self.slots and (jobs := self.source.take(self.slots - len(active))):
                for job in jobs:
                    try:
                        if job.pack_key != self.key:
                            raise DataError(job.tenant, job.settings.data.path or "", "cannot share this pool: it "
                                            "differs in base model, max_seq_len, packing, method or precision")
                        active[job.tenant] = self._admit(job)
                    except DataError as exc:  # this tenant's data, nobody else's problem
                        self.errors[job.tenant] = str(exc)
                        self.source.failed(job.tenant, str(exc), "invalid")
                        logger.warning("[%s] not started: %s", job.tenant, exc)
            for name in list(finished):
                if len(self.model.peft_config) > 1:
                    self.model.delete_adapter(name)
                    finished.remove(name)
            if not active and not self.source.wait_for_work():
                break  # nothing training, nothing left to take, nothing arrived within the idle time
            # Adding or deleting an adapter makes PEFT mark only its "active" one trainable.
            for slot in active.values():
                for param in slot.params:
                    param.requires_grad_(True)
            for name in active:
                self.packed_with[name] = sorted(set(self.packed_with.get(name, [])) | (set(active) - {name}))
            for name, error in self._step(list(active.values())).items():
                self.errors[name] = error
                self.source.failed(name, error)
                logger.warning("[%s] failed: %s", name, error)
                finished.append(name)  # its adapter leaves the model with the next change
                del active[name]
            for name in [n for n, s in active.items()
                         if s.state.step >= s.job.settings.train.max_steps or s.state.stopped_early]:
                self.results[name] = self._finish(active.pop(name))
                self.source.finished(name)
                finished.append(name)
        return {**self.results, **self.errors}

    def _step(self, slots: list[Slot]) -> dict[str, str]:
        """One optimizer step for every active tenant: shared forward and backward per micro-batch.

        Each tenant's batches are built first, apart: a tenant whose rows cannot be read (its
        spilled data gone, a row it cannot build) leaves the step before anything is computed
        and is returned (tenant -> error) to end alone; the others step as if it never was.
        """
        device, autocast = self.placement.device, self.placement.autocast
        self.model.train()
        plans, built, failed = {}, {}, {}
        for slot in slots:
            spec = slot.job.settings.train
            try:
                micro = [rows_for(len(slot.data.train), spec.seed, slot.state.rows_consumed + m * spec.batch_size,
                                  spec.batch_size) for m in range(spec.grad_accum)]
                plans[slot.name] = (micro, sum(slot.data.train.targets[i] for rows in micro for i in rows))
                built[slot.name] = [make_batch(slot.data.train, rows, device) for rows in micro]
            except Exception as exc:  # this tenant's data, nobody else's step
                failed[slot.name] = f"tenant '{slot.name}': step {slot.state.step + 1}: {type(exc).__name__}: {exc}"
        slots = [slot for slot in slots if slot.name not in failed]
        if not slots:
            return failed
        accum = max(s.job.settings.train.grad_accum for s in slots)
        losses = {slot.name: 0.0 for slot in slots}
        started = time.perf_counter()
        for m in range(accum):
            members = [s for s in slots if m < s.job.settings.train.grad_accum]
            batches = [built[s.name][m] for s in members]
            batch = _stack(batches)
            segments, row = [], 0
            for slot, part in zip(members, batches):
                segments.append((slot.name, row, row + part["input_ids"].shape[0]))
                row += part["input_ids"].shape[0]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with self.router.route(segments), torch.autocast(device_type=device.type, dtype=autocast,
                                                          enabled=autocast is not None):
                logits = self.model(**inputs, use_cache=False).logits
            total = 0.0
            start = 0
            for slot, part in zip(members, batches):
                rows = part["input_ids"].shape[0]
                summed = next_token_loss(logits[start:start + rows], batch["labels"][start:start + rows])
                loss = summed / plans[slot.name][1]  # normalised by this tenant's own step tokens
                total = total + loss
                losses[slot.name] += float(loss.detach())
                slot.state.tokens_seen += sum(slot.data.train.lengths[i] for i in plans[slot.name][0][m])
                start += rows
            total.backward()  # adapters are disjoint: each gets exactly its own tenant's gradient
        elapsed = time.perf_counter() - started
        self.step_seconds += elapsed
        for slot in slots:
            spec = slot.job.settings.train
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(slot.params, spec.grad_clip)
            slot.optimizer.step()
            slot.scheduler.step()
            slot.optimizer.zero_grad(set_to_none=True)
            slot.watch.total += elapsed
            state = slot.state
            state.step += 1
            state.rows_consumed += spec.batch_size * spec.grad_accum
            state.train_seconds = slot.watch.total
            state.losses.append((state.step, round(losses[slot.name], 6)))
            eval_loss = None
            if spec.eval_every and state.step % spec.eval_every == 0 and state.step < spec.max_steps:
                eval_loss = self._evaluate(slot)
                state.record_eval(state.step, eval_loss, spec)
            saved = None
            if state.step % spec.checkpoint_every == 0 and state.step < spec.max_steps and not state.stopped_early:
                saved = slot.checkpoints.save(lambda folder, s=slot: self._write_checkpoint(s, folder), state.step,
                                              {"step": state.step, "loss": losses[slot.name]})
            tokens = sum(slot.data.train.lengths[i] for rows in plans[slot.name][0] for i in rows)
            self.step_tokens += tokens
            self.progress.on_step(StepEvent(
                tenant=slot.name, step=state.step, max_steps=spec.max_steps, loss=losses[slot.name],
                learning_rate=slot.scheduler.get_last_lr()[0], tokens_per_s=tokens / elapsed if elapsed else 0.0,
                eta_s=elapsed * (spec.max_steps - state.step), checkpoint=saved, eval_loss=eval_loss))
        return failed

    def _evaluate(self, slot: Slot) -> float:
        """Mean eval loss per target token of one tenant's adapter (every row routed to it)."""
        with self.router.route([(slot.name, 0, sys.maxsize)]):
            return evaluate(self.model, slot.data.eval, slot.job.settings.train.batch_size,
                            self.placement.device, self.placement.autocast)

    def _adapter_state(self, slot: Slot) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=slot.name)

    def _write_checkpoint(self, slot: Slot, folder: Path) -> None:
        write_checkpoint(folder, self._adapter_state(slot), slot.optimizer, slot.scheduler, slot.state)

    def _finish(self, slot: Slot) -> TrainResult:
        """Final eval, the tenant's adapter saved as a normal PEFT adapter, its result."""
        state = slot.state
        eval_after = self._evaluate(slot)
        state.evals.append((state.step, eval_after))
        out = Path(slot.job.output_dir)
        adapter_dir = self._save_adapter(slot, out)
        _, total = count_parameters(self.model)
        result = TrainResult(
            tenant=slot.name, method=self.jobs[0].settings.method, steps=state.step, tokens=state.tokens_seen,
            train_seconds=round(state.train_seconds, 3), wall_seconds=round(time.perf_counter() - slot.started, 3),
            tokens_per_s=round(state.tokens_seen / state.train_seconds, 1) if state.train_seconds else 0.0,
            eval_loss_before=state.eval_loss_before, eval_loss_after=eval_after, trainable_params=slot.trainable,
            total_params=total, adapter_dir=str(adapter_dir),
            adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()),
            peak_memory_bytes=peak_memory_bytes(self.placement.device), precision=self.placement.precision,
            device=str(self.placement.device), padding_share=round(slot.data.train.padding_share, 4),
            dataset_fingerprint=slot.data.report.fingerprint, data_summary=slot.data.report.summary(),
            resumed_from_step=slot.resumed_from, stopped_early=state.stopped_early, losses=state.losses,
            evals=state.evals)
        (out / RESULT_FILE).write_text(json.dumps({**asdict(result), "packed_with": self.packed_with.get(slot.name, [])},
                                                  indent=2) + "\n")
        slot.checkpoints.finish(out, lambda folder: self._write_checkpoint(slot, folder), state.step,
                                {"step": state.step, "eval_loss": eval_after})
        return result

    def _save_adapter(self, slot: Slot, out: Path) -> Path:
        """PEFT's own save of this tenant's adapter (it lands in a sub-folder named after the
        adapter), moved to ``out/adapter`` through a temporary name."""
        final = out / ADAPTER_DIR
        with replacing_folder(final) as tmp:
            scratch = tmp / ".peft"
            self.model.save_pretrained(str(scratch), selected_adapters=[slot.name], safe_serialization=True)
            saved = scratch / slot.name if (scratch / slot.name).is_dir() else scratch
            for item in saved.iterdir():
                os.replace(item, tmp / item.name)
            shutil.rmtree(scratch)
        return final


def cotrain(jobs: list[TenantJob], slots: int, progress: Progress | None = None,
            resume: bool = True) -> dict[str, TrainResult | str]:
    """Co-train ``jobs`` (one pack) ``slots`` at a time in this process; see ``CoTrainer``."""
    return CoTrainer(jobs, slots, progress, resume).setup().run()


class _PackProgress:
    """Forwards every tenant's step events to the sweep's progress board."""

    def __init__(self, board):
        from farm.train.ray_support import BoardProgress

        self.board = board
        self.per_tenant: dict[str, BoardProgress] = {}
        self._make = BoardProgress

    def on_step(self, event: StepEvent) -> None:
        if event.tenant not in self.per_tenant:
            self.per_tenant[event.tenant] = self._make(self.board, event.tenant)
        self.per_tenant[event.tenant].on_step(event)


def ray_cotrain_loop(config: dict) -> dict:
    """Ray Train ``train_loop_per_worker`` of a pool: a co-training worker that takes tenants
    from its group's queue until the queue runs dry.

    ``config`` holds the group's ``prototype`` job (dict: base model and precision to load),
    the ``queue`` actor and this ``pool``'s name, its ``slots``, its ``idle_s`` (how long it
    waits for tenants on an open queue with every slot free before it ends), the torch ``threads``, the
    ``board`` actor and ``tenants_dir``, the folder on shared storage where each tenant's
    checkpoints and final adapter go (``<tenants_dir>/<tenant>/``, whichever pool trains it).
    A restarted worker group resumes the tenants this pool had taken from their newest complete
    checkpoint, skipping those whose final adapter is there.
    """
    import tempfile

    from farm.pools import QueueSource
    from farm.train.ray_support import StorageCheckpoints

    torch.set_num_threads(config.get("threads", 1))
    local = tempfile.mkdtemp(prefix="farm-pool-")
    tenants_dir = config["tenants_dir"].rstrip("/")
    prototype = TenantJob.model_validate(config["prototype"])
    source = QueueSource(config["queue"], config["pool"], tenants_dir, local, idle_s=config.get("idle_s"))
    try:
        trainer = CoTrainer([prototype], config["slots"], progress=_PackProgress(config.get("board")), source=source,
                            checkpoints_for=lambda job: StorageCheckpoints(f"{tenants_dir}/{job.tenant}",
                                                                           job.settings.train.keep_checkpoints))
        trainer.setup().run()
        return {"errors": trainer.errors, "packed_with": trainer.packed_with}
    finally:
        shutil.rmtree(local, ignore_errors=True)

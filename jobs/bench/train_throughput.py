"""Training throughput: `farm train` against transformers' Trainer with a PEFT model.

    python jobs/bench/train_throughput.py [--spec jobs/configs/demo.yaml] [--tenant acme] \
        [--steps 30] [--out bench-results/train_throughput.json]

The same tenant, settings and number of optimizer steps go through

  (a) farm     ``farm.train.lora.train_tenant`` (what ``farm train`` runs): packed rows;
  (b) hf-trainer  what a user would write instead: the same base model and tokenizer, the same
               LoRA config (``farm.models.build_peft_model``), one example per row, dynamically
               padded by ``DataCollatorForSeq2Seq``, trained by ``transformers.Trainer`` with the
               same batch size, accumulation, learning rate, schedule, clipping and seed.

Each variant runs in its own fresh subprocess (this script, re-invoked with the hidden
``--variant`` option), so its peak RSS is its own. Both see the same number of optimizer steps
and rows per step; farm's rows hold several examples each, so tokens per step differ: that is
what is measured. Reported per variant: real (non-pad) tokens per second of training-step time
(model load, eval and saving excluded), examples per second, peak memory (peak RSS on CPU, the
CUDA allocator's peak on GPU) and the share of padding tokens; then the farm/hf ratios and the
goals: (a) at least as fast as (b), with no more memory, and under 5% padding with packing on.
A benchmark only reports; it exits 0 whether the goals are met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("farm", "hf-trainer")
PADDING_GOAL = 0.05


# -- helpers shared by both variants ---------------------------------------------------------


def _load_job(spec_path: str, tenant: str, steps: int, output_dir: str):
    from farm.spec import load_spec

    job = load_spec(spec_path).job(tenant)
    train = job.settings.train.model_copy(update={"max_steps": steps})
    settings = job.settings.model_copy(update={"train": train})
    return job.model_copy(update={"settings": settings, "output_dir": output_dir})


def _peak_memory(device) -> int:
    from farm.train.common import peak_memory_bytes

    return peak_memory_bytes(device)


def _examples_in_row(position_ids: list[int], length: int) -> int:
    # Every example in a row starts with position 0 (packed or not).
    return sum(1 for p in position_ids[:length] if p == 0)


# -- variant (a): farm -----------------------------------------------------------------------


def run_farm(args, workdir: str) -> dict:
    from farm.data import load_tenant_data
    from farm.models import load_tokenizer
    from farm.train.common import rows_for
    from farm.train.lora import train_tenant

    job = _load_job(args.spec, args.tenant, args.steps, str(Path(workdir) / "farm-out"))
    spec = job.settings.train
    start = time.perf_counter()
    result = train_tenant(job, resume=False)
    wall = time.perf_counter() - start
    # Peak memory as train_tenant measured it (before anything below could add to it).
    peak = result.peak_memory_bytes

    # Which rows the run consumed is deterministic (seed, step count): rebuild the rows to
    # count examples and the padding inside those batches (for comparison with hf-trainer).
    tokenizer = load_tokenizer(job.base_model)
    train = load_tenant_data(job.tenant, job.settings.data, tokenizer).train
    consumed = rows_for(len(train), spec.seed, 0, result.steps * spec.batch_size * spec.grad_accum)
    real = sum(train.lengths[i] for i in consumed)
    if train.attention_mask is None:  # packed rows are always computed at full length
        total = len(consumed) * len(train.input_ids[0])
    else:  # unpacked rows are trimmed to the longest row of each micro-batch
        total = 0
        per_micro = spec.batch_size
        for at in range(0, len(consumed), per_micro):
            chunk = consumed[at:at + per_micro]
            total += len(chunk) * max(train.lengths[i] for i in chunk)
    examples = sum(_examples_in_row(train.position_ids[i], train.lengths[i]) for i in consumed)
    return {
        "variant": "farm",
        "steps": result.steps,
        "rows": len(consumed),
        "examples": examples,
        "real_tokens": result.tokens,
        "batch_tokens": total,
        "train_seconds": result.train_seconds,
        "wall_seconds": round(wall, 3),
        "tokens_per_s": result.train_seconds and result.tokens / result.train_seconds,
        "examples_per_s": result.train_seconds and examples / result.train_seconds,
        "peak_memory_bytes": peak,
        "padding_share": result.padding_share,  # over all training rows, as farm reports it
        "padding_share_consumed": (total - real) / total if total else 0.0,
        "device": result.device,
        "precision": result.precision,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "consistency": {"real_tokens_recounted": real},
    }


# -- variant (b): transformers Trainer + PEFT ------------------------------------------------


class CountingCollator:
    """Wraps a collator; records (real tokens, all tokens, examples, seconds) per batch."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int, float]] = []

    def __call__(self, features):
        start = time.perf_counter()
        batch = self.inner(features)
        seconds = time.perf_counter() - start
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), int(mask.numel()), int(mask.shape[0]), seconds))
        return batch


def run_hf_trainer(args, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from transformers.utils import logging as hf_logging

    from farm.data import load_tenant_data
    from farm.models import build_peft_model

    hf_logging.disable_progress_bar()  # quiet like farm's own loader; no effect on timing
    job = _load_job(args.spec, args.tenant, args.steps, str(Path(workdir) / "hf-out"))
    spec = job.settings.train
    start = time.perf_counter()

    # What a user writes: tokenizer and model, the same LoRA config, per-example rows.
    tokenizer = AutoTokenizer.from_pretrained(job.base_model.name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(job.base_model.name_or_path, dtype=torch.float32)
    model.config.use_cache = False
    model = build_peft_model(model, job.settings)

    data_spec = job.settings.data.model_copy(update={"packing": False})
    rows = load_tenant_data(job.tenant, data_spec, tokenizer).train
    dataset = Dataset.from_dict({
        "input_ids": [ids[:n] for ids, n in zip(rows.input_ids, rows.lengths)],
        "labels": [labels[:n] for labels, n in zip(rows.labels, rows.lengths)],
        "attention_mask": [mask[:n] for mask, n in zip(rows.attention_mask, rows.lengths)],
    })
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds = 0.0
            self.train_seconds = 0.0
            self._step = self._train = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._train = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._step = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds += time.perf_counter() - self._step

        def on_train_end(self, args, state, control, **kwargs):
            self.train_seconds = time.perf_counter() - self._train

    timer = StepTimer()
    training_args = TrainingArguments(
        output_dir=str(Path(workdir) / "hf-out"),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        max_steps=spec.max_steps,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=spec.schedule,
        max_grad_norm=spec.grad_clip or 0.0,
        gradient_checkpointing=spec.gradient_checkpointing,
        seed=spec.seed,
        report_to=[],
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=collator, callbacks=[timer])
    output = trainer.train()
    wall = time.perf_counter() - start
    peak = _peak_memory(torch.device("cuda") if cuda else torch.device("cpu"))

    # The dataloader may collate a batch ahead; count only the batches the steps consumed.
    consumed = collator.batches[: output.global_step * spec.grad_accum]
    real = sum(b[0] for b in consumed)
    total = sum(b[1] for b in consumed)
    examples = sum(b[2] for b in consumed)
    # Trainer collates before on_step_begin; farm's step time includes building its batches,
    # so the collation of the consumed batches is added to keep the two measures alike.
    seconds = timer.step_seconds + sum(b[3] for b in consumed)
    return {
        "variant": "hf-trainer",
        "steps": output.global_step,
        "rows": examples,
        "examples": examples,
        "real_tokens": real,
        "batch_tokens": total,
        "train_seconds": round(seconds, 3),
        "trainer_train_seconds": round(timer.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_s": seconds and real / seconds,
        "examples_per_s": seconds and examples / seconds,
        "peak_memory_bytes": peak,
        "padding_share": (total - real) / total if total else 0.0,
        "padding_share_consumed": (total - real) / total if total else 0.0,
        "device": str(training_args.device),
        "precision": "fp32",
        "optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
        "final_loss": output.training_loss,
    }


# -- driver ----------------------------------------------------------------------------------


def _run_variant_subprocess(variant: str, args, tmp: Path) -> dict:
    result_file = tmp / f"{variant}.json"
    command = [sys.executable, os.path.abspath(__file__), "--spec", args.spec, "--tenant", args.tenant,
               "--steps", str(args.steps), "--variant", variant, "--result", str(result_file)]
    print(f"--- running {variant} in a fresh process", flush=True)
    completed = subprocess.run(command)
    if completed.returncode != 0 or not result_file.is_file():
        return {"variant": variant, "error": f"subprocess exited with {completed.returncode}"}
    return json.loads(result_file.read_text())


def _ratio(a, b):
    return a / b if a is not None and b else None


def _report(results: dict[str, dict], args) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width))  # full columns even when piped
    table = Table(title=f"train throughput: tenant {args.tenant}, {args.steps} steps")
    for column in ("variant", "steps", "real tokens", "train s", "tokens/s", "examples/s",
                   "peak RSS MB", "padding %"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for name in VARIANTS:
        r = results[name]
        if "error" in r:
            table.add_row(name, "-", "-", "-", "-", "-", "-", f"[red]{r['error']}[/red]")
            continue
        table.add_row(name, str(r["steps"]), f"{r['real_tokens']:,}", f"{r['train_seconds']:.2f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['examples_per_s']:,.1f}",
                      f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{100 * r['padding_share']:.2f}")
    console.print(table)

    farm, hf = results["farm"], results["hf-trainer"]
    ok = "error" not in farm and "error" not in hf
    ratios = {
        "tokens_per_s": _ratio(farm.get("tokens_per_s"), hf.get("tokens_per_s")) if ok else None,
        "examples_per_s": _ratio(farm.get("examples_per_s"), hf.get("examples_per_s")) if ok else None,
        "peak_memory": _ratio(farm.get("peak_memory_bytes"), hf.get("peak_memory_bytes")) if ok else None,
    }
    for key, label in (("tokens_per_s", "tokens/s"), ("examples_per_s", "examples/s"),
                       ("peak_memory", "peak memory")):
        value = ratios[key]
        console.print(f"farm/hf {label}: " + (f"{value:.2f}x" if value is not None else "n/a"))

    goals = {
        "farm_tokens_per_s_at_least_hf": (ratios["tokens_per_s"] >= 1.0) if ratios["tokens_per_s"] else None,
        "farm_peak_memory_at_most_hf": (ratios["peak_memory"] <= 1.0) if ratios["peak_memory"] else None,
        "farm_padding_under_5_percent": (farm["padding_share"] < PADDING_GOAL) if "error" not in farm else None,
    }
    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    console.print(f"goal farm tokens/s >= hf:       {words[goals['farm_tokens_per_s_at_least_hf']]}")
    console.print(f"goal farm peak memory <= hf:    {words[goals['farm_peak_memory_at_most_hf']]}")
    console.print(f"goal farm padding < 5%:         {words[goals['farm_padding_under_5_percent']]}")
    return {"ratios": ratios, "goals": goals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/configs/demo.yaml", help="sweep spec (YAML)")
    parser.add_argument("--tenant", default="acme", help="tenant of the spec to train")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    parser.add_argument("--out", default="bench-results/train_throughput.json", help="JSON result file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant:  # child process: run one variant, write its figures, nothing else
        with tempfile.TemporaryDirectory(prefix=f"bench-{args.variant}-") as workdir:
            runner = run_farm if args.variant == "farm" else run_hf_trainer
            figures = runner(args, workdir)
        Path(args.result).write_text(json.dumps(figures, indent=2) + "\n")
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        results = {v: _run_variant_subprocess(v, args, Path(tmp)) for v in VARIANTS}
    summary = _report(results, args)

    import torch
    import transformers
    import peft

    payload = {
        "benchmark": "train_throughput",
        "spec": os.path.abspath(args.spec),
        "tenant": args.tenant,
        "steps": args.steps,
        "results": results,
        **summary,
        "environment": {
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: `farm train` against transformers' Trainer with a PEFT model.

    python jobs/bench/train_throughput.py [--spec jobs/configs/demo.yaml] [--tenant acme] \
        [--steps 30] [--mode same-data|same-rows|both] [--out bench-results/train_throughput.json]

The same tenant, settings and number of optimizer steps go through

  (a) farm     ``farm.train.adapter`` (what ``farm train`` runs: ``train_tenant``'s setup, train
               and save): ``batch_size`` packed rows per micro-batch, several examples per row;
  (b) hf-trainer  what a user would write instead: the same base model and tokenizer, the same
               LoRA config (``farm.models.build_peft_model``), one example per row, dynamically
               padded by ``DataCollatorForSeq2Seq``, trained by ``transformers.Trainer`` with the
               same accumulation, learning rate, schedule, clipping and seed.

What "the same batch" means is the mode:

  same-data (default)  both consume the same number of examples per optimizer step. farm keeps
               the spec's ``batch_size`` rows; the Trainer's ``per_device_train_batch_size`` is
               the examples farm packs into that many rows (mean examples per packed training
               row x ``batch_size``, rounded). Over ``--steps`` steps both see the same number of
               examples, so tokens/s, examples/s and memory compare like for like.
  same-rows    both take ``batch_size`` rows per micro-batch (the earlier comparison): farm's
               rows hold several examples each, so it does several times the work per step.
  both         one farm run, compared with a Trainer run of each mode; one table, one JSON.

Each variant runs in its own fresh subprocess (this script, re-invoked with the hidden
``--variant`` option), so its memory figures are its own. Reported per variant: examples per
optimizer step, real (non-pad) tokens, real tokens per second of training-step time (model load,
eval and saving excluded), examples per second, peak memory (peak RSS on CPU, the CUDA
allocator's peak on GPU), the growth of memory during training (peak minus the memory in use
after model load, right before the first step; on CPU the ~0.5 GB torch baseline otherwise
dominates) and the share of padding tokens; then the farm/hf ratios and the goals: (a) at least
as fast as (b) in tokens/s, with no more peak memory, and under 5% padding with packing on.
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
MODES = ("same-data", "same-rows")
MODE_TITLES = {"same-data": "same examples per step", "same-rows": "same rows per step"}
PADDING_GOAL = 0.05


# -- helpers shared by both variants ---------------------------------------------------------


from bench_common import write_json  # noqa: E402  (sibling module; run as a script)

def _load_job(spec_path: str, tenant: str, steps: int, output_dir: str, base_model: str | None = None):
    from farm.spec import load_spec

    overrides = {"base_model": {"name_or_path": os.path.abspath(base_model)}} if base_model else None
    job = load_spec(spec_path, overrides).job(tenant)
    train = job.settings.train.model_copy(update={"max_steps": steps})
    settings = job.settings.model_copy(update={"train": train})
    return job.model_copy(update={"settings": settings, "output_dir": output_dir})


def _peak_memory(device) -> int:
    from farm.train.common import peak_memory_bytes

    return peak_memory_bytes(device)


def _current_memory(device) -> int:
    """Memory in use now: CUDA allocator on GPUs, resident set size (psutil or /proc) on CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:  # pages: size resident shared ...
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def _memory_figures(device, before: int, peak_before: int, peak: int) -> dict:
    return {
        "peak_memory_bytes": peak,
        "memory_before_train_bytes": before,  # in use after model load, before the first step
        "peak_memory_before_train_bytes": peak_before,  # high-water mark at that point
        "memory_growth_bytes": peak - before,
        "memory_kind": "cuda allocator" if device.type == "cuda" else "rss",
    }


def _examples_in_row(position_ids: list[int], length: int) -> int:
    # Every example in a row starts with position 0 (packed or not); the padding segment after
    # ``length`` also restarts at 0 and is excluded.
    return sum(1 for p in position_ids[:length] if p == 0)


def _data_shape(args) -> dict:
    """How many examples farm packs per training row, so the Trainer can match it per step."""
    from farm.data import load_tenant_data
    from farm.models import load_tokenizer

    job = _load_job(args.spec, args.tenant, args.steps, "unused", args.base_model)
    spec, data_spec = job.settings.train, job.settings.data
    tokenizer = load_tokenizer(job.base_model)
    rows = load_tenant_data(job.tenant, data_spec, tokenizer).train
    unpacked = load_tenant_data(job.tenant, data_spec.model_copy(update={"packing": False}), tokenizer).train
    examples = sum(_examples_in_row(p, n) for p, n in zip(rows.position_ids, rows.lengths))
    if examples != len(unpacked):  # the two ways of counting must agree
        raise SystemExit(f"examples in packed rows ({examples}) != unpacked rows ({len(unpacked)})")
    per_row = examples / len(rows)
    return {
        "packing": data_spec.packing,
        "train_rows": len(rows),
        "train_examples": examples,
        "examples_per_row": per_row,
        "farm_batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "hf_batch_size": {"same-data": max(1, round(per_row * spec.batch_size)),
                          "same-rows": spec.batch_size},
    }


# -- variant (a): farm -----------------------------------------------------------------------


def run_farm(args, workdir: str) -> dict:
    from farm.data import load_tenant_data
    from farm.models import load_tokenizer
    from farm.train.common import rows_for
    from farm.train.adapter import AdapterRecipe

    job = _load_job(args.spec, args.tenant, args.steps, str(Path(workdir) / "farm-out"), args.base_model)
    spec = job.settings.train
    start = time.perf_counter()
    # train_tenant(job, resume=False), in its three steps so memory can be read before step 1.
    recipe = AdapterRecipe(job, resume=False).setup()
    device = recipe.placement.device
    before, peak_before = _current_memory(device), _peak_memory(device)
    result = recipe.train().save()
    wall = time.perf_counter() - start
    # Peak memory as farm measured it (before anything below could add to it).
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
        "batch_size": spec.batch_size,
        "batch_unit": "packed rows",
        "grad_accum": spec.grad_accum,
        "steps": result.steps,
        "rows": len(consumed),
        "examples": examples,
        "examples_per_step": examples / result.steps if result.steps else 0.0,
        "real_tokens": result.tokens,
        "batch_tokens": total,
        "train_seconds": result.train_seconds,
        "wall_seconds": round(wall, 3),
        "tokens_per_s": result.train_seconds and result.tokens / result.train_seconds,
        "examples_per_s": result.train_seconds and examples / result.train_seconds,
        **_memory_figures(device, before, peak_before, peak),
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
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from farm.data import load_tenant_data
    from farm.models import build_peft_model
    from farm.train.common import HF_SCHEDULES

    hf_logging.disable_progress_bar()  # quiet like farm's own loader; no effect on timing
    job = _load_job(args.spec, args.tenant, args.steps, str(Path(workdir) / "hf-out"), args.base_model)
    spec = job.settings.train
    batch_size = args.hf_batch_size or spec.batch_size
    start = time.perf_counter()

    # What a user writes: tokenizer and model, the same LoRA config, per-example rows.
    tokenizer = AutoTokenizer.from_pretrained(job.base_model.name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(job.base_model.name_or_path, dtype=torch.float32)
    model.config.use_cache = False
    model = build_peft_model(model, job.settings, job.base_model.name_or_path)

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
            self.memory_before = self.peak_before = 0

        def on_train_begin(self, args, state, control, **kwargs):
            # Model, data and optimizer built, no step taken: the baseline for memory growth.
            self.memory_before, self.peak_before = _current_memory(device), _peak_memory(device)
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
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        max_steps=spec.max_steps,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=HF_SCHEDULES[spec.schedule],  # the farm's own schedule names
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
        dataloader_drop_last=True,  # every step takes full batches, like farm's endless stream
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=collator, callbacks=[timer])
    output = trainer.train()
    wall = time.perf_counter() - start
    peak = _peak_memory(device)

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
        "batch_size": batch_size,
        "batch_unit": "examples",
        "grad_accum": spec.grad_accum,
        "steps": output.global_step,
        "rows": examples,
        "examples": examples,
        "examples_per_step": examples / output.global_step if output.global_step else 0.0,
        "real_tokens": real,
        "batch_tokens": total,
        "train_seconds": round(seconds, 3),
        "trainer_train_seconds": round(timer.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_s": seconds and real / seconds,
        "examples_per_s": seconds and examples / seconds,
        **_memory_figures(device, timer.memory_before, timer.peak_before, peak),
        "padding_share": (total - real) / total if total else 0.0,
        "padding_share_consumed": (total - real) / total if total else 0.0,
        "device": str(training_args.device),
        "precision": "fp32",
        "optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
        "final_loss": output.training_loss,
    }


# -- driver ----------------------------------------------------------------------------------


def _run_variant_subprocess(variant: str, args, tmp: Path, hf_batch_size: int | None = None,
                            tag: str | None = None) -> dict:
    result_file = tmp / f"{tag or variant}.json"
    command = [sys.executable, os.path.abspath(__file__), "--spec", args.spec, "--tenant", args.tenant,
               "--steps", str(args.steps), "--variant", variant, "--result", str(result_file)]
    if args.base_model:
        command += ["--base-model", args.base_model]
    if hf_batch_size is not None:
        command += ["--hf-batch-size", str(hf_batch_size)]
    label = variant + (f" (per_device_train_batch_size={hf_batch_size})" if hf_batch_size else "")
    print(f"--- running {label} in a fresh process", flush=True)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0 or not result_file.is_file():
        return {"variant": variant, "error": f"subprocess exited with {completed.returncode}"}
    return json.loads(result_file.read_text())


def _ratio(a, b):
    return a / b if a is not None and b else None


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def _compare(farm: dict, hf: dict) -> dict:
    ok = "error" not in farm and "error" not in hf
    ratios = {key: (_ratio(farm.get(field), hf.get(field)) if ok else None) for key, field in (
        ("tokens_per_s", "tokens_per_s"), ("examples_per_s", "examples_per_s"),
        ("peak_memory", "peak_memory_bytes"), ("memory_growth", "memory_growth_bytes"),
        ("examples_per_step", "examples_per_step"), ("real_tokens", "real_tokens"))}
    goals = {
        "farm_tokens_per_s_at_least_hf":
            (ratios["tokens_per_s"] >= 1.0) if ratios["tokens_per_s"] is not None else None,
        "farm_peak_memory_at_most_hf":
            (ratios["peak_memory"] <= 1.0) if ratios["peak_memory"] is not None else None,
        "farm_padding_under_5_percent":
            (farm["padding_share"] < PADDING_GOAL) if "error" not in farm else None,
    }
    return {"ratios": ratios, "goals": goals}


def _report(farm: dict, hf_runs: dict[str, dict], shape: dict, args) -> dict[str, dict]:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(180, Console().width))  # full columns even when piped
    table = Table(title=f"train throughput: tenant {args.tenant}, {args.steps} optimizer steps, "
                        f"farm {shape['examples_per_row']:.2f} examples per packed row")
    columns = ("variant", "batch", "examples/step", "examples", "real tokens", "train s", "tokens/s",
               "examples/s", "peak RSS MB", "RSS growth MB", "padding %")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    rows = [("farm", farm)] + [(f"hf-trainer ({m})", r) for m, r in hf_runs.items()]
    for name, r in rows:
        if "error" in r:
            table.add_row(name, *["-"] * (len(columns) - 2), f"[red]{r['error']}[/red]")
            continue
        table.add_row(name, f"{r['batch_size']} {r['batch_unit']}", f"{r['examples_per_step']:.1f}",
                      f"{r['examples']:,}", f"{r['real_tokens']:,}", f"{r['train_seconds']:.2f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['examples_per_s']:,.1f}",
                      _mb(r["peak_memory_bytes"]), _mb(r["memory_growth_bytes"]),
                      f"{100 * r['padding_share']:.2f}")
    console.print(table)

    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    summaries = {}
    for mode, hf in hf_runs.items():
        summary = summaries[mode] = _compare(farm, hf)
        ratios, goals = summary["ratios"], summary["goals"]
        console.print(f"[bold]{mode}[/bold] ({MODE_TITLES[mode]}): farm vs hf-trainer")
        for key, label in (("examples_per_step", "examples/step"), ("real_tokens", "real tokens"),
                           ("tokens_per_s", "tokens/s"), ("examples_per_s", "examples/s"),
                           ("peak_memory", "peak RSS"), ("memory_growth", "RSS growth")):
            value = ratios[key]
            console.print(f"  farm/hf {label + ':':<15}" + (f"{value:.2f}x" if value is not None else "n/a"))
        console.print(f"  goal farm tokens/s >= hf:       {words[goals['farm_tokens_per_s_at_least_hf']]}")
        console.print(f"  goal farm peak memory <= hf:    {words[goals['farm_peak_memory_at_most_hf']]}")
        console.print(f"  goal farm padding < 5%:         {words[goals['farm_padding_under_5_percent']]}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/configs/demo.yaml", help="sweep spec (YAML)")
    parser.add_argument("--tenant", default="acme", help="tenant of the spec to train")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="same-data",
                        help="same-data: the Trainer's batch holds as many examples as farm's packed "
                             "rows (default); same-rows: both take batch_size rows; both: run both")
    parser.add_argument("--out", default="bench-results/train_throughput.json", help="JSON result file")
    parser.add_argument("--base-model", help="base model folder or hub id (default: the spec's)")
    parser.add_argument("--smoke", action="store_true", help="3 steps: checks that every side still runs")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--hf-batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 3

    if args.variant:  # child process: run one variant, write its figures, nothing else
        with tempfile.TemporaryDirectory(prefix=f"bench-{args.variant}-") as workdir:
            runner = run_farm if args.variant == "farm" else run_hf_trainer
            figures = runner(args, workdir)
        Path(args.result).write_text(json.dumps(figures, indent=2) + "\n")
        return 0

    modes = MODES if args.mode == "both" else (args.mode,)
    shape = _data_shape(args)
    print(f"farm: {shape['train_examples']} train examples in {shape['train_rows']} rows "
          f"(packing {'on' if shape['packing'] else 'off'}, {shape['examples_per_row']:.3f} per row), "
          f"batch_size {shape['farm_batch_size']} rows x grad_accum {shape['grad_accum']}; "
          + ", ".join(f"hf-trainer {m}: per_device_train_batch_size {shape['hf_batch_size'][m]}"
                      for m in modes), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # farm's settings are the same in every mode: one run serves all comparisons.
        farm = _run_variant_subprocess("farm", args, Path(tmp))
        hf_runs = {m: _run_variant_subprocess("hf-trainer", args, Path(tmp), shape["hf_batch_size"][m],
                                              tag=f"hf-trainer-{m}") for m in modes}
    summaries = _report(farm, hf_runs, shape, args)

    import peft
    import torch
    import transformers

    payload = {
        "benchmark": "train_throughput",
        "spec": os.path.abspath(args.spec),
        "tenant": args.tenant,
        "steps": args.steps,
        "mode": args.mode,
        "data": shape,
        "farm": farm,  # one farm run, shared by the modes
        "modes": {m: {"description": MODE_TITLES[m],
                      "hf_per_device_train_batch_size": shape["hf_batch_size"][m],
                      "results": {"farm": farm, "hf-trainer": hf_runs[m]},
                      **summaries[m]} for m in modes},
        "environment": {
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if len(modes) == 1:  # the single comparison also at the top level, as before
        payload.update(results=payload["modes"][modes[0]]["results"],
                       ratios=summaries[modes[0]]["ratios"], goals=summaries[modes[0]]["goals"])
    write_json(payload, args.out)
    failed = [name for name, run in [("farm", farm), *((f"hf-trainer ({m})", r) for m, r in hf_runs.items())]
              if "error" in run]
    if failed:  # a comparison with a side missing is a failed benchmark, whatever the JSON says
        print(f"FAILED: {', '.join(failed)} did not run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

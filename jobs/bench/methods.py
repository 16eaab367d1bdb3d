"""PEFT methods side by side: what each trains, stores, costs and how it can be served.

    python jobs/bench/methods.py [--base-model .farm/base-model] [--tenant acme] [--steps 60]
        [--out bench-results/methods.json] [--readme README.md]

Every method of ``farm.methods`` trains the same sample tenant for the same steps, rows per
step, seed and data order, each in a fresh child process with one torch thread (a 1-CPU Ray
worker). Only the learning rate differs: methods with a few thousand parameters need a larger
one (``LEARNING_RATES``). Each adapter is then published to a scratch registry, which decides
how it can be served exactly as it does for a sweep. Methods that need what this host lacks
(QLoRA without CUDA) are listed with the reason instead of figures.

Columns: trainable parameters, adapter bytes on disk (safetensors + config), tokens/s of the
optimizer steps, eval loss before -> after, and serving. Writes JSON and a Markdown table next
to it; ``--readme`` also replaces the table between the README's ``methods-table`` markers.
A benchmark only reports: it exits 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from bench_common import write_json  # noqa: E402

#: Peak learning rate per method: the low-rank methods share the demo's; the ones with a few
#: thousand parameters (IA3 scales, prefixes, prompt embeddings) need ten times more.
LEARNING_RATES = {"lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "ia3": 3e-2, "prefix": 3e-2, "prompt": 3e-2,
                  "bottleneck": 1e-2}
SHARED = {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
MARKERS = ("<!-- methods-table:start (jobs/bench/methods.py --readme) -->", "<!-- methods-table:end -->")


def _data_path(name: str) -> str:
    return str(REPO / "jobs" / "data" / (f"{name}.parquet" if name == "umbrella" else f"{name}.jsonl"))


def _job(method: str, args, root: Path):
    from farm.spec import load_spec

    settings = {name: SHARED for name in ("lora", "dora", "qlora")}
    raw = {"name": "methods", "base_model": {"name_or_path": str(Path(args.base_model).resolve())},
           "output_dir": str(root / "runs"),
           "defaults": {"method": method, **settings,
                        "train": {"max_steps": args.steps, "batch_size": 4, "learning_rate": LEARNING_RATES[method],
                                  "warmup_steps": 5, "checkpoint_every": args.steps, "log_every": args.steps,
                                  "seed": 0},
                        "data": {"max_seq_len": 256}},
           "tenants": [{"name": args.tenant, "data": {"path": _data_path(args.tenant)}}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(raw))
    return load_spec(root / "spec.yaml").job(args.tenant)


def child(method: str, args) -> None:
    """Train one method and print its result as one JSON line."""
    import torch

    from farm.train.adapter import train_tenant

    torch.set_num_threads(1)

    class Quiet:
        def on_step(self, event) -> None:
            pass

    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        job = _job(method, args, Path(tmp))
        result = train_tenant(job, Quiet(), resume=False)
        from farm.registry import open_registry

        registry = open_registry(str(Path(tmp) / "registry"))
        info = registry.publish(job.tenant, method, Path(result.adapter_dir), base_model=job.base_model.name_or_path,
                                method=method)
        print(json.dumps({"method": method, "trainable_params": result.trainable_params,
                          "adapter_bytes": result.adapter_bytes, "tokens_per_s": result.tokens_per_s,
                          "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
                          "steps": result.steps, "learning_rate": LEARNING_RATES[method],
                          "precision": result.precision, "device": result.device,
                          "servable_by_vllm": info.servable_by_vllm, "not_servable_reason": info.not_servable_reason}))


def serving(row: dict) -> str:
    """How an adapter of this row can be served, from the registry's verdict and the method."""
    from farm.methods import METHODS

    if row.get("skipped"):
        return "-"
    if row["servable_by_vllm"]:
        return "vLLM multi-LoRA"
    if METHODS[row["method"]].mergeable:
        return "merged model (`farm export merged`), or transformers + PEFT"
    return "transformers + PEFT only"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['tenant']}, {meta['steps']} steps of 4 rows x 256 tokens, seed 0, one CPU thread, "
             f"tiny Llama base ({meta['host']})", "",
             "| method | trainable params | adapter bytes | tokens/s | eval loss before -> after | served by |",
             "|---|---:|---:|---:|---|---|"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['method']} | - | - | - | not run: {row['skipped']} | - |")
            continue
        lines.append(f"| {row['method']} (lr {row['learning_rate']:g}) | {row['trainable_params']:,} | "
                     f"{row['adapter_bytes']:,} | {row['tokens_per_s']:,.0f} | "
                     f"{row['eval_loss_before']:.3f} -> {row['eval_loss_after']:.3f} | {serving(row)} |")
    return "\n".join(lines) + "\n"


def replace_in_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")
    print(f"updated the table in {readme}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=str(REPO / ".farm" / "base-model"))
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--smoke", action="store_true", help="3 steps per method: checks that every method still trains")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "methods.json"))
    parser.add_argument("--readme", default=None, help="replace the methods table in this README")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return 0
    if args.smoke:
        args.steps = 3

    import torch
    from rich.console import Console
    from rich.table import Table

    from farm.methods import METHODS

    rows: list[dict] = []
    for method, info in METHODS.items():
        if info.needs_cuda and not torch.cuda.is_available():
            rows.append({"method": method, "skipped": f"{info.needs_cuda}; this host has none"})
            continue
        print(f"training {method} ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--base-model", args.base_model,
                               "--tenant", args.tenant, "--steps", str(args.steps)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
            rows.append({"method": method, "skipped": f"failed: {last}", "failed": True})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    meta = {"tenant": args.tenant, "steps": args.steps, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__}
    table = Table("method", "lr", "trainable", "adapter bytes", "tok/s", "eval loss", "served by",
                  title=f"PEFT methods on {args.tenant}, {args.steps} steps")
    for row in rows:
        if row.get("skipped"):
            table.add_row(row["method"], "-", "-", "-", "-", f"not run: {row['skipped']}", "-")
        else:
            table.add_row(row["method"], f"{row['learning_rate']:g}", f"{row['trainable_params']:,}",
                          f"{row['adapter_bytes']:,}", f"{row['tokens_per_s']:,.0f}",
                          f"{row['eval_loss_before']:.3f} -> {row['eval_loss_after']:.3f}", serving(row))
    Console(width=200).print(table)
    out = write_json({"meta": meta, "rows": rows}, args.out)
    md = markdown(rows, meta)
    md_path = out.with_suffix(".md")
    md_path.write_text(md)
    print(f"wrote {md_path}")
    failed = [row["method"] for row in rows if row.get("failed")]
    if failed:  # a method that no longer trains fails the benchmark (and the README keeps its table)
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.readme:
        replace_in_readme(Path(args.readme), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Co-training benchmark: K tenants on one shared base against stepping them one by one.

    python jobs/bench/cotrain.py [--base-model .farm/base-model] [--out bench-results/cotrain.json]
        [--skip-sweep]

Three measurements, each in fresh child processes (this script re-invoked with ``--child``) so
that peak RSS belongs to one configuration only:

  1. throughput: K = 1, 2, 4, 8 tiny tenants (the sample datasets, reused under new names for
     K = 8), micro-batches of 64 and 256 tokens (one row of that length per tenant and step),
     LoRA r=8 on q, k, v, o, fp32, one thread per process as in a 1-CPU Ray worker.
       (a) sequential: the same tenants stepped one after another in one process (one base,
           ``slots=1``: each tenant trains alone, then the next);
       (b) co-trained: ``slots=K``, one forward and backward per step for all K tenants.
     Tokens/s counts training steps only (start-up and eval excluded). Goals: (b)/(a) at least
     1.3x at K=4 with 256-token micro-batches and at least 2x at K=8 with 64-token ones.
  2. memory: peak RSS of the process co-training 4 tenants (256-token micro-batches) against 4
     separate processes each training one (the K=1 sequential process's peak, times 4): both
     are processes of (1). Goal: at least 3x less.
  3. sweep: a whole Ray sweep (``jobs/tenant_sweep.py``, local Ray) of 8 small sample tenants
     with ``packing: off`` (single-tenant pools: one tenant at a time per pool) and ``packing: auto``, wall time
     from launch to exit. Goal: packed at most 0.4x of unpacked. ``--skip-sweep`` leaves it out.

``--smoke``: K = 1, 2 with 64-token micro-batches, 3 steps, memory at K = 2, no sweep: checks
that every side still runs (the test tier runs it).

Prints a table, writes JSON and ``cotrain_speedup.png`` (speedup against K) next to it. Missed
goals are reported, not failed; a side that fails (a child process or a sweep that exits
non-zero) ends the benchmark with exit code 1 and its error in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from bench_common import write_json  # noqa: E402

SAMPLES = ["acme", "globex", "initech", "umbrella", "hooli"]
KS = (1, 2, 4, 8)
TOKENS = (64, 256)
STEPS = {64: 24, 256: 12}


def _data_path(name: str) -> str:
    return str(REPO / "jobs" / "data" / (f"{name}.parquet" if name == "umbrella" else f"{name}.jsonl"))


def _jobs(base_model: str, k: int, tokens: int, out: Path, steps: int):
    from farm.spec import parse_spec

    tenants = [{"name": f"{SAMPLES[i % len(SAMPLES)]}{i}", "data": {"path": _data_path(SAMPLES[i % len(SAMPLES)])},
                "train": {"seed": i}} for i in range(k)]
    raw = {"name": "bench", "base_model": {"name_or_path": base_model}, "output_dir": str(out),
           "defaults": {"lora": {"rank": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                        "train": {"max_steps": steps, "batch_size": 1, "learning_rate": 1e-3,
                                  "checkpoint_every": 10**6, "log_every": 10**6, "precision": "fp32"},
                        "data": {"max_seq_len": tokens}},
           "tenants": tenants}
    return list(parse_spec(raw).jobs.values())


def child(args) -> None:
    """One measured configuration in this process; prints its figures as JSON."""
    import torch

    from farm.train.cotrain import CoTrainer

    torch.set_num_threads(args.threads)
    quiet = type("Quiet", (), {"on_step": lambda self, event: None})()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = _jobs(args.base_model, args.k, args.tokens, Path(tmp), args.steps)
        trainer = CoTrainer(jobs, args.slots, progress=quiet, resume=False).setup()
        trainer.run()
    print(json.dumps({"tokens_per_s": trainer.step_tokens / trainer.step_seconds,
                      "step_seconds": trainer.step_seconds, "tokens": trainer.step_tokens,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


class SideFailed(RuntimeError):
    """One side of the comparison (a child process or a sweep) exited non-zero."""


def _run_child(base_model: str, k: int, tokens: int, slots: int, steps: int, threads: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", "--base-model", base_model, "--k", str(k),
               "--tokens", str(tokens), "--slots", str(slots), "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SideFailed(f"K={k}, {tokens} tokens, slots={slots}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sweep_wall(base_model: str, packing: str, workdir: Path) -> float:
    tenants = [{"name": f"{SAMPLES[i % len(SAMPLES)]}{i}", "data": {"path": _data_path(SAMPLES[i % len(SAMPLES)])}}
               for i in range(8)]
    spec = workdir / f"sweep-{packing}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": f"bench-{packing}", "base_model": {"name_or_path": base_model}, "output_dir": str(workdir / "runs"),
        "resources": {"workers": 1, "cpus_per_worker": 1, "packing": packing},
        "defaults": {"lora": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                     "train": {"max_steps": 20, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 10,
                               "log_every": 10},
                     "data": {"max_seq_len": 128}},
        "tenants": tenants}, sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "tenant_sweep.py"), "--config", str(spec)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SideFailed(f"sweep with packing {packing} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall


def _plot(rows: list[dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for tokens in TOKENS:
        points = [(r["k"], r["speedup"]) for r in rows if r["tokens"] == tokens]
        ax.plot(*zip(*points), marker="o", label=f"{tokens}-token micro-batches")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("tenants co-trained at once (K)")
    ax.set_ylabel("tokens/s, co-trained / sequential")
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.set_title(f"co-training speedup against K (tiny Llama, LoRA r=8, {threads} CPU thread(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=str(REPO / ".farm" / "base-model"))
    parser.add_argument("--out", default=str(REPO / "bench-results" / "cotrain.json"))
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="K=1,2, 64 tokens, 3 steps, no sweep: checks every side runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (a worker's CPUs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ks, token_sizes = ((1, 2), (64,)) if args.smoke else (KS, TOKENS)
    memory_k, memory_tokens = (2, 64) if args.smoke else (4, 256)
    rows, peaks, sweep = [], {}, None
    try:
        for tokens in token_sizes:
            steps = 3 if args.smoke else STEPS[tokens]
            for k in ks:
                sequential = _run_child(args.base_model, k, tokens, 1, steps, args.threads)
                # K=1 co-trained (slots=1) is the sequential configuration itself: measured once
                together = sequential if k == 1 else _run_child(args.base_model, k, tokens, k, steps, args.threads)
                peaks[(k, tokens)] = (sequential["peak_rss_bytes"], together["peak_rss_bytes"])
                rows.append({"k": k, "tokens": tokens, "sequential_tok_s": round(sequential["tokens_per_s"], 1),
                             "cotrained_tok_s": round(together["tokens_per_s"], 1),
                             "speedup": round(together["tokens_per_s"] / sequential["tokens_per_s"], 3),
                             "cotrained_peak_rss_bytes": together["peak_rss_bytes"]})
                console.print(f"K={k} {tokens} tokens: {rows[-1]['speedup']}x", highlight=False)
        if not (args.skip_sweep or args.smoke):
            with tempfile.TemporaryDirectory() as tmp:
                off = _sweep_wall(args.base_model, "off", Path(tmp))
                on = _sweep_wall(args.base_model, "auto", Path(tmp))
            sweep = {"tenants": 8, "unpacked_wall_s": round(off, 1), "packed_wall_s": round(on, 1),
                     "ratio": round(on / off, 3)}
    except SideFailed as exc:
        console.print(f"[red]a side failed[/red]: {exc}", highlight=False)
        write_json({"error": str(exc), "throughput": rows, "smoke": args.smoke}, args.out)
        return 1
    single, together = peaks[(1, memory_tokens)][0], peaks[(memory_k, memory_tokens)][1]
    memory = {"tenants": memory_k, "tokens": memory_tokens, "cotrain_peak_rss_bytes": together,
              "separate_peak_rss_bytes": memory_k * single, "ratio": round(memory_k * single / together, 2)}

    speed = {(r["k"], r["tokens"]): r["speedup"] for r in rows}
    goals = [(f"(b)/(a) at K={k}, {tokens}-token micro-batches", f">= {goal}x", f"{speed[(k, tokens)]}x",
              speed[(k, tokens)] >= goal) for k, tokens, goal in ((4, 256, 1.3), (8, 64, 2.0)) if (k, tokens) in speed]
    goals.append((f"peak memory: {memory_k} processes / 1 co-training process", ">= 3x", f"{memory['ratio']}x",
                  memory["ratio"] >= 3))
    if sweep:
        goals.append(("packed sweep of 8 / single-tenant pools", "<= 0.4x", f"{sweep['ratio']}x", sweep["ratio"] <= 0.4))

    table = Table("K", "micro-batch tokens", "sequential tok/s", "co-trained tok/s", "speedup",
                  title=f"co-training vs stepping tenants one by one (one process, {args.threads} thread(s))")
    for r in rows:
        table.add_row(str(r["k"]), str(r["tokens"]), f"{r['sequential_tok_s']:,.0f}", f"{r['cotrained_tok_s']:,.0f}",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    summary = Table("figure", "goal", "measured", "met", title="goals")
    summary.add_row(f"peak RSS, {memory_k} tenants", "",
                    f"co-trained {together / 2**20:,.0f} MiB vs separate {memory_k * single / 2**20:,.0f} MiB", "")
    if sweep:
        summary.add_row("sweep wall, 8 tenants", "", f"packed {sweep['packed_wall_s']} s vs unpacked {sweep['unpacked_wall_s']} s", "")
    for name, goal, value, met in goals:
        summary.add_row(name, goal, value, "yes" if met else "MISSED")
    console.print(summary)
    out = Path(args.out)
    png = out.with_name("cotrain_speedup.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(rows, png, args.threads)
    write_json({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
                "threads": args.threads, "smoke": args.smoke,
                "throughput": rows, "memory": memory, "sweep": sweep,
                "goals": [{"figure": n, "goal": g, "measured": v, "met": m} for n, g, v, m in goals],
                "plot": str(png)}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PEFT methods side by side: what each trains, stores, costs and how it can be served.

    python jobs/bench/methods.py [--base-model .farm/base-model] [--tenant acme] [--steps 60]
        [--out bench-results/methods.json] [--readme README.md] [--no-vllm]

Every method of ``farm.methods`` trains the same sample tenant for the same steps, rows per
step, seed and data order, each in a fresh child process with one torch thread (a 1-CPU Ray
worker). Only the learning rate differs: methods with a few thousand parameters need a larger
one (``LEARNING_RATES``). Each adapter is then published to a scratch registry, which decides
how it can be served exactly as it does for a sweep. Methods that need what this host lacks
(QLoRA without CUDA) are listed with the reason instead of figures.

Then serving: every adapter is served by the farm's transformers backend (``farm serve --backend
transformers``), and the LoRA one also by vLLM, both started over the same registry; each gets
the same greedy requests (``SERVE_REQUESTS`` of ``SERVE_TOKENS`` tokens, ``SERVE_CONCURRENCY``
in flight, EOS ignored) and the column gives generated tokens per second of wall time.

Columns: trainable parameters, adapter bytes on disk (safetensors + config), tokens/s of the
optimizer steps, eval loss before -> after, served tokens/s, and how it is served. Writes JSON
and a Markdown table next to it; ``--readme`` also replaces the table between the README's
``methods-table`` markers. Exits 1 when a method fails to train or a server fails to serve it.
``--smoke``: 3 training steps and a few short requests, transformers backend only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
    """Train one method, publish it to ``args.registry`` and print its result as one JSON line."""
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

        registry = open_registry(args.registry)
        info = registry.publish(job.tenant, method, Path(result.adapter_dir), base_model=job.base_model.name_or_path,
                                method=method)
        print(json.dumps({"method": method, "trainable_params": result.trainable_params,
                          "adapter_bytes": result.adapter_bytes, "tokens_per_s": result.tokens_per_s,
                          "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
                          "steps": result.steps, "learning_rate": LEARNING_RATES[method],
                          "precision": result.precision, "device": result.device,
                          "servable_by_vllm": info.servable_by_vllm, "not_servable_reason": info.not_servable_reason}))


SERVE_REQUESTS, SERVE_TOKENS, SERVE_CONCURRENCY = 8, 32, 4
PROMPTS = ["The customer asked", "My router keeps restarting", "Please summarise the ticket",
           "Which plan includes support"]


def serve_figures(rows: list[dict], args, work: Path) -> None:
    """Add ``serve_tokens_per_s`` (transformers backend) to each trained row and ``vllm_tokens_per_s``
    to LoRA's; a server that does not start or a request that fails marks the row failed."""
    import asyncio
    import secrets

    from serving import Server, _free_port, run_load, start_server

    trained = [row for row in rows if not row.get("skipped")]
    requests, tokens = (2, 4) if args.smoke else (SERVE_REQUESTS, SERVE_TOKENS)

    def measure(server: Server, row: dict, key: str) -> None:
        model = f"{args.tenant}.{row['method']}.v1"
        plan = [(model, PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
        asyncio.run(run_load(server, plan[:SERVE_CONCURRENCY], SERVE_CONCURRENCY, tokens))  # warm: load it
        load = asyncio.run(run_load(server, plan, SERVE_CONCURRENCY, tokens))
        errors = [r["error"] for r in load["results"] if not r["ok"]]
        if errors:
            row.update(failed=True, serve_error=f"{key}: {errors[0]}")
            return
        row[key] = round(sum(r["tokens"] for r in load["results"]) / load["wall_s"], 1)

    def serve(server: Server, targets: list[dict], key: str, label: str, timeout: float) -> None:
        """Wait for ``server``, measure each of ``targets`` into ``key``, stop it."""
        try:
            why = server.wait_ready(timeout)
            for row in targets:
                if why is not None:
                    row.update(failed=True, serve_error=f"{label}: {why}: {server.log_tail(5)}")
                else:
                    measure(server, row, key)
        finally:
            server.stop()

    key, port = secrets.token_urlsafe(24), _free_port()
    env = {**os.environ, "FARM_TRANSFORMERS_API_KEY": key, "FARM_REGISTRY_STORE": args.registry,
           "FARM_VLLM_CACHE_DIR": str(work / "cache-transformers")}
    for name in ("FARM_REGISTRY_URL", "FARM_REGISTRY_TOKEN", "FARM_REGISTRY_CATALOG"):
        env.pop(name, None)
    log = work / "transformers.log"
    print("serving every method with the transformers backend ...", flush=True)
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "farm.serving.transformers_server", "--base-model",
                                    args.base_model, "--port", str(port), "--served-model-name", "base",
                                    "--max-loaded-adapters", str(len(trained) or 1)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO)
    serve(Server(process, f"http://127.0.0.1:{port}", key, log, process.args), trained, "serve_tokens_per_s",
          "transformers backend", 300)
    lora = next((row for row in trained if row["method"] == "lora"), None)
    if args.smoke or args.no_vllm or lora is None:
        return
    print("serving LoRA with vLLM ...", flush=True)

    class VllmArgs:
        max_loras, max_cpu_loras = 2, 4

    serve(start_server(args.base_model, Path(args.registry), work / "cache-vllm", work / "vllm.log", VllmArgs),
          [lora], "vllm_tokens_per_s", "vLLM", 600)


def serving(row: dict) -> str:
    """How an adapter of this row can be served, from the registry's verdict and the method."""
    from farm.methods import METHODS

    if row.get("skipped"):
        return "-"
    if row["servable_by_vllm"]:
        return "vLLM multi-LoRA (transformers backend too)"
    also = ", or merged (`farm export merged`) on vLLM" if METHODS[row["method"]].mergeable else ""
    return f"transformers backend{also}"


def served(row: dict) -> str:
    """``transformers tokens/s`` (and ``/ vLLM tokens/s`` for LoRA)."""
    if row.get("serve_error"):
        return f"failed: {row['serve_error'][:80]}"
    text = f"{row['serve_tokens_per_s']:,.0f}" if "serve_tokens_per_s" in row else "-"
    if "vllm_tokens_per_s" in row:
        text += f" (vLLM {row['vllm_tokens_per_s']:,.0f})"
    return text


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['tenant']}, {meta['steps']} steps of 4 rows x 256 tokens, seed 0, one CPU thread, "
             f"tiny Llama base ({meta['host']})", "",
             "| method | trainable params | adapter bytes | train tokens/s | eval loss before -> after "
             "| served tokens/s | served by |",
             "|---|---:|---:|---:|---|---:|---|"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['method']} | - | - | - | not run: {row['skipped']} | - | - |")
            continue
        lines.append(f"| {row['method']} (lr {row['learning_rate']:g}) | {row['trainable_params']:,} | "
                     f"{row['adapter_bytes']:,} | {row['tokens_per_s']:,.0f} | "
                     f"{row['eval_loss_before']:.3f} -> {row['eval_loss_after']:.3f} | {served(row)} | "
                     f"{serving(row)} |")
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
    parser.add_argument("--no-vllm", action="store_true", help="serve with the transformers backend only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--registry", default=None, help=argparse.SUPPRESS)
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

    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    args.registry = str(work / "registry")
    rows: list[dict] = []
    for method, info in METHODS.items():
        if info.needs_cuda and not torch.cuda.is_available():
            rows.append({"method": method, "skipped": f"{info.needs_cuda}; this host has none"})
            continue
        print(f"training {method} ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--base-model", args.base_model,
                               "--tenant", args.tenant, "--steps", str(args.steps), "--registry", args.registry],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
            rows.append({"method": method, "skipped": f"failed: {last}", "failed": True})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    try:
        serve_figures(rows, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {"tenant": args.tenant, "steps": args.steps, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "serve": {"requests": SERVE_REQUESTS, "tokens": SERVE_TOKENS,
                                                  "concurrency": SERVE_CONCURRENCY, "smoke": args.smoke}}
    table = Table("method", "lr", "trainable", "adapter bytes", "train tok/s", "eval loss", "served tok/s",
                  "served by", title=f"PEFT methods on {args.tenant}, {args.steps} steps")
    for row in rows:
        if row.get("skipped"):
            table.add_row(row["method"], "-", "-", "-", "-", f"not run: {row['skipped']}", "-", "-")
        else:
            table.add_row(row["method"], f"{row['learning_rate']:g}", f"{row['trainable_params']:,}",
                          f"{row['adapter_bytes']:,}", f"{row['tokens_per_s']:,.0f}",
                          f"{row['eval_loss_before']:.3f} -> {row['eval_loss_after']:.3f}", served(row), serving(row))
    Console(width=200).print(table)
    out = write_json({"meta": meta, "rows": rows}, args.out)
    md = markdown(rows, meta)
    md_path = out.with_suffix(".md")
    md_path.write_text(md)
    print(f"wrote {md_path}")
    failed = [row["method"] for row in rows if row.get("failed")]
    if failed:  # a method that no longer trains or serves fails the benchmark (the README keeps its table)
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.readme:
        replace_in_readme(Path(args.readme), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-worker adapter training: 1 worker, 2 data-parallel workers, 2 workers on a sharded base.

    python jobs/bench/multi_worker.py [--steps 30] [--batch 8] [--base-model .farm/base-model]
        [--out bench-results/multi_worker.json] [--smoke]

One LoRA tenant (acme's sample data, r=8 on every linear, 128-token rows, fp32) is trained
three ways, side by side in one run, each in the sweep's own single-tenant pool
(``farm.train.adapter.ray_pool_loop``) under a Ray Train ``TorchTrainer`` on a local Ray of
this script's own (gloo on CPU):

  (a) 1 worker with the global batch;
  (b) 2 data-parallel workers (DDP), each with half of it;
  (c) 2 workers with the base sharded between them (``train.shard_base: fsdp``, FSDP2).

Reported per side: training tokens/s (steps only), peak memory of rank 0 (RSS on CPU, CUDA's
peak on a GPU) against the planner's figure for that layout, the final eval loss, and the
largest adapter difference from (a) (all three train the same rows: they should agree to
rounding). On 2 CPU cores the workers share the cores, so (b) and (c) show the cost of
splitting, not a speed-up; on a GPU host the same script compares real devices. Exit code 1
when a side fails or disagrees with (a) by more than 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from bench_common import write_json  # noqa: E402

SIDES = {"1 worker": (1, "none"), "2 workers, DDP": (2, "none"), "2 workers, sharded base": (2, "fsdp")}


def job_for(base_model: str, steps: int, batch: int, workers: int, shard: str, out: Path):
    from farm.spec import parse_spec

    raw = {"name": "mw", "base_model": {"name_or_path": base_model}, "output_dir": str(out),
           "defaults": {"lora": {"rank": 8, "dropout": 0.0, "target_modules": "all-linear"},
                        "train": {"max_steps": steps, "batch_size": batch // workers, "learning_rate": 1e-3,
                                  "seed": 7, "checkpoint_every": 10**6, "log_every": 10**6, "precision": "fp32",
                                  "shard_base": shard},
                        "data": {"max_seq_len": 128}},
           "tenants": [{"name": "acme", "data": {"path": str(REPO / "jobs" / "data" / "acme.jsonl")}}]}
    return parse_spec(raw).job("acme")


def run_side(job, workers: int, folder: Path) -> dict:
    """Train ``job`` in a pool of ``workers``; returns its result.json and adapter tensors."""
    from safetensors.torch import load_file

    from farm.pools import queue_actor
    from farm.train.adapter import ray_pool_loop
    from farm.trainers import cpu_workers

    returned = cpu_workers(workers).trainer(
        ray_pool_loop, {"queue": queue_actor([job.model_dump()], closed=True), "pool": "bench", "board": None,
                        "tenants_dir": str(folder / "pooled")},
        "bench", str(folder / "ray")).fit().return_value
    if returned["errors"]:
        raise RuntimeError(f"training failed: {returned['errors']}")
    final = folder / "pooled" / job.tenant / "final"
    return {"result": json.loads((final / "result.json").read_text()),
            "adapter": load_file(str(final / "adapter" / "adapter_model.safetensors"))}


def planned_bytes(job, workers: int) -> int:
    from farm.plan import load_shape, plan_memory
    from farm.sizing import Capacity, adapter_request

    return plan_memory(load_shape(job.base_model.name_or_path),
                       adapter_request(job, Capacity("cpu", None, workers, "bench"), workers=workers)).total_bytes


def print_table(rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("layout", "tok/s", "peak MiB (rank 0)", "planned MiB", "eval loss", "max diff vs 1 worker",
                  title="multi-worker adapter training (tiny base, LoRA r=8, fp32)")
    for name, row in rows.items():
        if "error" in row:
            table.add_row(name, "[red]failed[/red]", "", "", "", row["error"][:60])
            continue
        table.add_row(name, f"{row['tokens_per_s']:,.0f}", f"{row['peak_mib']:,.0f}", f"{row['planned_mib']:,.0f}",
                      f"{row['eval_loss_after']:.4f}", f"{row['max_diff']:.1e}")
    Console(width=max(Console().width, 120)).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per step over all workers)")
    parser.add_argument("--base-model", default=str(REPO / ".farm" / "base-model"))
    parser.add_argument("--out", default=str(REPO / "bench-results" / "multi_worker.json"))
    parser.add_argument("--smoke", action="store_true", help="3 steps (the smoke test)")
    args = parser.parse_args()
    import ray

    from serving import ensure_base_model

    base_model = str(ensure_base_model(Path(args.base_model).resolve()))
    steps = 3 if args.smoke else args.steps
    temp_dir = tempfile.mkdtemp(prefix="farm-mw-", dir="/tmp")  # a Ray of this script's own
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp_dir,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    rows: dict[str, dict] = {}
    reference = None
    try:
        with tempfile.TemporaryDirectory(prefix="farm-bench-mw-") as folder:
            for index, (name, (workers, shard)) in enumerate(SIDES.items()):
                print(f"{name}: training {steps} steps", flush=True)
                side = Path(folder) / f"side{index}"
                job = job_for(base_model, steps, args.batch, workers, shard, side)
                try:
                    run = run_side(job, workers, side)
                except Exception as exc:  # this side failed: the others still run, the exit code says so
                    rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                result, adapter = run["result"], run["adapter"]
                reference = reference or adapter
                rows[name] = {"workers": workers, "shard_base": shard, "tokens_per_s": result["tokens_per_s"],
                              "peak_mib": result["peak_memory_bytes"] / 2**20,
                              "planned_mib": planned_bytes(job, workers) / 2**20,
                              "eval_loss_after": result["eval_loss_after"], "steps": result["steps"],
                              "max_diff": max(float((adapter[k] - reference[k]).abs().max()) for k in reference)}
    finally:
        ray.shutdown()
    print_table(rows)
    failed = [f"{name}: {row['error']}" for name, row in rows.items() if "error" in row]
    failed += [f"{name}: adapter differs from 1 worker by {row['max_diff']:.1e}" for name, row in rows.items()
               if "error" not in row and row["max_diff"] > 1e-4]
    write_json({"benchmark": "multi_worker", "steps": steps, "global_batch": args.batch,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": rows, "failed": failed}, args.out)
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

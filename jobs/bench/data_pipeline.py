"""Data pipeline benchmark: records/s and peak memory of read + validate + tokenise + pack.

    python jobs/bench/data_pipeline.py [--sizes 10000,100000,1000000] [--formats jsonl,parquet]
        [--base-model .farm/base-model] [--out bench-results/data_pipeline.json] [--smoke]

For each format and size, N short chat records (a user question and an assistant answer of
about 10 words each, distinct in every record) are written to a temporary file, untimed; then
a fresh child process (this script with ``--child``) runs ``farm.data.load_tenant_data`` on it
exactly as a training worker does: read, parse, validate, render with the chat template,
tokenise, spill, split, pack. Its wall time gives records/s; its own peak RSS and its data
workers' (``farm.data.parallel``, on every CPU by default) are read from ``getrusage``.

Goals (issue 16): peak RSS flat from 100k to 1M records (the 1M peak within 1.5x of the 100k
peak, for the parent and for a worker) and at least 20,000 records/s on 2 cores. The table
says which are met. Exit code 1 when a run fails or loses records (used != records), so a
broken pipeline cannot pass as a slow one; goals only report.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from bench_common import write_json  # noqa: E402

GOAL_RECORDS_PER_S = 20_000
GOAL_RSS_RATIO = 1.5
WORDS = ["order", "parcel", "invoice", "refund", "printer", "account", "password", "delivery", "ticket", "warranty"]


def record(i: int) -> dict:
    """A short chat record, different in every i (so no cache can help)."""
    thing = WORDS[i % len(WORDS)]
    return {"messages": [
        {"role": "user", "content": f"Where is my {thing} number {i}? It was due on day {i % 28 + 1}."},
        {"role": "assistant", "content": f"Hello from Acme support! Your {thing} {i} ships on day {i % 28 + 2}."}]}


def write_records(path: Path, count: int, fmt: str) -> None:
    """Write ``count`` records as JSON Lines or Parquet (in row groups of 100,000)."""
    if fmt == "jsonl":
        with open(path, "w") as out:
            for i in range(count):
                out.write(json.dumps(record(i)) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, count, 100_000):
            rows = [record(i) for i in range(start, min(count, start + 100_000))]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def child(path: str, base_model: str, max_seq_len: int) -> dict:
    """One measured run, in this (fresh) process."""
    from farm.data import load_tenant_data, pipeline_workers
    from farm.models import load_tokenizer
    from farm.spec import BaseModelSpec, DataSpec

    tokenizer = load_tokenizer(BaseModelSpec(name_or_path=base_model))
    workers = WorkerMemory()
    started = time.perf_counter()
    with workers:
        data = load_tenant_data("bench", DataSpec(path=path, max_seq_len=max_seq_len), tokenizer)
    seconds = time.perf_counter() - started
    report = data.report
    return {"seconds": round(seconds, 3), "records": report.records, "used": report.used,
            "records_per_s": round(report.records / seconds), "tokens": report.tokens,
            "rows": len(data.train) + len(data.eval), "padding": round(data.train.padding_share, 4),
            "workers": pipeline_workers(),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mib": round(workers.peak / 2**20, 1)}


class WorkerMemory:
    """The largest resident memory any data worker (a child process) reached, sampled.

    Not ``getrusage(RUSAGE_CHILDREN)``: a child's ru_maxrss counts the parent's pages it shared
    between fork and exec, so every worker would look as large as its parent.
    """

    def __init__(self, every_s: float = 0.1):
        import threading

        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.every_s):
            for child in me.children():
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass  # it just exited

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(path: Path, base_model: str, max_seq_len: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", "--path", str(path), "--base-model", base_model,
                           "--max-seq-len", str(max_seq_len)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def goals(results: dict[str, dict[int, dict]], sizes: list[int]) -> dict[str, dict]:
    """Which goals each format meets (None where the sizes do not allow judging)."""
    out: dict[str, dict] = {}
    for fmt, runs in results.items():
        ok = {n: r for n, r in runs.items() if "error" not in r}
        largest = max(ok) if ok else None
        flat = None
        if 100_000 in ok and 1_000_000 in ok:
            ratios = [ok[1_000_000][k] / ok[100_000][k] for k in ("peak_rss_mib", "worker_peak_rss_mib") if ok[100_000][k]]
            flat = {"ratio": round(max(ratios), 3), "met": max(ratios) <= GOAL_RSS_RATIO}
        speed = None
        if largest is not None:
            speed = {"records_per_s": ok[largest]["records_per_s"], "at": largest,
                     "met": ok[largest]["records_per_s"] >= GOAL_RECORDS_PER_S}
        out[fmt] = {"rss_flat_100k_to_1m": flat, "records_per_s": speed}
    return out


def print_table(results: dict[str, dict[int, dict]], judged: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("format", "records", "seconds", "records/s", "tokens/record", "rows", "padding",
                  "peak RSS MiB", "worker peak RSS MiB", title="data pipeline: read + validate + tokenise + pack")
    for fmt, runs in results.items():
        for n, r in sorted(runs.items()):
            if "error" in r:
                table.add_row(fmt, f"{n:,}", "[red]failed[/red]", *[""] * 6)
                continue
            table.add_row(fmt, f"{n:,}", f"{r['seconds']:.1f}", f"{r['records_per_s']:,}",
                          f"{r['tokens'] / max(r['used'], 1):.1f}", f"{r['rows']:,}", f"{r['padding']:.1%}",
                          f"{r['peak_rss_mib']:.0f}", f"{r['worker_peak_rss_mib']:.0f}")
    console = Console(width=max(Console().width, 130))  # the whole table, also in a log file
    console.print(table)
    for fmt, g in judged.items():
        flat, speed = g["rss_flat_100k_to_1m"], g["records_per_s"]
        if flat:
            console.print(f"{fmt}: peak RSS 1M / 100k = {flat['ratio']:.2f}x (goal <= {GOAL_RSS_RATIO}x): "
                          f"{'met' if flat['met'] else 'MISSED'}")
        if speed:
            console.print(f"{fmt}: {speed['records_per_s']:,} records/s at {speed['at']:,} records "
                          f"(goal >= {GOAL_RECORDS_PER_S:,}): {'met' if speed['met'] else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="record counts, comma-separated")
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--base-model", default=str(REPO / ".farm" / "base-model"))
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "bench-results" / "data_pipeline.json"))
    parser.add_argument("--smoke", action="store_true", help="1,000 and 20,000 records only (the smoke test; workers start at 16,384)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.path, args.base_model, args.max_seq_len)))
        return 0
    from serving import ensure_base_model

    base_model = str(ensure_base_model(Path(args.base_model).resolve()))
    sizes = [1_000, 20_000] if args.smoke else [int(n) for n in args.sizes.split(",")]
    formats = args.formats.split(",")
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="farm-bench-data-") as folder:
        for fmt in formats:
            results[fmt] = {}
            for n in sizes:
                path = Path(folder) / f"records-{n}.{fmt}"
                write_records(path, n, fmt)
                print(f"{fmt} {n:,} records ({path.stat().st_size / 2**20:.1f} MiB): running", flush=True)
                results[fmt][n] = run_child(path, base_model, args.max_seq_len)
                path.unlink()
    judged = goals(results, sizes)
    print_table(results, judged)
    failed = [f"{fmt} {n}: {r.get('error', 'lost records: used %s of %s' % (r.get('used'), r.get('records')))}"
              for fmt, runs in results.items() for n, r in runs.items()
              if "error" in r or r["used"] != r["records"] or r["records"] != n]
    write_json({"benchmark": "data_pipeline", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                         "load": os.getloadavg()},
                "goals": judged, "results": {fmt: {str(n): r for n, r in runs.items()} for fmt, runs in results.items()},
                "failed": failed}, args.out)
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

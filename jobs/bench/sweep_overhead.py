"""Sweep overhead: the same tenants through the Ray sweep against a plain loop in one process.

    python jobs/bench/sweep_overhead.py [--spec jobs/configs/demo.yaml] \
        [--tenants acme,globex,initech,hooli] [--steps 20] [--out bench-results/sweep_overhead.json]

The same K tenants of the spec, each trained for ``--steps`` optimizer steps, go through

  (a) ray-sweep   ``python jobs/tenant_sweep.py`` on a spec written for the run (those tenants,
                  those steps, a temporary output folder, no registry), with ``--max-concurrent`` at its
                  default (every tenant submitted at once; the cluster's CPUs decide how many
                  train side by side). It joins a running Ray cluster or starts a local one.
  (b) plain-loop  one fresh Python process (this script, re-invoked with the hidden ``--child``
                  option) that calls ``farm.train.adapter.train_tenant`` for each tenant in turn.

Both are timed from just before their process is launched until it exits, so Python imports,
model loads and (for (a)) Ray's start-up all count. Reported per tenant: the delay from
submission to its first training step (for (a) the sweep driver's ``first_step_delay_s``; for
(b) from the start of the loop, when every tenant is waiting, to its first ``on_step``) and its
wall time (for (a) submission to result; for (b) its own ``train_tenant`` call); then both
total wall times, their ratio (a)/(b) and the goal: the Ray path at most 1.5x the plain loop.
A benchmark only reports; it exits 0 whether the goal is met or not.
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

import yaml

GOAL_RATIO = 1.5
REPO = Path(__file__).resolve().parents[2]
SWEEP_SCRIPT = REPO / "jobs" / "tenant_sweep.py"


# -- (b) plain loop: the child process -------------------------------------------------------


class FirstStepProgress:
    """A quiet progress object: remembers when the first step of each run was reported."""

    def __init__(self):
        self.first_step: float | None = None

    def on_step(self, event) -> None:
        if self.first_step is None:
            self.first_step = time.time()


from bench_common import write_json  # noqa: E402  (sibling module; run as a script)

def _jobs(spec_path: str, tenants: list[str], steps: int, output_dir: str) -> dict:
    """The tenants' jobs of the spec, with ``steps`` optimizer steps, writing under ``output_dir``."""
    from farm.spec import load_spec

    sweep = load_spec(spec_path, overrides={"output_dir": output_dir})
    jobs = {}
    for name in tenants:
        job = sweep.job(name)
        train = job.settings.train.model_copy(update={"max_steps": steps})
        jobs[name] = job.model_copy(update={"settings": job.settings.model_copy(update={"train": train})})
    return sweep.model_copy(update={"jobs": jobs}).jobs


def run_plain_loop(args) -> dict:
    """Child body: train every tenant in turn in this process; times are epoch seconds."""
    child_start = time.time()
    import torch

    from farm.train.adapter import train_tenant

    jobs = _jobs(args.spec, args.tenant_list, args.steps, args.output_dir)
    imported = time.time()
    loop_start = time.time()  # every tenant is "submitted" here, as the sweep submits all at once
    tenants = {}
    for name, job in jobs.items():
        progress = FirstStepProgress()
        start = time.time()
        result = train_tenant(job, progress=progress, resume=False)
        end = time.time()
        tenants[name] = {
            "started": start, "first_step": progress.first_step, "finished": end,
            "first_step_delay_s": round(progress.first_step - loop_start, 2) if progress.first_step else None,
            "setup_s": round(progress.first_step - start, 2) if progress.first_step else None,
            "wall_seconds": round(end - start, 2), "train_seconds": result.train_seconds,
            "steps": result.steps, "tokens": result.tokens,
            "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
        }
    return {"child_start": child_start, "imports_s": round(imported - child_start, 2),
            "loop_start": loop_start, "loop_seconds": round(time.time() - loop_start, 2),
            "torch_threads": torch.get_num_threads(), "tenants": tenants}


def _launch_plain_loop(args, tmp: Path) -> dict:
    result_file = tmp / "plain-loop.json"
    command = [sys.executable, os.path.abspath(__file__), "--child", "--spec", args.spec,
               "--tenants", ",".join(args.tenant_list), "--steps", str(args.steps),
               "--output-dir", str(tmp / "plain-runs"), "--result", str(result_file)]
    print("--- (b) plain loop in a fresh process", flush=True)
    launched = time.time()
    completed = subprocess.run(command, check=False, cwd=REPO)
    wall = time.time() - launched
    if completed.returncode != 0 or not result_file.is_file():
        return {"error": f"subprocess exited with {completed.returncode}", "wall_seconds": round(wall, 2)}
    figures = json.loads(result_file.read_text())
    figures["wall_seconds"] = round(wall, 2)
    figures["process_start_s"] = round(figures["child_start"] - launched, 2)
    return figures


# -- (a) Ray sweep ---------------------------------------------------------------------------


def write_sweep_spec(spec_path: str, tenants: list[str], steps: int, output_dir: Path, target: Path) -> Path:
    """A copy of the spec with only ``tenants``, ``steps`` steps and absolute paths."""
    source = Path(spec_path).resolve()
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))

    def absolute(value: str) -> str:
        if "://" in value or Path(value).expanduser().is_absolute():
            return value
        return str((source.parent / value).resolve())

    by_name = {t["name"]: t for t in raw["tenants"]}
    unknown = [name for name in tenants if name not in by_name]
    if unknown:
        raise SystemExit(f"{spec_path}: unknown tenant(s) {', '.join(unknown)}; it has {', '.join(by_name)}")
    kept = []
    for name in tenants:
        entry = json.loads(json.dumps(by_name[name]))
        entry["data"]["path"] = absolute(entry["data"]["path"])
        kept.append(entry)
    raw["tenants"] = kept
    raw.setdefault("defaults", {}).setdefault("train", {})["max_steps"] = steps
    for entry in kept:  # a per-tenant step count would win over the defaults
        entry.get("train", {}).pop("max_steps", None)
    name_or_path = raw["base_model"]["name_or_path"]
    if name_or_path.startswith(("./", "../", "/", "~")) or (source.parent / name_or_path).is_dir():
        raw["base_model"]["name_or_path"] = absolute(name_or_path)
    raw["output_dir"] = str(output_dir)
    raw.pop("baseline", None)  # the plain loop trains LoRA only; so must the sweep it is compared with
    # Publishing to a registry is not part of the comparison: the plain loop does not publish.
    raw.pop("registry", None)
    target.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return target


def _ray_cluster_running() -> bool:
    ray = Path(sys.executable).with_name("ray")
    try:
        return subprocess.run([str(ray) if ray.exists() else "ray", "status"], capture_output=True,
                              timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _launch_ray_sweep(args, tmp: Path) -> dict:
    output_dir = tmp / "ray-runs"
    spec = write_sweep_spec(args.spec, args.tenant_list, args.steps, output_dir, tmp / "sweep-spec.yaml")
    sweep_id = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, str(SWEEP_SCRIPT), "--config", str(spec), "--sweep-id", sweep_id]
    print(f"--- (a) Ray sweep: {' '.join(command[1:])}", flush=True)
    marks: dict[str, float] = {}
    launched = time.time()
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            now = time.time()
            sys.stdout.write(line)
            text = line.strip()
            if "submitted (" in text:
                marks.setdefault("first_submitted", now)
                marks["last_submitted"] = now
            elif "] step " in text:
                marks.setdefault("first_progress_line", now)
            elif ": done, eval loss" in text:
                marks["last_done"] = now
        returncode = process.wait()
    ended = time.time()
    wall = ended - launched
    report_file = output_dir / sweep_id / "report.json"
    figures: dict = {"sweep_id": sweep_id, "returncode": returncode, "wall_seconds": round(wall, 2),
                     "max_concurrent": None}
    figures["marks_s"] = {k: round(v - launched, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    if "first_submitted" in marks:
        # Python start-up, imports, ray.init (cluster start or join) and data validation.
        figures["launch_to_first_submit_s"] = round(marks["first_submitted"] - launched, 2)
    if "last_done" in marks:
        # The report, plot and Ray's shutdown at exit.
        figures["last_done_to_exit_s"] = round(ended - marks["last_done"], 2)
    if not report_file.is_file():
        figures["error"] = f"no report ({report_file}); sweep exited with {returncode}"
        return figures
    report = json.loads(report_file.read_text())
    figures["run_sweep_seconds"] = report["wall_seconds"]
    figures["tenants"] = {}
    for outcome in report["tenants"]:
        result_file = output_dir / sweep_id / outcome["tenant"] / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        figures["tenants"][outcome["tenant"]] = {
            "status": outcome["status"], "error": outcome.get("error"),
            "first_step_delay_s": outcome.get("first_step_delay_s"),
            "wall_seconds": outcome.get("wall_seconds"), "steps": outcome.get("steps"),
            "tokens": outcome.get("tokens"),
            # Inside the worker: the recipe's own wall (setup + train + save) and step time.
            "recipe_wall_seconds": result.get("wall_seconds"), "train_seconds": result.get("train_seconds"),
            "eval_loss_before": outcome.get("eval_loss_before"), "eval_loss_after": outcome.get("eval_loss_after"),
        }
    if returncode != 0:
        figures["error"] = f"sweep exited with {returncode}"
    return figures


# -- report ----------------------------------------------------------------------------------


def _s(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _report(ray_run: dict, plain: dict, args, load: list[float]) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))  # full columns even when piped
    table = Table(title=f"sweep overhead: {len(args.tenant_list)} tenants x {args.steps} steps, "
                        f"(a) Ray sweep vs (b) plain loop, {os.cpu_count()} CPUs")
    for column in ("tenant", "delay to 1st step (a) s", "delay to 1st step (b) s",
                   "wall (a) s", "wall (b) s", "train (a) s", "train (b) s"):
        table.add_column(column, justify="left" if column == "tenant" else "right", no_wrap=True)
    ray_tenants, plain_tenants = ray_run.get("tenants", {}), plain.get("tenants", {})
    for name in args.tenant_list:
        a, b = ray_tenants.get(name, {}), plain_tenants.get(name, {})
        table.add_row(name, _s(a.get("first_step_delay_s")), _s(b.get("first_step_delay_s")),
                      _s(a.get("wall_seconds")), _s(b.get("wall_seconds")),
                      _s(a.get("train_seconds")), _s(b.get("train_seconds")))
    table.add_section()
    table.add_row("[bold]total (process)[/bold]", "", "", f"[bold]{_s(ray_run.get('wall_seconds'))}[/bold]",
                  f"[bold]{_s(plain.get('wall_seconds'))}[/bold]",
                  _s(sum(t.get("train_seconds") or 0 for t in ray_tenants.values()) or None),
                  _s(sum(t.get("train_seconds") or 0 for t in plain_tenants.values()) or None))
    console.print(table)

    ok = "error" not in ray_run and "error" not in plain
    ratio = ray_run["wall_seconds"] / plain["wall_seconds"] if ok and plain.get("wall_seconds") else None
    goal = (ratio <= GOAL_RATIO) if ratio is not None else None
    words = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "[yellow]n/a[/yellow]"}
    for label, run in (("(a) Ray sweep", ray_run), ("(b) plain loop", plain)):
        if "error" in run:
            console.print(f"{label}: [red]{run['error']}[/red]")
    console.print(f"wall (a) Ray sweep:   {_s(ray_run.get('wall_seconds'))} s  (launch to first submit "
                  f"{_s(ray_run.get('launch_to_first_submit_s'))} s, run_sweep "
                  f"{_s(ray_run.get('run_sweep_seconds'))} s, last done to exit "
                  f"{_s(ray_run.get('last_done_to_exit_s'))} s)")
    console.print(f"wall (b) plain loop:  {_s(plain.get('wall_seconds'))} s  (imports + spec "
                  f"{_s(plain.get('imports_s'))} s, loop {_s(plain.get('loop_seconds'))} s, "
                  f"torch threads {plain.get('torch_threads', '-')})")
    console.print("ratio (a)/(b):        " + (f"{ratio:.2f}x" if ratio is not None else "n/a"))
    console.print(f"goal (a) <= {GOAL_RATIO}x (b):    {words[goal]}")
    if max(load) > (os.cpu_count() or 1):
        console.print(f"[yellow]note: load average reached {max(load):.1f} on {os.cpu_count()} CPUs during the "
                      "run; other processes shared the machine, so the times are noisy[/yellow]")
    return {"ratio": round(ratio, 3) if ratio is not None else None, "goal_ratio": GOAL_RATIO,
            "goal_met": goal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="jobs/configs/demo.yaml", help="sweep spec (YAML)")
    parser.add_argument("--tenants", default="acme,globex,initech,hooli", help="comma-separated tenants")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per tenant")
    parser.add_argument("--out", default="bench-results/sweep_overhead.json", help="JSON result file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.spec = os.path.abspath(args.spec)
    args.tenant_list = [t.strip() for t in args.tenants.split(",") if t.strip()]

    if args.child:  # child process: the plain loop, its figures to --result, nothing else
        Path(args.result).write_text(json.dumps(run_plain_loop(args), indent=2) + "\n")
        return 0

    cluster_running = _ray_cluster_running()
    load_before = os.getloadavg()
    print(f"{len(args.tenant_list)} tenants ({', '.join(args.tenant_list)}), {args.steps} steps each; "
          f"{os.cpu_count()} CPUs; Ray cluster running at start: {cluster_running}; load average {load_before[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        plain = _launch_plain_loop(args, Path(tmp))
        ray_run = _launch_ray_sweep(args, Path(tmp))
    load_after = os.getloadavg()
    summary = _report(ray_run, plain, args, [*load_before, *load_after])

    import ray
    import torch

    from farm.spec import load_spec
    from farm.sweep import trainer_resources

    payload = {
        "benchmark": "sweep_overhead",
        "spec": args.spec,
        "tenants": args.tenant_list,
        "steps": args.steps,
        "ray_sweep": ray_run,
        "plain_loop": plain,
        **summary,
        "environment": {
            "python": platform.python_version(), "platform": platform.platform(),
            "nproc": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "torch_threads_plain_loop": plain.get("torch_threads"),
            "torch_threads_per_ray_worker": trainer_resources(load_spec(args.spec).spec.resources).torch_threads,
            "ray_cluster_already_running": cluster_running,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

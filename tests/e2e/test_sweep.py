"""The tenant sweep against a real local Ray: isolation, report, resume, worker death.

Each test runs ``jobs/tenant_sweep.py`` as its own process with ``RAY_ADDRESS=local``, so it
starts (and stops) a real local Ray instance, exactly as an operator running it directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ..conftest import FAST_DEFAULTS, REPO

pytestmark = pytest.mark.slow
SWEEP = [sys.executable, str(REPO / "jobs" / "tenant_sweep.py")]
FARM_SWEEP = [sys.executable, "-m", "farm.cli", "sweep"]  # the installed package's command, same flags


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1",
            "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _spec(tmp_path: Path, base_model_dir: Path, tenants: list[dict], **train) -> Path:
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(train)
    raw = {"name": "e2e", "base_model": {"name_or_path": str(base_model_dir)},
           "output_dir": str(tmp_path / "runs"), "defaults": defaults,
           "resources": {"workers": 1, "cpus_per_worker": 1, "max_retries": 2}, "tenants": tenants,
           "registry": {"store": str(tmp_path / "registry")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(args: list[str], timeout: int = 900, command: list[str] = SWEEP) -> subprocess.CompletedProcess:
    return subprocess.run(command + args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def _alone(job) -> dict:
    """``job``'s adapter tensors trained uninterrupted in this process, on one thread like a
    Ray worker (the reference the sweep's adapters must equal)."""
    from safetensors.torch import load_file

    from farm.train.adapter import train_tenant

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_tenant(job, progress=type("Quiet", (), {"on_step": lambda self, e: None})())
    finally:
        torch.set_num_threads(threads)
    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_sweep_isolates_a_bad_tenant_reports_and_does_not_retrain(tmp_path, base_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    spec = _spec(tmp_path, base_model_dir, [
        {"name": "hooli", "data": {"path": str(REPO / "jobs/data/hooli.jsonl")}},
        {"name": "globex", "data": {"path": str(REPO / "jobs/data/globex.jsonl")}},
        {"name": "broken", "data": {"path": str(bad)}},
    ], max_steps=15, checkpoint_every=5)
    # --max-concurrent counts tenants: hooli and globex share a pack that trains one at a time
    first = _run(["--config", str(spec), "--sweep-id", "s1", "--progress-every", "2", "--max-concurrent", "1"])
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "(1 at a time" in first.stdout and "at most 1 tenant(s) train at once" in first.stdout
    out = tmp_path / "runs" / "s1"
    report = json.loads((out / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert report["ok"] is False
    for name in ("hooli", "globex"):
        tenant = by_name[name]
        assert tenant["status"] == "trained" and tenant["steps"] == 15
        assert tenant["eval_loss_after"] < tenant["eval_loss_before"]
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
        assert tenant["first_step_delay_s"] is not None
    assert by_name["broken"]["status"] == "invalid"
    assert "line 2" in by_name["broken"]["error"] and "field 'text'" in by_name["broken"]["error"]
    assert (out / "report.md").read_text().count("| trained |") == 2
    assert (out / "loss_curves.png").stat().st_size > 10_000
    # live progress reached the job's log, per tenant
    assert "[hooli] step" in first.stdout and "tok/s" in first.stdout and "eta" in first.stdout

    # the driver published each trained adapter, with metrics and lineage
    from farm.registry import open_registry

    registry = open_registry(str(tmp_path / "registry"))
    for name in ("hooli", "globex"):
        assert by_name[name]["serve_name"] == f"{name}.e2e.v1"
        info = registry.resolve(f"{name}.e2e@latest")
        assert info.servable_by_vllm, info.not_servable_reason
        assert info.metrics["eval_loss_after"] == by_name[name]["eval_loss_after"]
        assert info.lineage["sweep_id"] == "s1" and len(info.lineage["dataset_fingerprint"]) == 64
        assert info.base_model == str(base_model_dir)

    stamps = {n: (out / n / "result.json").stat().st_mtime_ns for n in ("hooli", "globex")}
    again = _run(["--config", str(spec), "--sweep-id", "s1", "--tenants", "hooli,globex"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]  # what it was asked for succeeded
    report = json.loads((out / "report.json").read_text())
    # the report still covers the whole sweep id: broken keeps its earlier error
    assert [t["status"] for t in report["tenants"]] == ["skipped", "skipped", "invalid"]
    assert report["tenants"][2]["error"] == by_name["broken"]["error"] and report["ok"] is False
    assert report["this_run"] == ["hooli", "globex"]
    summary = (out / "report.md").read_text()
    assert "2 of 3 tenants succeeded" in summary and "kept from earlier runs of this sweep id: broken" in summary
    assert "submitted" not in again.stdout  # no trainer was launched
    assert stamps == {n: (out / n / "result.json").stat().st_mtime_ns for n in ("hooli", "globex")}
    assert registry.search()[1] == 2  # nothing published twice


def _sweep_killing_a_worker(spec: Path, sweep_id: str, ready) -> tuple[int | None, int, str]:
    """Run a sweep and SIGKILL one of its Ray Train workers as soon as ``ready()`` is true;
    returns (killed pid or None, the sweep's exit code, its output)."""
    proc = subprocess.Popen(SWEEP + ["--config", str(spec), "--sweep-id", sweep_id], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                workers = _train_workers(proc.pid)
                if workers:
                    killed = workers[0].pid
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed, proc.returncode, output


def _train_workers(root_pid: int) -> list:
    import psutil

    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or proc.name().startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_single_tenant_pool_whose_worker_is_sigkilled_resumes_to_the_same_adapter(tmp_path, base_model_dir):
    """One tenant in a single-tenant pool; its worker is SIGKILLed after a checkpoint; Ray Train
    restarts the pool, which resumes the tenant it had taken from that checkpoint."""
    from safetensors.torch import load_file

    from farm.spec import load_spec

    tenants = [{"name": "hooli", "data": {"path": str(REPO / "jobs/data/hooli.jsonl")}}]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=40, checkpoint_every=5)
    checkpoint = tmp_path / "runs" / "kill" / ".ray" / "pooled" / "hooli" / "checkpoint-0000005"
    killed, returncode, output = _sweep_killing_a_worker(spec, "kill", checkpoint.is_dir)
    (tmp_path / "sweep.log").write_text(output)
    assert killed is not None, "the worker was never seen running after its first checkpoint"
    assert returncode == 0, output[-4000:]
    result = json.loads((tmp_path / "runs" / "kill" / "hooli" / "result.json").read_text())
    assert result["resumed_from_step"] is not None and 5 <= result["resumed_from_step"] < 40
    assert result["steps"] == 40

    # The same job, uninterrupted, in this process (one thread, like the Ray worker).
    job = load_spec(spec).job("hooli").model_copy(update={"output_dir": str(tmp_path / "straight")})
    b = load_file(str(tmp_path / "runs" / "kill" / "hooli" / "adapter" / "adapter_model.safetensors"))
    assert _max_difference(_alone(job), b) < 1e-5


def test_packed_sweep_co_trains_survives_a_killed_worker_and_matches_isolated_training(tmp_path, base_model_dir):
    """packing: auto puts the three small tenants in one co-training pack; the pack's worker is
    SIGKILLed after a checkpoint; Ray Train restarts it, every tenant resumes from its own
    checkpoint on storage, and each adapter still equals the one trained alone (fp32, no dropout)."""
    from safetensors.torch import load_file

    from farm.spec import load_spec

    names = ["hooli", "acme", "globex"]
    tenants = [{"name": n, "data": {"path": str(REPO / f"jobs/data/{n}.jsonl")}} for n in names]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=12, checkpoint_every=4, precision="fp32")
    raw = yaml.safe_load(spec.read_text())
    raw["defaults"]["lora"]["dropout"] = 0.0
    raw["resources"]["packing"] = "auto"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))

    pack_dir = tmp_path / "runs" / "packed" / ".ray" / "pooled"
    killed, returncode, output = _sweep_killing_a_worker(
        spec, "packed", lambda: any((pack_dir / n / "checkpoint-0000004" / "state.json").is_file() for n in names))
    assert killed is not None, "the pack's worker was never seen running after a checkpoint"
    assert returncode == 0, output[-4000:]
    assert "pack-1: hooli, acme, globex (3 at a time" in output
    report = json.loads((tmp_path / "runs" / "packed" / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert all(by_name[n]["status"] == "trained" and by_name[n]["pack"] == "pack-1" for n in names)
    assert sorted(by_name["hooli"]["packed_with"]) == ["acme", "globex"]
    assert any(by_name[n]["resumed_from_step"] for n in names)  # the restart resumed, not restarted
    assert "| pack-1 (with" in (tmp_path / "runs" / "packed" / "report.md").read_text()

    sweep = load_spec(spec)
    for name in names:
        job = sweep.job(name).model_copy(update={"output_dir": str(tmp_path / "alone" / name)})
        b = load_file(str(tmp_path / "runs" / "packed" / name / "adapter" / "adapter_model.safetensors"))
        assert _max_difference(_alone(job), b) < 1e-5, name


def test_a_pack_hands_off_each_tenant_the_moment_it_finishes(tmp_path, base_model_dir):
    """Two short tenants co-train with a long one in one pack: each short one is handed off
    (adapter copied, published, reported) while the long one is still training, not when the
    pack ends."""
    import re

    tenants = [{"name": n, "data": {"path": str(REPO / f"jobs/data/{n}.jsonl")}, "train": {"max_steps": steps}}
               for n, steps in (("hooli", 4), ("acme", 4), ("globex", 60))]
    spec = _spec(tmp_path, base_model_dir, tenants, checkpoint_every=50)
    raw = yaml.safe_load(spec.read_text())
    raw["resources"]["packing"] = "auto"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = _run(["--config", str(spec), "--sweep-id", "handoff", "--progress-every", "1"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "pack-1: hooli, acme, globex" in run.stdout or "pack-1: globex, hooli, acme" in run.stdout, run.stdout[-3000:]
    report = json.loads((tmp_path / "runs" / "handoff" / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert all(by_name[n]["status"] == "trained" and by_name[n]["pack"] == "pack-1" for n in by_name)
    for short in ("hooli", "acme"):
        published = run.stdout.index(f"{short}: published as {short}.")
        later_steps = [int(s) for s in re.findall(r"\[globex\] step (\d+)/60", run.stdout[published:])]
        assert later_steps and min(later_steps) < 60, f"{short} was not handed off while globex trained"
        assert by_name[short]["handed_off_s"] < by_name["globex"]["handed_off_s"]
        assert (tmp_path / "runs" / "handoff" / short / "adapter" / "adapter_model.safetensors").is_file()


def test_a_sweep_whose_driver_is_killed_resumes_every_tenant_from_its_checkpoint(tmp_path, base_model_dir):
    """The sweep's driver is SIGKILLed mid-training (its local Ray with it); running the same
    sweep id again resumes both tenants of the pool from their checkpoints on storage, and each
    adapter equals uninterrupted training (fp32, no dropout)."""
    import psutil
    from safetensors.torch import load_file

    from farm.spec import load_spec

    names = ["hooli", "acme"]
    tenants = [{"name": n, "data": {"path": str(REPO / f"jobs/data/{n}.jsonl")}} for n in names]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=30, checkpoint_every=5, precision="fp32")
    raw = yaml.safe_load(spec.read_text())
    raw["defaults"]["lora"]["dropout"] = 0.0
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    pooled = tmp_path / "runs" / "again" / ".ray" / "pooled"

    proc = subprocess.Popen(SWEEP + ["--config", str(spec), "--sweep-id", "again"], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if all((pooled / n / "checkpoint-0000010" / "state.json").is_file() for n in names):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stdout.read()[-3000:]
        started = psutil.Process(proc.pid).children(recursive=True)  # its Ray: stopped by PID below
        proc.kill()
        proc.wait(timeout=60)
    finally:
        for child in started:
            try:
                child.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "runs" / "again" / "report.json").exists()

    again = _run(["--config", str(spec), "--sweep-id", "again"])
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    by_name = {t["tenant"]: t for t in json.loads((tmp_path / "runs" / "again" / "report.json").read_text())["tenants"]}
    sweep = load_spec(spec)
    for name in names:
        assert by_name[name]["status"] == "trained" and by_name[name]["steps"] == 30
        assert by_name[name]["resumed_from_step"] is not None and by_name[name]["resumed_from_step"] >= 10
        job = sweep.job(name).model_copy(update={"output_dir": str(tmp_path / "straight" / name)})
        b = load_file(str(tmp_path / "runs" / "again" / name / "adapter" / "adapter_model.safetensors"))
        assert _max_difference(_alone(job), b) < 1e-5, name


def test_a_sweep_of_64_tenants_hands_each_off_as_it_finishes(tmp_path, base_model_dir):
    """64 tiny tenants (2 steps each) on pools: tenants are handed off while others have not
    even been taken by a pool yet, so hand-offs spread over the run instead of piling up at
    its end. (Times are only compared with each other, never with a bound.)"""
    samples = ["acme.jsonl", "globex.jsonl", "hooli.jsonl", "initech.jsonl", "umbrella.parquet"]
    tenants = [{"name": f"t{i:02d}", "data": {"path": str(REPO / "jobs" / "data" / samples[i % len(samples)])}}
               for i in range(64)]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=2, checkpoint_every=100)
    run = _run(["--config", str(spec), "--sweep-id", "many", "--progress-every", "1"], timeout=1200, command=FARM_SWEEP)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "runs" / "many" / "report.json").read_text())
    outcomes = report["tenants"]
    assert len(outcomes) == 64 and all(t["status"] == "trained" for t in outcomes)
    handed_off = sorted(t["handed_off_s"] for t in outcomes)
    taken = sorted(t["handed_off_s"] - t["wall_seconds"] for t in outcomes)  # when its pool took it
    # Many tenants were handed off before the last ones were even taken: not all at the end.
    assert sum(h < taken[-1] for h in handed_off) >= 16, (handed_off, taken)
    assert len({round(h) for h in handed_off}) >= 4, handed_off  # in several waves, not at one moment
    assert "64 of 64 tenants succeeded" in (tmp_path / "runs" / "many" / "report.md").read_text()


def test_two_worker_tenants_one_on_a_sharded_base_survive_a_sigkilled_worker(tmp_path, base_model_dir):
    """Two tenants on 2 workers each, in one single-tenant pool of that shape: hooli data
    parallel, acme with its base sharded (``train.shard_base: fsdp``). A worker is SIGKILLed
    after hooli's first checkpoint; Ray Train restarts the group, both ranks resume hooli from
    the same step, then the pool trains acme sharded. Each adapter equals 1 worker with the
    global batch, uninterrupted (fp32, no dropout; 1e-5 data parallel, 1e-4 sharded)."""
    from safetensors.torch import load_file

    from farm.spec import load_spec

    tenants = [{"name": "hooli", "data": {"path": str(REPO / "jobs/data/hooli.jsonl")}},
               {"name": "acme", "data": {"path": str(REPO / "jobs/data/acme.jsonl")},
                "train": {"shard_base": "fsdp", "max_steps": 8}}]
    spec = _spec(tmp_path, base_model_dir, tenants, max_steps=30, checkpoint_every=5, precision="fp32", batch_size=2)
    raw = yaml.safe_load(spec.read_text())
    raw["defaults"]["lora"]["dropout"] = 0.0
    raw["resources"]["workers"] = 2
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    checkpoint = tmp_path / "runs" / "dp" / ".ray" / "pooled" / "hooli" / "checkpoint-0000005" / "state.json"
    killed, returncode, output = _sweep_killing_a_worker(spec, "dp", checkpoint.is_file)
    assert killed is not None, "no worker was seen running after the first checkpoint"
    assert returncode == 0, output[-4000:]
    assert "2 worker(s)" in output and "pool-1: hooli, acme (one at a time)" in output
    result = json.loads((tmp_path / "runs" / "dp" / "hooli" / "result.json").read_text())
    assert result["steps"] == 30 and result["resumed_from_step"] is not None and result["resumed_from_step"] >= 5

    raw["defaults"]["train"]["batch_size"] = 4  # one worker, the global batch, nothing sharded
    raw["resources"]["workers"] = 1
    raw["tenants"][1]["train"]["shard_base"] = "none"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    for name, tolerance in (("hooli", 1e-5), ("acme", 1e-4)):
        job = load_spec(spec).job(name).model_copy(update={"output_dir": str(tmp_path / "one" / name)})
        b = load_file(str(tmp_path / "runs" / "dp" / name / "adapter" / "adapter_model.safetensors"))
        assert _max_difference(_alone(job), b) < tolerance, name

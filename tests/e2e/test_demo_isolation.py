"""``make demo`` (``jobs/run_demo.sh``) beside another Ray instance on the same machine.

The script starts its own head (its own temp dir, free ports for the GCS, dashboard, job agent
and client server), submits the sweep with ``ray job submit``, and stops only the processes it
started, by PID. Here another Ray head (started by this test, with its own temp dir) runs the
whole time, and Ray's default ports that are free are held by plain sockets, as another
program on a shared machine would hold them: the demo must finish, and the other head must
still answer afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ..conftest import FAST_DEFAULTS, REPO

pytestmark = pytest.mark.slow
RAY_DEFAULT_PORTS = (6379, 8265, 10001, 52365)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _holding(ports):
    """Listen on each port that is free (others are someone else's already)."""
    held = []
    for port in ports:
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen()
            held.append(sock)
        except OSError:
            sock.close()
    try:
        yield
    finally:
        for sock in held:
            sock.close()


def test_the_demo_runs_beside_another_ray_and_leaves_it_running(tmp_path, base_model_dir):
    temp_dir = tempfile.mkdtemp(prefix="farm-other-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    other = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=1",
                            "--include-dashboard=false", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-2000:]
    other_pids = [p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    assert other_pids, "the other Ray head's processes were not found"
    try:
        defaults = {**FAST_DEFAULTS, "train": {**FAST_DEFAULTS["train"], "max_steps": 3, "checkpoint_every": 3}}
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "isolated", "base_model": {"name_or_path": str(base_model_dir)}, "defaults": defaults,
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "tenants": [{"name": "acme", "data": {"path": str(REPO / "jobs" / "data" / "acme.jsonl")}}]}))
        demo_env = {**os.environ, "FARM_DEMO_SPEC": str(spec), "FARM_DEMO_BASE_MODEL": str(base_model_dir),
                    "FARM_DEMO_OUTPUT": str(tmp_path / "runs"), "FARM_DEMO_REGISTRY": str(tmp_path / "registry"),
                    "FARM_DEMO_SWEEP_ID": "isolated", "RAY_DISABLE_USAGE_STATS": "1"}
        for name in ("RAY_ADDRESS", "FARM_RAY_PORT", "FARM_DASHBOARD_PORT", "FARM_DASHBOARD_AGENT_PORT"):
            demo_env.pop(name, None)
        with _holding(RAY_DEFAULT_PORTS):
            demo = subprocess.run(["bash", "jobs/run_demo.sh"], cwd=REPO, env=demo_env, capture_output=True,
                                  text=True, timeout=900)
        assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
        assert "Job 'farm-isolated' succeeded" in demo.stdout and "1 of 1 tenants succeeded" in demo.stdout
        # the other head is untouched: its processes live, and it still runs work
        assert all(psutil.pid_exists(pid) for pid in other_pids)
        check = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=__import__('sys').argv[1]); "
                                "print(ray.get(ray.remote(lambda: 41 + 1).remote()))", f"127.0.0.1:{port}"],
                               capture_output=True, text=True, env=env, timeout=180)
        assert check.stdout.strip().endswith("42"), check.stdout[-2000:] + check.stderr[-2000:]
    finally:  # stop the other head by PID (and what it started), never with `ray stop`
        victims = set(other_pids)
        for pid in other_pids:
            with contextlib.suppress(psutil.Error):
                victims.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)

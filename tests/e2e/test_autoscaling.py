"""Autoscaling, proven on one machine: Ray's fake multi-node provider with logical-GPU workers.

``cluster/local-fake.yaml`` declares a head with no GPU and a worker type with one logical GPU
(minimum 0). A sweep of tiny tenants that each ask for one GPU starts on the head alone; the
autoscaler must add worker nodes for it, every tenant must finish and hand off its adapter, and
once the sweep has released its demand the idle nodes must be removed after the idle timeout.
Training itself runs on the CPU (the GPUs are only logical), over gloo (``backend: gloo``).

Everything the cluster starts carries its own short ``--temp-dir`` on its command line, so the
teardown stops exactly this cluster's processes (``ray stop`` would stop every Ray on the host).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import FAST_DEFAULTS, REPO

pytestmark = pytest.mark.slow
IDLE_TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp_dir: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found + _descendants(found)


def _descendants(roots: list[int]) -> list[int]:
    """Children of ``roots``, recursively: Ray's agents rename themselves (``ray::DashboardAgent``),
    so their command lines lose the temp dir, and left running they hold Ray's default ports."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may contain spaces
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], set(roots)
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found.extend(children)
        frontier = children
    return found


@pytest.fixture
def fake_cluster(tmp_path):
    """A head started with the autoscaler on the fake multi-node provider; yields its address."""
    from ray._private.services import get_node_ip_address

    port = _free_port()
    config = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    config["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60
    # The fake provider starts its nodes against GCS on port 6379 unless told otherwise; a free
    # port keeps this cluster apart from any other Ray on the machine.
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    config_file = tmp_path / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    temp_dir = tempfile.mkdtemp(prefix="farm-as-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    start = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
         f"--autoscaling-config={config_file}", f"--temp-dir={temp_dir}", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        for _ in range(3):
            for pid in _cluster_processes(temp_dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)


class NodeWatch(threading.Thread):
    """Counts alive GPU nodes (the head has none) once a second."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address = address
        self.samples: list[tuple[float, int]] = []
        self.seen: set[str] = set()  # every GPU node that was ever alive
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        try:
            while not self.stop.is_set():
                nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
                self.seen.update(n["NodeID"] for n in nodes)
                self.samples.append((time.time(), len(nodes)))
                time.sleep(1)
        finally:
            ray.shutdown()

    def first_time(self, predicate, after: float = 0.0) -> float | None:
        return next((t for t, count in self.samples if t >= after and predicate(count)), None)

    @property
    def peak(self) -> int:
        return max((count for _, count in self.samples), default=0)


def _gpu_spec(tmp_path: Path, base_model_dir: Path, name: str, tenants: list[str], max_steps: int,
              max_retries: int) -> Path:
    """A sweep of sample tenants, one trainer and one (logical) GPU each, over gloo."""
    defaults = json.loads(json.dumps(FAST_DEFAULTS))
    defaults["train"].update(max_steps=max_steps, checkpoint_every=max_steps, batch_size=2)
    defaults["data"] = {"max_seq_len": 64}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "base_model": {"name_or_path": str(base_model_dir)},
        "output_dir": str(tmp_path / "runs"), "defaults": defaults,
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, "backend": "gloo",
                      "max_retries": max_retries, "packing": "off"},  # one trainer, one GPU per tenant
        "tenants": [{"name": t, "data": {"path": str(REPO / "jobs" / "data" / f"{t}.jsonl")}} for t in tenants],
    }, sort_keys=False))
    return spec


def test_sweep_scales_gpu_nodes_up_from_zero_and_back_down(tmp_path, base_model_dir, fake_cluster):
    address, env = fake_cluster
    tenants = ["hooli", "acme", "globex"]
    spec = _gpu_spec(tmp_path, base_model_dir, "scale", tenants, max_steps=3, max_retries=1)

    watch = NodeWatch(address)
    watch.start()
    time.sleep(3)
    assert watch.samples and watch.samples[-1][1] == 0, "the cluster must start with no GPU nodes"
    started = time.time()
    sweep = subprocess.run([sys.executable, str(REPO / "jobs" / "tenant_sweep.py"), "--config", str(spec)],
                           capture_output=True, text=True, timeout=600, cwd=REPO,
                           env={**env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"})
    finished = time.time()
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
    assert "asked the autoscaler for 3 worker bundle(s) up front" in sweep.stdout

    report = json.loads((tmp_path / "runs" / "scale" / "report.json").read_text())
    assert [t["status"] for t in report["tenants"]] == ["trained"] * 3
    for name in tenants:
        assert (tmp_path / "runs" / "scale" / name / "adapter" / "adapter_model.safetensors").is_file()

    # Scale-up: the autoscaler added GPU nodes for the sweep (each tenant asked for a whole GPU).
    assert watch.peak >= 2, watch.samples
    # Scale-down: after the idle timeout every GPU node is gone again.
    deadline = finished + IDLE_TIMEOUT_S + 90
    while time.time() < deadline and (not watch.samples or watch.samples[-1][1] > 0):
        time.sleep(2)
    watch.stop.set()
    watch.join(timeout=30)
    assert watch.samples[-1][1] == 0, watch.samples[-10:]

    first_node = watch.first_time(lambda n: n >= 1, after=started)
    peak_at = watch.first_time(lambda n: n == watch.peak, after=started)
    gone = watch.first_time(lambda n: n == 0, after=finished)
    figures = {"nodes_added": len(watch.seen), "nodes_removed": len(watch.seen), "peak_gpu_nodes": watch.peak,
               "first_gpu_node_s": round(first_node - started, 1), "all_nodes_up_s": round(peak_at - started, 1),
               "sweep_s": round(finished - started, 1), "scale_down_after_sweep_s": round(gone - finished, 1),
               "idle_timeout_s": IDLE_TIMEOUT_S}
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "autoscaling_proof.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(figures)


def test_an_auto_gpu_sweep_scales_up_from_zero_and_its_sigkilled_driver_leaves_no_demand(
        tmp_path, base_model_dir, fake_cluster):
    """``gpus_per_worker: auto`` on a cluster with no GPU node up plans for the GPUs the
    autoscaler can add (``FARM_GPU_NODES``, as the cluster files set it) and scales them up. The
    sweep asks for its first wave up front as placement groups its job owns: when its driver is
    SIGKILLed mid-run the demand goes with the job, and the GPU nodes it caused are removed after
    the idle timeout (a standing request_resources would have kept them)."""
    address, env = fake_cluster
    spec = _gpu_spec(tmp_path, base_model_dir, "killed", ["hooli", "acme", "globex"], max_steps=100000,
                     max_retries=0)  # trains until killed
    raw = yaml.safe_load(spec.read_text())
    raw["resources"]["gpus_per_worker"] = "auto"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**env, "FARM_GPU_NODES": "fakegpu:4"}  # local-fake.yaml's gpu_worker type: 0..4
    watch = NodeWatch(address)
    watch.start()
    sweep = subprocess.Popen([sys.executable, "-m", "farm.cli", "sweep", "--config", str(spec)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and watch.peak < 2 and sweep.poll() is None:
            time.sleep(1)
        assert sweep.poll() is None, "the sweep ended before it could be killed: " + sweep.stdout.read()[-3000:]
        assert watch.peak >= 2, watch.samples[-10:]  # auto planned GPUs, and the demand launched GPU nodes
    finally:
        sweep.kill()  # SIGKILL: no finally of the driver runs
        sweep.wait(60)
    killed = time.time()
    deadline = killed + IDLE_TIMEOUT_S + 120
    while time.time() < deadline and (not watch.samples or watch.samples[-1][1] > 0):
        time.sleep(2)
    watch.stop.set()
    watch.join(timeout=30)
    assert watch.samples[-1][1] == 0, f"GPU nodes still up {time.time() - killed:.0f} s after the driver died"

"""A sweep mixing PEFT methods, submitted with ``ray job submit`` as ``make methods`` does.

``jobs/run_demo.sh`` starts a Ray head (token auth on), submits ``jobs/tenant_sweep.py`` with
``jobs/configs/methods.yaml`` and stops the head. Without CUDA the spec's QLoRA tenant makes
the whole spec refused before any tenant starts; the other five methods then train side by
side, each published with its method and servability.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from farm.methods import METHODS

from ..conftest import REPO

pytestmark = pytest.mark.slow
CPU_TENANTS = {"acme": "lora", "globex": "dora", "initech": "ia3", "umbrella": "prefix", "hooli": "prompt",
               "globex-bottleneck": "bottleneck"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(tmp_path: Path, base_model_dir: Path, sweep_id: str, args: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "FARM_DEMO_SPEC": "jobs/configs/methods.yaml", "FARM_DEMO_ARGS": args,
           "FARM_DEMO_SWEEP_ID": sweep_id, "FARM_DEMO_BASE_MODEL": str(base_model_dir),
           "FARM_DEMO_OUTPUT": str(tmp_path / "runs"), "FARM_DEMO_REGISTRY": str(tmp_path / "registry"),
           # Free ports: an earlier test's Ray may still hold the defaults (the job agent's 52365).
           "FARM_RAY_PORT": str(_free_port()), "FARM_DASHBOARD_PORT": str(_free_port()),
           "FARM_DASHBOARD_AGENT_PORT": str(_free_port()),
           "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(["bash", "jobs/run_demo.sh"], capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)


def test_a_sweep_mixing_methods_trains_each_through_ray_job_submit(tmp_path, base_model_dir):
    if not torch.cuda.is_available():
        refused = _submit(tmp_path, base_model_dir, "refused")
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, output[-3000:]
        assert "tenant 'acme-qlora': method qlora: QLoRA loads the base in 4-bit" in output, output[-3000:]
        assert "workers get no GPU" in output
        assert not list((tmp_path / "runs" / "refused").glob("*/result.json"))  # nothing started

    tenants = dict(CPU_TENANTS, **({"acme-qlora": "qlora"} if torch.cuda.is_available() else {}))
    run = _submit(tmp_path, base_model_dir, "mixed", args=f"--tenants {','.join(tenants)}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "Job 'farm-mixed' succeeded" in output  # Ray's verdict on the submitted job
    report = json.loads((tmp_path / "runs" / "mixed" / "report.json").read_text())
    by_name = {t["tenant"]: t for t in report["tenants"]}
    assert set(by_name) == set(tenants)

    from farm.registry import open_registry

    registry = open_registry(str(tmp_path / "registry"))
    for tenant, method in tenants.items():
        outcome = by_name[tenant]
        assert outcome["status"] == "trained" and outcome["steps"] == 30, outcome
        assert outcome["eval_loss_after"] < outcome["eval_loss_before"], outcome
        assert outcome["pack"] is None  # only LoRA co-trains, and acme is the only LoRA tenant here
        info = registry.resolve(f"{tenant}.{method}@latest")
        assert info.method == method and info.training["method"] == method
        assert info.servable_by_vllm == (method in ("lora", "qlora")), info.not_servable_reason
        config = json.loads((tmp_path / "runs" / "mixed" / tenant / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == METHODS[method].peft_type
    assert registry.search()[1] == len(tenants)
    summary = (tmp_path / "runs" / "mixed" / "report.md").read_text()
    assert "| umbrella | prefix 16 tokens | trained |" in summary and "| globex | dora r8 | trained |" in summary
    assert "| globex-bottleneck | bottleneck houlsby 1/16 | trained |" in summary

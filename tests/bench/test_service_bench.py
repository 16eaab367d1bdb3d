"""``jobs/bench/service.py --smoke``: the service benchmark runs end to end (vLLM, gateway,
service), every job succeeds and every figure is there; timings are never checked."""

from __future__ import annotations

import pytest

from .conftest import run_smoke


@pytest.mark.vllm
@pytest.mark.slow
def test_service_benchmark_smoke(tmp_path, base_model_dir):
    result, stdout = run_smoke("service.py", tmp_path / "s.json", base_model_dir, timeout=900)
    assert result["benchmark"] == "service" and result["failed"] == []
    latency, load = result["latency"], result["throughput"]
    assert len(latency["first_step_s"]["all"]) == len(latency["first_completion_s"]["all"]) == 2
    assert all(value > 0 for value in latency["first_step_s"]["all"] + latency["first_completion_s"]["all"])
    assert (load["jobs"], load["tenants"]) == (6, 2) and load["ratio"] > 0
    assert set(load["wait_s"]["per_tenant_mean"]) == {"t00", "t01"}
    assert "ideal in-process loop" in stdout and "first training step" in stdout

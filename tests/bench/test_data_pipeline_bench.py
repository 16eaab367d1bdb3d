"""``jobs/bench/data_pipeline.py --smoke``: the data pipeline benchmark runs end to end.

Counts and failures only, never timings: every record of each size and format is read and
used, the larger size goes through the worker processes, and the goals are judged.
"""

from __future__ import annotations

import pytest

from .conftest import run_smoke

pytestmark = pytest.mark.slow


def test_data_pipeline_benchmark_smoke(tmp_path, base_model_dir):
    result, stdout = run_smoke("data_pipeline.py", tmp_path / "d.json", base_model_dir)
    assert result["benchmark"] == "data_pipeline" and result["failed"] == []
    for fmt in ("jsonl", "parquet"):
        runs = result["results"][fmt]
        assert set(runs) == {"1000", "20000"}
        for size, figures in runs.items():
            assert figures["records"] == figures["used"] == int(size), (fmt, size, figures)
            assert figures["rows"] > 0 and figures["tokens"] > 0 and figures["peak_rss_mib"] > 0
        # 20,000 records pass the 32 batches after which workers start (where the CPUs allow)
        if runs["20000"]["workers"] > 1:
            assert runs["20000"]["worker_peak_rss_mib"] > 0
        assert result["goals"][fmt]["records_per_s"]["at"] == 20000
    assert "records/s" in stdout and "peak RSS" in stdout

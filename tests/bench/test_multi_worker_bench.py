"""Smoke test of ``jobs/bench/multi_worker.py``: every layout trains and agrees with 1 worker."""

from __future__ import annotations

import pytest

from .conftest import run_smoke

pytestmark = pytest.mark.slow


def test_multi_worker_benchmark_runs_every_layout(tmp_path, base_model_dir):
    figures, stdout = run_smoke("multi_worker.py", tmp_path / "mw.json", base_model_dir, timeout=900)
    assert figures["failed"] == []
    assert set(figures["results"]) == {"1 worker", "2 workers, DDP", "2 workers, sharded base"}
    for row in figures["results"].values():
        assert row["steps"] == 3 and row["tokens_per_s"] > 0 and row["max_diff"] <= 1e-4
    assert "multi-worker adapter training" in stdout

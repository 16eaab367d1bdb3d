"""Smoke test of ``jobs/bench/train_throughput.py``: farm's loop and the transformers Trainer
both run (an API change breaks this test, not the benchmark in silence)."""

from __future__ import annotations

import pytest

from ..conftest import REPO
from .conftest import run_smoke

pytestmark = pytest.mark.slow


def test_train_throughput_benchmark_runs_both_sides(tmp_path, base_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # the default spec is relative to the repository
    figures, stdout = run_smoke("train_throughput.py", tmp_path / "tt.json", base_model_dir)
    for side in ("farm", "hf-trainer"):
        run = figures["results"][side]
        assert "error" not in run, run
        assert run["tokens_per_s"] > 0 and run["real_tokens"] > 0
    assert figures["steps"] == 3 and "train throughput" in stdout

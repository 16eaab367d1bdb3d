"""Smoke test of ``jobs/bench/cotrain.py``: sequential and co-trained sides both run (K = 1, 2,
3 steps each), and a side that fails ends the benchmark non-zero."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..conftest import REPO
from .conftest import run_smoke

pytestmark = pytest.mark.slow


def test_cotrain_benchmark_runs_both_sides(tmp_path, base_model_dir):
    figures, stdout = run_smoke("cotrain.py", tmp_path / "c.json", base_model_dir)
    assert [(row["k"], row["tokens"]) for row in figures["throughput"]] == [(1, 64), (2, 64)]
    for row in figures["throughput"]:
        assert row["sequential_tok_s"] > 0 and row["cotrained_tok_s"] > 0
    assert figures["memory"]["tenants"] == 2 and figures["memory"]["ratio"] > 0
    assert figures["sweep"] is None and "goals" in stdout


def test_cotrain_benchmark_fails_when_a_side_fails(tmp_path):
    out = tmp_path / "c.json"
    run = subprocess.run([sys.executable, "jobs/bench/cotrain.py", "--smoke", "--out", str(out),
                          "--base-model", str(tmp_path / "no-such-model")],
                         cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "K=1, 64 tokens" in json.loads(out.read_text())["error"]

"""Smoke test of ``jobs/bench/methods.py``: every method the farm knows still trains (3 steps)
and is served by the transformers backend (a few short requests)."""

from __future__ import annotations

import pytest
import torch

from farm.methods import METHODS

from .conftest import run_smoke

pytestmark = pytest.mark.slow


def test_methods_benchmark_trains_every_method(tmp_path, base_model_dir):
    figures, stdout = run_smoke("methods.py", tmp_path / "methods.json", base_model_dir, timeout=900)
    rows = {row["method"]: row for row in figures["rows"]}
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        if METHODS[name].needs_cuda and not torch.cuda.is_available():
            assert "this host has none" in row["skipped"]
            continue
        assert not row.get("skipped"), row
        assert row["trainable_params"] > 0 and row["tokens_per_s"] > 0
        assert row["serve_tokens_per_s"] > 0, row  # served through the transformers backend
    assert "PEFT methods on" in stdout

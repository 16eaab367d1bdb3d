"""Smoke test of ``jobs/bench/registry_load.py``: publish, bulk rows, every HTTP mix and the
reindex run on a small catalog, with no failed request."""

from __future__ import annotations

import pytest

from .conftest import run_smoke

pytestmark = pytest.mark.slow  # a uvicorn server and a few hundred requests

MIXES = {"healthz", "get", "search", "search-tenant", "search-all"}  # every mix the benchmark has


def test_registry_load_benchmark_runs_every_mix(tmp_path):
    figures, stdout = run_smoke("registry_load.py", tmp_path / "r.json", None)
    assert figures["populate"]["total_versions"] == 40
    assert set(figures["mixes"]) == MIXES
    for mix, run in figures["mixes"].items():
        assert run["requests"] == 40 and run["errors"] == 0, (mix, run)
    assert figures["reindex"]["versions"] == 20 and figures["reindex"]["skipped"] == 0
    assert "registry load" in stdout

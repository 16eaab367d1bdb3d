"""``jobs/bench/sweep_scaling.py --smoke``: the sweep scaling benchmark runs end to end.

One real sweep (K = 2, on its own local Ray) and its in-process loop; counts,
hand-offs and failures are checked, never timings.
"""

from __future__ import annotations

import pytest

from .conftest import run_smoke


@pytest.mark.slow
def test_sweep_scaling_benchmark_smoke(tmp_path, base_model_dir):
    result, stdout = run_smoke("sweep_scaling.py", tmp_path / "s.json", base_model_dir)
    assert result["benchmark"] == "sweep_scaling" and result["failed"] == []
    assert set(result["results"]) == {"2"}
    row = result["results"]["2"]
    assert row["loop"]["trained"] == row["sweep"]["trained"] == 2
    assert row["ratio"] is not None and row["sweep"]["first_handoff_s"] is not None
    assert row["sweep"]["first_handoff_s"] <= row["sweep"]["last_handoff_s"]
    assert "sweep scaling" in stdout

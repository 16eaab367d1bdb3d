"""A sweep's progress display: per-tenant lines in a log while few train, one summary line when
many do, and a live table on a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from farm.sweep_progress import LINES_UP_TO, SweepProgress


def _event(step: int, max_steps: int = 10) -> dict:
    return {"step": step, "max_steps": max_steps, "loss": 2.5, "tokens_per_s": 1234.0, "eta_s": 65.0, "time": 0.0}


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_log_gets_a_line_per_changed_tenant_while_few_train():
    console, out = _log_console()
    with SweepProgress(console, ["a", "b", "c"]) as progress:
        progress.update({"a": _event(1), "b": _event(1)})
        progress.update({"a": _event(1), "b": _event(2)})  # only b moved
        progress.set("a", "trained")
    lines = out.getvalue().splitlines()
    assert lines == ["[a] step 1/10  loss 2.5000  1,234 tok/s  eta 1m05s", "[b] step 1/10  loss 2.5000  1,234 tok/s  eta 1m05s",
                     "[b] step 2/10  loss 2.5000  1,234 tok/s  eta 1m05s"]
    assert progress.state == {"a": "trained", "b": "training", "c": "queued"}


def test_a_log_gets_one_summary_line_per_update_when_many_train():
    console, out = _log_console()
    tenants = [f"t{i:03d}" for i in range(LINES_UP_TO * 4)]
    with SweepProgress(console, tenants) as progress:
        progress.set("t000", "failed")
        progress.update({t: _event(5) for t in tenants[1:]})
        progress.update({t: _event(5) for t in tenants[1:]})  # nothing moved: nothing printed
    lines = out.getvalue().splitlines()
    assert lines == [f"progress: {len(tenants) - 1} training, 1 failed of {len(tenants)} tenants; "
                     "those training are 50% through on average"]


def test_a_terminal_gets_a_live_table():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with SweepProgress(console, ["acme", "globex", "hooli"]) as progress:
        assert progress.live is not None
        progress.update({"acme": _event(3), "globex": _event(7)})
        progress.set("hooli", "invalid")
    text = out.getvalue()
    assert "2 training, 1 invalid of 3 tenants" in text
    assert "acme" in text and "3/10" in text and "globex" in text and "7/10" in text and "1m05s" in text
    assert "[acme] step" not in text  # no log lines on a terminal

"""A sweep's progress for people: one live table on a terminal, compact lines in a job log.

On a terminal (``rich.live``) the table shows every tenant that is training, with its step,
loss, speed and time left, under a line of counts; messages (submitted, done, failed) scroll
above it. In a log (``ray job submit``, CI) each tenant's progress is a line when its step
changes, while few tenants train at once; past ``LINES_UP_TO`` tenants a single summary line
per update replaces them, so hundreds of tenants never interleave hundreds of lines.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

LINES_UP_TO = 16   # tenants training at once for which a log gets one line each
TABLE_ROWS = 30    # training tenants shown in the live table (the rest are counted)


def progress_line(tenant: str, event: dict) -> str:
    """One tenant's latest step event as a log line."""
    eta = int(event["eta_s"])
    return (f"[{tenant}] step {event['step']}/{event['max_steps']}  loss {event['loss']:.4f}  "
            f"{event['tokens_per_s']:,.0f} tok/s  eta {eta // 60}m{eta % 60:02d}s")


class SweepProgress:
    """Tracks each tenant's state and latest step event, and shows them (see module doc)."""

    def __init__(self, console: Console, tenants: list[str], live: bool | None = None):
        self.console = console
        self.state = {tenant: "queued" for tenant in tenants}
        self.events: dict[str, dict] = {}
        self._printed: dict[str, int] = {}
        self.live = Live(self._table(), console=console, refresh_per_second=2, transient=False) \
            if (console.is_terminal if live is None else live) else None

    def __enter__(self) -> "SweepProgress":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()

    def set(self, tenant: str, state: str) -> None:
        """A tenant's state: queued, training, trained, invalid, failed, skipped."""
        self.state[tenant] = state
        self._refresh()

    def update(self, events: dict[str, dict]) -> None:
        """The progress board's latest events (tenant -> step event)."""
        for tenant, event in events.items():
            self.events[tenant] = event
            if self.state.get(tenant) == "queued":
                self.state[tenant] = "training"
        if self.live is not None:
            self._refresh()
            return
        changed = {t: e for t, e in sorted(events.items()) if self._printed.get(t) != e["step"]}
        for tenant, event in changed.items():
            self._printed[tenant] = event["step"]
        training = [t for t, s in self.state.items() if s == "training"]
        if len(training) <= LINES_UP_TO:
            for tenant, event in changed.items():
                self.console.print(progress_line(tenant, event), markup=False, highlight=False)
        elif changed:
            self.console.print(self._counts(), markup=False, highlight=False)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def _counts(self) -> str:
        counts: dict[str, int] = {}
        for state in self.state.values():
            counts[state] = counts.get(state, 0) + 1
        training = [self.events[t] for t, s in self.state.items() if s == "training" and t in self.events]
        done_share = sum(e["step"] / max(e["max_steps"], 1) for e in training) / len(training) if training else 0
        parts = [f"{counts.get(s, 0)} {s}" for s in ("training", "queued", "trained", "skipped", "failed", "invalid")
                 if counts.get(s)]
        return f"progress: {', '.join(parts)} of {len(self.state)} tenants" + \
            (f"; those training are {done_share:.0%} through on average" if training else "")

    def _table(self) -> Group:
        table = Table("tenant", "step", "loss", "tok/s", "eta", box=None, pad_edge=False)
        training = sorted(t for t, s in self.state.items() if s == "training")
        for tenant in training[:TABLE_ROWS]:
            event = self.events.get(tenant)
            if event is None:
                table.add_row(tenant, "starting", "", "", "")
                continue
            eta = int(event["eta_s"])
            table.add_row(tenant, f"{event['step']}/{event['max_steps']}", f"{event['loss']:.4f}",
                          f"{event['tokens_per_s']:,.0f}", f"{eta // 60}m{eta % 60:02d}s")
        more = len(training) - TABLE_ROWS
        footer = [Text(f"... and {more} more training", style="dim")] if more > 0 else []
        return Group(Text(self._counts(), style="bold"), table, *footer)

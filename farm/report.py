"""The sweep's summary: a terminal table, JSON, Markdown and a PNG of every tenant's loss curve.

A sweep id's report covers every tenant any run of that sweep id ran: a re-run of some tenants
replaces their lines and keeps the others' latest outcome from the earlier ``report.json``
(``merge_with_previous``). Every file is written to a temporary name and renamed into place, so
a crash leaves the previous report or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pydantic import TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from farm.atomic import replace_file

# skipped: finished in an earlier run of the same sweep id; unchanged: --changed-only kept its newest version
STATUS_OK = ("trained", "skipped", "unchanged")
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class TenantOutcome:
    """One tenant's line in the sweep summary."""

    tenant: str
    status: str                      # trained | skipped | unchanged | invalid | failed
    method: str = ""                 # the PEFT method and its size, for example "lora r8", "prefix 16 tokens"
    steps: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    adapter_bytes: int = 0
    adapter_dir: str | None = None
    serve_name: str | None = None            # the registry version, once published
    error: str | None = None
    resumed_from_step: int | None = None
    first_step_delay_s: float | None = None   # from submission to the first training step
    handed_off_s: float | None = None         # from the sweep's start to its adapter's hand-off
    baseline_error: str | None = None         # why the full fine-tuning baseline did not run
    pack: str | None = None                   # the co-training pack it trained in (packing: auto)
    packed_with: list[str] = field(default_factory=list)  # tenants that shared its steps
    losses: list[tuple[int, float]] = field(default_factory=list)
    # When the run that produced this outcome wrote it (UTC, ISO 8601); None in reports written
    # before this field existed. Tells a re-run's own lines from those kept from earlier runs.
    reported_at: str | None = None
    # What its data became (farm.data.DataReport.to_json): records read, used, skipped, ...
    data: dict | None = None
    # Its quality evals (farm.quality.TenantQuality as JSON: checks' pass rates base vs adapter,
    # eval loss beside the gated alias's current version, the gate's decision); None: none asked
    quality: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status in STATUS_OK

    @classmethod
    def from_json(cls, data: object) -> TenantOutcome:
        """An outcome from its ``report.json`` entry; keys this version does not know are ignored
        (reports of newer versions still load) and missing optional ones take their defaults
        (older reports too). Raises ``ValueError`` when the entry is not an outcome."""
        if not isinstance(data, dict):
            raise ValueError(f"a tenant's outcome must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return _OUTCOME.validate_python({key: value for key, value in data.items() if key in known})


# Validates types as well as names, so a hand-edited or damaged entry is refused here instead
# of breaking the table or Markdown later (pydantic's ValidationError is a ValueError).
_OUTCOME = TypeAdapter(TenantOutcome)


@dataclass
class SweepReport:
    """Every tenant's outcome plus the sweep's identity and wall time."""

    sweep_id: str
    wall_seconds: float                 # of this run
    outcomes: list[TenantOutcome]
    comparison: list = field(default_factory=list)  # farm.baseline.ComparisonRow, LoRA vs full
    ran: list[str] | None = None        # tenants this run was asked for; None: every tenant in outcomes
    notes: list[str] = field(default_factory=list)  # what the reader must know (a report kept aside)
    matrix: dict | None = None          # farm.quality.loss_matrix of this run's adapters

    @property
    def ok(self) -> bool:
        """Every tenant of the sweep id succeeded, including those kept from earlier runs."""
        return all(o.ok for o in self.outcomes)

    @property
    def ran_ok(self) -> bool:
        """Every tenant this run was asked for succeeded (the sweep job's exit code)."""
        ran = self.this_run
        return all(o.ok for o in self.outcomes if o.tenant in ran)

    @property
    def this_run(self) -> list[str]:
        """The tenants this run was asked for."""
        return [o.tenant for o in self.outcomes] if self.ran is None else list(self.ran)

    @property
    def earlier(self) -> list[TenantOutcome]:
        """Outcomes kept from earlier runs of this sweep id (tenants this run was not asked for)."""
        ran = set(self.this_run)
        return [o for o in self.outcomes if o.tenant not in ran]

    def to_json(self) -> dict:
        return {"sweep_id": self.sweep_id, "wall_seconds": round(self.wall_seconds, 2), "ok": self.ok,
                "this_run": self.this_run, "notes": list(self.notes),
                "tenants": [asdict(o) for o in self.outcomes],
                "comparison": [{**asdict(row), "plan_error": round(row.plan_error, 4)} for row in self.comparison],
                "matrix": self.matrix}


@dataclass(frozen=True)
class PreviousReport:
    """What an earlier run of the sweep id left in ``report.json``."""

    outcomes: list[TenantOutcome]
    comparison: list                    # farm.baseline.ComparisonRow
    note: str | None = None             # set when the file could not be read and was kept aside


def parse_report(data: object) -> tuple[list[TenantOutcome], list]:
    """The outcomes and comparison rows of a parsed ``report.json``; ``ValueError`` when it is
    not a report (so the caller keeps it aside whole instead of dropping the parts it cannot read)."""
    from farm.baseline import ComparisonRow

    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ValueError("not a sweep report: no list of tenants")
    outcomes = [TenantOutcome.from_json(entry) for entry in data["tenants"]]
    rows = data.get("comparison") or []
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("not a sweep report: its comparison is not a list of rows")
    known = {f.name for f in fields(ComparisonRow)}
    adapter = TypeAdapter(ComparisonRow)
    comparison = [adapter.validate_python({k: v for k, v in row.items() if k in known}) for row in rows]
    return outcomes, comparison


def _utc_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _keep_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.unreadable-<UTC time>`` (never over an earlier one)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.unreadable-{stamp}")
    counter = 1
    while aside.exists() or aside.is_symlink():
        aside = path.with_name(f"{path.name}.unreadable-{stamp}-{counter}")
        counter += 1
    os.replace(path, aside)
    return aside


def read_previous_report(folder: Path) -> PreviousReport:
    """The outcomes of an earlier run's ``report.json`` in ``folder`` (none if there is none).

    A file that cannot be read or is not a report never stops the sweep and is never lost: it is
    renamed to ``report.json.unreadable-<UTC time>`` and the returned note says so.
    """
    path = folder / REPORT_JSON
    if not path.exists():
        return PreviousReport([], [])
    try:
        outcomes, comparison = parse_report(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # JSON, UTF-8 and pydantic errors are ValueErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            aside = _keep_aside(path)
        except OSError as rename_error:  # then writing the new report will fail loudly, as it should
            return PreviousReport([], [], f"{path} could not be read ({reason}) nor kept aside "
                                          f"({rename_error}); this report lists only this run's tenants")
        return PreviousReport([], [], f"the earlier {REPORT_JSON} could not be read ({reason}); it was kept "
                                      f"as {aside.name} and this report lists only this run's tenants")
    return PreviousReport(outcomes, comparison)


def merge_outcomes(previous: Sequence[TenantOutcome], outcomes: Sequence[TenantOutcome]) -> list[TenantOutcome]:
    """Every tenant's latest outcome: ``outcomes`` (this run's) replace the previous line of the
    same tenant in place; previous tenants this run did not touch keep theirs; tenants new to
    the report follow in this run's order."""
    latest = {o.tenant: o for o in outcomes}
    merged: dict[str, TenantOutcome] = {}  # insertion order: the previous report's, then this run's
    for outcome in previous:  # a hand-edited report could list a tenant twice: the first line wins
        merged.setdefault(outcome.tenant, latest.get(outcome.tenant, outcome))
    for outcome in outcomes:
        merged.setdefault(outcome.tenant, latest[outcome.tenant])
    return list(merged.values())


def merge_with_previous(report: SweepReport, folder: Path, compared: Collection[str] = ()) -> SweepReport:
    """``report`` (this run's tenants) merged with the earlier report of the sweep id in ``folder``.

    Tenants of this run replace their earlier lines; the others keep their latest outcome, so
    the merged ``ok`` and summary cover every tenant the sweep id has run. Comparison rows
    follow the same rule for the tenants this run ran a baseline for (``compared``). This run's
    outcomes are stamped with the current time (``reported_at``).
    """
    now = _utc_stamp()
    for outcome in report.outcomes:
        outcome.reported_at = outcome.reported_at or now
    previous = read_previous_report(folder)
    replaced = set(compared) | {row.tenant for row in report.comparison}
    comparison = [row for row in previous.comparison if row.tenant not in replaced] + list(report.comparison)
    return SweepReport(report.sweep_id, report.wall_seconds, merge_outcomes(previous.outcomes, report.outcomes),
                       comparison, ran=report.this_run,
                       notes=list(report.notes) + ([previous.note] if previous.note else []), matrix=report.matrix)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


_COLUMNS = ("tenant", "method", "status", "pack", "steps", "tokens", "wall s", "eval before", "eval after", "adapter",
            "registry", "error")


def _cells(o: TenantOutcome) -> list[str]:
    pack = f"{o.pack} (with {', '.join(o.packed_with)})" if o.pack and o.packed_with else (o.pack or "")
    return [o.tenant, o.method, o.status, pack, str(o.steps or ""), f"{o.tokens:,}" if o.tokens else "",
            f"{o.wall_seconds:.1f}" if o.wall_seconds else "", _fmt(o.eval_loss_before),
            _fmt(o.eval_loss_after), _size(o.adapter_bytes) if o.adapter_bytes else "", o.serve_name or "",
            o.error or ""]


def _summary(report: SweepReport) -> str:
    """One line: how many tenants of the sweep id succeeded, and which lines are older."""
    line = f"{sum(o.ok for o in report.outcomes)} of {len(report.outcomes)} tenants succeeded"
    earlier = report.earlier
    if not earlier:
        return f"{line} in {report.wall_seconds:.0f} s."
    kept = ", ".join(f"{o.tenant} ({o.status}{', ' + o.reported_at if o.reported_at else ''})" for o in earlier)
    return (f"{line}. This run ({report.wall_seconds:.0f} s): {', '.join(report.this_run) or 'no tenant'}; "
            f"kept from earlier runs of this sweep id: {kept}.")


def _data_rows(report: SweepReport) -> tuple[tuple[str, ...], list[list[str]]]:
    """The data table: for each tenant whose data was read, the columns of `farm data check`."""
    from farm.data import DataReport

    rows = []
    for outcome in report.outcomes:
        if outcome.data:
            cells = DataReport.from_json(outcome.data).columns()
            rows.append([outcome.tenant, *[cells[c] for c in DataReport.COLUMNS]])
    return ("tenant", *DataReport.COLUMNS), rows


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _quality_rows(report: SweepReport) -> tuple[tuple[str, ...], list[list[str]]]:
    """The behaviour-check table: per tenant and check, the base's and the adapter's pass rates,
    the gated alias's current version beside them, eval loss, and the gate's decision."""
    rows = []
    for outcome in report.outcomes:
        quality = outcome.quality
        if not quality:
            continue
        decision = quality.get("decision") or {}
        verdict = f"{decision['decision']} @{decision['alias']}: {decision['reason']}" if decision else ""
        loss = quality.get("eval_loss", {})
        loss_cell = _fmt(loss.get("adapter")) + (f" (current {_fmt(loss['incumbent'])})"
                                                 if loss.get("incumbent") is not None else "")
        checks = quality.get("checks") or [{"check": "(none)", "base": None, "adapter": None, "incumbent": None}]
        for index, check in enumerate(checks):
            first = index == 0
            rows.append([outcome.tenant if first else "", check["check"], _percent(check["base"]),
                         _percent(check["adapter"]), _percent(check.get("incumbent")),
                         loss_cell if first else "", quality.get("engine", "transformers") if first else "",
                         verdict if first else ""])
    return ("tenant", "behaviour check", "base", "adapter", "current", "eval loss", "answers by", "promotion"), rows


def _matrix_rows(report: SweepReport) -> tuple[tuple[str, ...], list[list[str]], str]:
    """The cross-tenant eval-loss matrix (adapters down, tenants' data across; the lowest loss
    of each data column starred) and a line on the diagonal."""
    matrix = report.matrix
    if not matrix:
        return (), [], ""
    names = matrix["tenants"]
    best = {data: min(names, key=lambda a: matrix["loss"][a][data]) for data in names}
    rows = [[adapter, *[f"{matrix['loss'][adapter][data]:.3f}{' *' if best[data] == adapter else ''}"
                        for data in names]] for adapter in names]
    own = sum(bool(v) for v in matrix["own_best"].values())
    line = (f"each adapter's eval loss on each tenant's first {matrix['rows']} held-out rows (* lowest of the "
            f"column): the tenant's own adapter is best on its data in {own} of {len(names)} "
            f"({own / len(names):.0%})")
    return ("adapter \\ data", *names), rows, line


def _print_table(console: Console, header: Sequence[str], rows: list[list[str]], title: str,
                 caption: str | None = None) -> None:
    """A titled table of plain cells (never read as markup); nothing when there are no rows."""
    if not rows:
        return
    table = Table(*header, title=title, caption=escape(caption) if caption else None)
    for row in rows:
        table.add_row(*[escape(cell) for cell in row])
    console.print(table)


def print_report(report: SweepReport, console: Console | None = None) -> None:
    """The summary table, coloured by status, then what each tenant's data became."""
    console = console or Console()
    table = Table(*_COLUMNS, title=f"sweep {report.sweep_id} ({report.wall_seconds:.0f} s)",
                  caption=escape(_summary(report)) if report.earlier else None)
    colours = {"trained": "green", "skipped": "cyan", "unchanged": "cyan", "invalid": "red", "failed": "red"}
    for outcome in report.outcomes:
        # Errors quote workers, libraries and tenants' data: never read them as markup.
        cells = [escape(cell) for cell in _cells(outcome)]
        cells[2] = f"[{colours.get(outcome.status, 'white')}]{escape(outcome.status)}[/]"
        table.add_row(*cells)
    console.print(table)
    header, rows = _data_rows(report)
    _print_table(console, header, rows, "tenant data")
    header, rows = _quality_rows(report)
    _print_table(console, header, rows, "behaviour checks on held-out prompts (pass rates)")
    header, rows, line = _matrix_rows(report)
    _print_table(console, header, rows, "cross-tenant eval loss", line)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if report.comparison:
        from farm.baseline import comparison_table

        console.print(comparison_table(report.comparison))


def markdown(report: SweepReport) -> str:
    """The summary table as Markdown."""
    lines = [f"# Sweep `{report.sweep_id}`", "", _summary(report), ""]
    lines += [f"Note: {note}" for note in report.notes] + ([""] if report.notes else [])
    lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for outcome in report.outcomes:
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in _cells(outcome)]
        lines.append("| " + " | ".join(cells) + " |")
    header, rows = _data_rows(report)
    if rows:
        lines += ["", "## Tenant data", "", _md_table(header, rows)]
    header, rows = _quality_rows(report)
    if rows:
        lines += ["", "## Behaviour checks on held-out prompts", "", _md_table(header, rows)]
    header, rows, line = _matrix_rows(report)
    if rows:
        lines += ["", "## Cross-tenant eval loss", "", line, "", _md_table(header, rows)]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if report.comparison:
        from farm.baseline import comparison_markdown

        lines += ["## LoRA vs full fine-tuning", "", comparison_markdown(report.comparison), "",
                  "![LoRA vs full](lora_vs_full.png)", ""]
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(map(cell, row)) + " |" for row in rows)])


def plot_losses(report: SweepReport, path: Path) -> Path | None:
    """One PNG with every tenant's training loss against step; None when there is nothing to draw."""
    curves = [(o.tenant, o.losses) for o in report.outcomes if o.losses]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for tenant, losses in curves:
        steps, values = zip(*losses)
        ax.plot(steps, values, label=tenant, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_title(f"sweep {report.sweep_id}: training loss per tenant")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: SweepReport, folder: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``loss_curves.png`` into ``folder``, each atomically.

    ``report`` is written as given: ``merge_with_previous`` is what keeps earlier tenants' lines.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report.to_json(), indent=2) + "\n"
    paths = {"json": replace_file(folder / REPORT_JSON, lambda p: p.write_text(text, encoding="utf-8")),
             "markdown": replace_file(folder / REPORT_MD,
                                            lambda p: p.write_text(markdown(report), encoding="utf-8"))}
    png = replace_file(folder / "loss_curves.png", lambda p: plot_losses(report, p))
    if png:
        paths["png"] = png
    if report.comparison:
        from farm.baseline import plot_comparison

        paths["comparison_png"] = replace_file(folder / "lora_vs_full.png",
                                                     lambda p: plot_comparison(report.comparison, p))
    return paths

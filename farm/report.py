"""The sweep's summary: a terminal table, JSON, Markdown and a PNG of every tenant's loss curve."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

STATUS_OK = ("trained", "skipped")  # skipped: finished in an earlier run of the same sweep id


@dataclass
class TenantOutcome:
    """One tenant's line in the sweep summary."""

    tenant: str
    status: str                      # trained | skipped | invalid | failed
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
    baseline_error: str | None = None         # why the full fine-tuning baseline did not run
    pack: str | None = None                   # the co-training pack it trained in (packing: auto)
    packed_with: list[str] = field(default_factory=list)  # tenants that shared its steps
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in STATUS_OK


@dataclass
class SweepReport:
    """Every tenant's outcome plus the sweep's identity and wall time."""

    sweep_id: str
    wall_seconds: float
    outcomes: list[TenantOutcome]
    comparison: list = field(default_factory=list)  # farm.baseline.ComparisonRow, LoRA vs full

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def to_json(self) -> dict:
        return {"sweep_id": self.sweep_id, "wall_seconds": round(self.wall_seconds, 2), "ok": self.ok,
                "tenants": [asdict(o) for o in self.outcomes],
                "comparison": [{**asdict(row), "plan_error": round(row.plan_error, 4)} for row in self.comparison]}


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


def print_report(report: SweepReport, console: Console | None = None) -> None:
    """The summary table, coloured by status."""
    console = console or Console()
    table = Table(*_COLUMNS, title=f"sweep {report.sweep_id} ({report.wall_seconds:.0f} s)")
    colours = {"trained": "green", "skipped": "cyan", "invalid": "red", "failed": "red"}
    for outcome in report.outcomes:
        cells = _cells(outcome)
        cells[2] = f"[{colours.get(outcome.status, 'white')}]{outcome.status}[/]"
        table.add_row(*cells)
    console.print(table)
    if report.comparison:
        from farm.baseline import comparison_table

        console.print(comparison_table(report.comparison))


def markdown(report: SweepReport) -> str:
    """The summary table as Markdown."""
    lines = [f"# Sweep `{report.sweep_id}`", "",
             f"{sum(o.ok for o in report.outcomes)} of {len(report.outcomes)} tenants succeeded "
             f"in {report.wall_seconds:.0f} s.", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for outcome in report.outcomes:
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in _cells(outcome)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if report.comparison:
        from farm.baseline import comparison_markdown

        lines += ["## LoRA vs full fine-tuning", "", comparison_markdown(report.comparison), "",
                  "![LoRA vs full](lora_vs_full.png)", ""]
    return "\n".join(lines)


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
    """Write ``report.json``, ``report.md`` and ``loss_curves.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    png = plot_losses(report, folder / "loss_curves.png")
    if png:
        paths["png"] = png
    if report.comparison:
        from farm.baseline import plot_comparison

        paths["comparison_png"] = plot_comparison(report.comparison, folder / "lora_vs_full.png")
    return paths

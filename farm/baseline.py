"""The full fine-tuning baseline: run DeepSpeed ZeRO for some tenants and compare it with LoRA.

    python jobs/full_ft_baseline.py --config jobs/configs/demo.yaml --tenants acme --workers 2

For each baseline tenant, ``run_baseline`` starts one Ray Train ``TorchTrainer`` with N workers
running ``farm.train.full.ray_full_loop``; the final checkpoint's consolidated ``model/`` is
copied to ``<sweep dir>/<tenant>/full/``. ``compare`` puts it beside the tenant's LoRA result:
same rows per optimizer step, same order, same steps and seed (see ``baseline_job``).
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

from farm.atomic import replacing_folder
from farm.spec import BaselineSpec, ResourceSpec, TenantJob

FULL_DIR = "full"


def baseline_job(job: TenantJob, baseline: BaselineSpec, workers: int, lora_workers: int) -> TenantJob:
    """The tenant's job as the baseline runs it: the same rows per optimizer step as its LoRA
    run (``batch_size x lora_workers x grad_accum``), split over ``workers``, and the baseline's
    learning rate. Raises ``ValueError`` naming the tenant when the rows cannot be split evenly."""
    train = job.settings.train
    rows = train.batch_size * lora_workers
    if rows % workers:
        raise ValueError(f"tenant {job.tenant!r}: {rows} rows per micro-batch (batch_size {train.batch_size} x "
                         f"{lora_workers} LoRA worker(s)) cannot be split evenly over {workers} baseline workers")
    train = train.model_copy(update={"batch_size": rows // workers, "learning_rate": baseline.learning_rate})
    settings = job.settings.model_copy(update={"train": train})
    return job.model_copy(update={"settings": settings})


@dataclass(frozen=True)
class BaselineRun:
    """What ``run_baseline`` needs besides the job: where to store, how to place the workers."""

    storage: str           # Ray Train storage root of the sweep
    destination: Path      # <sweep dir>/<tenant>; the model lands in <destination>/full
    resources: ResourceSpec
    workers: int
    max_retries: int = 2


def baseline_worker_resources(resources: ResourceSpec, workers: int):
    """A baseline's trainer request: the sweep's CPUs per worker and, on GPU clusters, one whole
    GPU per worker (NCCL refuses two ranks on one device)."""
    from farm.trainers import trainer_resources

    gpus = 1.0 if resources.gpus_per_worker else 0.0
    return trainer_resources(resources.model_copy(update={"workers": workers, "gpus_per_worker": gpus}))


def run_baseline(job: TenantJob, baseline: BaselineSpec, run: BaselineRun) -> dict:
    """Run one tenant's full fine-tune on Ray Train; returns ``{"ok", "result" | "error"}`` (never raises).

    Re-running with the same storage resumes from the newest complete sharded checkpoint.
    """
    from farm.trainers import error_summary
    from farm.train.full import MODEL_DIR, PROBE_FILE, ray_full_loop
    from farm.train.adapter import RESULT_FILE

    resources = baseline_worker_resources(run.resources, run.workers)
    name = f"{job.tenant}-full"
    try:
        trainer = resources.trainer(
            ray_full_loop, {"job": job.model_dump(), "baseline": baseline.model_dump(),
                            "run_dir": f"{run.storage.rstrip('/')}/{name}"},
            name, run.storage, run.max_retries, keep_checkpoints=job.settings.train.keep_checkpoints)
        fitted = trainer.fit()
    except Exception as exc:  # the tenant's baseline fails, nothing else
        return {"ok": False, "error": error_summary(exc), "trace": traceback.format_exc()[-4000:]}
    final = run.destination / FULL_DIR
    with replacing_folder(final) as tmp, fitted.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / MODEL_DIR, tmp / MODEL_DIR)
        shutil.copy2(Path(folder) / PROBE_FILE, tmp / PROBE_FILE)
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
        result["model_dir"] = str(final / MODEL_DIR)
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return {"ok": True, "result": result}


# -- the comparison --------------------------------------------------------------------------


@dataclass
class ComparisonRow:
    """One training run of a tenant in the LoRA-versus-full table."""

    tenant: str
    run: str                      # "lora r8" or "full ZeRO-3"
    workers: int
    steps: int
    eval_loss_before: float
    eval_loss_after: float
    wall_seconds: float           # the trainer's whole run: start-up, data, training, eval, save
    train_seconds: float          # the optimizer steps only
    tokens_per_s: float
    peak_memory_bytes: int        # per worker: CUDA allocator peak on GPUs, peak RSS on CPU
    planned_memory_bytes: int     # the planner's estimate of the same figure
    trainable_params: int
    bytes_on_disk: int            # the adapter, or the consolidated model
    losses: list[tuple[int, float]]

    @property
    def plan_error(self) -> float:
        """Planner estimate relative to the measured peak (0.1 = 10% over)."""
        return self.planned_memory_bytes / self.peak_memory_bytes - 1 if self.peak_memory_bytes else 0.0


def planned_peak(job: TenantJob, result: dict) -> int:
    """The planner's per-worker estimate for a finished run, in the units the run measured.

    On GPUs the planner's runtime line is dropped, since the CUDA allocator's peak excludes the
    CUDA context; on CPU the measured peak RSS includes the interpreter and libraries, which the
    planner's CPU runtime line stands for.
    """
    from farm.methods import planner_fields
    from farm.plan import PlanRequest, load_shape, plan_memory

    settings = job.settings
    full = result["method"] == "full"
    shape = load_shape(job.base_model.name_or_path)
    method_fields = {"method": "full", "zero_stage": result.get("zero_stage", 0),
                     "offload": result.get("offload", "none")} if full else \
        planner_fields(settings.method, settings.method_settings(), shape)
    request = PlanRequest(
        **method_fields, devices=result.get("workers", 1),
        batch=settings.train.batch_size,  # per worker (a baseline job carries its own split)
        seq_len=settings.data.max_seq_len, grad_accum=settings.train.grad_accum,
        gradient_checkpointing=settings.train.gradient_checkpointing,
        precision="bf16" if result.get("precision") == "bf16" else "fp32",
        runtime_bytes=0 if str(result.get("device", "")).startswith("cuda") else None)
    return plan_memory(shape, request).total_bytes


def method_label(job: TenantJob) -> str:
    """``lora r8``, ``ia3``, ``prefix 16 tokens``, ``bottleneck houlsby 1/16``: a run's method as a table shows it."""
    settings = job.settings.method_settings()
    if hasattr(settings, "rank"):
        return f"{job.settings.method} r{settings.rank}"
    if hasattr(settings, "num_virtual_tokens"):
        return f"{job.settings.method} {settings.num_virtual_tokens} tokens"
    if hasattr(settings, "placement"):
        size = f"size {settings.bottleneck_size}" if settings.bottleneck_size else f"1/{settings.reduction_factor}"
        return f"{job.settings.method} {settings.placement} {size}"
    return job.settings.method


def comparison_row(job: TenantJob, result: dict, lora_workers: int = 1) -> ComparisonRow:
    """A table row from a run's ``result.json`` (LoRA or full)."""
    full = result["method"] == "full"
    return ComparisonRow(
        tenant=result["tenant"], run=f"full ZeRO-{result['zero_stage']}" + (" offload" if result.get("offload") == "cpu" else "")
        if full else method_label(job),
        workers=result.get("workers", lora_workers), steps=result["steps"],
        eval_loss_before=result["eval_loss_before"], eval_loss_after=result["eval_loss_after"],
        wall_seconds=result["wall_seconds"], train_seconds=result["train_seconds"],
        tokens_per_s=result["tokens_per_s"], peak_memory_bytes=result["peak_memory_bytes"],
        planned_memory_bytes=planned_peak(job, result), trainable_params=result["trainable_params"],
        bytes_on_disk=result["model_bytes"] if full else result["adapter_bytes"],
        losses=[tuple(x) for x in result.get("losses", [])])


def comparison_table(rows: list[ComparisonRow], title: str = "LoRA vs full fine-tuning"):
    """The comparison as a rich table (one row per run, LoRA first for each tenant)."""
    from rich.table import Table

    table = Table("tenant", "run", "workers", "steps", "eval before", "eval after", "vs full", "wall s", "tok/s",
                  "peak mem/worker", "planned", "trainable", "on disk", title=title)
    full = _full_eval(rows)
    for row in rows:
        table.add_row(*_cells(row, full))
    return table


def _full_eval(rows: list[ComparisonRow]) -> dict[str, float]:
    """Each tenant's eval loss after full fine-tuning (what its other runs are measured against)."""
    return {row.tenant: row.eval_loss_after for row in rows if row.run.startswith("full")}


def _versus(row: ComparisonRow, full: dict[str, float]) -> str:
    """A run's eval loss after, relative to full fine-tuning's of the same tenant (+8.9%: higher)."""
    reference = full.get(row.tenant)
    if row.run.startswith("full") or not reference:
        return ""
    return f"{row.eval_loss_after / reference - 1:+.1%}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _size(n: int) -> str:
    return f"{n / 2**10:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _cells(row: ComparisonRow, full: dict[str, float]) -> list[str]:
    return [row.tenant, row.run, str(row.workers), str(row.steps), f"{row.eval_loss_before:.4f}",
            f"{row.eval_loss_after:.4f}", _versus(row, full), f"{row.wall_seconds:.1f}", f"{row.tokens_per_s:,.0f}",
            _mib(row.peak_memory_bytes), f"{_mib(row.planned_memory_bytes)} ({row.plan_error:+.0%})",
            f"{row.trainable_params:,}", _size(row.bytes_on_disk)]


def comparison_markdown(rows: list[ComparisonRow]) -> str:
    """The comparison as a Markdown table."""
    head = ["tenant", "run", "workers", "steps", "eval before", "eval after", "vs full", "wall s", "tok/s",
            "peak mem/worker", "planned (error)", "trainable", "on disk"]
    full = _full_eval(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(row, full)) + " |" for row in rows]
    return "\n".join(lines)


def plot_comparison(rows: list[ComparisonRow], path: Path) -> Path | None:
    """PNG: training loss of each run against step (left); peak memory per worker, measured
    and planned (right)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, memory) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for row in rows:
        if row.losses:
            steps, values = zip(*row.losses)
            curves.plot(steps, values, label=f"{row.tenant} {row.run}", linewidth=1.5,
                        linestyle="-" if row.run.startswith("full") else "--")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training loss (per target token)")
    curves.set_title("LoRA vs full fine-tuning: training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    labels = [f"{row.tenant}\n{row.run}" for row in rows]
    x = range(len(rows))
    memory.bar([i - 0.2 for i in x], [row.peak_memory_bytes / 2**20 for row in rows], width=0.4, label="measured peak")
    memory.bar([i + 0.2 for i in x], [row.planned_memory_bytes / 2**20 for row in rows], width=0.4, label="planner")
    memory.set_xticks(list(x), labels, fontsize="small")
    memory.set_ylabel("MiB per worker")
    memory.set_title("peak memory per worker")
    memory.legend(fontsize="small")
    memory.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""The sweep's quality stage: score each handed-off tenant on Ray, then publish it with the
figures and move its gated alias only when the gate passes; score every adapter against every
tenant's data at the end.

A tenant whose spec declares behaviour checks or a promotion gate (``eval.checks``,
``eval.promote``) is scored by a Ray task the moment its adapter is handed off, while the sweep
goes on training the others; its version is published once the figures are in, with them and
the gate's decision in its lineage, so a version's record says why it was (not) promoted. A
tenant with neither is published at once, as before. The adapter files travel to the task
through Ray's object store (they are small), so the task runs on any node.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from farm.atomic import replace_file
from farm.report import TenantOutcome
from farm.spec import ResolvedSweep, TenantJob

QUALITY_FILE = "quality.json"  # the tenant's scores and decision, next to its result.json


def read_folder(folder: str | Path) -> dict[str, bytes]:
    """Every file of an adapter folder (flat), for shipping to a task."""
    return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def _written(files: dict[str, bytes], into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (into / Path(name).name).write_bytes(data)  # names came from read_folder: plain file names
    return into


def score_task(job: dict, adapter: dict[str, bytes], incumbent: dict[str, bytes] | None,
               incumbent_name: str | None, precision: str = "auto") -> dict:
    """Ray task body: score one tenant's adapter (and the alias's current version) on one base."""
    from dataclasses import asdict

    from farm.quality import load_base_for_eval, score_on_engine

    tenant_job = TenantJob.model_validate(job)
    tokenizer, base, device = load_base_for_eval(tenant_job, precision)
    with tempfile.TemporaryDirectory(prefix="farm-quality-") as work:
        new_dir = _written(adapter, Path(work) / "new")
        old_dir = _written(incumbent, Path(work) / "current") if incumbent else None
        quality = score_on_engine(base, tokenizer, tenant_job, new_dir, device, old_dir, incumbent_name)
    return asdict(quality)


def matrix_task(jobs: dict[str, dict], adapters: dict[str, dict[str, bytes]], rows: int,
                precision: str = "auto") -> dict:
    """Ray task body: the cross-tenant eval-loss matrix of every adapter on every tenant's rows."""
    from farm.quality import load_base_for_eval, loss_matrix

    tenant_jobs = {name: TenantJob.model_validate(job) for name, job in jobs.items()}
    tokenizer, base, device = load_base_for_eval(next(iter(tenant_jobs.values())), precision)
    with tempfile.TemporaryDirectory(prefix="farm-matrix-") as work:
        folders = {name: str(_written(files, Path(work) / name)) for name, files in adapters.items()}
        return loss_matrix(base, tokenizer, tenant_jobs, folders, device, rows)


def wants_quality(job: TenantJob) -> bool:
    """Whether the tenant's spec asks for behaviour checks or a promotion gate."""
    return bool(job.settings.eval.checks) or job.settings.eval.promote is not None


class QualityStage:
    """Scores handed-off tenants on Ray and publishes them once scored (see the module doc)."""

    def __init__(self, sweep: ResolvedSweep, registry, out: Path, console: Console,
                 publish: Callable[[str, TenantOutcome, dict], None], task_options: Callable[[str], dict]):
        import ray

        self.sweep, self.registry, self.out, self.console = sweep, registry, out, console
        self.publish, self.task_options = publish, task_options
        self._score = ray.remote(max_retries=1)(score_task)
        self.running: dict = {}  # ObjectRef -> (tenant, outcome)

    def submit(self, name: str, outcome: TenantOutcome) -> None:
        """Start scoring a handed-off tenant (its adapter is in ``<out>/<name>/adapter``)."""
        job = self.sweep.job(name)
        saved = self.out / name / QUALITY_FILE
        if saved.is_file():  # scored by an earlier run of this sweep id that stopped before publishing
            self._finish(name, outcome, json.loads(saved.read_text()))
            return
        incumbent, incumbent_files = None, None
        gate = job.settings.eval.promote
        if gate is not None and self.registry is not None:
            incumbent, incumbent_files = self._current_version(job, gate.alias)
        files = read_folder(outcome.adapter_dir or self.out / name / "adapter")
        ref = self._score.options(**self.task_options(name)).remote(
            job.model_dump(), files, incumbent_files, incumbent)
        self.running[ref] = (name, outcome)
        self.console.print(f"{name}: scoring its adapter (behaviour checks"
                           f"{', against ' + incumbent if incumbent else ''})", markup=False, highlight=False)

    def _current_version(self, job: TenantJob, alias: str) -> tuple[str | None, dict | None]:
        from farm.registry.core import NotFound

        try:
            info = self.registry.get(job.tenant, job.adapter, alias=alias)
        except NotFound:
            return None, None
        with tempfile.TemporaryDirectory(prefix="farm-incumbent-") as work:
            folder = Path(work) / "adapter"
            self.registry.download(info.serve_name, folder)
            return info.serve_name, read_folder(folder)

    def poll(self, timeout: float = 0.0) -> None:
        """Publish every tenant whose scores are in (waits at most ``timeout`` seconds)."""
        import ray

        if not self.running:
            return
        ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
        for ref in ready:
            name, outcome = self.running.pop(ref)
            try:
                quality = ray.get(ref)
            except Exception as exc:  # scoring failed: the adapter stays unpublished, the tenant says why
                outcome.status, outcome.error = "failed", f"quality evals: {str(exc).splitlines()[-1][:300]}"
                self.console.print(f"{name}: quality evals failed: {exc}", markup=False, highlight=False)
                continue
            self._finish(name, outcome, quality)

    def drain(self) -> None:
        """Wait for every tenant still being scored and publish it."""
        while self.running:
            self.poll(timeout=5.0)

    def _finish(self, name: str, outcome: TenantOutcome, quality: dict) -> None:
        from farm.quality import TenantQuality, decide

        job = self.sweep.job(name)
        gate = job.settings.eval.promote
        if gate is not None and quality.get("decision") is None:
            quality["decision"] = decide(gate, TenantQuality(**quality))
        # Kept beside result.json first: a re-run after a crash publishes with the same figures.
        replace_file(self.out / name / QUALITY_FILE,
                           lambda tmp: tmp.write_text(json.dumps(quality, indent=2) + "\n"))
        outcome.quality = quality
        rates = ", ".join(f"{c['check']}: base {c['base']:.0%} -> adapter {c['adapter']:.0%}" for c in quality["checks"])
        engine = quality.get("engine", "transformers") + (f" ({quality['engine_note']})" if quality.get("engine_note") else "")
        self.console.print(f"{name}: {rates or 'no behaviour checks'}; eval loss {quality['eval_loss']['adapter']}; "
                           f"answers by {engine}", markup=False, highlight=False)
        self.publish(name, outcome, quality)


def promote_if_passed(registry, job: TenantJob, serve_name: str, quality: dict, console: Console) -> None:
    """Move the gated alias to the just-published version when its decision says so (idempotent)."""
    decision = quality.get("decision")
    if not decision:
        return
    alias = decision["alias"]
    if decision["decision"] != "promoted":
        console.print(f"{job.tenant}: {serve_name} stays unpromoted (@{alias}): {decision['reason']}",
                      markup=False, highlight=False)
        return
    version = registry.resolve(serve_name).version
    previous, _ = registry.set_alias(job.tenant, job.adapter, alias, version,
                                     note={"by": "farm sweep", "serve_name": serve_name, **decision})
    was = f"v{previous}" if previous is not None else "unset"
    console.print(f"{job.tenant}: {serve_name} promoted to @{alias} (was {was}): {decision['reason']}",
                  markup=False, highlight=False)


def run_matrix(sweep: ResolvedSweep, outcomes: dict[str, TenantOutcome], options: dict,
               console: Console) -> dict | None:
    """The cross-tenant matrix for the sweep's adapters (``quality.matrix_rows``), or None."""
    import ray

    quality = sweep.spec.quality
    adapters = {name: o.adapter_dir for name, o in outcomes.items() if o.ok and o.adapter_dir
                and Path(o.adapter_dir).is_dir()}
    if quality.matrix_rows == 0 or not 2 <= len(adapters) <= quality.matrix_max_tenants:
        return None
    console.print(f"cross-tenant matrix: {len(adapters)} adapters x {len(adapters)} tenants' held-out data "
                  f"({quality.matrix_rows} rows each)", markup=False, highlight=False)
    task = ray.remote(max_retries=1)(matrix_task).options(**options)
    try:
        return ray.get(task.remote({name: sweep.job(name).model_dump() for name in adapters},
                                   {name: read_folder(folder) for name, folder in adapters.items()},
                                   quality.matrix_rows))
    except Exception as exc:  # the matrix is a report: its failure fails no tenant
        console.print(f"cross-tenant matrix failed: {exc}", markup=False, highlight=False)
        return None


"""Incremental sweeps: which tenants changed since their newest version (``farm sweep
--changed-only``), and warm starts from a version an alias names (``train.init_from``).

Both run on the sweep's driver, the registry's single writer, before anything is planned:
an unchanged tenant asks the cluster for nothing, and a warm start's files are staged on the
sweep's storage, where the training workers read them (they hold no registry credentials).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from farm.data import DataError, load_tenant_data
from farm.models import load_tokenizer
from farm.report import TenantOutcome
from farm.spec import ResolvedSweep, TenantJob

logger = logging.getLogger(__name__)

#: Train settings that change how a run is watched or kept, not what it learns: a change of
#: these alone does not make a tenant "changed". init_from says where a retraining starts,
#: not whether one is due: turning warm starts on must not retrain every tenant. shard_base is
#: a layout (the planner resolves ``auto`` per cluster), not a change of what is learned.
NOT_LEARNING = ("log_every", "checkpoint_every", "keep_checkpoints", "init_from", "shard_base")

#: Where a sweep stages warm-start adapters on its storage (beside the pools' checkpoints).
INIT_DIR = "init"


def training_record(job: TenantJob) -> dict:
    """What decides a job's weights, as a version's ``training`` lineage records it (the run's
    precision and device are added by the publish, from the run itself)."""
    settings = job.settings
    return {"method": settings.method, "method_settings": settings.method_settings().model_dump(),
            "train": settings.train.model_dump(), "data": settings.data.model_dump(),
            "eval": settings.eval.model_dump(exclude_defaults=True)}


def _learning(record: dict) -> dict:
    """The part of a training record that decides the weights (behaviour checks do not)."""
    train = {k: v for k, v in (record.get("train") or {}).items() if k not in NOT_LEARNING}
    return {"method": record.get("method"), "method_settings": record.get("method_settings"), "train": train,
            "data": record.get("data")}


def settings_changed(info, job: TenantJob) -> str | None:
    """Why ``job`` must train again although ``info`` (its newest version) exists, judged on
    what decides the weights besides the data (base model, method, settings); None: the same."""
    if info.base_model != job.base_model.name_or_path:
        return f"base model {info.base_model} -> {job.base_model.name_or_path}"
    old, new = _learning(info.training), _learning(training_record(job))
    for part in ("method", "method_settings", "train", "data"):
        if old[part] != new[part]:
            if isinstance(old[part], dict) and isinstance(new[part], dict):
                keys = sorted(k for k in {*old[part], *new[part]} if old[part].get(k) != new[part].get(k))
                return f"{part} settings changed ({', '.join(keys[:4])})"
            return f"{part} {old[part]} -> {new[part]}"
    return None


def select_changed(sweep: ResolvedSweep, names: list[str], registry, console) -> tuple[list[str], dict]:
    """Split ``names`` into the tenants to train and, for every other one, an ``unchanged``
    outcome naming the version it keeps. A tenant is unchanged when its newest version (its
    ``latest``) was trained on this base, these settings and this dataset fingerprint.

    Compared with ``latest`` and not with a gated alias: a version the gate held back was
    trained on the same inputs, and training them again would give the same adapter (seeded).
    A tenant whose data cannot be read counts as changed: the sweep's data checks report it.
    """
    from farm.registry.core import NotFound

    tokenizer = None
    changed: list[str] = []
    unchanged: dict[str, TenantOutcome] = {}
    for name in names:
        job = sweep.job(name)
        try:
            info = registry.get(job.tenant, job.adapter, alias="latest")
        except NotFound:
            changed.append(name)
            console.print(f"{name}: changed (no version yet)", markup=False, highlight=False)
            continue
        reason = settings_changed(info, job)  # settings first: no data is read for a tenant they decide
        if reason is None:
            tokenizer = tokenizer or load_tokenizer(sweep.spec.base_model)
            try:
                fingerprint = load_tenant_data(name, job.settings.data, tokenizer).report.fingerprint
            except DataError:
                fingerprint = None
            if fingerprint is None or fingerprint != info.lineage.get("dataset_fingerprint"):
                reason = "dataset changed"
        if reason is not None:
            changed.append(name)
            console.print(f"{name}: changed since {info.serve_name}: {reason}", markup=False, highlight=False)
            continue
        unchanged[name] = TenantOutcome(tenant=name, status="unchanged", serve_name=info.serve_name,
                                        eval_loss_before=info.metrics.get("eval_loss_before"),
                                        eval_loss_after=info.metrics.get("eval_loss_after"),
                                        steps=info.metrics.get("steps"), tokens=info.metrics.get("tokens"))
        console.print(f"{name}: unchanged since {info.serve_name}; not trained", markup=False, highlight=False)
    return changed, unchanged


def stage_warm_start(registry, job: TenantJob, storage: str) -> TenantJob:
    """For a job with ``train.init_from``: copy the version its alias names onto the sweep's
    storage and return the job pointing at it (``init_adapter``, ``init_version``). Unchanged
    when the alias does not exist yet (a tenant's first version starts fresh). ``ValueError``
    when that version cannot start this adapter (other base, method or method settings)."""
    from farm.registry.core import NotFound
    from farm.train.ray_support import upload

    alias = job.settings.train.init_from
    if alias is None:
        return job
    try:
        info = registry.get(job.tenant, job.adapter, alias=alias)
    except NotFound:
        logger.info("%s: train.init_from %s: no such version yet; starting fresh", job.tenant, alias)
        return job
    record = training_record(job)
    if info.base_model != job.base_model.name_or_path:
        raise ValueError(f"train.init_from: {info.serve_name} was trained on base {info.base_model}, not "
                         f"{job.base_model.name_or_path}")
    if info.method != job.settings.method or info.training.get("method_settings") != record["method_settings"]:
        raise ValueError(f"train.init_from: {info.serve_name} was trained with other {info.method} settings; its "
                         f"weights cannot start this adapter (drop init_from or restore those settings)")
    if getattr(job.settings.method_settings(), "projection", False):
        raise ValueError("train.init_from: prefix tuning with projection cannot warm-start (its projection MLP is "
                         "not part of a saved adapter)")
    destination = f"{storage.rstrip('/')}/{INIT_DIR}/{job.key}"
    with tempfile.TemporaryDirectory(prefix="farm-init-") as work:
        registry.download(info.serve_name, Path(work) / "adapter")
        upload(Path(work) / "adapter", destination)
    return job.model_copy(update={"init_adapter": destination, "init_version": info.serve_name})

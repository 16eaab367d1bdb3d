"""Sweep policy without a cluster: resource requests and skip-if-finished."""

from __future__ import annotations

import json

import pytest

from farm.report import SweepReport, TenantOutcome, markdown
from farm.spec import ResourceSpec
from farm.sweep import finished_outcome, trainer_resources


def test_fractional_gpus_pack_small_jobs_and_multi_worker_jobs_get_whole_gpus():
    small = trainer_resources(ResourceSpec(workers=1, cpus_per_worker=2, gpus_per_worker=0.25))
    assert small.use_gpu and small.resources_per_worker == {"CPU": 2, "GPU": 0.25}
    assert small.torch_threads == 2
    cpu = trainer_resources(ResourceSpec(workers=2, cpus_per_worker=0.5))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 0.5} and cpu.torch_threads == 1
    with pytest.raises(ValueError, match="NCCL"):
        trainer_resources(ResourceSpec(workers=2, gpus_per_worker=0.5))
    typed = trainer_resources(ResourceSpec(gpus_per_worker=1, accelerator_type="A100"))
    assert typed.accelerator_type == "A100"


def test_only_a_complete_tenant_counts_as_finished(tmp_path):
    assert finished_outcome(tmp_path, "acme") is None
    (tmp_path / "acme" / "adapter").mkdir(parents=True)
    (tmp_path / "acme" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert finished_outcome(tmp_path, "acme") is None  # no result.json: publication not done
    (tmp_path / "acme" / "result.json").write_text(json.dumps({
        "steps": 3, "tokens": 10, "eval_loss_before": 2.0, "eval_loss_after": 1.0,
        "adapter_bytes": 1, "losses": [[1, 2.0]]}))
    done = finished_outcome(tmp_path, "acme")
    assert done is not None and done.status == "skipped" and done.ok


def test_markdown_report_escapes_errors():
    report = SweepReport("s", 1.0, [TenantOutcome("a", "failed", error="bad | pipe\nnewline")])
    text = markdown(report)
    assert "bad \\| pipe newline" in text and not report.ok


def test_error_summary_finds_the_workers_root_cause():
    from farm.sweep import error_summary

    wrapped = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise ValueError("bad rank")\n'
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for TenantJob\n"
        "adapter\n  Field required [type=missing]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/missing\n")
    summary = error_summary(wrapped)
    assert summary.startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error")
    assert "Field required" in summary and "further information" not in summary
    assert error_summary(KeyError("x")) == "KeyError: 'x'"

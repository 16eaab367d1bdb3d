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


def _job(base_model_dir, **train):
    from farm.spec import parse_spec

    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
           "defaults": {"train": {"batch_size": 8, **train}, "data": {"max_seq_len": 256},
                        "lora": {"rank": 8, "target_modules": "all-linear"}},
           "tenants": [{"name": "acme", "data": {"path": "x.jsonl"}}]}
    return parse_spec(raw).job("acme")


def test_planner_packs_lora_jobs_per_gpu_and_refuses_what_cannot_fit(base_model_dir):
    from farm.plan import GiB, PlanRequest, load_shape, plan_memory
    from farm.sizing import Capacity, DoesNotFit, size_adapter

    job = _job(base_model_dir)
    planned = plan_memory(load_shape(str(base_model_dir)), PlanRequest(
        method="lora", rank=8, batch=8, seq_len=256, precision="bf16", gradient_checkpointing=False)).total_bytes
    # auto: as many jobs per GPU as fit, capped at 8 (tiny jobs), each asking 1/k of a GPU
    big = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("gpu", 80 * GiB, 4, "spec"))
    assert big.resources.gpus_per_worker == 0.125 and big.planned_bytes == planned
    # a device that holds exactly three such jobs gets three
    three = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("gpu", 3 * planned + 1, 4, "spec"))
    assert three.resources.gpus_per_worker == round(1 / 3, 4)
    assert trainer_resources(three.resources).resources_per_worker["GPU"] == round(1 / 3, 4)
    # CPU clusters: no GPU, and Ray's memory resource reserves the plan per worker
    cpu = size_adapter(job, ResourceSpec(gpus_per_worker="auto"), Capacity("cpu", 16 * GiB, 2, "ray"))
    assert trainer_resources(cpu.resources).resources_per_worker == {"CPU": 1.0, "memory": cpu.planned_bytes}
    # a job no device can hold is refused with the numbers
    with pytest.raises(DoesNotFit, match=r"tenant 'acme': a lora worker needs .* GB \(weights .*\), more than"):
        size_adapter(job, ResourceSpec(gpus_per_worker=1), Capacity("gpu", planned // 2, 4, "spec"))


def test_planner_picks_baseline_workers_and_refuses_a_baseline_that_cannot_fit(base_model_dir):
    from farm.plan import PlanRequest, load_shape, plan_memory
    from farm.sizing import Capacity, DoesNotFit, size_baseline
    from farm.spec import BaselineSpec

    job = _job(base_model_dir)
    shape = load_shape(str(base_model_dir))

    def per_worker(workers: int) -> int:
        return plan_memory(shape, PlanRequest(method="full", zero_stage=3, devices=workers, batch=8 // workers,
                                              seq_len=256, gradient_checkpointing=False,
                                              precision="bf16")).total_bytes

    baseline = BaselineSpec(tenants=["acme"], zero_stage=3)
    # room for the 4-worker partition but not the 2-worker one: the planner asks for 4
    device = (per_worker(2) + per_worker(4)) // 2
    workers, plan = size_baseline(job, baseline, Capacity("gpu", device, 8, "spec"))
    assert workers == 4 and plan.total_bytes == per_worker(4) <= device
    with pytest.raises(DoesNotFit, match="does not fit even on all 2 devices"):
        size_baseline(job, baseline, Capacity("gpu", device, 2, "spec"))


def test_spec_rejects_a_baseline_for_an_unknown_tenant(base_model_dir):
    from farm.spec import SpecError, parse_spec

    raw = {"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
           "baseline": {"tenants": ["nobody"]}, "tenants": [{"name": "acme", "data": {"path": "x.jsonl"}}]}
    with pytest.raises(SpecError, match="'nobody' not among the spec's tenants"):
        parse_spec(raw)

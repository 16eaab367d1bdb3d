"""What the service decides before a job reaches a pool (``FineTuningService.resolve_job``), run
against a real registry (local store, SQLite catalog) and the tiny base's tokenizer, no Ray:
the file through the whole data pipeline, errors naming the file id and line (never where the
store keeps it), a validation file as the eval set, and the service's ceiling on steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from farm.service.records import ServiceRecords, new_id
from farm.service.runner import FineTuningService, ServiceConfig, _JobRefused

from ..conftest import REPO


@pytest.fixture
def service(tmp_path, base_model_dir):
    config = ServiceConfig.model_validate({
        "base_model": {"name_or_path": str(base_model_dir)}, "registry": {"store": str(tmp_path / "registry")},
        "storage": str(tmp_path / "storage"), "max_steps": 500,
        "defaults": {"train": {"max_steps": 100, "batch_size": 4}, "data": {"max_seq_len": 128}}})
    return FineTuningService(config)


def _file(service, tmp_path, tenant: str, lines: list[str]) -> str:
    path = tmp_path / f"{new_id('x')}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    file_id = new_id("file")
    relative = service.registry.store.put_tenant_file(tenant, file_id, ".jsonl", path)
    ServiceRecords(service.registry.catalog).add_file(file_id=file_id, tenant=tenant, filename=path.name,
                                                      purpose="fine-tune", size=path.stat().st_size, sha256="0" * 64,
                                                      records=len(lines), fmt="chat", store_path=relative)
    return file_id


def _row(tenant: str, request: dict, validation_file: str | None = None):
    return SimpleNamespace(id=new_id("ftjob"), tenant=tenant, request=request, training_file=request["training_file"],
                           validation_file=validation_file)


def test_a_job_is_resolved_checked_and_refused_with_the_files_own_name(service, tmp_path, tokenizer):
    lines = (REPO / "jobs" / "data" / "acme.jsonl").read_text().splitlines()
    good = _file(service, tmp_path, "acme", lines[:40])
    job = service.resolve_job(_row("acme", {"model": "tiny", "training_file": good, "suffix": "support",
                                            "hyperparameters": {"n_epochs": 2}}), tokenizer)
    assert (job.tenant, job.adapter, job.run_id is not None) == ("acme", "support", True)
    assert job.settings.data.path.endswith(f"files/acme/{good}.jsonl") and job.settings.train.max_steps >= 2

    held_out = _file(service, tmp_path, "acme", lines[40:50])
    with_eval = service.resolve_job(_row("acme", {"model": "tiny", "training_file": good}, held_out), tokenizer)
    assert with_eval.settings.data.eval_path.endswith(f"{held_out}.jsonl")

    # a record the upload check lets through (valid chat) but the pipeline refuses: too long for max_seq_len
    too_long = json.dumps({"messages": [{"role": "user", "content": "x " * 400},
                                        {"role": "assistant", "content": "y"}]})
    strict = _file(service, tmp_path, "acme", lines[:3] + [too_long])
    request = {"model": "tiny", "training_file": strict, "method": {"type": "supervised"}}
    service.config = service.config.model_copy(update={"defaults": service.config.defaults.model_copy(update={
        "data": service.config.defaults.data.model_copy(update={"too_long": "error"})})})
    with pytest.raises(_JobRefused) as refused:
        service.resolve_job(_row("acme", request), tokenizer)
    error = refused.value.error
    assert error["code"] == "invalid_training_file" and error["param"] == "training_file"
    assert f"{strict} line 4" in error["message"] and "max_seq_len" in error["message"]
    assert "files/acme" not in error["message"] and str(tmp_path) not in error["message"]

    with pytest.raises(_JobRefused) as over:  # 1,000 steps asked, the service trains at most 500 a job
        service.resolve_job(_row("acme", {"model": "tiny", "training_file": good,
                                          "hyperparameters": {"max_steps": 1000}}), tokenizer)
    assert over.value.error["param"] == "hyperparameters" and "500" in over.value.error["message"]

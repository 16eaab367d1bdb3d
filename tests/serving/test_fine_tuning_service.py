"""``farm service`` behind ``farm gateway``, driven with the ``openai`` client, end to end.

The session's vLLM server (``vllm_server``) serves the registry the service publishes to; a real
gateway (uvicorn, lifespan on) serves the fine-tuning API and the completions in front of it; the
service runs as ``farm service`` in its own process on its own local Ray instance, and is killed
and restarted by one test. Tenants ``tuna`` and ``sardine`` are new to the registry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import psutil
import pytest
import yaml

from farm.registry.catalog import Catalog
from farm.registry.core import default_catalog_url
from farm.service.records import ServiceRecords
from farm.serving.gateway import create_gateway_app
from farm.serving.gateway_config import GatewayConfig

from ..conftest import REPO
from ..registry.test_api import LiveServer
from .conftest import PROMPT, MAX_TOKENS, peft_greedy, until_eos

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DATA = REPO / "jobs" / "data"
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceProcess:
    """``farm service --config`` in its own process group (and its own local Ray instance)."""

    def __init__(self, config: Path, log: Path):
        env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled",
               "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "farm.cli", "service", "--config", str(config)],
                                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL the service and every process it started (its Ray), by PID."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.process.kill()
        self.process.wait(30)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass

    def stop(self) -> None:
        """SIGTERM (the service stops its pools and its Ray), then whatever is left, by PID."""
        if self.process.poll() is None:
            try:
                children = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.Error:
                children = []
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
            for child in children:
                try:
                    child.kill()
                except psutil.Error:
                    pass


@pytest.fixture(scope="module")
def stack(vllm_server, base_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-service")
    store = str(vllm_server.registry.store.root)
    catalog = Catalog(default_catalog_url(store))
    tokens = {name: catalog.create_token(name) for name in ("tuna", "sardine")}
    os.environ["TEST_FT_VLLM_KEY"] = vllm_server.api_key
    gateway_config = GatewayConfig.model_validate({
        "registry": {"store": store},
        "bases": [{"name": "tiny", "base_model": vllm_server.base_model,
                   "backends": [{"url": vllm_server.url, "api_key_env": "TEST_FT_VLLM_KEY"}]}],
        "fine_tuning": {"models": ["tiny"]}, "health_interval_s": 1, "usage_flush_s": 3600})
    service_file = root / "service.yaml"
    service_file.write_text(yaml.safe_dump({
        "base_model": {"name_or_path": str(base_model_dir)}, "registry": {"store": store},
        "storage": str(root / "storage"), "pools": 1, "running_per_tenant": 1, "poll_s": 0.1,
        "resources": {"cpus_per_worker": 1, "max_retries": 1},
        "defaults": {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                     "train": {"max_steps": 400, "batch_size": 4, "learning_rate": 3e-3, "checkpoint_every": 5,
                               "precision": "fp32"},
                     "data": {"max_seq_len": 128}}}))
    small = root / "small.jsonl"  # 8 short chats: one step an epoch
    small.write_text("".join((DATA / "hooli.jsonl").read_text().splitlines(keepends=True)[:8]))
    with LiveServer(create_gateway_app(gateway_config, catalog), lifespan="on") as gateway:
        state = SimpleNamespace(url=gateway.url, tokens=tokens, catalog=catalog, root=root, small=small,
                                records=ServiceRecords(catalog), registry=vllm_server.registry,
                                service=ServiceProcess(service_file, root / "service.log"), service_file=service_file)
        try:
            yield state
        finally:
            state.service.stop()


def _client(stack, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.tokens[who], max_retries=0, timeout=120)


def _wait(stack, client: openai.OpenAI, job_id: str, until=lambda job: job.status in TERMINAL, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert stack.service.process.poll() is None, "the service died:\n" + stack.service.tail()
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s (it is {job.status}):\n{stack.service.tail()}")


def _upload(client: openai.OpenAI, path: Path):
    with path.open("rb") as handle:
        return client.files.create(file=(path.name, handle), purpose="fine-tune")


def test_a_tenant_uploads_fine_tunes_and_calls_its_model_through_the_gateway(stack, base_model_dir, tmp_path):
    tuna, sardine = _client(stack, "tuna"), _client(stack, "sardine")
    file = _upload(tuna, DATA / "acme.jsonl")
    job = tuna.fine_tuning.jobs.create(model="tiny", training_file=file.id, suffix="support",
                                       hyperparameters={"n_epochs": 1})
    assert job.status == "validating_files"
    job = _wait(stack, tuna, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "tuna.support.v1" and job.trained_tokens > 0 and job.finished_at
    messages = [e.message for e in reversed(tuna.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert "Files validated, moving job to queued state" in messages and "Fine-tuning job started" in messages
    steps = [e for e in tuna.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert steps and steps[0].data["step"] == steps[0].data["total_steps"] == job.hyperparameters.steps
    checkpoints = tuna.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert checkpoints[0].step_number == job.hyperparameters.steps and checkpoints[0].metrics.valid_loss > 0

    # the model answers at once, through the gateway, as transformers + PEFT does with the adapter
    answer = tuna.completions.create(model=job.fine_tuned_model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0, extra_body={"return_token_ids": True})
    adapter = tmp_path / "adapter"
    stack.registry.download(job.fine_tuned_model, adapter)
    _, expected = peft_greedy(base_model_dir, adapter)
    assert until_eos(answer.choices[0].to_dict()["token_ids"], None)[:len(expected)] == expected

    # another tenant sees nothing of it: not the file, not the job, not the model
    with pytest.raises(openai.NotFoundError):
        sardine.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        sardine.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        sardine.completions.create(model=job.fine_tuned_model, prompt=PROMPT, max_tokens=4)
    assert sardine.files.list().data == [] and sardine.fine_tuning.jobs.list().data == []

    # the tenant pays for its training
    usage = {row["model"]: row for row in stack.catalog.usage(tenant="tuna")}
    assert usage[job.fine_tuned_model]["trained_tokens"] == job.trained_tokens


def test_a_bad_file_is_refused_with_its_line_and_one_that_fails_the_pipeline_fails_its_job(stack, tmp_path):
    tuna = _client(stack, "tuna")
    lines = (DATA / "hooli.jsonl").read_text().splitlines()[:5]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines[:2] + ['{"messages": "not a list"}'] + lines[2:]) + "\n")
    with pytest.raises(openai.BadRequestError, match="line 3"):
        _upload(tuna, broken)
    assert broken.name not in [f.filename for f in tuna.files.list().data]

    one = tmp_path / "one.jsonl"
    one.write_text((DATA / "hooli.jsonl").read_text().splitlines()[0] + "\n")  # one record: nothing to evaluate
    file = _upload(tuna, one)
    job = _wait(stack, tuna, tuna.fine_tuning.jobs.create(model="tiny", training_file=file.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert file.id in job.error.message and "usable example" in job.error.message
    assert str(stack.root) not in job.error.message and "files/tuna" not in job.error.message  # no store paths


def test_a_cancelled_running_job_stops_and_frees_its_slot(stack):
    tuna, sardine = _client(stack, "tuna"), _client(stack, "sardine")
    long = tuna.fine_tuning.jobs.create(model="tiny", training_file=_upload(tuna, DATA / "acme.jsonl").id,
                                        hyperparameters={"n_epochs": 20})  # hundreds of steps
    _wait(stack, tuna, long.id, until=lambda job: any(
        e.type == "metrics" for e in tuna.fine_tuning.jobs.list_events(job.id).data))
    short = sardine.fine_tuning.jobs.create(model="tiny", training_file=_upload(sardine, stack.small).id)
    _wait(stack, sardine, short.id, until=lambda job: job.status != "validating_files")
    assert sardine.fine_tuning.jobs.retrieve(short.id).status == "queued"  # one pool, and it is busy
    tuna.fine_tuning.jobs.cancel(long.id)
    cancelled = _wait(stack, tuna, long.id, timeout=60)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    last_step = max(e.data["step"] for e in tuna.fine_tuning.jobs.list_events(long.id, limit=100).data
                    if e.type == "metrics")
    assert last_step < cancelled.hyperparameters.steps
    assert _wait(stack, sardine, short.id).status == "succeeded"  # the pool took the next job


def test_one_tenants_single_job_starts_before_anothers_twenty_finish(stack):
    tuna, sardine = _client(stack, "tuna"), _client(stack, "sardine")
    tuna_file, sardine_file = _upload(tuna, stack.small), _upload(sardine, stack.small)
    many = [tuna.fine_tuning.jobs.create(model="tiny", training_file=tuna_file.id, suffix="many").id
            for _ in range(20)]
    one = sardine.fine_tuning.jobs.create(model="tiny", training_file=sardine_file.id, suffix="one").id
    assert _wait(stack, sardine, one).status == "succeeded"
    unfinished = [j for j in many if tuna.fine_tuning.jobs.retrieve(j).status not in TERMINAL]
    assert len(unfinished) >= 10, f"only {len(unfinished)} of tuna's 20 jobs were left when sardine's finished"
    for job_id in unfinished:  # queued ones are cancelled at once, a running one at its next step
        try:
            tuna.fine_tuning.jobs.cancel(job_id)
        except openai.ConflictError:  # it finished between the listing and the cancel: 409 is right
            assert tuna.fine_tuning.jobs.retrieve(job_id).status == "succeeded"
    for job_id in unfinished:
        assert _wait(stack, tuna, job_id, timeout=60).status in ("cancelled", "succeeded")


def test_a_sweep_spec_is_submitted_to_the_running_service(stack, base_model_dir, tmp_path):
    """``tenant_sweep.py --service``: a CSV tenant is converted and trained; a tenant with a
    broken line is refused with that line, and costs the other nothing."""
    import csv
    import json

    rows = [json.loads(line) for line in (DATA / "initech.jsonl").read_text().splitlines()[:12]]
    with (tmp_path / "squid.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows)
    lines = (DATA / "hooli.jsonl").read_text().splitlines()[:6]
    (tmp_path / "octopus.jsonl").write_text("\n".join(lines[:3] + ["{broken"] + lines[3:]) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "viaservice", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(tmp_path / "runs"),
        "defaults": {"lora": {"rank": 4, "dropout": 0.0}, "train": {"max_steps": 3, "batch_size": 2}},
        "tenants": [{"name": "squid", "data": {"path": str(tmp_path / "squid.csv"), "format": "alpaca"}},
                    {"name": "octopus", "data": {"path": str(tmp_path / "octopus.jsonl")}}]}))
    admin = stack.catalog.create_token(None, label="sweep")
    run = subprocess.run([sys.executable, "jobs/tenant_sweep.py", "--config", str(spec), "--service", stack.url,
                          "--service-model", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FARM_SERVICE_TOKEN": admin, "COLUMNS": "200"})
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # octopus was refused
    assert "octopus: refused" in run.stdout and "line 4" in run.stdout, run.stdout[-3000:]
    assert "squid.viaservice.v1" in run.stdout, run.stdout[-3000:]
    info = stack.registry.resolve("squid.viaservice.v1")
    assert info.lineage["fine_tuning_job"].startswith("ftjob-") and info.metrics["steps"] == 3
    assert info.training["method_settings"]["rank"] == 4  # the spec's method settings went with the job


def test_a_service_killed_mid_job_resumes_it_to_the_same_adapter(stack, tmp_path):
    from safetensors.torch import load_file

    from farm.spec import TenantJob
    from farm.train.adapter import train_tenant

    tuna = _client(stack, "tuna")
    job = tuna.fine_tuning.jobs.create(model="tiny", training_file=_upload(tuna, DATA / "acme.jsonl").id,
                                       suffix="resumed", hyperparameters={"max_steps": 30})
    checkpoint = stack.root / "storage" / "pooled" / job.id / "checkpoint-0000010" / "state.json"
    _wait(stack, tuna, job.id, until=lambda _: checkpoint.is_file() or _.status in TERMINAL, timeout=300)
    assert tuna.fine_tuning.jobs.retrieve(job.id).status == "running"
    stack.service.kill()
    assert tuna.fine_tuning.jobs.retrieve(job.id).status == "running"  # the gateway answers meanwhile
    stack.service = ServiceProcess(stack.service_file, stack.root / "service.log")
    done = _wait(stack, tuna, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in tuna.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("The service restarted") for m in messages)
    info = stack.registry.resolve(done.fine_tuned_model)
    assert info.lineage["fine_tuning_job"] == job.id and info.lineage["resumed_from_step"] >= 10

    # the same job straight through, in this process: the same adapter
    row = stack.records.job(None, job.id)
    straight = TenantJob.model_validate(row.job).model_copy(update={"output_dir": str(tmp_path / "straight")})
    train_tenant(straight, resume=False)
    resumed_dir = tmp_path / "resumed"
    stack.registry.download(done.fine_tuned_model, resumed_dir)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

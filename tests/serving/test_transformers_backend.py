"""The transformers backend behind a real gateway: every method the farm trains is servable.

One transformers backend, started by ``farm serve --backend transformers --run`` on 127.0.0.1
and holding at most two adapters loaded, behind a real gateway
(uvicorn, lifespan on) that has no vLLM for this base. For each method an adapter is published
and asked for greedy completions through the gateway: they equal transformers + the adapter
loaded directly (PEFT, or the farm's bottleneck implementation), token for token, streamed or
not. Another tenant's adapter answers exactly like a missing one; usage is metered; concurrent
requests (batched by the backend) get the answers they get alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from farm.methods import METHODS
from farm.registry import open_registry
from farm.registry.catalog import Catalog
from farm.registry.core import default_catalog_url
from farm.serving.gateway import create_gateway_app
from farm.serving.gateway_config import GatewayConfig

from ..registry.test_api import LiveServer
from .conftest import PROMPT, Billing, free_port, peft_greedy, until_eos

pytestmark = pytest.mark.slow

SERVED = [name for name, info in METHODS.items() if not info.needs_cuda]  # QLoRA: a LoRA, served like one


def _adapter(base_model_dir: Path, method: str, folder: Path, seed: int) -> Path:
    """A freshly built adapter of ``method`` with every trained tensor nudged off its init (so
    that it visibly changes the base's answers), saved as the trainer saves it."""
    import torch
    from transformers import AutoModelForCausalLM

    from farm.models import build_peft_model
    from farm.spec import JobSettings

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = build_peft_model(base, JobSettings(method=method), str(base_model_dir))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.3 if method in ("lora", "dora") else 0.05))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def stack(base_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers-backend")
    registry = open_registry(str(root / "registry"))
    base = str(base_model_dir)
    adapters = {}
    for seed, method in enumerate(SERVED):
        folder = _adapter(base_model_dir, method, root / method, seed)
        adapters[registry.publish("acme", method, folder, base_model=base, method=method).serve_name] = folder
    registry.publish("globex", "lora", _adapter(base_model_dir, "lora", root / "globex", 99), base_model=base)

    key, port = secrets.token_urlsafe(24), free_port()
    env = {**os.environ, "FARM_TRANSFORMERS_API_KEY": key, "FARM_REGISTRY_STORE": str(registry.store.root),
           "FARM_VLLM_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    for name in ("FARM_REGISTRY_URL", "FARM_REGISTRY_TOKEN", "FARM_REGISTRY_CATALOG"):
        env.pop(name, None)
    log = root / "backend.log"
    with log.open("wb") as out:  # its own process group, stopped by PID below
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "farm"), "serve", "--backend", "transformers", "--run",
             "--base-model", base, "--port", str(port), "--served-model-name", "base", "--max-cpu-loras", "2",
             "--store", str(registry.store.root), "--cache-dir", str(root / "cache")],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.environ["TEST_TRANSFORMERS_KEY"] = key
        catalog = Catalog(default_catalog_url(str(registry.store.root)))
        tokens = {name: catalog.create_token(name, label="test") for name in ("acme", "globex")}
        config = GatewayConfig.model_validate({
            "bases": [{"name": "base", "base_model": base, "backends": [
                {"url": url, "kind": "transformers", "api_key_env": "TEST_TRANSFORMERS_KEY"}]}],
            "limits": {"default": {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000,
                                   "concurrent_requests": 16, "max_tokens": 64}},
            "health_interval_s": 1, "usage_flush_s": 3600})
        app = create_gateway_app(config, catalog)
        with LiveServer(app, lifespan="on") as gateway:
            yield {"url": gateway.url, "backend": url, "key": key, "tokens": tokens, "adapters": adapters,
                   "gateway": app.state.gateway, "registry": registry, "log": log}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def _client(stack, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=stack["url"], timeout=120, headers={"Authorization": f"Bearer {stack['tokens'][tenant]}"})


def _body(model: str, **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "return_token_ids": True, **extra}


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_every_method_answers_through_the_gateway_like_direct_transformers(stack, base_model_dir):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(base_model_dir).eos_token_id
    acme = _client(stack, "acme")
    base_ids = peft_greedy(base_model_dir, None)[1]
    for method in SERVED:
        serve = f"acme.{method}.v1"
        info = stack["registry"].resolve(serve)
        assert info.servable_by == (["vllm", "transformers"] if method == "lora" else ["transformers"]), info
        expected = peft_greedy(base_model_dir, stack["adapters"][serve])[1]
        assert expected != base_ids, f"{method}: the adapter must change the answer for this test to mean anything"
        for model in (serve, f"acme.{method}@latest"):
            plain = acme.post("/v1/completions", json=_body(model))
            assert plain.status_code == 200, (method, plain.text, stack["log"].read_text()[-2000:])
            choice = plain.json()["choices"][0]
            assert until_eos(choice["token_ids"], eos) == expected, method
        with acme.stream("POST", "/v1/completions", json=_body(serve, stream=True)) as response:
            assert response.status_code == 200
            events = _events(response)
        assert until_eos([t for e in events for c in e["choices"] for t in c.get("token_ids") or []], eos) == expected
        assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"], method
    plain = acme.post("/v1/completions", json=_body("base")).json()
    assert until_eos(plain["choices"][0]["token_ids"], eos) == base_ids
    models = {m["id"] for m in acme.get("/v1/models").json()["data"]}
    assert {f"acme.{m}.v1" for m in SERVED} <= models and not any(m.startswith("globex.") for m in models)


def test_chat_and_concurrent_requests_get_the_answers_they_get_alone(stack):
    acme = _client(stack, "acme")
    chat = {"model": "acme.bottleneck.v1", "messages": [{"role": "user", "content": "My router keeps restarting."}],
            "temperature": 0, "max_tokens": 10}
    alone = acme.post("/v1/chat/completions", json=chat)
    assert alone.status_code == 200, alone.text
    assert alone.json()["choices"][0]["message"]["role"] == "assistant"
    # Prompts of different lengths: batched rows are left-padded, which must not change an answer.
    prompts = [PROMPT, "Hello", "The customer asked about the router that keeps restarting every night"]
    jobs = [(m, p) for m in ("prefix", "prompt", "bottleneck", "lora") for p in prompts]
    singles = {(m, p): acme.post("/v1/completions", json=_body(f"acme.{m}.v1", prompt=p)).json()["choices"][0]["text"]
               for m, p in jobs}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: (job, acme.post("/v1/completions", json=_body(
            f"acme.{job[0]}.v1", prompt=job[1])).json()), jobs * 2))
    for job, answer in answers:
        assert answer["choices"][0]["text"] == singles[job], (job, answer)
    again = [acme.post("/v1/chat/completions", json=chat).json() for _ in range(2)]
    assert all(a["choices"][0]["message"] == alone.json()["choices"][0]["message"] for a in again)


def test_another_tenants_adapter_answers_like_a_missing_one_and_usage_is_metered(stack):
    globex, acme = _client(stack, "globex"), _client(stack, "acme")
    for stream in (False, True):
        for name in ("acme.bottleneck.v1", "acme.prefix@latest", "acme.ia3.v1"):
            answer = globex.post("/v1/completions", json=_body(name, stream=stream))
            missing = globex.post("/v1/completions", json=_body("globex.nothing.v1", stream=stream))
            assert answer.status_code == missing.status_code == 404, (name, answer.text)
            assert answer.text == missing.text.replace("globex.nothing.v1", name)
    # The backend itself wants its key (the gateway is the only caller that has it).
    direct = httpx.post(f"{stack['backend']}/v1/completions", json=_body("acme.ia3.v1"))
    assert direct.status_code == 401
    assert httpx.post(f"{stack['backend']}/v1/completions", json={**_body("acme.ia3.v1"), "logprobs": 2},
                      headers={"Authorization": f"Bearer {stack['key']}"}).json()["error"]["param"] == "logprobs"

    billing = Billing(stack["gateway"], stack["registry"].store.root, "acme")
    start = billing.total()
    usage = acme.post("/v1/completions", json=_body("acme.dora.v1")).json()["usage"]
    body = _body("acme.prompt.v1", stream=True, stream_options={"include_usage": True})
    with acme.stream("POST", "/v1/completions", json=body) as response:
        final = [e for e in _events(response) if e.get("usage") and not e["choices"]][-1]["usage"]
    total = billing.total()
    assert total["requests"] - start["requests"] == 2
    assert total["prompt_tokens"] - start["prompt_tokens"] == usage["prompt_tokens"] + final["prompt_tokens"]
    assert total["completion_tokens"] - start["completion_tokens"] == usage["completion_tokens"] + final["completion_tokens"]
    assert usage["completion_tokens"] >= 1 and final["completion_tokens"] >= 1

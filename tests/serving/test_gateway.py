"""``farm gateway``: policy objects without servers, then a real gateway in front of real vLLM.

- Unit tier: the limiter (driven by its own clock), request-body checks, the vLLM route
  allowlist, token expiry and revocation.
- ``TestGatewayWithVllm`` (marked ``vllm`` and ``slow``): the session's vLLM server (base A) and
  a second one for another base (B), both on 127.0.0.1, behind a real gateway (uvicorn, its
  lifespan on) reading the same registry catalog. Tenant isolation on every route, answers equal
  to direct vLLM and to transformers + PEFT, alias moves, limits, metered usage (a cut stream
  included), and a backend killed mid-request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from farm.registry.catalog import Catalog, utcnow
from farm.registry.core import default_catalog_url
from farm.serving.gateway import GatewayError, check_body, create_gateway_app
from farm.serving.gateway_config import GatewayConfig, LimitsConfig, TenantLimits
from farm.serving.limits import Limiter

from ..registry.conftest import make_lora_adapter
from ..registry.test_api import LiveServer
from .conftest import PROMPT, Billing, peft_greedy, start_vllm, until_eos


# -- policy objects ---------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_requests_per_minute_refuses_with_retry_after_and_recovers():
    clock = Clock()
    limiter = Limiter(LimitsConfig(default=TenantLimits(requests_per_minute=6)), clock)
    for _ in range(6):
        assert limiter.admit("acme", 10) is None
        limiter.release("acme", 10, 10)
    refusal = limiter.admit("acme", 10)
    assert refusal.limit == "requests_per_minute" and refusal.retry_after_s == 10  # one request per 10 s
    assert limiter.admit("globex", 10) is None  # another tenant is not affected
    clock.now += 9.5
    assert limiter.admit("acme", 10).retry_after_s == 1
    clock.now += 0.5
    assert limiter.admit("acme", 10) is None


def test_limiter_tokens_are_corrected_by_actual_usage_and_concurrency_is_bounded():
    clock = Clock()
    limits = LimitsConfig(default=TenantLimits(tokens_per_minute=600, concurrent_requests=2),
                          tenants={"big": TenantLimits(concurrent_requests=3)})
    limiter = Limiter(limits, clock)
    assert limiter.limits_of("big").tokens_per_minute == 600  # unset fields come from the default
    assert limiter.admit("acme", 500) is None
    refusal = limiter.admit("acme", 200)  # 100 left
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after_s == 10  # 100 more at 10/s
    limiter.release("acme", 500, 50)  # it used 50 of the 500 reserved: 450 come back
    assert limiter.admit("acme", 200) is None and limiter.admit("acme", 200) is None
    assert limiter.admit("acme", 1).limit == "concurrent_requests"
    limiter.release("acme", 200, 200)
    assert limiter.admit("acme", 1) is None
    assert [limiter.admit("big", 1) for _ in range(4)][-1].limit == "concurrent_requests"


@pytest.mark.parametrize("body, kind, message", [
    ({"model": "m", "prompt": "x", "priority": -100}, "completions", "priority: not a field"),
    ({"model": "m", "prompt": "x", "cache_salt": "other-tenant"}, "completions", "cache_salt: not a field"),
    ({"model": "m", "prompt": "x", "kv_transfer_params": {}}, "completions", "kv_transfer_params"),
    ({"model": "m", "messages": [], "chat_template": "{{x}}"}, "chat/completions", "chat_template"),
    ({"model": "m"}, "completions", "prompt: required"),
    ({"model": "m", "prompt": "x", "max_tokens": "9"}, "completions", "max_tokens: expected an integer"),
    ({"model": "m", "prompt": "x", "max_tokens": 2000}, "completions", "max_tokens: 2000 is over this tenant's ceiling of 64"),
    ({"model": "m", "messages": "hi"}, "chat/completions", "messages: required"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "completions", "stream: expected true or false"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "completions", "only with stream"),
    ({"model": "m", "prompt": "x", "n": 100}, "completions", "n: expected an integer in 1..16"),
])
def test_bad_request_bodies_get_400_naming_the_field(body, kind, message):
    with pytest.raises(GatewayError) as refused:
        check_body(body, kind, max_tokens_ceiling=64)
    assert refused.value.status == 400 and message in refused.value.message


def test_max_tokens_defaults_to_the_ceiling():
    body = {"model": "m", "prompt": "x", "n": 2}
    assert check_body(body, "completions", max_tokens_ceiling=64) == (128, False)
    assert body["max_tokens"] == 64
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}
    assert check_body(chat, "chat/completions", max_tokens_ceiling=64) == (8, True)


def test_stream_usage_is_the_last_complete_event_whatever_the_chunking():
    from farm.serving.gateway import _StreamUsage

    events = [{"choices": [{"text": "a"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
              {"choices": [{"text": "b"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for size in (1, 7, 50, len(raw)):
        follower = _StreamUsage()
        for at in range(0, len(raw), size):
            follower.feed(raw[at:at + size])
        assert follower.last == (5, 3), size
    cut = _StreamUsage()
    cut.feed(raw[:raw.index(b"\n\n", raw.index(b'"b"')) + 2] + b'data: {"choices": [{"te')  # cut mid-event
    assert cut.last == (5, 2)
    assert _StreamUsage().last is None


def test_vllm_route_allowlist_closes_everything_but_inference():
    """The middleware ``farm serve`` puts in front of vLLM's app, on an app with vLLM's paths."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from farm.serving.vllm_server import RouteAllowlist

    async def ok(request):
        return PlainTextResponse("reached vLLM")

    paths = ["/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/invocations", "/adapters",
             "/adapters/x", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/detokenize",
             "/metrics", "/version", "/ping", "/docs", "/openapi.json", "/v1/responses", "/pooling"]
    inner = Starlette(routes=[Route(p, ok, methods=["GET", "POST", "DELETE"]) for p in paths])

    async def call(method, path):
        transport = httpx.ASGITransport(app=RouteAllowlist(inner))
        async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as client:
            return await client.request(method, path, headers={"X-Amzn-SageMaker-Adapter-Identifier": "a.b.v1"})

    reached = {(m, p) for m in ("GET", "POST", "DELETE") for p in paths
               if asyncio.run(call(m, p)).text == "reached vLLM"}
    assert reached == {("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                       ("POST", "/v1/chat/completions")}


def test_backends_are_balanced_by_requests_in_flight_and_skipped_when_down(monkeypatch):
    from farm.serving.gateway import BasePool
    from farm.serving.gateway_config import BaseConfig

    monkeypatch.setenv("K", "secret")
    pool = BasePool(BaseConfig(name="b", base_model="m", backends=[
        *({"url": f"http://127.0.0.1:{port}", "api_key_env": "K"} for port in (1, 2, 3)),
        {"url": "http://127.0.0.1:4", "kind": "transformers"}]), timeout_s=5)
    one, two, three, other = pool.backends
    assert one.headers["Authorization"] == "Bearer secret" and pool.kinds == ["vllm", "transformers"]
    one.outstanding, two.outstanding, three.outstanding, other.outstanding = 2, 0, 1, 9
    assert pool.pick("vllm") is two and pool.pick("transformers") is other  # a kind only gets its own
    two.healthy = False
    assert pool.pick("vllm") is three
    three.outstanding = 2  # a tie between one and three: taken in turn
    assert {pool.pick("vllm").url for _ in range(4)} == {one.url, three.url}
    one.healthy = three.healthy = False
    assert pool.pick("vllm") is None and pool.pick("transformers") is other


def test_requests_refused_before_any_backend_is_asked(tmp_path, monkeypatch):
    """No token, a body too large or not JSON, an unknown path or method: refused by the gateway."""
    import asyncio

    monkeypatch.setenv("K", "secret")
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    token = catalog.create_token("acme")
    config = GatewayConfig.model_validate({"bases": [{"name": "base", "base_model": "m", "backends": [
        {"url": "http://127.0.0.1:9", "api_key_env": "K"}]}], "max_body_bytes": 2048})
    app = create_gateway_app(config, catalog)  # lifespan not run: no backend is ever contacted

    async def call(method, path, token=token, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    def run(*args, **kwargs):
        return asyncio.run(call(*args, **kwargs))

    assert run("POST", "/v1/completions", token=None, json={"model": "base", "prompt": "x"}).status_code == 401
    assert run("POST", "/v1/completions", token="farm_not-a-token", json={}).status_code == 401
    big = run("POST", "/v1/completions", json={"model": "base", "prompt": "x" * 4096})
    assert big.status_code == 413 and "2048" in big.json()["error"]["message"]
    assert run("POST", "/v1/completions", content=b"{not json").json()["error"]["message"] == "body: not valid JSON"
    assert run("POST", "/v1/completions", json=[1, 2]).json()["error"]["message"] == "body: expected a JSON object"
    for method, path in (("GET", "/v1/completions"), ("PUT", "/v1/models"), ("POST", "/invocations"),
                         ("GET", "/v1/files"), ("DELETE", "/adapters/a.b.v1")):
        answer = run(method, path)
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "NotFoundError", (method, path)
    assert run("GET", "/healthz", token=None).json()["healthy_backends"] == {"base": 1}  # not checked yet


def test_tokens_expire_and_can_be_revoked(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    live = catalog.create_token("acme", label="ci")
    short = catalog.create_token("acme", expires_at=utcnow() + timedelta(seconds=1))
    past = catalog.create_token("acme", expires_at=utcnow() - timedelta(seconds=1))
    assert catalog.principal(live).tenant == "acme" and catalog.principal(short).tenant == "acme"
    assert catalog.principal(past) is None
    listed = catalog.list_tokens()
    assert [t.label for t in listed] == ["ci", "", ""] and all(t.tenant == "acme" for t in listed)
    assert catalog.revoke_token(listed[0].id) and catalog.principal(live) is None
    assert not catalog.revoke_token(999)
    time.sleep(1.1)
    assert catalog.principal(short) is None


# -- the real gateway in front of real vLLM ----------------------------------------------------------
@pytest.fixture(scope="module")
def stack(vllm_server, base_model_dir, tmp_path_factory):
    """Base A (the session's vLLM), base B (a second vLLM, killed by the last test), the gateway."""
    root = tmp_path_factory.mktemp("gateway")
    registry = vllm_server.registry
    base_b = Path(shutil.copytree(base_model_dir, root / "base-b"))  # another base: another path
    folder_b = make_lora_adapter(base_b, root / "umbrella-b", seed=11)
    vllm_server.adapters[registry.publish("umbrella", "onb", folder_b, base_model=str(base_b)).serve_name] = folder_b
    server_b = start_vllm(root / "b", base_b, registry, served_model_name="base-b")
    os.environ["TEST_GATEWAY_KEY_A"], os.environ["TEST_GATEWAY_KEY_B"] = vllm_server.api_key, server_b.api_key
    catalog = Catalog(default_catalog_url(str(registry.store.root)))
    tokens = {name: catalog.create_token(name, label="test") for name in ("acme", "globex", "umbrella", "limited")}
    tokens["admin"] = catalog.create_token(None, label="test")
    config = GatewayConfig.model_validate({
        "bases": [
            {"name": "base", "base_model": vllm_server.base_model, "tenants": ["acme", "globex", "limited"],
             # a second backend that is down: health checks keep every request on the live one
             "backends": [{"url": vllm_server.url, "api_key_env": "TEST_GATEWAY_KEY_A"},
                          {"url": "http://127.0.0.1:9", "api_key_env": "TEST_GATEWAY_KEY_A"}]},
            {"name": "base-b", "base_model": str(base_b), "tenants": ["umbrella"],
             "backends": [{"url": server_b.url, "api_key_env": "TEST_GATEWAY_KEY_B"}]}],
        "limits": {"default": {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000,
                               "concurrent_requests": 16, "max_tokens": 1800},
                   "tenants": {"limited": {"requests_per_minute": 6, "max_tokens": 16}}},
        "health_interval_s": 1, "usage_flush_s": 3600})  # usage flushed by the tests, not by time
    app = create_gateway_app(config, catalog)
    with LiveServer(app, lifespan="on") as gateway:  # the lifespan starts health checks and metering
        yield {"url": gateway.url, "tokens": tokens, "gateway": app.state.gateway, "a": vllm_server,
               "b": server_b, "base_b": base_b, "registry": registry, "catalog": catalog}
    server_b.stop()


def _client(stack, who: str) -> httpx.Client:
    return httpx.Client(base_url=stack["url"], timeout=120,
                        headers={"Authorization": f"Bearer {stack['tokens'][who]}"})


def _completion(model: str, **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "return_token_ids": True, **extra}


def _stream_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.mark.vllm
@pytest.mark.slow
class TestGatewayWithVllm:
    def test_another_tenants_adapter_answers_exactly_like_a_missing_one(self, stack):
        globex, acme = _client(stack, "globex"), _client(stack, "acme")
        assert acme.post("/v1/completions", json=_completion("acme.support.v1")).status_code == 200
        variants = ["acme.support.v1", "acme.support@production", "acme.support@latest", "ACME.support.v1",
                    "acme.Support.v1", "acme%2Esupport.v1", "acme.support.v1\n", "acme.support.v1 ",
                    "umbrella.onb.v1", "hooli.cotrained.v1"]
        for route, body_of in (("/v1/completions", _completion),
                               ("/v1/chat/completions", lambda m, **kw: {
                                   "model": m, "messages": [{"role": "user", "content": "hi"}], **kw})):
            for stream in (False, True):
                for name in variants:
                    answer = globex.post(route, json=body_of(name, stream=stream))
                    missing = globex.post(route, json=body_of("globex.nothing.v1", stream=stream))
                    assert answer.status_code == missing.status_code == 404, (route, name, answer.text)
                    assert answer.text == missing.text.replace("globex.nothing.v1", json.dumps(name)[1:-1]), name
        models = {m["id"] for m in globex.get("/v1/models").json()["data"]}
        assert models == {"base", "globex.helpdesk.v1", "globex.helpdesk@latest"}  # none of acme's
        assert "base-b" not in models and "acme.support.v1" in {
            m["id"] for m in _client(stack, "admin").get("/v1/models").json()["data"]}

    def test_no_other_vllm_route_is_reachable(self, stack):
        acme = _client(stack, "acme")
        sagemaker = {"X-Amzn-SageMaker-Adapter-Identifier": "globex.helpdesk.v1"}
        for method, path, kwargs in [
                ("POST", "/invocations", {"json": {"prompt": "x"}, "headers": sagemaker}),
                ("POST", "/adapters", {"json": {"name": "globex.helpdesk.v1", "src": "/tmp"}}),
                ("DELETE", "/adapters/globex.helpdesk.v1", {}),
                ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": "/tmp", "load_inplace": True}}),
                ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "globex.helpdesk.v1"}}),
                ("POST", "/tokenize", {"json": {"model": "base", "prompt": "x"}}), ("GET", "/version", {}),
                ("GET", "/docs", {}), ("GET", "/openapi.json", {}), ("GET", "/v1/completions", {}),
                ("POST", "/v1/responses", {"json": {"model": "base", "input": "x"}}), ("GET", "/health", {})]:
            answer = acme.request(method, path, **kwargs)
            assert answer.status_code == 404, (method, path, answer.text)
        assert acme.get("/metrics").status_code == 403
        assert httpx.get(f"{stack['url']}/metrics").status_code == 401
        # ... and vLLM itself, on loopback, answers none of them either (the route allowlist)
        direct = stack["a"].http
        for method, path in [("POST", "/invocations"), ("POST", "/adapters"), ("DELETE", "/adapters/x"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
                             ("POST", "/tokenize"), ("GET", "/metrics"), ("GET", "/version")]:
            assert direct.request(method, path, json={}, headers=sagemaker).status_code == 404, path

    def test_answers_equal_direct_vllm_and_peft_streamed_or_not(self, stack, base_model_dir):
        acme, a = _client(stack, "acme"), stack["a"]
        for model, adapter in (("acme.support.v2", a.adapters["acme.support.v2"]), ("base", None)):
            expected = peft_greedy(base_model_dir, adapter)[1]
            assert a.greedy(model)[1] == expected
            plain = acme.post("/v1/completions", json=_completion(model)).json()
            assert until_eos(plain["choices"][0]["token_ids"], a.eos) == expected
            with acme.stream("POST", "/v1/completions", json=_completion(model, stream=True)) as response:
                assert response.status_code == 200
                events = _stream_events(response)
            streamed = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
            assert until_eos(streamed, a.eos) == expected
            assert "".join(c["text"] for e in events for c in e["choices"]) == plain["choices"][0]["text"]
        chat = {"messages": [{"role": "user", "content": "My router keeps restarting."}], "temperature": 0,
                "max_tokens": 12}
        direct = a.http.post("/v1/chat/completions", json={"model": "acme.support.v1", **chat}).json()
        through = acme.post("/v1/chat/completions", json={"model": "acme.support.v1", **chat}).json()
        assert through["choices"][0]["message"] == direct["choices"][0]["message"]

    def test_an_alias_move_counts_from_the_next_request(self, stack, base_model_dir):
        acme, a = _client(stack, "acme"), stack["a"]
        v1 = peft_greedy(base_model_dir, a.adapters["acme.support.v1"])[1]
        v2 = peft_greedy(base_model_dir, a.adapters["acme.support.v2"])[1]
        assert v1 != v2

        def answer():
            response = acme.post("/v1/completions", json=_completion("acme.support@production"))
            return until_eos(response.json()["choices"][0]["token_ids"], a.eos)

        a.registry.set_alias("acme", "support", "production", 1)
        assert answer() == v1
        a.registry.set_alias("acme", "support", "production", 2)
        assert answer() == v2
        a.registry.delete_alias("acme", "support", "production")
        assert acme.post("/v1/completions", json=_completion("acme.support@production")).status_code == 404

    def test_unsound_adapters_are_refused_at_publish_and_never_served(self, stack, base_model_dir, tmp_path):
        import torch
        from safetensors.torch import load_file, save_file

        from farm.registry.validate import PublishError

        registry, acme = stack["registry"], _client(stack, "acme")
        for case in ("nan", "shape"):
            folder = make_lora_adapter(base_model_dir, tmp_path / case, seed=21)
            weights = folder / "adapter_model.safetensors"
            tensors = load_file(str(weights))
            name = sorted(k for k in tensors if k.endswith("v_proj.lora_B.weight"))[0]
            if case == "nan":
                tensors[name] = torch.full_like(tensors[name], float("nan"))
            else:
                tensors[name] = torch.zeros(tensors[name].shape[0] + 3, tensors[name].shape[1])
            save_file(tensors, str(weights))
            with pytest.raises(PublishError, match="NaN" if case == "nan" else "features") as refused:
                registry.publish("acme", f"bad-{case}", folder, base_model=str(base_model_dir))
            assert name in str(refused.value)
            assert acme.post("/v1/completions", json=_completion(f"acme.bad-{case}.v1")).status_code == 404
        assert acme.post("/v1/completions", json=_completion("acme.support.v1")).status_code == 200

    def test_limits_answer_429_with_retry_after_and_recover_without_reaching_vllm(self, stack):
        limited, meter = _client(stack, "limited"), stack["gateway"].meter
        assert limited.post("/v1/completions", json=_completion("base", max_tokens=17)).status_code == 400
        before = meter.requests.labels("limited", "base", "base", "200")._value.get()
        answers = [limited.post("/v1/completions", json=_completion("base", max_tokens=4)) for _ in range(7)]
        assert [r.status_code for r in answers] == [200] * 6 + [429]
        refused = answers[-1]
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        wait = int(refused.headers["Retry-After"])
        assert 1 <= wait <= 10
        assert meter.requests.labels("limited", "base", "base", "200")._value.get() == before + 6  # 429: not sent
        time.sleep(wait)
        assert limited.post("/v1/completions", json=_completion("base", max_tokens=4)).status_code == 200

    def test_usage_is_metered_from_vllm_including_a_cut_stream(self, stack):
        gateway, globex = stack["gateway"], _client(stack, "globex")
        gateway.meter.flush()
        billing = Billing(gateway, stack["registry"].store.root, "globex")
        start = billing.total()
        seen_prompt = seen_completion = 0
        for _ in range(2):
            usage = globex.post("/v1/completions", json=_completion("globex.helpdesk.v1")).json()["usage"]
            seen_prompt, seen_completion = seen_prompt + usage["prompt_tokens"], seen_completion + usage["completion_tokens"]
        chat = globex.post("/v1/chat/completions", json={"model": "globex.helpdesk@latest", "max_tokens": 8,
                                                         "messages": [{"role": "user", "content": "hello"}]}).json()
        seen_prompt += chat["usage"]["prompt_tokens"]
        seen_completion += chat["usage"]["completion_tokens"]
        body = _completion("globex.helpdesk.v1", stream=True, stream_options={"include_usage": True})
        with globex.stream("POST", "/v1/completions", json=body) as response:
            final = [e for e in _stream_events(response) if e.get("usage") and not e["choices"]][-1]["usage"]
        seen_prompt, seen_completion = seen_prompt + final["prompt_tokens"], seen_completion + final["completion_tokens"]
        # A stream the client cuts after its first chunks: still billed for what vLLM made.
        # long enough that even a starved client cuts it before vLLM is done (200 was not, on 2 busy cores)
        long = _completion("globex.helpdesk.v1", stream=True, max_tokens=1800, ignore_eos=True)
        with globex.stream("POST", "/v1/completions", json=long) as response:
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        cut_prompt = first["usage"]["prompt_tokens"]
        time.sleep(1)  # the gateway notices the disconnect and meters
        total = billing.total()
        assert total["requests"] - start["requests"] == 5 and total["errors"] == start["errors"]
        assert total["prompt_tokens"] - start["prompt_tokens"] == seen_prompt + cut_prompt
        cut_completion = total["completion_tokens"] - start["completion_tokens"] - seen_completion
        assert 1 <= cut_completion < 1800, cut_completion
        metrics = _client(stack, "admin").get("/metrics").text
        assert 'farm_gateway_tokens_total{base="base",kind="completion",model="globex.helpdesk.v1",tenant="globex"}' in metrics

    def test_a_backend_killed_mid_request_gives_a_clean_error_and_the_other_base_serves(self, stack):
        umbrella, acme, b = _client(stack, "umbrella"), _client(stack, "acme"), stack["b"]
        assert umbrella.post("/v1/completions", json=_completion("umbrella.onb.v1")).status_code == 200
        long = _completion("umbrella.onb.v1", stream=True, max_tokens=1800, ignore_eos=True)
        with umbrella.stream("POST", "/v1/completions", json=long) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.killpg(b.process.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "failed mid-stream" in rest[-1] and "Traceback" not in "".join(rest)
        after = umbrella.post("/v1/completions", json=_completion("umbrella.onb.v1"))
        assert after.status_code in (502, 503) and after.json()["error"]["code"] == after.status_code
        assert "base-b" in after.json()["error"]["message"] and "Traceback" not in after.text
        assert acme.post("/v1/completions", json=_completion("acme.support.v2")).status_code == 200
        time.sleep(2)  # a health round
        assert umbrella.post("/v1/completions", json=_completion("base-b")).status_code == 503
        assert httpx.get(f"{stack['url']}/healthz").json()["healthy_backends"] == {"base": 1, "base-b": 0}


def test_gateway_file_paths_are_relative_to_it_and_errors_name_the_field(tmp_path, base_model_dir, monkeypatch):
    from farm.serving.gateway_config import GatewayConfigError, load_gateway_config

    shutil.copytree(base_model_dir, tmp_path / "models" / "tiny")
    (tmp_path / "conf").mkdir()
    good = tmp_path / "conf" / "gateway.yaml"
    good.write_text("registry: {store: ../reg}\nbases:\n  - name: tiny\n    base_model: ../models/tiny\n"
                    "    backends: [{url: 'http://127.0.0.1:8000/', api_key_env: K}]\n")
    config = load_gateway_config(good)
    assert config.registry.store == str(tmp_path / "reg")
    assert config.bases[0].base_model == str(tmp_path / "models" / "tiny")  # as the sweep publishes it
    assert config.bases[0].backends[0].url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="K is not set"):
        config.bases[0].backends[0].api_key()
    # a catalog URL (it carries a password) comes from the environment, never from the file
    assert config.registry.catalog is None
    monkeypatch.setenv("FARM_REGISTRY_CATALOG", "postgresql+psycopg://farm:secret@db:5432/farm")
    assert load_gateway_config(good).registry.catalog == "postgresql+psycopg://farm:secret@db:5432/farm"
    from farm.service.runner import load_service_config

    service = tmp_path / "conf" / "service.yaml"
    service.write_text("base_model: {name_or_path: ../models/tiny}\nregistry: {store: ../reg}\n")
    assert load_service_config(service).registry.catalog == "postgresql+psycopg://farm:secret@db:5432/farm"
    monkeypatch.delenv("FARM_REGISTRY_CATALOG")
    bad = tmp_path / "conf" / "bad.yaml"
    bad.write_text("bases:\n  - name: tiny\n    base_model: x\n    backends: [{url: 'ftp://x'}]\n"
                   "limits: {default: {requests_per_minute: 0}}\n")
    with pytest.raises(GatewayConfigError) as refused:
        load_gateway_config(bad)
    assert "bases.0.backends.0.url" in str(refused.value) and "limits.default.requests_per_minute" in str(refused.value)
    from typer.testing import CliRunner

    from farm.cli import app

    result = CliRunner().invoke(app, ["gateway", "--config", str(bad)])
    assert result.exit_code == 2 and "bases.0.backends.0.url" in result.stderr


def test_token_commands_create_list_and_revoke(tmp_path):
    from typer.testing import CliRunner

    from farm.cli import app

    runner, store = CliRunner(), str(tmp_path / "reg")
    assert runner.invoke(app, ["registry", "token", "list", "--store", store]).exit_code == 2  # reads never create
    created = runner.invoke(app, ["registry", "token", "create", "--tenant", "acme", "--expires-in", "2h",
                                  "--label", "ci", "--json", "--store", store])
    assert created.exit_code == 0, created.output
    token = json.loads(created.stdout)["token"]
    catalog = Catalog(default_catalog_url(store))
    assert catalog.principal(token).tenant == "acme"
    listed = json.loads(runner.invoke(app, ["registry", "token", "list", "--json", "--store", store]).stdout)
    assert [(t["tenant"], t["label"], t["revoked"]) for t in listed] == [("acme", "ci", False)]
    assert token not in json.dumps(listed) and listed[0]["expires_at"]
    assert runner.invoke(app, ["registry", "token", "revoke", str(listed[0]["id"]), "--store", store]).exit_code == 0
    assert catalog.principal(token) is None
    assert runner.invoke(app, ["registry", "token", "revoke", "99", "--store", store]).exit_code == 2
    bad = runner.invoke(app, ["registry", "token", "create", "--tenant", "acme", "--expires-in", "soon",
                              "--store", store])
    assert bad.exit_code != 0 and "--expires-in" in bad.stderr

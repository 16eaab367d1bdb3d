"""``farm gateway``: the OpenAI-compatible front door, the only serving surface tenants reach.

    farm gateway --config gateway.yaml --port 8080
    curl http://127.0.0.1:8080/v1/completions -H "Authorization: Bearer $TENANT_TOKEN" \\
         -d '{"model": "acme.support@production", "prompt": "Hello", "max_tokens": 16}'

Routes (everything else answers 404):

    POST /v1/completions, /v1/chat/completions   tenant token; streamed (SSE) or not
    GET  /v1/models                              the caller's adapters and the bases it may use
    GET  /healthz                                no token; healthy backends per base
    GET  /metrics                                admin token; Prometheus text
    /v1/files, /v1/fine_tuning/jobs[/...]        tenant token; the fine-tuning API (farm.service.api)

A request's identity is its bearer token (the registry's tokens: admin, or one tenant). Its
``model`` is a base's public name, a serve name (``acme.support.v3``) or an alias reference
(``acme.support@production``). The gateway resolves it in the registry's catalog on every
request, so an alias move counts from the next request, and sends vLLM only the immutable serve
name. Another tenant's adapter, a malformed name and a missing one get the same 404, after the
same catalog lookup. Limits (requests and tokens per minute, requests in flight, a ceiling on
``max_tokens``) are checked before anything reaches vLLM; usage comes from vLLM's ``usage``
(streams always ask for it) and is metered per tenant and model. Errors are OpenAI-shaped
``{"error": {"message", "type", "param", "code"}}`` and never carry a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from farm.methods import servable_by
from farm.registry.catalog import Catalog, Principal, ServingTarget
from farm.registry.names import NameError_, parse_ref
from farm.serving.errors import APIError
from farm.serving.errors import handled as handled_as_openai
from farm.serving.gateway_config import BackendConfig, BaseConfig, GatewayConfig
from farm.serving.limits import Limiter
from farm.serving.metering import Meter

logger = logging.getLogger("farm.gateway")

#: Request fields passed to vLLM (OpenAI's, plus vLLM's sampling extras). Anything else is a
#: 400: vLLM also accepts fields a tenant must not set (``priority``, ``cache_salt``,
#: ``kv_transfer_params``, ``chat_template``, ``request_id``, ...).
COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "return_token_ids",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "stop_token_ids"})
FIELDS = {
    "completions": COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"},
    "chat/completions": COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                                         "tool_choice", "parallel_tool_calls", "response_format",
                                         "add_generation_prompt", "continue_final_message"},
}
MAX_MODEL_NAME = 300


#: The gateway's errors are the shared OpenAI-shaped ones (farm.serving.errors).
GatewayError = APIError


def not_found(model: str) -> GatewayError:
    """The one answer for a missing model, another tenant's, and a malformed name."""
    return GatewayError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


# -- backends ---------------------------------------------------------------------------------------
#: How errors and /healthz name a backend kind.
KIND_NAMES = {"vllm": "vLLM", "transformers": "transformers"}


class Backend:
    """One server (vLLM or the transformers backend): a pooled HTTP client, requests in flight,
    and whether it answers.

    aiohttp, not httpx, on this path: it costs a fraction of httpx's CPU per request, and the
    gateway's own CPU is what it adds to every answer.
    """

    def __init__(self, config: BackendConfig, timeout_s: float):
        self.config, self.url, self.timeout_s, self.kind = config, config.url, timeout_s, config.kind
        key = config.api_key()
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None
        self.outstanding = 0
        self.healthy = True  # until a check or a request says otherwise

    @property
    def session(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use inside the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.url, headers=self.headers, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=5.0),
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30))
        return self._session

    async def check(self) -> bool:
        """GET /health, once more after a short pause if it fails (one blip is not an outage)."""
        for attempt in range(2):
            try:
                async with self.session.get("/health", timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                    if response.status == 200:
                        self.healthy = True
                        return True
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if attempt == 0:
                await asyncio.sleep(0.2)
        self.healthy = False
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class BasePool:
    """The backends of one base model, balanced by fewest requests in flight."""

    def __init__(self, config: BaseConfig, timeout_s: float):
        self.config = config
        self.backends = [Backend(b, timeout_s) for b in config.backends]
        self.kinds = [kind for kind in ("vllm", "transformers") if any(b.kind == kind for b in self.backends)]
        self._turn = 0

    def pick(self, kind: str) -> Backend | None:
        """The healthy ``kind`` backend with the fewest requests in flight (ties in turn); None if none."""
        healthy = [b for b in self.backends if b.healthy and b.kind == kind]
        if not healthy:
            return None
        self._turn += 1
        count = len(healthy)
        return min((healthy[(self._turn + i) % count] for i in range(count)), key=lambda b: b.outstanding)


@dataclass(frozen=True)
class Target:
    """Where a request goes: a base's pool and the kind of backend, the name the backend knows,
    and the name it is metered under."""

    pool: BasePool
    vllm_model: str
    metered_as: str
    kind: str = "vllm"


# -- the application ----------------------------------------------------------------------------------
class Gateway:
    """State shared by the routes: catalog, pools, limiter, meter, token cache."""

    def __init__(self, config: GatewayConfig, catalog: Catalog):
        from prometheus_client import CollectorRegistry, Histogram

        from farm.registry.api import TokenCache

        self.config, self.catalog = config, catalog
        self.pools = {b.name: BasePool(b, config.request_timeout_s) for b in config.bases}
        self.by_base_model = {pool.config.base_model: pool for pool in self.pools.values()}
        self.limiter = Limiter(config.limits)
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.meter = Meter(catalog, self.prometheus)
        self.latency = Histogram("farm_gateway_request_seconds", "time to the response head",
                                 ["route"], registry=self.prometheus)
        self.tokens = TokenCache(catalog, config.token_cache_s)
        # serve name -> (expiry, Target): serve names never change meaning, only vanish (delete,
        # archive), which counts within target_cache_s. Aliases are never cached.
        self._targets: dict[str, tuple[float, Target]] = {}
        self._salt_key = secrets.token_bytes(32)  # per process: a tenant's salt is stable while it runs
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.check_backends()
        self._tasks = [asyncio.create_task(self._every(self.config.health_interval_s, self.check_backends)),
                       asyncio.create_task(self._every(self.config.usage_flush_s, self.flush_usage))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush_usage()
        for pool in self.pools.values():
            for backend in pool.backends:
                await backend.close()

    @staticmethod
    async def _every(seconds: float, action) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()
            except Exception:  # a failed round must not end the loop
                logger.exception("periodic %s failed", getattr(action, "__name__", action))

    async def check_backends(self) -> None:
        backends = [b for pool in self.pools.values() for b in pool.backends]
        await asyncio.gather(*(b.check() for b in backends))

    async def flush_usage(self) -> int:
        return await asyncio.to_thread(self.meter.flush)

    # -- identity and names -------------------------------------------------------------------------
    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        found = None
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            found = self.tokens.cached(token) or await asyncio.to_thread(self.tokens.lookup, token)
        if found is None:
            raise GatewayError(401, "missing, unknown, expired or revoked bearer token", "authentication_error",
                               headers={"WWW-Authenticate": "Bearer"})
        return found

    def cache_salt(self, tenant: str | None) -> str:
        """Per-tenant prefix-cache salt: tenants never share cached prompt blocks."""
        return hmac.new(self._salt_key, (tenant or "*admin*").encode(), hashlib.sha256).hexdigest()[:32]

    async def target(self, model: Any, who: Principal) -> Target:
        """Resolve the request's ``model`` for ``who``; 404 for anything it may not use."""
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "model: required, a string", param="model")
        if len(model) > MAX_MODEL_NAME:
            raise not_found(model[:MAX_MODEL_NAME])
        pool = self.pools.get(model)
        if pool is not None and pool.config.allows(who.tenant):
            return Target(pool, pool.config.vllm_name, model, pool.kinds[0])
        try:
            ref = parse_ref(model)
        except NameError_:
            ref = None
        own = ref is not None and (who.is_admin or ref.tenant == who.tenant)
        if own and ref.version is not None:
            hit = self._targets.get(model)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        # Otherwise one catalog lookup whatever the name, so that "malformed", "missing" and
        # "another tenant's" take the same path and the same time (the cache above serves only
        # the caller's own names, so it says nothing about anyone else's).
        found: ServingTarget | None = await asyncio.to_thread(
            self.catalog.serving_target, ref.tenant if ref else "-", ref.adapter if ref else "-",
            ref.version if ref else 0, ref.alias if ref else None)
        if not own or found is None:
            raise not_found(model)
        pool = self.by_base_model.get(found.base_model)
        if pool is None:
            raise GatewayError(400, f"adapter {found.serve_name} was trained for base model "
                                    f"{found.base_model!r}, which this gateway does not serve", param="model")
        # vLLM when it can serve the version, else the transformers backend (every method).
        kinds = [kind for kind in servable_by(found.method, found.servable_by_vllm) if kind in pool.kinds]
        if not kinds:
            raise GatewayError(400, f"adapter {found.serve_name} cannot be served by vLLM: "
                                    f"{found.not_servable_reason}; base {pool.config.name!r} has no transformers "
                                    "backend on this gateway", param="model")
        target = Target(pool, found.serve_name, found.serve_name, kinds[0])
        if ref.version is not None and self.config.target_cache_s > 0:
            if len(self._targets) > 10_000:
                self._targets.clear()
            self._targets[model] = (time.monotonic() + self.config.target_cache_s, target)
        return target


async def _read_body(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise GatewayError(413, f"request body over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise GatewayError(400, "body: not valid JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "body: expected a JSON object")
    return body


def _int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise GatewayError(400, f"{name}: expected an integer {'>= ' + str(low) if high is None else f'in {low}..{high}'}"
                                f", got {json.dumps(value)[:40]}", param=name)
    return value


def _estimate_prompt_tokens(body: dict, kind: str) -> int:
    """A cheap upper-ish guess (4 bytes a token) used for admission; corrected by vLLM's usage."""
    text = body.get("prompt") if kind == "completions" else body.get("messages")
    return max(1, math.ceil(len(json.dumps(text, ensure_ascii=False).encode()) / 4))


def check_body(body: dict, kind: str, max_tokens_ceiling: int | None) -> tuple[int, bool]:
    """Validate ``body`` in place for ``kind``; returns (most tokens it may generate, stream)."""
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise GatewayError(400, f"{unknown[0]}: not a field this gateway accepts", param=unknown[0])
    if kind == "completions":
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(p, (str, int)) and not isinstance(p, bool) for p in prompt))):
            raise GatewayError(400, "prompt: required, a string or a list of strings or token ids", param="prompt")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise GatewayError(400, "messages: required, a non-empty list of objects", param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "stream: expected true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise GatewayError(400, "stream_options: an object, only with stream: true", param="stream_options")
    n = _int_field(body, "n", 1, 16) or 1
    field = "max_completion_tokens" if kind == "chat/completions" and "max_completion_tokens" in body else "max_tokens"
    requested = _int_field(body, field, 1)
    if max_tokens_ceiling is not None:
        if requested is not None and requested > max_tokens_ceiling:
            raise GatewayError(400, f"{field}: {requested} is over this tenant's ceiling of {max_tokens_ceiling}",
                               param=field)
        if requested is None:
            body[field] = requested = max_tokens_ceiling
    return (requested or 0) * n, stream


def _usage_of(payload: dict) -> tuple[int, int] | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class _StreamUsage:
    """Follows an SSE stream and keeps its last complete event that carries ``usage``.

    Only that event is parsed, once, at the end (vLLM's usage is cumulative), so following a
    stream costs a substring search per chunk.
    """

    def __init__(self):
        self.tail = b""
        self.event: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        data = self.tail + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return
        complete, self.tail = data[:end], data[end + 2:]
        at = complete.rfind(b'"usage"')
        if at >= 0:
            start = complete.rfind(b"\n\n", 0, at)
            self.event = complete[start + 2 if start >= 0 else 0:]

    @property
    def last(self) -> tuple[int, int] | None:
        if self.event is None:
            return None
        for line in reversed(self.event.split(b"\n")):
            if line.startswith(b"data: "):
                with contextlib.suppress(ValueError):
                    return _usage_of(json.loads(line[6:]))
        return None


async def _proxy(gateway: Gateway, request: Request, kind: str) -> Response:
    started = time.perf_counter()
    who = await gateway.principal(request)
    body = await _read_body(request, gateway.config.max_body_bytes)
    limits = gateway.limiter.limits_of(who.tenant)
    max_new, stream = check_body(body, kind, limits.max_tokens)
    target = await gateway.target(body.get("model"), who)
    estimate = _estimate_prompt_tokens(body, kind) + max_new
    refusal = gateway.limiter.admit(who.tenant, estimate)
    if refusal is not None:
        raise GatewayError(429, f"rate limit: {refusal.message}; retry after {refusal.retry_after_s} s",
                           "rate_limit_exceeded", headers={"Retry-After": str(refusal.retry_after_s)})
    tenant = who.tenant or "admin"
    base = target.pool.config.name
    body["model"] = target.vllm_model
    body["cache_salt"] = gateway.cache_salt(who.tenant)
    if stream:
        # vLLM then reports usage in every chunk, so a stream cut short is still metered. Clients
        # see those usage fields (and the final usage chunk) whether or not they asked: taking
        # them out would mean re-encoding every chunk.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    backend = target.pool.pick(target.kind)
    shown = KIND_NAMES[target.kind]
    if backend is None:
        gateway.limiter.release(who.tenant, estimate, 0)
        raise GatewayError(503, f"no healthy {shown} backend for base model {base!r}; try again later",
                           "service_unavailable")
    payload = json.dumps(body).encode()
    backend.outstanding += 1
    finished = False

    def finish(status: int, usage: tuple[int, int] | None) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        backend.outstanding -= 1
        prompt, completion = usage or (0, 0)
        gateway.limiter.release(who.tenant, estimate, prompt + completion if usage else None)
        gateway.meter.record(tenant, target.metered_as, base, status, prompt, completion)

    failed = GatewayError(502, f"the {shown} backend for base model {base!r} failed; try again", "bad_gateway")
    try:
        upstream = await backend.session.post(f"/v1/{kind}", data=payload)
    except Exception as exc:  # refused, reset, timed out, malformed answer: the backend failed
        backend.healthy = False  # the health loop brings it back when it answers again
        finish(502, None)
        logger.warning("backend %s failed: %s", backend.url, exc)
        raise failed from None
    except BaseException:  # cancelled (the server is stopping): free the slot, count the attempt
        finish(499, None)
        raise
    gateway.latency.labels(kind).observe(time.perf_counter() - started)
    if not stream or upstream.status != 200:
        try:
            content = await upstream.read()
        except Exception:
            backend.healthy = False
            finish(502, None)
            raise failed from None
        except BaseException:
            finish(499, None)
            raise
        finally:
            upstream.release()
        status = upstream.status
        if status >= 500:  # vLLM's own failures are not passed through (they may carry details)
            finish(status, None)
            raise GatewayError(502, f"the {shown} backend for base model {base!r} failed ({status})", "bad_gateway")
        usage = None
        if status == 200:
            with contextlib.suppress(ValueError):
                usage = _usage_of(json.loads(content))
        finish(status, usage)
        return Response(content, status_code=status, media_type="application/json")

    follower = _StreamUsage()

    async def relay():
        status = 200
        completed = False
        try:
            async for chunk in upstream.content.iter_any():
                follower.feed(chunk)
                yield chunk
            completed = True
        except Exception as exc:  # the backend died or answered garbage mid-stream
            status = 502
            backend.healthy = False
            logger.warning("backend %s failed mid-stream: %s", backend.url, exc)
            error = {"error": {"message": f"the {shown} backend for base model {base!r} failed mid-stream",
                               "type": "bad_gateway", "param": None, "code": 502}}
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()  # drops the connection: vLLM aborts the generation
            finish(status, follower.last)

    return _RelayResponse(relay(), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _RelayResponse(StreamingResponse):
    """A stream that stops reading from vLLM as soon as the client goes away.

    Starlette's own response, under an ASGI 2.4 server, notices a disconnect only when a write
    fails; this one listens for it, cancels the relay (closing the upstream request, so vLLM
    aborts the generation) and always closes the relay, whose ``finally`` meters what was made.
    """

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def create_gateway_app(config: GatewayConfig, catalog: Catalog) -> Starlette:
    """The gateway's ASGI app (its lifespan starts health checks and usage flushing)."""
    gateway = Gateway(config, catalog)

    def handled(handler):
        return handled_as_openai(handler, logger)

    async def completions(request: Request) -> Response:
        return await _proxy(gateway, request, "completions")

    async def chat(request: Request) -> Response:
        return await _proxy(gateway, request, "chat/completions")

    async def models(request: Request) -> Response:
        who = await gateway.principal(request)
        return JSONResponse({"object": "list", "data": await asyncio.to_thread(_models_of, gateway, who)})

    async def healthz(request: Request) -> Response:
        bases = {name: sum(b.healthy for b in pool.backends) for name, pool in gateway.pools.items()}
        return JSONResponse({"status": "ok" if all(bases.values()) else "degraded", "healthy_backends": bases})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        who = await gateway.principal(request)
        if not who.is_admin:
            raise GatewayError(403, "/metrics needs an admin token", "permission_error")
        return Response(generate_latest(gateway.prometheus), media_type=CONTENT_TYPE_LATEST)

    async def anything_else(request: Request) -> Response:
        raise GatewayError(404, "not found", "NotFoundError")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    from farm.service.api import fine_tuning_routes

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(routes=[
        Route("/v1/completions", handled(completions), methods=["POST"]),
        Route("/v1/chat/completions", handled(chat), methods=["POST"]),
        Route("/v1/models", handled(models), methods=["GET"]),
        Route("/healthz", handled(healthz), methods=["GET"]),
        Route("/metrics", handled(metrics), methods=["GET"]),
        *fine_tuning_routes(gateway, handled),  # farm.service.api: files and fine-tuning jobs
        Route("/{path:path}", handled(anything_else), methods=methods),
    ], lifespan=lifespan)
    app.state.gateway = gateway
    return app


def _models_of(gateway: Gateway, who: Principal) -> list[dict]:
    """OpenAI model objects: bases ``who`` may call, then its versions this gateway's backends can
    serve, and their alias refs."""
    from sqlalchemy import select

    from farm.registry.catalog import AdapterRow, AliasRow, TenantRow, VersionRow

    now = int(datetime.now(timezone.utc).timestamp())
    data = [{"id": pool.config.name, "object": "model", "created": now, "owned_by": "farm"}
            for pool in gateway.pools.values() if pool.config.allows(who.tenant)]
    query = (select(VersionRow.id, VersionRow.serve_name, VersionRow.created_at, TenantRow.name, AdapterRow.name,
                    VersionRow.base_model, VersionRow.method, VersionRow.servable_by_vllm)
             .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
             .join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
             .where(VersionRow.status == "active", VersionRow.base_model.in_(list(gateway.by_base_model)))
             .order_by(TenantRow.name, AdapterRow.name, VersionRow.number))
    if not who.is_admin:
        query = query.where(TenantRow.name == who.tenant)
    with gateway.catalog.engine.connect() as connection:
        # Only versions a backend of their base on this gateway can serve.
        rows = [row[:6] for row in connection.execute(query).all()
                if set(servable_by(row[6], row[7])) & set(gateway.by_base_model[row[5]].kinds)]
        aliases = connection.execute(select(AliasRow.version_id, AliasRow.name).where(
            AliasRow.version_id.in_([r[0] for r in rows]))).all() if rows else []
    by_version: dict[int, list[str]] = {}
    for version_id, alias in aliases:
        by_version.setdefault(version_id, []).append(alias)
    for version_id, serve, created, tenant, adapter, base_model in rows:
        root = gateway.by_base_model[base_model].config.name
        stamp = int(created.timestamp()) if created else now
        data.append({"id": serve, "object": "model", "created": stamp, "owned_by": tenant, "root": root})
        for alias in sorted(by_version.get(version_id, [])):
            data.append({"id": f"{tenant}.{adapter}@{alias}", "object": "model", "created": stamp,
                         "owned_by": tenant, "root": root, "parent": serve})
    return data


def serve_gateway(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8080,
                  log_level: str = "info") -> None:
    """Run the gateway with uvicorn until interrupted."""
    import uvicorn

    from farm.registry.core import default_catalog_url

    catalog = Catalog(config.registry.catalog or default_catalog_url(config.registry.store))
    uvicorn.run(create_gateway_app(config, catalog), host=host, port=port, log_level=log_level,
                access_log=False)

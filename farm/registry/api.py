"""The registry's HTTP query API (FastAPI): search, read, download, alias, publish, archive.

    app = create_app(open_registry(".farm/registry"))
    serve(registry, host="127.0.0.1", port=8700)          # or: farm registry serve

This module builds the app: its state, the ``_Guard`` middleware (body limits, metrics), the
error handlers and the routers. The routes live in ``farm/registry/routes/``, one module per
group (``ops``, ``versions``, ``aliases``, ``uploads``, ``admin``), with the dependencies they
share in ``routes/deps.py`` and the request and response models in ``routes/models.py``.

Every route but ``/healthz``, ``/docs`` and ``/openapi.json`` needs
``Authorization: Bearer <token>`` (tokens come from ``farm registry token create``). An admin
token sees every tenant; a tenant token sees only its own tenant, which always comes from the
token and never from the URL: another tenant's adapter answers 404 with the same body as a
missing one. Every error is JSON ``{"detail": "..."}``.

Uploads are streamed to a temporary folder (multipart parts are spooled to disk), the body is
counted as it arrives and refused with 413 past the limit, file names are checked to be plain
names before anything is written, and the version is then validated and published by
``Registry.publish`` (422 with the reason when refused).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm.registry.catalog import Catalog, Principal
from farm.registry.core import Registry
from farm.registry.names import NameError_
from farm.registry.routes import admin, aliases, ops, uploads, versions
from farm.registry.validate import PublishError

DEFAULT_MAX_UPLOAD_BYTES = 2 * 2**30   # a whole publish request (all files together)
MAX_JSON_BODY_BYTES = 64 * 2**10       # every other request body (alias updates)
TOKEN_CACHE_SECONDS = 0.0              # 0: a revoked or expired token fails on its next request
_PUBLISH_PATH = re.compile(r"^/v1/adapters/[^/]+/[^/]+/versions/?$")  # routes/uploads.py: the upload limit


class TokenCache:
    """token hash -> principal for a few seconds (only hits are kept, so the cache stays small).

    Shared by the registry API and ``farm gateway``: a revoked or expired token stops working
    within ``ttl_s``.
    """

    def __init__(self, catalog: Catalog, ttl_s: float, max_entries: int = 4096):
        self.catalog, self.ttl_s, self.max_entries = catalog, ttl_s, max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()

    def cached(self, token: str) -> Principal | None:
        """The principal if a fresh lookup of ``token`` is cached (no database access)."""
        if not token or len(token) > 512:
            return None
        with self._lock:
            hit = self._entries.get(self._key(token))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def lookup(self, token: str) -> Principal | None:
        """The principal ``token`` names (from the cache while fresh, else the catalog), or None."""
        if not token or len(token) > 512:
            return None
        key = self._key(token)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        principal = self.catalog.principal(token)
        if principal is not None and self.ttl_s > 0:
            with self._lock:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[key] = (now + self.ttl_s, principal)
        return principal


class _Guard:
    """Pure ASGI middleware: request-body size limit (413) and Prometheus request metrics."""

    def __init__(self, app, *, upload_limit: int, body_limit: int, metrics: dict):
        self.app, self.upload_limit, self.body_limit, self.metrics = app, upload_limit, body_limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}
        publish = scope.get("method") == "POST" and bool(_PUBLISH_PATH.match(scope.get("path", "")))
        limit = self.upload_limit if publish else self.body_limit

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = None
            for key, value in scope.get("headers", []):
                if key == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        length = None
            if length is not None and length > limit:
                response = JSONResponse({"detail": f"request body over the limit of {limit} bytes"},
                                        status_code=413, headers={"Connection": "close"})
                await response(scope, receive, send_status)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise HTTPException(status_code=413,
                                            detail=f"request body over the limit of {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics["requests"].labels(method, template, str(status["code"])).inc()
            self.metrics["latency"].labels(method, template).observe(time.perf_counter() - started)


# -- errors: always {"detail": "..."} -------------------------------------------------------------
async def _http_error(request: Request, exc: StarletteHTTPException):
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


async def _unprocessable_error(request: Request, exc: Exception):
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def _internal_error(request: Request, exc: Exception):
    return JSONResponse({"detail": "internal error"}, status_code=500)


_ERROR_HANDLERS = ((StarletteHTTPException, _http_error),  # FastAPI's HTTPException is a subclass
                   (RequestValidationError, _validation_error),
                   (NameError_, _unprocessable_error),
                   (PublishError, _unprocessable_error),
                   (Exception, _internal_error))


# -- the application ----------------------------------------------------------------------------
def create_app(registry: Registry, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               token_cache_s: float = TOKEN_CACHE_SECONDS) -> FastAPI:
    """The query API over ``registry`` (one app per registry; metrics are per app)."""
    app = FastAPI(title="Adapter farm registry", version="1",
                  description="Query, download, alias and publish adapter versions. "
                              "Bearer tokens: admin, or one tenant (sees only itself).")
    # What the routes' dependencies read (routes/deps.py).
    app.state.registry = registry
    app.state.tokens = TokenCache(registry.catalog, token_cache_s)
    app.state.max_upload_bytes = max_upload_bytes
    app.state.prometheus, metrics = _metrics(registry)
    app.add_middleware(_Guard, upload_limit=max_upload_bytes, body_limit=MAX_JSON_BODY_BYTES, metrics=metrics)
    for exc_class, handler in _ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    for module in (ops, versions, aliases, uploads, admin):
        app.include_router(module.router)
    return app


def _metrics(registry: Registry):
    """This app's Prometheus registry, and the request counter and latency histogram ``_Guard`` fills."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    prom = CollectorRegistry(auto_describe=True)
    metrics = {
        "requests": Counter("farm_registry_requests", "HTTP requests by route template and status",
                            ["method", "route", "status"], registry=prom),
        "latency": Histogram("farm_registry_request_seconds", "HTTP request latency",
                             ["method", "route"], registry=prom),
    }
    versions_gauge = Gauge("farm_registry_versions", "versions in the catalog (all statuses)", registry=prom)

    def _count_versions() -> float:
        try:
            return float(registry.catalog.stats()["versions"] or 0)
        except Exception:  # a scrape must not fail because the catalog is briefly unavailable
            return float("nan")

    versions_gauge.set_function(_count_versions)
    return prom, metrics


def serve(registry: Registry, host: str = "127.0.0.1", port: int = 8700, *,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, log_level: str = "info") -> None:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(registry, max_upload_bytes=max_upload_bytes), host=host, port=port,
                log_level=log_level)

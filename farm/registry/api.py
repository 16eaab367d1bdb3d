"""The registry's HTTP query API (FastAPI): search, read, download, alias, publish, archive.

    app = create_app(open_registry(".farm/registry"))
    serve(registry, host="127.0.0.1", port=8700)          # or: farm registry serve

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
import math
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm.registry import validate
from farm.registry.catalog import Catalog, Principal
from farm.registry.core import NotFound, Registry, VersionInfo
from farm.registry.names import (NameError_, Ref, check_name, check_text, parse_metric_filter,  # noqa: F401
                                 parse_ref, serve_name)
from farm.registry.validate import PublishError

DEFAULT_MAX_UPLOAD_BYTES = 2 * 2**30   # a whole publish request (all files together)
MAX_JSON_BODY_BYTES = 64 * 2**10       # every other request body (alias updates)
TOKEN_CACHE_SECONDS = 0.0              # 0: a revoked or expired token fails on its next request
MAX_VERSION = 999_999_999              # serve names allow up to nine digits
_PUBLISH_PATH = re.compile(r"^/v1/adapters/[^/]+/[^/]+/versions/?$")
# Documented in the OpenAPI schema (so clients and fuzzers see the shape); enforced in the
# handlers with readable messages (names.py is the authority).
_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
_SERVE_PATTERN = rf"^{_NAME}\.{_NAME}\.v[1-9][0-9]{{0,8}}$"
_REF_PATTERN = rf"^{_NAME}\.{_NAME}(\.v[1-9][0-9]{{0,8}}|@{_NAME})$"


# -- response models (they are what /docs and /openapi.json describe) -------------------------
class VersionList(BaseModel):
    items: list[VersionInfo]
    total: int
    limit: int
    offset: int


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., ge=1, le=MAX_VERSION, description="version number the alias points at")
    note: dict | None = Field(None, description="why (a JSON object of at most 16 KiB, for example an eval "
                              "gate's decision and figures), kept with the move in the alias history")


class AliasEvent(BaseModel):
    alias: str
    version: int | None = Field(..., description="the version the alias pointed at after the move; null: removed")
    previous: int | None
    at: str | None
    note: dict | None


class AliasOut(BaseModel):
    alias: str
    version: int
    previous: int | None
    serve_name: str


class GcOut(BaseModel):
    removed: list[str]
    dry_run: bool


class SkippedOut(BaseModel):
    path: str
    reason: str


class ReindexOut(BaseModel):
    versions: int
    skipped: list[SkippedOut] = Field(default_factory=list, description="what could not be parsed (left as it is)")


class ErrorOut(BaseModel):
    detail: str


_ERRORS = {401: {"model": ErrorOut, "description": "missing or unknown token"},
           404: {"model": ErrorOut, "description": "no such version, or one this token may not see"},
           422: {"model": ErrorOut, "description": "invalid name, reference or parameter"}}


# -- helpers shared with the CLI ----------------------------------------------------------------
class PublishForm(BaseModel):
    """The publish form's text fields, parsed: each typed and bounded, unknown fields refused.

    Sent as form text by a tenant: ``metrics``, ``training`` and ``lineage`` are JSON objects
    (finite numbers, bounded depth and size), ``aliases`` a comma-separated list (default
    ``latest``), an empty optional field the same as an absent one.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, max_length=500)
    base_architecture: Optional[str] = Field(None, max_length=200)
    method: Optional[str] = Field(None, max_length=32)
    metrics: dict = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    lineage: dict = Field(default_factory=dict)
    aliases: tuple[str, ...] = ("latest",)

    @field_validator("base_architecture", "method", mode="before")
    @classmethod
    def _empty_is_absent(cls, value):
        return value or None

    @field_validator("base_model", "base_architecture", "method")
    @classmethod
    def _plain_text(cls, value, info):
        return value if value is None else check_text(info.field_name, value, 500)

    @field_validator("metrics", "training", "lineage", mode="before")
    @classmethod
    def _json(cls, value, info):
        return value if isinstance(value, dict) else _json_object(info.field_name, value)

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: dict):
        for key in value:
            check_text("metric name", key, 100)
        return value

    @field_validator("lineage")
    @classmethod
    def _lineage(cls, value: dict):
        for key, max_len in (("sweep_id", 200), ("dataset_fingerprint", 64)):
            if value.get(key) is not None:
                if not isinstance(value[key], str):
                    raise ValueError(f"lineage.{key}: must be a string")
                check_text(f"lineage.{key}", value[key], max_len)
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases(cls, value):
        names = tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value
        for alias in names:
            check_name("alias", alias)
        return names

    @classmethod
    def parse(cls, fields: dict[str, str]) -> "PublishForm":
        """The checked form, or ``ValueError`` naming the first bad field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "form"
            message = str(first.get("ctx", {}).get("error") or first["msg"])
            raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None


def _check_json_value(field: str, value: Any, depth: int = 0) -> None:
    """JSON that is stored and echoed: finite numbers, UTF-8 strings, bounded nesting."""
    if depth > 32:
        raise ValueError(f"{field}: nested too deeply")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"{field}: numbers must be finite and below 1e308")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field}: strings must be valid UTF-8") from None
        return
    if isinstance(value, list):
        for item in value:
            _check_json_value(field, item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(field, key, depth + 1)
            _check_json_value(f"{field}.{key}", item, depth + 1)
        return
    raise ValueError(f"{field}: unsupported value {type(value).__name__}")


def _json_object(field: str, raw: str | None) -> dict:
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a JSON object")
    _check_json_value(field, value)
    return value


def _utc(value: datetime | None, field: str) -> datetime | None:
    """Naive times are taken as UTC; aware ones are converted to UTC (the catalog's zone)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValueError(f"{field}: out of range") from None


def _name_param(kind: str):
    return PathParam(..., max_length=63, description=f"{kind} name", json_schema_extra={"pattern": f"^{_NAME}$"})


def _ref_param(serve_only: bool = False):
    if serve_only:
        return PathParam(..., max_length=200, description="serve name tenant.adapter.vN",
                         json_schema_extra={"pattern": _SERVE_PATTERN})
    return PathParam(..., max_length=200, description="serve name tenant.adapter.vN or alias reference "
                     "tenant.adapter@alias", json_schema_extra={"pattern": _REF_PATTERN})


def _not_found(what: str) -> HTTPException:
    # The body names only what the caller asked for, so "missing" and "another tenant's"
    # cannot be told apart.
    return HTTPException(status_code=404, detail=f"not found: {what}")


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


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


# -- the application ----------------------------------------------------------------------------
def create_app(registry: Registry, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               token_cache_s: float = TOKEN_CACHE_SECONDS) -> FastAPI:
    """The query API over ``registry`` (one app per registry; metrics are per app)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    app = FastAPI(title="Adapter farm registry", version="1",
                  description="Query, download, alias and publish adapter versions. "
                              "Bearer tokens: admin, or one tenant (sees only itself).")
    app.state.registry = registry
    tokens = TokenCache(registry.catalog, token_cache_s)
    bearer = HTTPBearer(auto_error=False, description="farm registry token (farm registry token create)")

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
    app.add_middleware(_Guard, upload_limit=max_upload_bytes, body_limit=MAX_JSON_BODY_BYTES, metrics=metrics)

    # -- errors: always {"detail": "..."} --------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException is a subclass
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            loc = ".".join(str(part) for part in error.get("loc", ()))
            parts.append(f"{loc}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(NameError_)
    async def _name_error(request: Request, exc: NameError_):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(PublishError)
    async def _publish_error(request: Request, exc: PublishError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": "internal error"}, status_code=500)

    # -- auth ------------------------------------------------------------------------------------
    def principal(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        found = tokens.lookup(credentials.credentials) if credentials is not None else None
        if found is None:
            raise HTTPException(status_code=401, detail="missing or unknown bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return found

    def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.is_admin:
            raise HTTPException(status_code=403, detail="this route needs an admin token")
        return who

    def may_write(who: Principal, tenant: str, what: str) -> None:
        if not who.is_admin and who.tenant != tenant:
            raise _not_found(what)

    def resolve(ref: str, who: Principal):
        try:
            return registry.resolve(ref, who)
        except NotFound:
            raise _not_found(ref) from None

    def serve_ref(ref: str) -> Ref:
        parsed = parse_ref(ref)
        if parsed.version is None:
            raise _unprocessable(f"{ref!r}: use a serve name (tenant.adapter.vN), not an alias reference")
        return parsed

    # -- operations (health open; metrics need an admin token) ------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics (admin token)"}})
    def prometheus(who: Principal = Depends(admin)) -> Response:
        """Prometheus text; behind an admin token (version counts are no tenant's business)."""
        return Response(generate_latest(prom), media_type=CONTENT_TYPE_LATEST)

    # -- versions ----------------------------------------------------------------------------------
    @app.get("/v1/versions", response_model=VersionList, tags=["versions"], responses=_ERRORS)
    def list_versions(
        who: Principal = Depends(principal),
        tenant: str | None = Query(None, description="admin only; a tenant token always sees itself",
                                   json_schema_extra={"pattern": f"^{_NAME}$"}),
        adapter: str | None = Query(None, json_schema_extra={"pattern": f"^{_NAME}$"}),
        base_model: str | None = Query(None, max_length=500),
        method: str | None = Query(None, max_length=32),
        servable: bool | None = Query(None, description="servable by vLLM"),
        served_by: Literal["vllm", "transformers"] | None = Query(None, description="a backend that can serve it"),
        alias: str | None = Query(None, description="only versions this alias points at",
                                  json_schema_extra={"pattern": f"^{_NAME}$"}),
        sweep_id: str | None = Query(None, max_length=200),
        status: Literal["active", "archived", "any"] = Query("active"),
        metric: list[str] = Query([], description="repeatable: NAME<op>VALUE, e.g. eval_loss<=3.5"),
        created_after: datetime | None = Query(None),
        created_before: datetime | None = Query(None),
        sort: str = Query("-created_at", max_length=120,
                          description="created_at, version or metric:<name>; '-' for descending"),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> dict:
        """Search versions with filters, sorting and pagination (total counts every match)."""
        try:
            for kind, value in (("tenant", tenant), ("adapter", adapter), ("alias", alias)):
                if value is not None:
                    check_name(kind, value)
            for field, value in (("base_model", base_model), ("method", method), ("sweep_id", sweep_id),
                                 ("sort", sort)):
                if value is not None:
                    check_text(field, value, 500)
            filters = dict(
                tenant=tenant, adapter=adapter, base_model=base_model, method=method, servable=servable,
                served_by=served_by,
                alias=alias, sweep_id=sweep_id, status=None if status == "any" else status,
                metric_filters=[parse_metric_filter(m) for m in metric],
                created_after=_utc(created_after, "created_after"),
                created_before=_utc(created_before, "created_before"),
                sort=sort, limit=limit, offset=offset)
            items, total = registry.search(who, **filters)
        except ValueError as exc:  # NameError_, bad filter, bad sort
            raise _unprocessable(str(exc)) from None
        return {"items": [item.to_dict() for item in items], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/versions/{ref}", response_model=VersionInfo, tags=["versions"], responses=_ERRORS)
    def get_version(ref: str = _ref_param(),
                    who: Principal = Depends(principal)) -> dict:
        """One version by serve name or alias reference."""
        return resolve(ref, who).to_dict()

    @app.get("/v1/versions/{ref}/files/{name}", tags=["versions"], response_class=StreamingResponse,
             responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                         "description": "the file, streamed"}})
    async def download_file(ref: str = _ref_param(),
                            name: str = PathParam(..., max_length=200, description="a file of the version"),
                            who: Principal = Depends(principal)):
        """Stream one file of a version; ``X-Content-SHA256`` carries its manifest digest."""
        info = await run_in_threadpool(resolve, ref, who)
        entry = info.files.get(name)
        if entry is None:
            raise _not_found(f"{ref}/{name}")

        def first_chunk():
            chunks = registry.iter_file(info, name)
            try:
                return chunks, next(chunks, b"")
            except (FileNotFoundError, OSError):
                raise _not_found(f"{ref}/{name}") from None

        chunks, first = await run_in_threadpool(first_chunk)

        def body():
            if first:
                yield first
            yield from chunks

        return StreamingResponse(body(), media_type="application/octet-stream", headers={
            "Content-Length": str(entry["size"]), "X-Content-SHA256": entry["sha256"],
            "Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/v1/versions/{ref}/archive", response_model=VersionInfo, tags=["lifecycle"], responses=_ERRORS)
    def archive_version(ref: str = _ref_param(serve_only=True), who: Principal = Depends(principal)) -> dict:
        """Hide a version from default searches and drop its aliases (files stay)."""
        parsed = serve_ref(ref)
        try:
            registry.archive(parsed.tenant, parsed.adapter, parsed.version, who)
            return registry.get(parsed.tenant, parsed.adapter, parsed.version, principal=who).to_dict()
        except NotFound:
            raise _not_found(ref) from None

    @app.delete("/v1/versions/{ref}", status_code=204, response_class=Response, tags=["lifecycle"],
                responses=_ERRORS)
    def delete_version(ref: str = _ref_param(serve_only=True), who: Principal = Depends(principal)) -> Response:
        """Delete a version; its number is never reused."""
        parsed = serve_ref(ref)
        try:
            registry.delete(parsed.tenant, parsed.adapter, parsed.version, who)
        except NotFound:
            raise _not_found(ref) from None
        return Response(status_code=204)

    # -- aliases -----------------------------------------------------------------------------------
    @app.put("/v1/adapters/{tenant}/{adapter}/aliases/{alias}", response_model=AliasOut, tags=["aliases"],
             responses=_ERRORS)
    def set_alias(body: AliasBody, tenant: str = _name_param("tenant"),
                  adapter: str = _name_param("adapter"), alias: str = _name_param("alias"),
                  who: Principal = Depends(principal)) -> dict:
        """Point (or move) an alias at a version; answers the version it pointed at before."""
        check_name("tenant", tenant), check_name("adapter", adapter), check_name("alias", alias)
        what = serve_name(tenant, adapter, body.version)
        may_write(who, tenant, what)
        try:
            previous, number = registry.set_alias(tenant, adapter, alias, body.version, who, note=body.note)
        except NotFound:
            raise _not_found(what) from None
        except ValueError as exc:  # the note
            raise _unprocessable(str(exc)) from None
        return {"alias": alias, "version": number, "previous": previous,
                "serve_name": serve_name(tenant, adapter, number)}

    @app.get("/v1/adapters/{tenant}/{adapter}/alias-history", response_model=list[AliasEvent], tags=["aliases"],
             responses=_ERRORS)
    def alias_history(tenant: str = _name_param("tenant"), adapter: str = _name_param("adapter"),
                      alias: str | None = Query(None, max_length=63, description="only this alias's moves"),
                      who: Principal = Depends(principal)) -> list[dict]:
        """Every move of the adapter's aliases, oldest first, with the note each was made with."""
        check_name("tenant", tenant), check_name("adapter", adapter)
        if alias is not None:
            check_name("alias", alias)
        try:
            return registry.alias_history(tenant, adapter, alias, who)
        except NotFound:
            raise _not_found(f"{tenant}.{adapter}") from None

    @app.delete("/v1/adapters/{tenant}/{adapter}/aliases/{alias}", status_code=204, response_class=Response,
                tags=["aliases"], responses=_ERRORS)
    def delete_alias(tenant: str = _name_param("tenant"), adapter: str = _name_param("adapter"),
                     alias: str = _name_param("alias"), who: Principal = Depends(principal)) -> Response:
        """Remove an alias (the version stays)."""
        check_name("tenant", tenant), check_name("adapter", adapter), check_name("alias", alias)
        what = f"{tenant}.{adapter}@{alias}"
        may_write(who, tenant, what)
        try:
            registry.delete_alias(tenant, adapter, alias, who)
        except NotFound:
            raise _not_found(what) from None
        return Response(status_code=204)

    # -- publish -----------------------------------------------------------------------------------
    publish_body = {"parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
        "type": "string", "minLength": 8, "maxLength": 200},
        "description": "a retry with the key of a committed publish answers with that version"}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files", "base_model"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": f"{validate.CONFIG_FILE}, {validate.WEIGHTS_FILE}, optionally README.md"},
            "base_model": {"type": "string", "description": "base model the adapter was trained on"},
            "base_architecture": {"type": "string", "description": "e.g. LlamaForCausalLM (for servability)"},
            "method": {"type": "string", "description": "PEFT method the trainer used (lora, dora, ia3, prefix, "
                                                        "prompt, qlora); default: what adapter_config.json shows"},
            "metrics": {"type": "string", "description": "JSON object, e.g. {\"eval_loss\": 1.2}"},
            "training": {"type": "string", "description": "JSON object"},
            "lineage": {"type": "string", "description": "JSON object (sweep_id, dataset_fingerprint, ...)"},
            "aliases": {"type": "string", "description": "comma-separated aliases to point here (default latest)"},
        }}}}}}

    @app.post("/v1/adapters/{tenant}/{adapter}/versions", status_code=201, response_model=VersionInfo,
              tags=["versions"], openapi_extra=publish_body,
              responses={**_ERRORS, 413: {"model": ErrorOut, "description": "upload over the size limit"}})
    async def publish(request: Request, tenant: str = _name_param("tenant"),
                      adapter: str = _name_param("adapter"), who: Principal = Depends(principal)) -> dict:
        """Publish an adapter folder (multipart upload) as the next version of tenant/adapter."""
        check_name("tenant", tenant), check_name("adapter", adapter)
        may_write(who, tenant, f"{tenant}.{adapter}")
        # The body is read only now, after the token was checked; the guard middleware counts it.
        form = await request.form(max_files=8, max_fields=16, max_part_size=1 << 20)
        folder = None
        try:
            uploads: dict[str, UploadFile] = {}
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    name = value.filename or ""
                    if name in uploads:
                        raise _unprocessable(f"{name!r}: uploaded twice")
                    uploads[name] = value
                elif key in fields:
                    raise _unprocessable(f"form field {key!r} given twice")
                else:
                    fields[key] = value
            try:
                # names (plain names, no pickles, only adapter files) and sizes, before writing anything
                validate.validate_files({name: upload.size or 0 for name, upload in uploads.items()},
                                        max_upload_bytes)
                checked = PublishForm.parse(fields)
            except ValueError as exc:  # PublishError and NameError_ are ValueErrors too
                raise _unprocessable(str(exc)) from None

            key = request.headers.get("idempotency-key")
            if key is not None and not 8 <= len(key) <= 200:
                raise _unprocessable("Idempotency-Key: 8-200 characters")

            def save_and_publish():
                nonlocal folder
                folder = registry.store.new_spool()  # gc removes it if this server dies mid-request
                paths = {}
                for name, upload in uploads.items():
                    if Path(name).name != name or name in ("", ".", ".."):  # validate_files already refused these
                        raise _unprocessable(f"{name!r}: file names must be plain names")
                    path = folder / name
                    upload.file.seek(0)
                    with path.open("xb") as out:
                        shutil.copyfileobj(upload.file, out, 1 << 20)
                    paths[name] = path
                _check_config_bounds(paths[validate.CONFIG_FILE])
                return registry.publish(tenant, adapter, paths, **checked.model_dump(), max_file_bytes=max_upload_bytes,
                                        detect_architecture=False, idempotency_key=key)

            try:
                info = await run_in_threadpool(save_and_publish)
            except (PublishError, NameError_) as exc:
                raise _unprocessable(str(exc)) from None
            except FileExistsError as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
            return info.to_dict()
        finally:
            await form.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    # -- admin -------------------------------------------------------------------------------------
    @app.post("/v1/admin/gc", response_model=GcOut, tags=["admin"],
              responses={**_ERRORS, 403: {"model": ErrorOut, "description": "not an admin token"}})
    def gc(older_than_s: float = Query(3600.0, ge=0, le=10**9), dry_run: bool = Query(False),
           who: Principal = Depends(admin)) -> dict:
        """Remove incomplete folders left by crashed publishes."""
        return {"removed": registry.gc(older_than_s=older_than_s, dry_run=dry_run), "dry_run": dry_run}

    @app.post("/v1/admin/reindex", response_model=ReindexOut, tags=["admin"],
              responses={**_ERRORS, 403: {"model": ErrorOut, "description": "not an admin token"}})
    def reindex(who: Principal = Depends(admin)) -> dict:
        """Rebuild the catalog's versions from the store's manifests."""
        report = registry.reindex()
        return {"versions": report.versions, "skipped": report.skipped}

    return app


def _check_config_bounds(path: Path) -> None:
    """Refuse numbers the catalog's integer columns cannot hold (``check_config`` checks the rest)."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PublishError(f"{validate.CONFIG_FILE}: not valid JSON ({exc})") from None
    if isinstance(config, dict):
        rank = config.get("r")
        if isinstance(rank, int) and not isinstance(rank, bool) and not 1 <= rank <= 2**31 - 1:
            raise PublishError(f"{validate.CONFIG_FILE}: field 'r' out of range ({rank})")
        try:
            _check_json_value(validate.CONFIG_FILE, config)
        except ValueError as exc:
            raise PublishError(str(exc)) from None


def serve(registry: Registry, host: str = "127.0.0.1", port: int = 8700, *,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, log_level: str = "info") -> None:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(registry, max_upload_bytes=max_upload_bytes), host=host, port=port,
                log_level=log_level)

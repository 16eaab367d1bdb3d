"""Versions: search, read one, download a file, archive, delete."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from fastapi import APIRouter, Path as PathParam, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from farm.registry.core import NotFound, VersionInfo
from farm.registry.names import check_name, check_text, parse_metric_filter
from farm.registry.routes.deps import (PrincipalDep, RegistryDep, not_found, resolve, serve_ref,
                                       unprocessable)
from farm.registry.routes.models import ERRORS, NAME_PATTERN, VersionList, ref_param

router = APIRouter(responses=ERRORS)


@router.get("/v1/versions", response_model=VersionList, tags=["versions"])
def list_versions(
    registry: RegistryDep,
    who: PrincipalDep,
    tenant: str | None = Query(None, description="admin only; a tenant token always sees itself",
                               json_schema_extra={"pattern": NAME_PATTERN}),
    adapter: str | None = Query(None, json_schema_extra={"pattern": NAME_PATTERN}),
    base_model: str | None = Query(None, max_length=500),
    method: str | None = Query(None, max_length=32),
    servable: bool | None = Query(None, description="servable by vLLM"),
    served_by: Literal["vllm", "transformers"] | None = Query(None, description="a backend that can serve it"),
    alias: str | None = Query(None, description="only versions this alias points at",
                              json_schema_extra={"pattern": NAME_PATTERN}),
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
        raise unprocessable(str(exc)) from None
    return {"items": [item.to_dict() for item in items], "total": total, "limit": limit, "offset": offset}


@router.get("/v1/versions/{ref}", response_model=VersionInfo, tags=["versions"])
def get_version(registry: RegistryDep, who: PrincipalDep, ref: str = ref_param()) -> dict:
    """One version by serve name or alias reference."""
    return resolve(registry, ref, who).to_dict()


@router.get("/v1/versions/{ref}/files/{name}", tags=["versions"], response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the file, streamed"}})
async def download_file(registry: RegistryDep, who: PrincipalDep, ref: str = ref_param(),
                        name: str = PathParam(..., max_length=200, description="a file of the version")):
    """Stream one file of a version; ``X-Content-SHA256`` carries its manifest digest."""
    info = await run_in_threadpool(resolve, registry, ref, who)
    entry = info.files.get(name)
    if entry is None:
        raise not_found(f"{ref}/{name}")

    def first_chunk():
        chunks = registry.iter_file(info, name)
        try:
            return chunks, next(chunks, b"")
        except (FileNotFoundError, OSError):
            raise not_found(f"{ref}/{name}") from None

    chunks, first = await run_in_threadpool(first_chunk)

    def body():
        if first:
            yield first
        yield from chunks

    return StreamingResponse(body(), media_type="application/octet-stream", headers={
        "Content-Length": str(entry["size"]), "X-Content-SHA256": entry["sha256"],
        "Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/v1/versions/{ref}/archive", response_model=VersionInfo, tags=["lifecycle"])
def archive_version(registry: RegistryDep, who: PrincipalDep, ref: str = ref_param(serve_only=True)) -> dict:
    """Hide a version from default searches and drop its aliases (files stay)."""
    parsed = serve_ref(ref)
    try:
        registry.archive(parsed.tenant, parsed.adapter, parsed.version, who)
        return registry.get(parsed.tenant, parsed.adapter, parsed.version, principal=who).to_dict()
    except NotFound:
        raise not_found(ref) from None


@router.delete("/v1/versions/{ref}", status_code=204, response_class=Response, tags=["lifecycle"])
def delete_version(registry: RegistryDep, who: PrincipalDep, ref: str = ref_param(serve_only=True)) -> Response:
    """Delete a version; its number is never reused."""
    parsed = serve_ref(ref)
    try:
        registry.delete(parsed.tenant, parsed.adapter, parsed.version, who)
    except NotFound:
        raise not_found(ref) from None
    return Response(status_code=204)


def _utc(value: datetime | None, field: str) -> datetime | None:
    """Naive times are taken as UTC; aware ones are converted to UTC (the catalog's zone)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValueError(f"{field}: out of range") from None

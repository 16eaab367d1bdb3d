"""Admin-only maintenance: garbage-collect crashed publishes, rebuild the catalog from the store."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from farm.registry.routes.deps import RegistryDep, admin
from farm.registry.routes.models import ERRORS, ErrorOut, GcOut, ReindexOut

router = APIRouter(tags=["admin"], dependencies=[Depends(admin)],
                   responses={**ERRORS, 403: {"model": ErrorOut, "description": "not an admin token"}})


@router.post("/v1/admin/gc", response_model=GcOut)
def gc(registry: RegistryDep, older_than_s: float = Query(3600.0, ge=0, le=10**9),
       dry_run: bool = Query(False)) -> dict:
    """Remove incomplete folders left by crashed publishes."""
    return {"removed": registry.gc(older_than_s=older_than_s, dry_run=dry_run), "dry_run": dry_run}


@router.post("/v1/admin/reindex", response_model=ReindexOut)
def reindex(registry: RegistryDep) -> dict:
    """Rebuild the catalog's versions from the store's manifests."""
    report = registry.reindex()
    return {"versions": report.versions, "skipped": report.skipped}

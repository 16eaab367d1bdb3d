"""Aliases: point or move one at a version, remove one, and the history of their moves."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from farm.registry.core import NotFound
from farm.registry.names import check_name, serve_name
from farm.registry.routes.deps import PrincipalDep, RegistryDep, may_write, not_found, unprocessable
from farm.registry.routes.models import ERRORS, AliasBody, AliasEvent, AliasOut, name_param

router = APIRouter(tags=["aliases"], responses=ERRORS)


@router.put("/v1/adapters/{tenant}/{adapter}/aliases/{alias}", response_model=AliasOut)
def set_alias(body: AliasBody, registry: RegistryDep, who: PrincipalDep, tenant: str = name_param("tenant"),
              adapter: str = name_param("adapter"), alias: str = name_param("alias")) -> dict:
    """Point (or move) an alias at a version; answers the version it pointed at before."""
    check_name("tenant", tenant), check_name("adapter", adapter), check_name("alias", alias)
    what = serve_name(tenant, adapter, body.version)
    may_write(who, tenant, what)
    try:
        previous, number = registry.set_alias(tenant, adapter, alias, body.version, who, note=body.note)
    except NotFound:
        raise not_found(what) from None
    except ValueError as exc:  # the note
        raise unprocessable(str(exc)) from None
    return {"alias": alias, "version": number, "previous": previous,
            "serve_name": serve_name(tenant, adapter, number)}


@router.get("/v1/adapters/{tenant}/{adapter}/alias-history", response_model=list[AliasEvent])
def alias_history(registry: RegistryDep, who: PrincipalDep, tenant: str = name_param("tenant"),
                  adapter: str = name_param("adapter"),
                  alias: str | None = Query(None, max_length=63, description="only this alias's moves")) -> list[dict]:
    """Every move of the adapter's aliases, oldest first, with the note each was made with."""
    check_name("tenant", tenant), check_name("adapter", adapter)
    if alias is not None:
        check_name("alias", alias)
    try:
        return registry.alias_history(tenant, adapter, alias, who)
    except NotFound:
        raise not_found(f"{tenant}.{adapter}") from None


@router.delete("/v1/adapters/{tenant}/{adapter}/aliases/{alias}", status_code=204, response_class=Response)
def delete_alias(registry: RegistryDep, who: PrincipalDep, tenant: str = name_param("tenant"),
                 adapter: str = name_param("adapter"), alias: str = name_param("alias")) -> Response:
    """Remove an alias (the version stays)."""
    check_name("tenant", tenant), check_name("adapter", adapter), check_name("alias", alias)
    what = f"{tenant}.{adapter}@{alias}"
    may_write(who, tenant, what)
    try:
        registry.delete_alias(tenant, adapter, alias, who)
    except NotFound:
        raise not_found(what) from None
    return Response(status_code=204)

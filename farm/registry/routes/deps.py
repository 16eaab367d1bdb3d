"""What the routes share: the registry and the caller (from ``request.app.state``), and auth checks.

``create_app`` sets ``app.state.registry`` (the ``Registry``), ``app.state.tokens`` (the
``TokenCache``), ``app.state.max_upload_bytes`` and ``app.state.prometheus`` (the metrics'
``CollectorRegistry``) once; nothing here keeps state of its own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farm.registry.catalog import Principal
from farm.registry.core import NotFound, Registry, VersionInfo
from farm.registry.names import Ref, parse_ref

bearer = HTTPBearer(auto_error=False, description="farm registry token (farm registry token create)")


def not_found(what: str) -> HTTPException:
    """404 ``not found: <what>``."""
    # The body names only what the caller asked for, so "missing" and "another tenant's"
    # cannot be told apart.
    return HTTPException(status_code=404, detail=f"not found: {what}")


def unprocessable(message: str) -> HTTPException:
    """422 with ``message`` as the detail."""
    return HTTPException(status_code=422, detail=message)


# -- dependencies -------------------------------------------------------------------------------
async def get_registry(request: Request) -> Registry:
    """The app's registry."""
    # async: a plain attribute read needs no worker thread
    return request.app.state.registry


def principal(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    """The caller named by the bearer token; 401 when it is missing or unknown."""
    found = request.app.state.tokens.lookup(credentials.credentials) if credentials is not None else None
    if found is None:
        raise HTTPException(status_code=401, detail="missing or unknown bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """The caller, who must hold an admin token (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(status_code=403, detail="this route needs an admin token")
    return who


RegistryDep = Annotated[Registry, Depends(get_registry)]
PrincipalDep = Annotated[Principal, Depends(principal)]
AdminDep = Annotated[Principal, Depends(admin)]


# -- checks inside handlers ---------------------------------------------------------------------
def may_write(who: Principal, tenant: str, what: str) -> None:
    """404 for ``what`` unless ``who`` is an admin or ``tenant`` itself."""
    if not who.is_admin and who.tenant != tenant:
        raise not_found(what)


def resolve(registry: Registry, ref: str, who: Principal) -> VersionInfo:
    """The version ``ref`` (serve name or alias reference) names, as ``who`` sees it; 404 otherwise."""
    try:
        return registry.resolve(ref, who)
    except NotFound:
        raise not_found(ref) from None


def serve_ref(ref: str) -> Ref:
    """``ref`` parsed; 422 unless it is a serve name (the routes that change a version need one)."""
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise unprocessable(f"{ref!r}: use a serve name (tenant.adapter.vN), not an alias reference")
    return parsed

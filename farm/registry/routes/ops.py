"""Operations: ``/healthz`` (open) and ``/metrics`` (Prometheus text, admin token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from farm.registry.routes.deps import AdminDep

router = APIRouter(tags=["ops"])


# No docstring: a route's docstring is its OpenAPI description, and this one has none.
@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics (admin token)"}})
def prometheus(request: Request, who: AdminDep) -> Response:
    """Prometheus text; behind an admin token (version counts are no tenant's business)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.prometheus), media_type=CONTENT_TYPE_LATEST)

"""vLLM's OpenAI API server with every route but inference closed: what ``farm serve`` runs.

    python -m farm.serving.vllm_server --model /models/base --enable-lora ...   (vLLM's own flags)

vLLM 0.32 serves far more than inference, and checks its API key only on ``/v1``, ``/v2``,
``/inference`` and ``/cohere`` paths (read in its API server's code): ``/invocations`` picks any adapter from
a header, ``/adapters`` loads any local folder under any name, ``/tokenize`` and ``/metrics``
answer anyone. And it asks LoRA resolvers (the farm's registry plugin) only when
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is on, the same switch that adds the routes which load
adapters from paths. So this launcher turns the switch on inside the vLLM process alone and
puts an allowlist in front of vLLM's app, outermost, before any of vLLM's own middleware:

    GET  /health                 liveness (no key; says nothing about adapters)
    GET  /v1/models              key checked by vLLM
    POST /v1/completions         key checked by vLLM
    POST /v1/chat/completions    key checked by vLLM

Everything else answers 404 whatever the method, key or headers, and the registry resolver
stays the only way an adapter name becomes weights. The server is still meant to listen on
loopback (or a private interface) behind ``farm gateway``, which adds tenant scoping.
"""

from __future__ import annotations

import json
import logging
import sys

logger = logging.getLogger("vllm.farm_server")  # under "vllm": vLLM's log handlers show it

#: (method, path) pairs vLLM may answer. Paths are matched exactly: no prefixes, no templates.
ALLOWED_ROUTES = frozenset({
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
})


class RouteAllowlist:
    """Pure ASGI middleware: requests outside ``ALLOWED_ROUTES`` get 404 and never reach vLLM."""

    def __init__(self, app, allowed: frozenset[tuple[str, str]] = ALLOWED_ROUTES):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http" or (scope.get("method", ""), scope.get("path", "")) not in self.allowed:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"error": {"message": "not found", "type": "NotFoundError", "code": 404}}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def served_routes(app) -> list[tuple[str, str]]:
    """(methods, path) of every route vLLM registered, for the start-up log and the tests."""
    routes = []
    for route in getattr(app, "routes", []):
        methods = ",".join(sorted(getattr(route, "methods", None) or ["*"]))
        routes.append((methods, getattr(route, "path", repr(route))))
    return sorted(routes, key=lambda r: r[1])


def _locked_build_app(original):
    def build_app(*args, **kwargs):
        app = original(*args, **kwargs)
        closed = [f"{m} {p}" for m, p in served_routes(app)
                  if not any((method, p) in ALLOWED_ROUTES for method in m.split(","))]
        logger.warning("farm: vLLM routes closed by the allowlist: %s", ", ".join(closed))
        # Outermost, before vLLM's own middleware. vLLM's SageMaker bootstrap has already built
        # the middleware stack (add_middleware refuses then): insert and let Starlette rebuild it.
        from starlette.middleware import Middleware

        app.user_middleware.insert(0, Middleware(RouteAllowlist))
        app.middleware_stack = None
        return app

    return build_app


def main(argv: list[str] | None = None) -> None:
    """Run vLLM's OpenAI API server (``argv``: vLLM's flags) behind the route allowlist."""
    import os

    # Resolvers are consulted only with this switch on; its load/unload routes stay closed.
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
    from vllm.entrypoints.launchers.api_server import entry

    entry.build_app = _locked_build_app(entry.build_app)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    entry.main()


if __name__ == "__main__":
    main()

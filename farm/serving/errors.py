"""OpenAI-shaped error answers, shared by the gateway and the transformers backend.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status; an unexpected
exception becomes a 500 that carries a reference to the log line, never a trace.
"""

from __future__ import annotations

import logging
import uuid


class APIError(Exception):
    """An answer to the client: OpenAI-shaped error with a status (and headers)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status, headers=self.headers)


def handled(handler, logger: logging.Logger):
    """A Starlette endpoint running ``handler``: ``APIError`` answered as it says, anything else a
    500 naming a reference that the log line (with the trace) carries."""
    async def endpoint(request):
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except Exception:
            reference = uuid.uuid4().hex[:12]
            logger.exception("internal error %s", reference)
            return APIError(500, f"internal error (reference {reference})", "internal_error").response()

    return endpoint

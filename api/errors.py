"""One envelope for every error, FastAPI's own included, produced in one place."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import InferatechError
from core.logs import log_context

log = logging.getLogger("inferatech.api")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HTTP_CODES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILED",
    403: "AUTHORIZATION_FAILED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMIT_EXCEEDED",
    503: "SERVICE_UNAVAILABLE",
}


# Another body for the errors of the routes under a prefix (OpenAI's error object under
# /openai/): (request, status, code, message, details) → response.
ErrorShape = Callable[[Request, int, str, str, dict[str, Any]], JSONResponse]


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "")) or "unknown"


def envelope(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error body; carries the route's rate-limit headers once the key was admitted."""
    body = {
        "error": {"code": code, "message": message, "details": details or {}},
        "request_id": request_id_of(request),
    }
    extra = {**getattr(request.state, "response_headers", {}), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=extra)


class RequestIdMiddleware:
    """Accepts a sane `X-Request-ID` or generates one; echoes it on every response.

    The id is also the log context of everything the request does (`core.logs`), and rides
    along in the Celery tasks it queues.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_OK.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        with log_context(request_id=rid):
            await self.app(scope, receive, send_with_id)


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return f"{first['field']}: {first['message']}", errors


def is_outage(exc: BaseException) -> bool:
    """Database, broker or Redis unreachable: the client should retry, it is not a bug."""
    import redis.exceptions
    import sqlalchemy.exc
    from kombu.exceptions import OperationalError as KombuOperationalError

    outages = (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        KombuOperationalError,
        ConnectionError,
    )
    return isinstance(exc, outages) or (
        isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    )


def install_error_handlers(app: FastAPI, shapes: Mapping[str, ErrorShape] | None = None) -> None:
    """Every error through one place; routes under a prefix of `shapes` get that body."""
    by_prefix = dict(shapes or {})

    def respond(
        request: Request,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        for prefix, shape in by_prefix.items():
            if request.url.path.startswith(prefix):
                response = shape(request, status, code, message, details or {})
                extra = {**getattr(request.state, "response_headers", {}), **(headers or {})}
                response.headers.update(extra)
                return response
        return envelope(request, status, code, message, details, headers)

    @app.exception_handler(InferatechError)
    async def _ours(request: Request, exc: InferatechError) -> JSONResponse:
        return respond(request, exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, errors = _validation_message(exc)
        return respond(request, 400, "INVALID_REQUEST", message, {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "INVALID_REQUEST")
        return respond(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            log.warning("dependency unavailable: %s", type(exc).__name__)
            return respond(
                request, 503, "SERVICE_UNAVAILABLE", "a backing service is unavailable; retry"
            )
        # Outside the middleware's log context by now: name the request explicitly.
        log.exception("unhandled error", extra={"request_id": request_id_of(request)})
        return respond(request, 500, "INTERNAL_ERROR", "internal error; quote the request_id")

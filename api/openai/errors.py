"""OpenAI's error object for the `/openai/v1` routes, so official clients raise their usual types.

`{"error": {"message", "type", "param", "code"}}`: the status picks the client's exception
(401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 400 BadRequestError,
429 RateLimitError, 5xx InternalServerError); `code` is our own machine-readable code.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

PREFIX = "/openai/"
# OpenAI answers a bad key with 401 (our other routes say 403, as they always have).
_STATUS = {"AUTHENTICATION_FAILED": 401}
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def openai_error(
    request: Request, status: int, code: str, message: str, details: dict[str, Any]
) -> JSONResponse:
    status = _STATUS.get(code, status)
    errors = details.get("errors") or []
    param = errors[0]["field"] if errors and errors[0]["field"] != "body" else None
    body = {
        "error": {"message": message, "type": error_type(status), "param": param, "code": code},
        "request_id": str(getattr(request.state, "request_id", "")) or "unknown",
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)

"""The OpenAPI document at `/openapi.json`: every route with its auth and its error codes.

FastAPI describes paths, bodies and success responses; this adds what a client generator and
a reader need on top: the security scheme(s) each route takes (`AUTH_RULES`, checked in order;
a route no rule covers fails the build of the document, so a new route cannot go out
undocumented), the error codes it may answer by HTTP status in our envelope (OpenAI's object
under `/openai/v1`), the rate-limit headers of the routes that run jobs, and the WebSocket.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from core import errors

SCHEMES: dict[str, dict[str, Any]] = {
    "ApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key `ik_…`, scoped to one model (or one prompt router).",
    },
    "AccountToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The account token `iat_…` that `POST /v1/accounts` returns once.",
    },
    "OperatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`INFERATECH_OPERATOR_TOKEN` (operators only).",
    },
    "StorageEventsSecret": {
        "type": "http",
        "scheme": "bearer",
        "description": "`INFERATECH_STORAGE_EVENTS_SECRET` (object-storage notifications).",
    },
    "MetricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`INFERATECH_METRICS_TOKEN`, when set; otherwise `/metrics` is open.",
    },
    "StripeSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "Stripe-Signature",
        "description": "Stripe's signature of the raw body (`INFERATECH_STRIPE_WEBHOOK_SECRET`).",
    },
}

# (method or "*", path pattern, schemes: any one of them is enough; [] = public).
AUTH_RULES: list[tuple[str, str, list[str]]] = [
    ("GET", r"^/(healthz|readyz)$", []),
    ("GET", r"^/metrics$", ["MetricsToken", ""]),  # "": optional
    ("POST", r"^/v1/accounts$", []),  # signup
    ("PUT", r"^/v1/uploads/\{token\}$", []),  # the signed token in the URL is the credential
    ("POST", r"^/v1/storage/events$", ["StorageEventsSecret"]),
    ("POST", r"^/v1/billing/webhooks/stripe$", ["StripeSignature"]),
    ("GET", r"^/v1/workers$", ["OperatorToken"]),
    ("PUT", r"^/v1/accounts/\{account_id\}/stripe-customer$", ["OperatorToken"]),
    ("PUT", r"^/v1/keys/\{key_id\}/billed-customer$", ["OperatorToken"]),
    ("GET", r"^/v1/billing/events$", ["OperatorToken"]),
    ("GET", r"^/v1/(jobs|batches)/", ["ApiKey", "AccountToken"]),
    ("POST", r"^/v1/(jobs|batches)/\{\w+\}/cancel$", ["ApiKey", "AccountToken"]),
    ("*", r"^/v1/(infer|jobs|sessions|batches|ws)\b", ["ApiKey"]),
    ("*", r"^/openai/v1/", ["ApiKey"]),
    ("*", r"^/v1/", ["AccountToken"]),
]

# Routes that start a job: admission (rate limits), model scope and the job's own errors.
JOB_ROUTES = re.compile(
    r"^/(v1/(infer|jobs|ws)|openai/v1/(chat/completions|completions|embeddings))$"
)
JOB_CODES = [
    "MODEL_NOT_FOUND",
    "MODEL_NOT_READY",
    "ROUTER_NOT_FOUND",
    "BILLING_INACTIVE",
    "RATE_LIMIT_EXCEEDED",
    "BUDGET_EXCEEDED",
    "SESSION_NOT_FOUND",
    "SESSION_BUSY",
    "CONTEXT_LENGTH_EXCEEDED",
    "CHAT_TEMPLATE_MISSING",
    "UNSUPPORTED_FOR_MODEL",
    "INFERENCE_FAILED",
    "TIMEOUT",
]
# Extra codes by path (a regex on the templated path).
PATH_CODES: list[tuple[str, list[str]]] = [
    (r"^/v1/jobs/", ["JOB_NOT_FOUND"]),
    (
        r"^/v1/batches",
        [
            "BATCH_NOT_FOUND",
            "MODEL_NOT_FOUND",
            "ROUTER_NOT_FOUND",
            "RATE_LIMIT_EXCEEDED",
            "PAYLOAD_TOO_LARGE",
        ],
    ),
    (r"^/v1/sessions", ["SESSION_NOT_FOUND", "MODEL_NOT_FOUND", "MODEL_NOT_READY"]),
    (r"^/v1/routers", ["ROUTER_NOT_FOUND", "MODEL_NOT_FOUND", "MODEL_NOT_READY"]),
    (r"^/v1/models", ["MODEL_NOT_FOUND", "UPLOAD_INCOMPLETE", "PAYLOAD_TOO_LARGE"]),
    (r"^/v1/keys", ["KEY_NOT_FOUND"]),
    (r"^/v1/accounts/", ["ACCOUNT_NOT_FOUND"]),
    (r"^/v1/uploads/", ["PAYLOAD_TOO_LARGE"]),
    (r"^/v1/billing/(portal|customer)$", ["NOT_CONFIGURED"]),
    (r"^/v1/accounts$", ["SIGNUP_DISABLED"]),
]
RATE_LIMIT_HEADERS = {
    name: {"description": text, "schema": {"type": "integer"}}
    for name, text in [
        ("X-RateLimit-Limit", "requests per minute allowed to this key"),
        ("X-RateLimit-Remaining", "requests left now"),
        ("X-RateLimit-Reset", "seconds until the request bucket is full again"),
        ("X-RateLimit-Limit-Tokens", "tokens (prompt + completion) per minute"),
        ("X-RateLimit-Remaining-Tokens", "tokens left at admission"),
        ("X-RateLimit-Reset-Tokens", "seconds until the token bucket is full again"),
        ("X-RateLimit-Limit-Concurrency", "requests in flight allowed"),
        ("X-RateLimit-Remaining-Concurrency", "requests in flight still free"),
    ]
}
ENVELOPE = {
    "type": "object",
    "required": ["error", "request_id"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        },
        "request_id": {"type": "string"},
    },
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}
WEBSOCKET_PATH = {
    "get": {
        "tags": ["inference"],
        "summary": "WebSocket: streamed inferences over one connection",
        "description": (
            "Upgrade to a WebSocket. Messages are JSON text frames with `type` and `id`: "
            "client `auth` {api_key}, `inference` {the /v1/infer fields}, `cancel`, `ping`; "
            "server `auth_ok`, `accepted` {job_id}, `token` {token, index}, `complete`, `pong`, "
            "`error` {error: {code, message, details}}. Closes with 1008 on a failed or late "
            "`auth`, 1009 on a frame over 1 MiB. See the README's WebSocket section."
        ),
        "operationId": "websocket_v1_ws",
        "responses": {"101": {"description": "Switching Protocols"}},
    }
}


def status_of(code: str) -> int:
    """The HTTP status our error tree gives a code (400 for a code no class names)."""
    stack: list[type[errors.InferatechError]] = [errors.InferatechError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls.status_code
        stack.extend(cls.__subclasses__())
    return 400


def auth_of(method: str, path: str) -> list[str]:
    for rule_method, pattern, schemes in AUTH_RULES:
        if rule_method in ("*", method) and re.search(pattern, path):
            return schemes
    raise LookupError(f"no auth rule documents {method} {path}: add one to api/openapi.py")


def codes_of(method: str, path: str, schemes: list[str]) -> list[str]:
    codes = ["INVALID_REQUEST", "INTERNAL_ERROR", "SERVICE_UNAVAILABLE"]
    if any(schemes):
        codes.append("AUTHENTICATION_FAILED")
    if "ApiKey" in schemes:
        codes.append("AUTHORIZATION_FAILED")
    if method == "POST" and JOB_ROUTES.search(path):
        codes += JOB_CODES
    for pattern, extra in PATH_CODES:
        if re.search(pattern, path):
            codes += extra
    return list(dict.fromkeys(codes))


def _document(method: str, path: str, op: dict[str, Any]) -> None:
    schemes = auth_of(method.upper(), path)
    op["security"] = [{s: []} if s else {} for s in schemes]
    codes = codes_of(method.upper(), path, schemes)
    op["x-error-codes"] = codes
    schema = "OpenAIError" if path.startswith("/openai/") else "ErrorEnvelope"
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)  # validation errors are 400 INVALID_REQUEST here
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(status_of(code), []).append(code)
    if path.startswith("/openai/") and "AUTHENTICATION_FAILED" in codes:
        by_status.setdefault(401, []).append("AUTHENTICATION_FAILED")  # OpenAI clients expect 401
        by_status[403].remove("AUTHENTICATION_FAILED")
    for status, named in sorted(by_status.items()):
        if not named:
            continue
        entry: dict[str, Any] = {
            "description": ", ".join(named),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
                **RATE_LIMIT_HEADERS,
            }
        responses[str(status)] = entry
    if method == "post" and JOB_ROUTES.search(path):
        for key, success in responses.items():
            if key.startswith("2"):
                success.setdefault("headers", {}).update(RATE_LIMIT_HEADERS)


def build(app: FastAPI) -> dict[str, Any]:
    """The document: FastAPI's, with auth, error codes and the WebSocket added."""
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=(
            "Every error is `{error: {code, message, details}, request_id}` "
            "(OpenAI's error object under `/openai/v1`); each operation lists its codes in "
            "`x-error-codes` and by status."
        ),
        routes=app.routes,
    )
    spec["paths"]["/v1/ws"] = WEBSOCKET_PATH
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            _document(method, path, op)
    components = spec.setdefault("components", {})
    components["securitySchemes"] = SCHEMES
    schemas = components.setdefault("schemas", {})
    schemas["ErrorEnvelope"] = ENVELOPE
    schemas["OpenAIError"] = OPENAI_ERROR
    return spec


def install(app: FastAPI) -> None:
    """Serve `build(app)` at /openapi.json, built once on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

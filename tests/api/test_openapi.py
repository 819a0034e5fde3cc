"""`/openapi.json`: every route with its auth, its error codes and, where jobs run, its limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import openapi
from core import errors

PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("post", "/v1/accounts"),
          ("put", "/v1/uploads/{token}")}  # fmt: skip


def _known_codes() -> set[str]:
    codes, stack = set(), [errors.InferatechError]
    while stack:
        cls = stack.pop()
        codes.add(cls.code)
        stack.extend(cls.__subclasses__())
    return codes | set(errors.JOB_ERRORS)


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    document: dict[str, Any] = resp.json()
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI wraps them)."""
    for route in routes:
        if hasattr(route, "original_router"):
            inner = prefix + route.include_context.prefix
            yield from _routes(route.original_router.routes, inner)
            continue
        for method in getattr(route, "methods", None) or ["GET"]:  # a WebSocket: its upgrade
            yield method, prefix + route.path


def test_every_route_of_the_app_is_documented(client: TestClient, spec: dict[str, Any]) -> None:
    documented = {(m.upper(), p) for m, p, _ in operations(spec)}
    served = set(_routes(client.app.routes))  # type: ignore[attr-defined]
    served -= {("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")}
    served = {(m, p) for m, p in served if m != "HEAD"}
    assert ("GET", "/v1/ws") in served and ("POST", "/openai/v1/embeddings") in served
    assert served - documented == set()


def test_every_operation_names_its_auth(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    for method, path, op in operations(spec):
        security = op["security"]
        if (method, path) in PUBLIC:
            assert security == [], (method, path)
            continue
        assert security, (method, path)
        for requirement in security:
            assert set(requirement) <= set(schemes), (method, path)
    by_path = {(m, p): op["security"] for m, p, op in operations(spec)}
    assert by_path[("post", "/v1/infer")] == [{"ApiKey": []}]
    assert by_path[("get", "/v1/jobs/{job_id}")] == [{"ApiKey": []}, {"AccountToken": []}]
    assert by_path[("post", "/v1/models")] == [{"AccountToken": []}]
    assert by_path[("get", "/v1/workers")] == [{"OperatorToken": []}]
    assert by_path[("get", "/metrics")] == [{"MetricsToken": []}, {}]  # optional


def test_every_operation_lists_known_error_codes_by_status(spec: dict[str, Any]) -> None:
    known = _known_codes()
    for method, path, op in operations(spec):
        codes = op["x-error-codes"]
        assert set(codes) <= known, (method, path, set(codes) - known)
        assert "422" not in op["responses"], (method, path)  # validation errors are 400
        listed = [c for status, r in op["responses"].items() if status[0] in "45"
                  for c in r["description"].split(", ")]  # fmt: skip
        assert sorted(listed) == sorted(codes), (method, path)
        assert "503" in op["responses"] and "500" in op["responses"]


def test_job_routes_document_limits_and_job_errors(spec: dict[str, Any]) -> None:
    infer = spec["paths"]["/v1/infer"]["post"]["responses"]
    assert "RATE_LIMIT_EXCEEDED" in infer["429"]["description"]
    assert "BUDGET_EXCEEDED" in infer["429"]["description"]
    assert {"Retry-After", "X-RateLimit-Limit"} <= set(infer["429"]["headers"])
    assert "X-RateLimit-Remaining-Tokens" in infer["200"]["headers"]
    assert "MODEL_NOT_READY" in infer["409"]["description"]
    assert "CONTEXT_LENGTH_EXCEEDED" in infer["400"]["description"]
    assert infer["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    chat = spec["paths"]["/openai/v1/chat/completions"]["post"]["responses"]
    assert chat["401"]["description"] == "AUTHENTICATION_FAILED"  # what OpenAI clients expect
    assert chat["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "401" not in spec["paths"]["/v1/infer"]["post"]["responses"]


def test_a_route_without_an_auth_rule_cannot_be_documented() -> None:
    with pytest.raises(LookupError):
        openapi.auth_of("GET", "/v2/brand-new")
    assert openapi.auth_of("DELETE", "/v1/sessions/{session_id}") == ["ApiKey"]

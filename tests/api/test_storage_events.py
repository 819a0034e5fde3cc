from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api import lambda_handler
from api.main import create_app
from core.settings import get_settings
from tests.utils.factories import auth, create_account, declare, wait_for_verdict
from tests.utils.stack import StackInfo


def s3_event(bucket: str, key: str, size: int, name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """The shape S3 (and MinIO, which adds top-level keys) sends."""
    return {
        "EventName": f"s3:{name}",
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-11-22T10:00:00.000Z",
                "eventName": name,
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {
                        "key": key.replace(" ", "+"),
                        "size": size,
                        "eTag": "abc",
                        "sequencer": "0A1B",
                    },
                },
            }
        ],
    }


def _secret(stack: StackInfo) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.settings.storage_events_secret.get_secret_value()}"}


def _upload_without_complete(
    client: TestClient, token: str, gguf: Path
) -> tuple[dict[str, Any], str]:
    created = declare(client, token, "evented", {"tiny.gguf": gguf})
    (plan,) = created["uploads"]
    data = gguf.read_bytes()
    if plan["url"].startswith("http://testserver"):
        resp = client.put(plan["url"], content=data)
    else:
        resp = httpx.put(plan["url"], content=data, headers=plan["headers"])
    assert resp.status_code == 200
    return created, plan["url"]


def _object_key(stack: StackInfo, client: TestClient, token: str, model_id: str) -> str:
    acct = client.get("/v1/models", headers=auth(token))  # ensures the token works
    assert acct.status_code == 200
    from core.db import session_scope
    from core.tables import Model

    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        return f"models/{model.account_id}/{model_id}/tiny.gguf"


def test_storage_event_starts_validation_once(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    token = create_account(client)
    created, _ = _upload_without_complete(client, token, gguf_model)
    key = _object_key(stack, client, token, created["id"])
    event = s3_event("inferatech-test", key, gguf_model.stat().st_size)
    first = client.post("/v1/storage/events", json=event, headers=_secret(stack))
    assert first.status_code == 200, first.text
    assert first.json()["outcomes"][0]["status"] in ("validating", "ready")
    verdict = wait_for_verdict(client, token, created["id"])
    assert verdict["status"] == "ready"
    dup = client.post("/v1/storage/events", json=event, headers=_secret(stack))
    assert dup.status_code == 200
    assert dup.json()["outcomes"][0]["status"] == "ready"
    again = client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()
    assert again["validated_at"] == verdict["validated_at"]


def test_storage_event_for_missing_object_changes_nothing(
    client: TestClient, stack: StackInfo
) -> None:
    token = create_account(client)
    created = declare(client, token, "m", {"tiny.gguf": b"GGUF"})
    key = _object_key(stack, client, token, created["id"])
    resp = client.post("/v1/storage/events", json=s3_event("b", key, 4), headers=_secret(stack))
    assert resp.status_code == 200
    assert (
        client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()["status"]
        == "awaiting_upload"
    )


@pytest.mark.parametrize("header", [None, "Bearer wrong", "wrong", ""])
def test_storage_event_refuses_bad_secret(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = client.post(
        "/v1/storage/events", json=s3_event("b", "acct_x/mdl_y/a.gguf", 1), headers=headers
    )
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"


def test_storage_event_refuses_malformed_and_oversized_payloads(
    client: TestClient, stack: StackInfo
) -> None:
    h = _secret(stack)
    bad = client.post("/v1/storage/events", content=b"{not json", headers=h)
    assert bad.status_code == 400
    big = client.post("/v1/storage/events", content=b"[" + b"1," * 600_000 + b"1]", headers=h)
    assert big.status_code == 413
    for payload in (
        [],
        {"Records": "x"},
        {"Records": [1, None, {"s3": "x"}]},
        {"Service": "Amazon S3", "Event": "s3:TestEvent"},
    ):
        resp = client.post("/v1/storage/events", json=payload, headers=h)
        assert resp.status_code == 200
        assert resp.json()["received"] == 0


def test_storage_event_for_foreign_key_is_ignored(client: TestClient, stack: StackInfo) -> None:
    owner = create_account(client)
    created = declare(client, owner, "m", {"tiny.gguf": b"GGUF"})
    forged = f"models/acct_someoneelse/{created['id']}/tiny.gguf"
    resp = client.post("/v1/storage/events", json=s3_event("b", forged, 4), headers=_secret(stack))
    assert resp.json()["outcomes"] == [{"key": forged, "outcome": "unknown_model"}]


def test_lambda_handler_processes_s3_records(
    client: TestClient, stack: StackInfo, gguf_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = create_account(client)
    created, _ = _upload_without_complete(client, token, gguf_model)
    key = _object_key(stack, client, token, created["id"])
    monkeypatch.setattr(lambda_handler, "get_settings", lambda: stack.settings)
    event = s3_event("inferatech-test", key, gguf_model.stat().st_size)
    del event["EventName"], event["Key"]
    out = lambda_handler.handler(event, None)
    assert out["received"] == 1
    assert wait_for_verdict(client, token, created["id"])["status"] == "ready"


def test_lambda_handler_serves_http_events(
    stack: StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    get_settings.cache_clear()
    for name, value in {
        "INFERATECH_DATA_DIR": str(stack.settings.data_dir),
        "INFERATECH_REDIS_URL": stack.settings.redis_url,
    }.items():
        monkeypatch.setenv(name, value)
    event = {
        "version": "2.0", "routeKey": "$default", "rawPath": "/healthz", "rawQueryString": "",
        "headers": {"host": "x.lambda-url.us-east-1.on.aws"},
        "requestContext": {"http": {"method": "GET", "path": "/healthz", "sourceIp": "1.2.3.4", "protocol": "HTTP/1.1"},
                           "domainName": "x", "requestId": "r", "stage": "$default", "accountId": "1", "apiId": "a", "time": "t", "timeEpoch": 0},
        "isBase64Encoded": False,
    }  # fmt: skip
    asyncio.run(asyncio.sleep(0))  # leaves this thread with no event loop, as other tests may
    out = lambda_handler.handler(event, None)
    assert out["statusCode"] == 200
    assert '"ok"' in out["body"]


def test_lambda_handler_runs_an_inference(
    stack: StackInfo, gguf_ready: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's lifespan (Redis clients, worker directory) runs under Mangum too."""

    def app_for_stack() -> Any:
        app = create_app(stack.settings)
        app.dependency_overrides[get_settings] = lambda: stack.settings
        return app

    monkeypatch.setattr(lambda_handler, "create_app", app_for_stack)
    lambda_handler._http.cache_clear()
    body = {"model_id": gguf_ready["id"], "prompt": "Hi", "raw": True, "max_tokens": 4,
            "temperature": 0.0}  # fmt: skip
    event = {
        "version": "2.0", "routeKey": "$default", "rawPath": "/v1/infer", "rawQueryString": "",
        "headers": {"host": "x.lambda-url.us-east-1.on.aws", "content-type": "application/json",
                    "authorization": f"Bearer {gguf_ready['key']}"},
        "requestContext": {"http": {"method": "POST", "path": "/v1/infer", "sourceIp": "1.2.3.4", "protocol": "HTTP/1.1"},
                           "domainName": "x", "requestId": "r", "stage": "$default", "accountId": "1", "apiId": "a", "time": "t", "timeEpoch": 0},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }  # fmt: skip
    try:
        for _ in range(2):  # a warm container serves the next invocation as well
            out = lambda_handler.handler(event, None)
            assert out["statusCode"] == 200, out["body"]
            answer = json.loads(out["body"])
            assert answer["completion_tokens"] >= 1 and answer["id"].startswith("job_")
    finally:
        lambda_handler._http.cache_clear()

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import get_settings
from tests.conftest import make_settings
from tests.utils.factories import auth, create_account, spy_threads
from tests.utils.stack import StackInfo


def test_every_error_uses_the_envelope_with_request_id(client: TestClient) -> None:
    token = create_account(client)
    responses = [
        client.get("/v1/nope"),
        client.delete("/v1/accounts"),
        client.get("/v1/models/mdl_missing", headers=auth(token)),
        client.post("/v1/models", json={"bad": 1}, headers=auth(token)),
        client.get("/v1/models"),
    ]
    for resp in responses:
        body = resp.json()
        assert set(body) == {"error", "request_id"}, body
        assert set(body["error"]) == {"code", "message", "details"}
        assert body["request_id"] == resp.headers["x-request-id"]
    assert [r.status_code for r in responses] == [404, 405, 404, 400, 403]


def test_request_id_is_echoed_when_sane_and_replaced_when_not(client: TestClient) -> None:
    ok = client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert ok.headers["x-request-id"] == "trace-123"
    evil = client.get("/healthz", headers={"X-Request-ID": "a b<script>" + "x" * 300})
    assert evil.headers["x-request-id"].startswith("req_")


def test_healthz_answers_on_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Liveness takes no worker thread: a pool filled by slow sync routes does not fail it."""
    import fastapi.routing

    threaded = spy_threads(monkeypatch, fastapi.routing)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert threaded == []
    client.get("/readyz")  # a sync route: the spy sees its hop
    assert len(threaded) == 1


def test_readyz_reports_every_dependency(client: TestClient) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}


def test_readyz_is_503_when_redis_is_down(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["redis"].startswith("unavailable")
    assert resp.json()["checks"]["database"] == "ok"


def test_database_down_is_503_service_unavailable(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        database_url="postgresql://postgres@127.0.0.1:1/x",
    )
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = c.post("/v1/accounts", json={"name": "a"})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


def test_broker_down_on_complete_is_503_and_model_stays_retryable(
    client: TestClient, stack: StackInfo, tmp_path: Path
) -> None:
    from tests.utils.factories import declare, upload_files

    token = create_account(client)
    files = {"a.json": b'{"x": 1}'}
    created = declare(client, token, "m", files)
    body = upload_files(client, created, files)
    down = stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    app = create_app(down)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app, raise_server_exceptions=False) as broken:
        resp = broken.post(f"/v1/models/{created['id']}/complete", json=body, headers=auth(token))
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    status = client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()["status"]
    assert status == "awaiting_upload"

"""The `file` backend's signed upload URLs, exercised through the API (moto checks no signatures)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.db import migrate
from core.settings import Settings, get_settings
from tests.conftest import make_settings
from tests.utils.factories import auth, create_account, declare
from tests.utils.stack import system_redis_url


def _client(settings: Settings) -> TestClient:
    migrate(settings)
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


@pytest.fixture
def file_client(tmp_path: Path) -> Iterator[TestClient]:
    with _client(make_settings(tmp_path, redis_url=system_redis_url())) as c:
        yield c


def _plan_url(client: TestClient, size: int = 16) -> tuple[str, str, str]:
    token = create_account(client)
    created = declare(client, token, "m", {"model.gguf": b"G" * size})
    return created["uploads"][0]["url"], token, created["id"]


def test_upload_exact_bytes_then_complete_is_accepted(file_client: TestClient) -> None:
    url, token, mid = _plan_url(file_client)
    resp = file_client.put(url, content=b"G" * 16)
    assert resp.status_code == 200
    done = file_client.post(f"/v1/models/{mid}/complete", headers=auth(token))
    assert done.status_code == 202
    assert done.json()["files"][0]["uploaded"] is True
    assert resp.json()["size"] == 16
    assert resp.headers["etag"].strip('"') == resp.json()["etag"]


def test_upload_more_bytes_than_signed_is_refused(file_client: TestClient) -> None:
    url, _, _ = _plan_url(file_client)
    resp = file_client.put(url, content=b"G" * 17)
    assert resp.status_code == 413
    assert resp.json()["error"]["details"]["code"] in ("UPLOAD_SIZE_MISMATCH", "UPLOAD_TOO_LARGE")


def test_upload_streamed_past_declared_size_without_length_is_refused(
    file_client: TestClient,
) -> None:
    url, token, mid = _plan_url(file_client)

    def body() -> Iterator[bytes]:
        yield b"G" * 10
        yield b"G" * 10

    resp = file_client.put(url, content=body())
    assert resp.status_code == 413
    assert resp.json()["error"]["details"]["code"] == "UPLOAD_TOO_LARGE"
    done = file_client.post(f"/v1/models/{mid}/complete", headers=auth(token))
    assert done.status_code == 409  # nothing half-written was kept


def test_upload_fewer_bytes_than_signed_is_refused(file_client: TestClient) -> None:
    url, _, _ = _plan_url(file_client)
    resp = file_client.put(url, content=b"G" * 3)
    assert resp.status_code in (400, 413)
    assert resp.json()["error"]["details"]["code"] in ("UPLOAD_SIZE_MISMATCH", "UPLOAD_TOO_SMALL")


def test_upload_with_tampered_token_is_forbidden(file_client: TestClient) -> None:
    url, _, _ = _plan_url(file_client)
    prefix, token = url.rsplit("/", 1)
    payload, sig = token.split(".")
    for forged in (
        payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + sig,
        payload + "." + sig[:-1] + ("A" if sig[-1] != "A" else "B"),
        payload,
        "x.y",
        "",
    ):
        resp = file_client.put(f"{prefix}/{forged}", content=b"G" * 16)
        assert resp.status_code in (403, 404, 405), forged
        if resp.status_code == 403:
            assert resp.json()["error"]["details"]["code"] == "UPLOAD_TOKEN_INVALID"


def test_upload_with_expired_token_is_forbidden(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url=system_redis_url(), upload_url_expiry_s=-5)
    with _client(settings) as c:
        url, _, _ = _plan_url(c)
        resp = c.put(url, content=b"G" * 16)
    assert resp.status_code == 403
    assert resp.json()["error"]["details"]["code"] == "UPLOAD_URL_EXPIRED"


def test_upload_route_refuses_when_storage_is_s3(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        redis_url=system_redis_url(),
        storage_url="s3://b/p",
        s3_endpoint_url="http://127.0.0.1:9",
    )
    with _client(settings) as c:
        resp = c.put("/v1/uploads/abc.def", content=b"x")
    assert resp.status_code == 501

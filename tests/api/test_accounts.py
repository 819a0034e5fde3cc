from __future__ import annotations

from fastapi.testclient import TestClient

from core import keys
from tests.utils.factories import auth


def test_create_account_returns_token_once(client: TestClient) -> None:
    resp = client.post("/v1/accounts", json={"name": "acme"})
    assert resp.status_code == 201
    body = resp.json()
    assert body["id"].startswith("acct_")
    assert keys.parse(body["token"], keys.ACCOUNT_TOKEN_PREFIX) is not None
    listed = client.get("/v1/models", headers=auth(body["token"]))
    assert listed.status_code == 200
    assert body["token"] not in listed.text


def test_create_account_rejects_missing_or_bad_name(client: TestClient) -> None:
    for payload in ({}, {"name": ""}, {"name": "x" * 101}, {"name": "<script>"}, {"name": 5}):
        resp = client.post("/v1/accounts", json=payload)
        assert resp.status_code == 400, payload
        err = resp.json()["error"]
        assert err["code"] == "INVALID_REQUEST"
        assert "name" in err["message"]


def test_create_account_rejects_unknown_fields_and_non_json(client: TestClient) -> None:
    assert client.post("/v1/accounts", json={"name": "a", "admin": True}).status_code == 400
    resp = client.post(
        "/v1/accounts", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "INVALID_REQUEST"


def test_create_account_refused_when_signup_disabled(client: TestClient, stack) -> None:  # type: ignore[no-untyped-def]
    from core.settings import get_settings

    disabled = stack.settings.model_copy(update={"signup_enabled": False})
    client.app.dependency_overrides[get_settings] = lambda: disabled  # type: ignore[attr-defined]
    resp = client.post("/v1/accounts", json={"name": "acme"})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "SIGNUP_DISABLED"


def test_account_token_rejects_junk_wrong_checksum_and_wrong_secret(client: TestClient) -> None:
    token = client.post("/v1/accounts", json={"name": "a"}).json()["token"]
    flipped_secret = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
    forged = keys.mint(keys.ACCOUNT_TOKEN_PREFIX, "another-pepper")  # valid checksum, unknown id
    same_id_wrong_secret = (
        token.split("_")[0] + "_" + token.split("_")[1] + "_" + forged.plaintext.split("_")[2]
    )
    cases = [
        "",
        "Bearer",
        "junk",
        flipped_secret,
        forged.plaintext,
        same_id_wrong_secret,
        "x" * 5000,
    ]
    for bad in cases:
        resp = client.get("/v1/models", headers={"Authorization": f"Bearer {bad}"})
        assert resp.status_code == 403, bad
        assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert client.get("/v1/models").status_code == 403
    assert client.get("/v1/models", headers={"Authorization": f"Basic {token}"}).status_code == 403

"""The API-key cache of `/v1/infer`: fast when warm, never stale beyond its TTL."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import keys
from core.db import session_scope
from core.ids import random_base62
from core.settings import Settings, get_settings
from core.tables import ApiKey, utcnow
from tests.utils.factories import auth, create_account, upload_model
from tests.utils.stack import StackInfo

DEADLINE_S = 30  # well past the 1 s TTL: "eventually", not a timing assertion


def _client(settings: Settings) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


@pytest.fixture
def short_ttl_client(stack: StackInfo) -> Iterator[TestClient]:
    """An API process whose grants live one second, like a replica beside another one."""
    with _client(stack.settings.model_copy(update={"auth_cache_ttl_s": 1.0})) as c:
        yield c


def infer(client: TestClient, key: str, model_id: str) -> Any:
    body = {"model_id": model_id, "prompt": "hi", "max_tokens": 1}
    return client.post("/v1/infer", json=body, headers=auth(key))


def mint(client: TestClient, ready: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(
        f"/v1/models/{ready['id']}/keys", json={"name": "cached"}, headers=auth(ready["token"])
    )
    assert resp.status_code == 201, resp.text
    minted: dict[str, Any] = resp.json()
    return minted


def _reads(statements: list[str], table: str) -> bool:
    return any(re.search(rf"\bFROM {table}\b", s) for s in statements)


def test_warm_infer_does_not_query_the_key_or_the_model(
    client: TestClient, gguf_ready: dict[str, Any], statements: list[str]
) -> None:
    key = mint(client, gguf_ready)["key"]
    assert infer(client, key, gguf_ready["id"]).status_code == 200
    statements.clear()

    resp = infer(client, key, gguf_ready["id"])

    assert resp.status_code == 200, resp.text
    # Not even the job: the worker that claims a `/v1/infer` job writes its row.
    assert statements == [], statements


def test_cache_disabled_checks_the_key_on_every_request(
    stack: StackInfo, gguf_ready: dict[str, Any], statements: list[str]
) -> None:
    with _client(stack.settings.model_copy(update={"auth_cache_ttl_s": 0})) as client:
        key = mint(client, gguf_ready)["key"]
        assert infer(client, key, gguf_ready["id"]).status_code == 200
        statements.clear()
        assert infer(client, key, gguf_ready["id"]).status_code == 200
    assert _reads(statements, "api_key") and _reads(statements, "model"), statements


def test_key_revoked_through_the_api_is_refused_at_once(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    minted = mint(client, gguf_ready)
    assert infer(client, minted["key"], gguf_ready["id"]).status_code == 200

    revoked = client.delete(f"/v1/keys/{minted['id']}", headers=auth(gguf_ready["token"]))
    resp = infer(client, minted["key"], gguf_ready["id"])

    assert revoked.status_code == 204
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert "revoked" in resp.json()["error"]["message"]


def test_key_revoked_by_another_process_is_refused_within_the_ttl(
    short_ttl_client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    minted = mint(short_ttl_client, gguf_ready)
    assert infer(short_ttl_client, minted["key"], gguf_ready["id"]).status_code == 200
    with session_scope(stack.settings) as s:  # what another API replica's revocation does
        key = s.get(ApiKey, minted["id"])
        assert key is not None
        key.revoked_at = utcnow()
        s.add(key)

    deadline = time.monotonic() + DEADLINE_S
    resp = infer(short_ttl_client, minted["key"], gguf_ready["id"])
    while resp.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        resp = infer(short_ttl_client, minted["key"], gguf_ready["id"])

    assert resp.status_code == 403, "a key revoked elsewhere still works past the cache TTL"
    assert "revoked" in resp.json()["error"]["message"]


def test_wrong_secret_for_a_cached_key_id_is_refused(
    client: TestClient, gguf_ready: dict[str, Any], statements: list[str]
) -> None:
    minted = mint(client, gguf_ready)
    assert infer(client, minted["key"], gguf_ready["id"]).status_code == 200
    forged = keys.compose(keys.API_KEY_PREFIX, minted["id"], random_base62(keys.SECRET_LEN))
    statements.clear()

    resp = infer(client, forged, gguf_ready["id"])

    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert resp.json()["error"]["message"] == "invalid API key"
    assert statements == []  # refused by the cached digest, not by a lookup
    assert infer(client, minted["key"], gguf_ready["id"]).status_code == 200


def test_deleted_model_is_refused_at_once(client: TestClient, gguf_model: Path) -> None:
    token = create_account(client, "deleter")
    ready = upload_model(client, token, {"tiny.gguf": gguf_model}, name="doomed")
    assert ready["status"] == "ready", ready
    assert infer(client, ready["api_key"], ready["id"]).status_code == 200

    deleted = client.delete(f"/v1/models/{ready['id']}", headers=auth(token))
    resp = infer(client, ready["api_key"], ready["id"])

    assert deleted.status_code == 204
    # Deleting a model revokes its keys, and the key is checked before the model it names.
    assert resp.status_code == 403, resp.text
    assert "revoked" in resp.json()["error"]["message"]

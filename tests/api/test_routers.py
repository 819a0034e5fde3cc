"""Prompt routers on the real stack: rules, first match, routed_to, scoped keys, hostile input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import get_settings
from tests.utils.factories import (
    account_of,
    auth,
    create_account,
    declare,
    ready_model_row,
    upload_model,
)
from tests.utils.stack import StackInfo

JOB = {"raw": True, "temperature": 0.0, "max_tokens": 2}


@pytest.fixture(scope="module")
def models(stack: StackInfo, gguf_ready: dict[str, Any], gguf_model: Path) -> dict[str, Any]:
    """Two ready models of one account: `a` (gguf_ready) and `b`."""
    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        second = upload_model(c, gguf_ready["token"], {"tiny.gguf": gguf_model}, name="second")
    assert second["status"] == "ready", second
    return {"token": gguf_ready["token"], "a": gguf_ready["id"], "b": second["id"],
            "a_key": gguf_ready["key"]}  # fmt: skip


def make_router(client: TestClient, token: str, rules: list[Any], default: str) -> Any:
    body = {"name": "router", "rules": rules, "default_model_id": default}
    return client.post("/v1/routers", json=body, headers=auth(token))


def router_with_key(
    client: TestClient, token: str, rules: list[Any], default: str
) -> tuple[str, str]:
    resp = make_router(client, token, rules, default)
    assert resp.status_code == 201, resp.text
    router_id = resp.json()["id"]
    minted = client.post(f"/v1/routers/{router_id}/keys", headers=auth(token))
    assert minted.status_code == 201, minted.text
    assert minted.json()["router_id"] == router_id
    return router_id, minted.json()["key"]


def routed(client: TestClient, key: str, target: str, prompt: str) -> str:
    """Submit a job through `target`; the model the router chose."""
    resp = client.post(
        "/v1/jobs", json={"model_id": target, "prompt": prompt, **JOB}, headers=auth(key)
    )
    assert resp.status_code == 202, resp.text
    chosen: str = resp.json()["routed_to"]
    assert resp.headers["x-routed-to"] == chosen
    return chosen


def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["error"]["code"] == code and body["request_id"]
    return body


@pytest.mark.parametrize(
    ("when", "matching", "other"),
    [
        ({"regex": r"(?i)\bcode\b"}, "Write CODE for me", "write a poem"),
        ({"language": "fr"}, "Le chat est sur la table et il dort", "The cat is on the table"),
        ({"max_prompt_tokens": 3}, "hi there", "a prompt well over twelve bytes long"),
        ({"min_prompt_tokens": 10}, "x" * 40, "short"),
        ({"regex": "cat", "language": "en"}, "the cat is here", "le cat est ici"),
    ],
)
def test_router_sends_matching_prompts_to_the_rule_and_others_to_default(
    client: TestClient, models: dict[str, Any], when: dict[str, Any], matching: str, other: str
) -> None:
    rules = [{"when": when, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    assert routed(client, key, router_id, matching) == models["b"]
    assert routed(client, key, router_id, other) == models["a"]


def test_router_rules_first_match_wins_in_order(client: TestClient, models: dict[str, Any]) -> None:
    rules = [
        {"when": {"regex": "cat"}, "model_id": models["b"]},
        {"when": {"language": "en"}, "model_id": models["a"]},
        {"when": {"regex": "cat"}, "model_id": models["a"]},
    ]
    router_id, key = router_with_key(client, models["token"], rules, models["b"])
    assert routed(client, key, router_id, "the cat and the dog") == models["b"]  # 1st and 2nd
    assert routed(client, key, router_id, "the dog and the bird") == models["a"]  # 2nd only
    assert routed(client, key, router_id, "zzz qqq") == models["b"]  # none: the default


def test_infer_through_router_says_which_model_served(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"regex": "^Once"}, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    resp = client.post(
        "/v1/infer",
        json={"model_id": router_id, "prompt": "Once upon", **JOB},
        headers=auth(key),
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["routed_to"] == body["model_id"] == models["b"]
    assert resp.headers["x-routed-to"] == models["b"]
    job = client.get(f"/v1/jobs/{body['id']}", headers=auth(key)).json()
    assert job["router_id"] == router_id and job["routed_to"] == models["b"]
    assert job["result"]["routed_to"] == models["b"]
    direct = client.post(
        "/v1/infer",
        json={"model_id": models["a"], "prompt": "Once upon", **JOB},
        headers=auth(models["a_key"]),
    )
    assert direct.status_code == 200 and direct.json()["routed_to"] is None
    assert "x-routed-to" not in direct.headers


def test_openai_chat_through_a_router_routes_on_the_messages(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"regex": "(?i)poem"}, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])

    def chat(text: str) -> Any:
        body = {"model": router_id, "messages": [{"role": "user", "content": text}],
                "max_tokens": 3, "temperature": 0}  # fmt: skip
        return client.post("/openai/v1/chat/completions", json=body, headers=auth(key))

    poem, other = chat("Write a POEM"), chat("Add two numbers")
    assert poem.status_code == other.status_code == 200, poem.text
    assert poem.headers["x-routed-to"] == models["b"]
    assert other.headers["x-routed-to"] == models["a"]
    assert poem.json()["object"] == "chat.completion"


def test_router_key_calls_only_its_router_and_model_keys_never_a_router(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"regex": "x"}, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    other_id, _ = router_with_key(client, models["token"], rules, models["a"])
    body = {"prompt": "hello", **JOB}
    for model_id in (models["a"], models["b"]):  # the router's own models, but not directly
        resp = client.post("/v1/jobs", json={"model_id": model_id, **body}, headers=auth(key))
        assert_error(resp, 403, "AUTHORIZATION_FAILED")
    resp = client.post("/v1/jobs", json={"model_id": other_id, **body}, headers=auth(key))
    assert_error(resp, 403, "AUTHORIZATION_FAILED")
    resp = client.post(
        "/v1/infer", json={"model_id": router_id, **body}, headers=auth(models["a_key"])
    )
    assert_error(resp, 403, "AUTHORIZATION_FAILED")


def test_router_refuses_foreign_missing_and_unready_models(
    client: TestClient, models: dict[str, Any]
) -> None:
    stranger = create_account(client, "stranger")
    body = assert_error(make_router(client, stranger, [], models["a"]), 404, "MODEL_NOT_FOUND")
    assert body["error"]["details"]["field"] == "default_model_id"
    rules = [{"when": {"regex": "x"}, "model_id": "mdl_doesnotexist00"}]
    body = assert_error(make_router(client, models["token"], rules, models["a"]), 404,
                        "MODEL_NOT_FOUND")  # fmt: skip
    assert body["error"]["details"]["field"] == "rules.0.model_id"
    pending = declare(client, models["token"], "pending", {"m.gguf": b"GGUF" + b"\0" * 60})
    rules = [{"when": {"regex": "x"}, "model_id": pending["id"]}]
    resp = make_router(client, models["token"], rules, models["a"])
    assert_error(resp, 409, "MODEL_NOT_READY")


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        ("(unclosed", "invalid regex"),
        (r"(a)\1", "groupref"),
        (r"(?<=a)b", "assert"),
        ("a{500}", "capped"),
        ("a" * 257, "at most 256"),
    ],
)
def test_router_refuses_invalid_or_unsafe_regex(
    client: TestClient, models: dict[str, Any], regex: str, message: str
) -> None:
    rules = [{"when": {"regex": regex}, "model_id": models["b"]}]
    body = assert_error(make_router(client, models["token"], rules, models["a"]), 400,
                        "INVALID_REQUEST")  # fmt: skip
    assert message in body["error"]["message"]


@pytest.mark.timeout(120)  # a guard only: Python's `re` would backtrack for ever here
def test_catastrophic_regex_does_not_hang_the_api(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"regex": "(a+)+$"}, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    assert routed(client, key, router_id, "a" * 50_000 + "!") == models["a"]
    assert routed(client, key, router_id, "a" * 30 + "!") == models["a"]
    assert routed(client, key, router_id, "a" * 30) == models["b"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "r", "rules": "nope", "default_model_id": "mdl_x"},
        {"name": "r", "rules": [{"when": {}, "model_id": "mdl_x"}], "default_model_id": "mdl_x"},
        {"name": "r", "rules": [{"when": {"colour": "red"}, "model_id": "m"}],
         "default_model_id": "m"},
        {"name": "r", "rules": [{"when": {"max_prompt_tokens": -1}, "model_id": "m"}],
         "default_model_id": "m"},
        {"name": "r", "rules": [{"when": {"max_prompt_tokens": "10"}, "model_id": "m"}],
         "default_model_id": "m"},
        {"name": "r", "rules": [{"when": {"regex": "x"}, "model_id": "m"}] * 33,
         "default_model_id": "m"},
        {"name": "../etc/passwd", "rules": [], "default_model_id": "m"},
        {"name": "r" * 101, "rules": [], "default_model_id": "m"},
        {"name": "r", "rules": [], "default_model_id": "m" * 41},
        {"name": "r", "rules": [], "default_model_id": "m", "admin": True},
    ],
)  # fmt: skip
def test_router_create_refuses_malformed_bodies(
    client: TestClient, models: dict[str, Any], body: dict[str, Any]
) -> None:
    resp = client.post("/v1/routers", json=body, headers=auth(models["token"]))
    assert_error(resp, 400, "INVALID_REQUEST")


def test_router_refuses_unknown_language_and_non_json(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"language": "xx"}, "model_id": models["b"]}]
    body = assert_error(make_router(client, models["token"], rules, models["a"]), 400,
                        "INVALID_REQUEST")  # fmt: skip
    assert body["error"]["details"]["field"] == "rules.0.when.language"
    resp = client.post(
        "/v1/routers",
        content=b"{not json",
        headers={**auth(models["token"]), "content-type": "application/json"},
    )
    assert_error(resp, 400, "INVALID_REQUEST")


def test_router_routes_need_the_account_token(client: TestClient, models: dict[str, Any]) -> None:
    rules: list[Any] = []
    body = {"name": "r", "rules": rules, "default_model_id": models["a"]}
    assert_error(client.post("/v1/routers", json=body), 403, "AUTHENTICATION_FAILED")
    resp = client.post("/v1/routers", json=body, headers=auth(models["a_key"]))
    assert_error(resp, 403, "AUTHENTICATION_FAILED")
    assert_error(client.get("/v1/routers", headers=auth("iat_forged")), 403,
                 "AUTHENTICATION_FAILED")  # fmt: skip


def test_another_accounts_router_is_not_found(client: TestClient, models: dict[str, Any]) -> None:
    router_id, key = router_with_key(client, models["token"], [], models["a"])
    stranger = create_account(client, "nosy")
    for method, path in [
        ("GET", f"/v1/routers/{router_id}"),
        ("DELETE", f"/v1/routers/{router_id}"),
        ("POST", f"/v1/routers/{router_id}/keys"),
    ]:
        assert_error(client.request(method, path, headers=auth(stranger)), 404,
                     "ROUTER_NOT_FOUND")  # fmt: skip
    assert router_id not in str(client.get("/v1/routers", headers=auth(stranger)).json())
    assert routed(client, key, router_id, "still mine") == models["a"]


def test_router_list_read_delete_revokes_its_keys(
    client: TestClient, models: dict[str, Any]
) -> None:
    rules = [{"when": {"regex": "b"}, "model_id": models["b"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    read = client.get(f"/v1/routers/{router_id}", headers=auth(models["token"])).json()
    assert read["rules"][0]["when"]["regex"] == "b" and read["rules"][0]["model_id"] == models["b"]
    assert read["default_model_id"] == models["a"]
    listed = client.get("/v1/routers", headers=auth(models["token"])).json()
    assert router_id in [r["id"] for r in listed["data"]]
    keys = client.get("/v1/keys", headers=auth(models["token"])).json()["data"]
    assert [k["router_id"] for k in keys if key.startswith(k["prefix"].rstrip("…"))] == [router_id]
    resp = client.delete(f"/v1/routers/{router_id}", headers=auth(models["token"]))
    assert resp.status_code == 204
    assert_error(client.get(f"/v1/routers/{router_id}", headers=auth(models["token"])), 404,
                 "ROUTER_NOT_FOUND")  # fmt: skip
    resp = client.post(
        "/v1/jobs", json={"model_id": router_id, "prompt": "b", **JOB}, headers=auth(key)
    )
    assert_error(resp, 403, "AUTHENTICATION_FAILED")


def test_deleted_models_of_a_router_are_not_found_and_its_keys_survive(
    client: TestClient, stack: StackInfo, models: dict[str, Any]
) -> None:
    doomed = ready_model_row(stack.settings, account_of(stack.settings, models["a"]))
    rules = [{"when": {"regex": "^doomed"}, "model_id": doomed["id"]}]
    router_id, key = router_with_key(client, models["token"], rules, models["a"])
    other_id, other_key = router_with_key(client, models["token"], [], doomed["id"])
    resp = client.delete(f"/v1/models/{doomed['id']}", headers=auth(models["token"]))
    assert resp.status_code == 204
    body = {"model_id": router_id, "prompt": "doomed prompt", **JOB}
    assert_error(client.post("/v1/jobs", json=body, headers=auth(key)), 404, "MODEL_NOT_FOUND")
    assert routed(client, key, router_id, "a living prompt") == models["a"]
    # A router key names its router's default model only as a placeholder: deleting that
    # model does not revoke the key (its calls still fail while the router chooses it).
    body = {"model_id": other_id, "prompt": "x", **JOB}
    assert_error(client.post("/v1/jobs", json=body, headers=auth(other_key)), 404,
                 "MODEL_NOT_FOUND")  # fmt: skip
    keys = client.get("/v1/keys", headers=auth(models["token"])).json()["data"]
    scoped = [k for k in keys if k["router_id"] == other_id]
    assert len(scoped) == 1 and scoped[0]["revoked_at"] is None

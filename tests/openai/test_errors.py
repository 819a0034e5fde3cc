"""Errors on `/openai/v1` use OpenAI's error object, so the client raises its usual types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from tests.openai.conftest import sync_client
from tests.utils.factories import auth, create_account, upload_model

MESSAGES = [{"role": "user", "content": "Hi"}]


def post(url: str, path: str, key: str | None, body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{url}{path}", headers=headers, timeout=60, **kwargs)


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


@pytest.mark.parametrize(
    "key",
    ["ik_junk", "not-a-key-at-all", "iat_someaccounttoken", "ik_" + "A" * 60],
)
def test_bad_key_is_authentication_error(
    openai_url: str, gguf_ready: dict[str, Any], key: str
) -> None:
    client = sync_client(openai_url, key)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=gguf_ready["id"], messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "AUTHENTICATION_FAILED"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model=gguf_ready["id"], input="x")


def test_missing_key_is_401_with_openai_error(openai_url: str, gguf_ready: dict[str, Any]) -> None:
    resp = post(
        openai_url, "/chat/completions", None, {"model": gguf_ready["id"], "messages": MESSAGES}
    )
    assert_openai_error(resp, 401, "AUTHENTICATION_FAILED")
    assert httpx.get(f"{openai_url}/models", timeout=30).status_code == 401


def test_revoked_key_is_authentication_error(
    client: TestClient, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    minted = client.post(
        f"/v1/models/{gguf_ready['id']}/keys",
        json={"name": "temp"},
        headers=auth(gguf_ready["token"]),
    ).json()
    client.delete(f"/v1/keys/{minted['id']}", headers=auth(gguf_ready["token"]))
    with pytest.raises(openai.AuthenticationError) as info:
        sync_client(openai_url, minted["key"]).models.list()
    assert "revoked" in info.value.message


def test_key_of_another_model_is_permission_denied(
    client: TestClient, openai_url: str, gguf_ready: dict[str, Any], gguf_model: Path
) -> None:
    other = upload_model(client, gguf_ready["token"], {"o.gguf": gguf_model}, name="sibling")
    api = sync_client(openai_url, gguf_ready["key"])
    for model in (other["id"], "sibling"):
        with pytest.raises(openai.PermissionDeniedError) as info:
            api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        assert info.value.code == "AUTHORIZATION_FAILED"


def test_unknown_or_strangers_model_is_not_found(
    client: TestClient, openai_url: str, gguf_ready: dict[str, Any], gguf_model: Path
) -> None:
    stranger = create_account(client, "stranger")
    theirs = upload_model(client, stranger, {"t.gguf": gguf_model}, name="strangers-secret")
    api = sync_client(openai_url, gguf_ready["key"])
    for model in ("mdl_nope", "no-such-name", theirs["id"], "strangers-secret", "x' OR '1'='1"):
        with pytest.raises(openai.NotFoundError) as info:
            api.chat.completions.create(model=model, messages=MESSAGES)
        assert info.value.code == "MODEL_NOT_FOUND"
        with pytest.raises(openai.NotFoundError):
            api.completions.create(model=model, prompt="x")


def test_n_other_than_one_is_bad_request(openai_url: str, gguf_ready: dict[str, Any]) -> None:
    api = sync_client(openai_url, gguf_ready["key"])
    for n in (2, 0):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=gguf_ready["id"], messages=MESSAGES, n=n)
        assert info.value.code == "INVALID_REQUEST" and info.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=gguf_ready["id"], prompt="x", n=3)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", b"{not json", None),
        ("/chat/completions", b"[]", None),
        ("/chat/completions", {"model": "m"}, "messages"),
        ("/chat/completions", {"messages": MESSAGES}, "model"),
        ("/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/chat/completions", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/chat/completions", {"model": "m", "messages": [{"role": "user"}]}, "messages.0.content"),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "temperature": 3}, "temperature"),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "stop": ["a"] * 5}, "stop"),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}, None),
        ("/chat/completions", {"model": "m", "messages": MESSAGES, "logprobs": True}, "logprobs"),
        ("/completions", {"model": "m", "prompt": ""}, "prompt"),
        ("/completions", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ("/completions", {"model": "m", "prompt": "x", "echo": True}, None),
        ("/embeddings", {"model": "m", "input": []}, "input"),
        ("/embeddings", {"model": "m", "input": [""]}, "input"),
        ("/embeddings", {"model": "m", "input": [[1, 2, 3]]}, "input"),
        ("/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/embeddings", {"model": "m", "input": "x", "dimensions": 8}, "dimensions"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_400_with_the_field(
    openai_url: str, gguf_ready: dict[str, Any], path: str, body: Any, param: str | None
) -> None:
    error = assert_openai_error(
        post(openai_url, path, gguf_ready["key"], body), 400, "INVALID_REQUEST"
    )
    assert error["type"] == "invalid_request_error"
    if param is not None:  # a union's error names the member after the field
        assert error["param"] is not None and error["param"].startswith(param)


def test_oversized_inputs_are_bad_requests(
    stack: Any, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    api = sync_client(openai_url, gguf_ready["key"])
    settings = stack.settings
    huge = "a" * (settings.max_prompt_chars + 1)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model=gguf_ready["id"], messages=[{"role": "user", "content": huge}]
        )
    assert "messages is over" in info.value.message
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=gguf_ready["id"], prompt=huge)
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(
            model=gguf_ready["id"], input=["a"] * (settings.max_embedding_inputs + 1)
        )
    assert info.value.param == "input"
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model=gguf_ready["id"], messages=MESSAGES, max_tokens=settings.max_completion_tokens + 1
        )
    assert "max_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model=gguf_ready["id"], messages=[{"role": "user", "content": "norway " * 400}]
        )
    assert info.value.code == "CONTEXT_LENGTH_EXCEEDED"


def test_hostile_message_content_is_data_not_template(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    """Jinja in a message is rendered as text: the template sees content, never code."""
    api = sync_client(openai_url, gguf_ready["key"])
    plain = api.chat.completions.create(
        model=gguf_ready["id"],
        messages=[{"role": "user", "content": "{{ 7 * 7 }}"}],
        max_tokens=1,
        temperature=0.0,
    )
    same = api.chat.completions.create(
        model=gguf_ready["id"],
        messages=[{"role": "user", "content": "{{ 7 * 7 }}"}],
        max_tokens=1,
        temperature=0.0,
    )
    rendered = api.chat.completions.create(
        model=gguf_ready["id"],
        messages=[{"role": "user", "content": "49"}],
        max_tokens=1,
        temperature=0.0,
    )
    assert plain.usage is not None and same.usage is not None and rendered.usage is not None
    assert plain.usage.prompt_tokens == same.usage.prompt_tokens > rendered.usage.prompt_tokens


def test_other_routes_keep_their_own_envelope(client: TestClient) -> None:
    resp = client.post("/v1/infer", json={"model_id": "m", "prompt": "x"})
    assert resp.status_code == 403
    assert set(resp.json()) == {"error", "request_id"}
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert "details" in resp.json()["error"]


def test_rate_limit_is_rate_limit_error_with_retry_after_and_headers(
    openai_url: str, client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    minted = client.post(
        f"/v1/models/{gguf_ready['id']}/keys",
        json={"name": "one-a-minute", "rate_limit_rpm": 1},
        headers=auth(gguf_ready["token"]),
    )
    assert minted.status_code == 201, minted.text
    sdk = sync_client(openai_url, minted.json()["key"])
    first = sdk.chat.completions.with_raw_response.create(
        model=gguf_ready["id"], messages=MESSAGES, max_tokens=2
    )
    assert first.headers["x-ratelimit-limit"] == "1"
    assert first.headers["x-ratelimit-remaining"] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(model=gguf_ready["id"], messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 429 and info.value.code == "RATE_LIMIT_EXCEEDED"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.response.headers["x-ratelimit-limit"] == "1"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "rate_limit_error"

"""Chain mode: `/v1/sessions`, and requests that continue a conversation through it."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.sessions import lock_key
from tests.utils.factories import auth
from tests.utils.stack import StackInfo

GREEDY = {"temperature": 0.0, "max_tokens": 6, "seed": 3}


def new_session(client: TestClient, ready: dict[str, Any], **body: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/sessions", json={"model_id": ready["id"], **body}, headers=auth(ready["key"])
    )
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def infer(client: TestClient, ready: dict[str, Any], prompt: str, **body: Any) -> Any:
    return client.post(
        "/v1/infer",
        json={"model_id": ready["id"], "prompt": prompt, **GREEDY, **body},
        headers=auth(ready["key"]),
    )


def read(client: TestClient, ready: dict[str, Any], sid: str, key: str | None = None) -> Any:
    return client.get(f"/v1/sessions/{sid}", headers=auth(key or ready["key"]))


def second_key(client: TestClient, ready: dict[str, Any]) -> str:
    resp = client.post(
        f"/v1/models/{ready['id']}/keys", json={"name": "other"}, headers=auth(ready["token"])
    )
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key


def test_a_new_session_is_empty_and_readable(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    created = new_session(client, gguf_ready, max_context_tokens=512)
    assert created["id"].startswith("ses_")
    assert (created["turns"], created["tokens"], created["messages"]) == (0, 0, [])
    assert created["max_context_tokens"] == 512 and created["model_id"] == gguf_ready["id"]
    assert read(client, gguf_ready, created["id"]).json() == created


def test_each_turn_is_kept_and_prepended_to_the_next(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    sid = new_session(client, gguf_ready, max_context_tokens=4096)["id"]
    alone = infer(client, gguf_ready, "And the next one?").json()

    first = infer(client, gguf_ready, "Name a city.", session_id=sid)
    assert first.status_code == 200, first.text
    after_one = read(client, gguf_ready, sid).json()
    assert after_one["turns"] == 1
    assert after_one["messages"] == [
        {"role": "user", "content": "Name a city."},
        {"role": "assistant", "content": first.json()["completion"]},
    ]
    assert after_one["tokens"] == first.json()["tokens_used"]  # nothing before it to subtract

    second = infer(client, gguf_ready, "And the next one?", session_id=sid).json()
    # The same prompt costs more inside the session: the first turn was sent with it.
    assert second["prompt_tokens"] > alone["prompt_tokens"]
    after_two = read(client, gguf_ready, sid).json()
    assert after_two["turns"] == 2
    assert [m["role"] for m in after_two["messages"]] == ["user", "assistant"] * 2
    assert after_two["messages"][2] == {"role": "user", "content": "And the next one?"}
    assert after_two["messages"][3]["content"] == second["completion"]


def test_turns_outside_the_window_are_not_sent(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    sid = new_session(client, gguf_ready, max_context_tokens=1)["id"]  # no turn fits
    alone = infer(client, gguf_ready, "Second question").json()
    assert infer(client, gguf_ready, "First question", session_id=sid).status_code == 200
    chained = infer(client, gguf_ready, "Second question", session_id=sid).json()
    assert chained["prompt_tokens"] == alone["prompt_tokens"]
    state = read(client, gguf_ready, sid).json()
    assert state["turns"] == 2 and state["window_tokens"] == 0  # kept, but not sent


def test_an_async_job_appends_its_turn_too(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    sid = new_session(client, gguf_ready)["id"]
    resp = client.post(
        "/v1/jobs",
        json={"model_id": gguf_ready["id"], "prompt": "Hello there", "session_id": sid, **GREEDY},
        headers=auth(gguf_ready["key"]),
    )
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 60
    while read(client, gguf_ready, sid).json()["turns"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=auth(gguf_ready["key"])).json()
    messages = read(client, gguf_ready, sid).json()["messages"]
    assert messages[-1] == {"role": "assistant", "content": job["result"]["completion"]}


def test_a_session_is_busy_while_a_turn_runs(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    sid = new_session(client, gguf_ready)["id"]
    r = redis.Redis.from_url(stack.settings.effective_redis_url)
    r.set(lock_key(sid), "job_someone_else", ex=60)  # a turn in flight
    busy = infer(client, gguf_ready, "Hi", session_id=sid)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "SESSION_BUSY"
    r.delete(lock_key(sid))
    assert infer(client, gguf_ready, "Hi", session_id=sid).status_code == 200
    assert infer(client, gguf_ready, "Hi again", session_id=sid).status_code == 200  # unlocked
    assert r.get(lock_key(sid)) is None


def test_only_the_creating_key_sees_the_session(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    sid = new_session(client, gguf_ready)["id"]
    other = second_key(client, gguf_ready)  # same account, same model, another key
    assert read(client, gguf_ready, sid, key=other).status_code == 404
    assert client.delete(f"/v1/sessions/{sid}", headers=auth(other)).status_code == 404
    stolen = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "x", "session_id": sid},
        headers=auth(other),
    )
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "SESSION_NOT_FOUND"
    owner_token = read(client, gguf_ready, sid, key=gguf_ready["token"])  # account, not key
    assert owner_token.status_code == 403
    assert read(client, gguf_ready, sid).status_code == 200


def test_deleted_session_is_gone(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    sid = new_session(client, gguf_ready)["id"]
    assert infer(client, gguf_ready, "Hi", session_id=sid).status_code == 200
    assert client.delete(f"/v1/sessions/{sid}", headers=auth(gguf_ready["key"])).status_code == 204
    assert read(client, gguf_ready, sid).status_code == 404
    gone = infer(client, gguf_ready, "Hi", session_id=sid)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_raw_cannot_continue_a_session(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    sid = new_session(client, gguf_ready)["id"]
    resp = infer(client, gguf_ready, "Hi", session_id=sid, raw=True)
    assert resp.status_code == 400 and "raw" in resp.json()["error"]["message"]
    assert infer(client, gguf_ready, "Hi", session_id=sid).status_code == 200  # lock not held


@pytest.mark.parametrize(
    "body",
    [
        {"max_context_tokens": 0},
        {"max_context_tokens": -5},
        {"max_context_tokens": "lots"},
        {"max_context_tokens": 10**9},
        {"max_context_tokens": 1.5},
        {"ttl_s": 5},
        {"model_id": ""},
        {"model_id": "m" * 500},
    ],
)
def test_malformed_session_bodies(
    client: TestClient, gguf_ready: dict[str, Any], body: dict[str, Any]
) -> None:
    resp = client.post(
        "/v1/sessions",
        json={"model_id": gguf_ready["id"], **body},
        headers=auth(gguf_ready["key"]),
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize("sid", ["ses_", "nope", "ses_../../etc", "ses_" + "a" * 60, "ses_a b"])
def test_malformed_session_ids(client: TestClient, gguf_ready: dict[str, Any], sid: str) -> None:
    assert infer(client, gguf_ready, "Hi", session_id=sid).status_code == 400
    assert read(client, gguf_ready, sid).status_code in (404, 405)


def test_session_needs_a_valid_key_for_its_model(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    body = {"model_id": gguf_ready["id"]}
    assert client.post("/v1/sessions", json=body).status_code == 403
    assert client.post("/v1/sessions", json=body, headers=auth("ik_bad")).status_code == 403
    foreign = client.post(
        "/v1/sessions", json={"model_id": "mdl_someone_else"}, headers=auth(gguf_ready["key"])
    )
    assert foreign.status_code == 404
    assert client.get("/v1/sessions/ses_abc").status_code == 403


def test_openai_chat_continues_a_session(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    sid = new_session(client, gguf_ready)["id"]
    body = {
        "model": gguf_ready["id"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a river."},
        ],
        "max_tokens": 5,
        "temperature": 0,
        "session_id": sid,
    }
    resp = client.post("/openai/v1/chat/completions", json=body, headers=auth(gguf_ready["key"]))
    assert resp.status_code == 200, resp.text
    answer = resp.json()["choices"][0]["message"]["content"]
    # The system message steers each request; only the conversation is kept.
    assert read(client, gguf_ready, sid).json()["messages"] == [
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": answer},
    ]

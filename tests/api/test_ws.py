"""`/v1/ws`: auth, streamed inference, cancel, ping, and every way a client can get it wrong."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import select
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from api.inference import ws as ws_module
from core.db import session_scope
from core.events import cancel_key
from core.tables import UsageEvent
from tests.utils.factories import auth
from tests.utils.stack import StackInfo

GREEDY = {"temperature": 0.0, "max_tokens": 12, "seed": 1, "raw": True}


def _authed(sock: WebSocketTestSession, key: str) -> None:
    sock.send_json({"type": "auth", "id": "a", "api_key": key})
    assert sock.receive_json() == {"type": "auth_ok", "id": "a"}


def _until_complete(
    sock: WebSocketTestSession, msg_id: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tokens: list[dict[str, Any]] = []
    while True:
        message = sock.receive_json()
        assert message["id"] == msg_id, message
        if message["type"] == "token":
            tokens.append(message)
        elif message["type"] == "complete":
            return tokens, message
        else:
            assert message["type"] == "accepted", message


def _redis(stack: StackInfo) -> redis.Redis:  # type: ignore[type-arg]
    return redis.Redis.from_url(stack.settings.effective_redis_url)


def test_ping_pong_echoes_the_id(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as sock:
        sock.send_json({"type": "ping", "id": "p-1"})
        assert sock.receive_json() == {"type": "pong", "id": "p-1"}


def test_streamed_inference_matches_v1_infer_and_is_billed(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    plain = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "The capital of", **GREEDY},
        headers=auth(gguf_ready["key"]),
    ).json()
    with client.websocket_connect("/v1/ws") as sock:
        _authed(sock, gguf_ready["key"])
        sock.send_json(
            {
                "type": "inference",
                "id": "r1",
                "model_id": gguf_ready["id"],
                "prompt": "The capital of",
                **GREEDY,
            }
        )
        accepted = sock.receive_json()
        assert accepted["type"] == "accepted" and accepted["job_id"].startswith("job_")
        tokens, done = _until_complete(sock, "r1")
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["token"] for t in tokens) == done["completion"] == plain["completion"]
    assert done["status"] == "succeeded" and done["finish_reason"] in ("stop", "length")
    assert done["job_id"] == accepted["job_id"]
    assert done["prompt_tokens"] == plain["prompt_tokens"]
    assert done["completion_tokens"] == plain["completion_tokens"] == len(tokens)
    assert done["latency_ms"] > 0
    with session_scope(stack.settings) as s:
        usage = s.exec(select(UsageEvent).where(UsageEvent.job_id == done["job_id"])).one()
    assert usage.completion_tokens == done["completion_tokens"]


def test_two_inferences_on_one_socket_are_told_apart_by_id(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        for msg_id in ("x", "y"):
            sock.send_json(
                {
                    "type": "inference",
                    "id": msg_id,
                    "model_id": gguf_ready["id"],
                    "prompt": "Hello",
                    **GREEDY,
                }
            )
        seen: dict[str, list[str]] = {"x": [], "y": []}
        finished: dict[str, dict[str, Any]] = {}
        while len(finished) < 2:
            message = sock.receive_json()
            if message["type"] == "token":
                seen[message["id"]].append(message["token"])
            elif message["type"] == "complete":
                finished[message["id"]] = message
    assert finished["x"]["job_id"] != finished["y"]["job_id"]
    for msg_id in ("x", "y"):
        assert "".join(seen[msg_id]) == finished[msg_id]["completion"]
    assert finished["x"]["completion"] == finished["y"]["completion"]  # same greedy request


def test_inference_before_auth_is_an_error_and_the_socket_stays_open(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    with client.websocket_connect("/v1/ws") as sock:
        sock.send_json(
            {"type": "inference", "id": "r", "model_id": gguf_ready["id"], "prompt": "hi"}
        )
        error = sock.receive_json()
        assert error["type"] == "error" and error["id"] == "r"
        assert error["error"]["code"] == "AUTHENTICATION_FAILED"
        sock.send_json({"type": "ping", "id": "still-here"})
        assert sock.receive_json()["type"] == "pong"


@pytest.mark.parametrize("api_key", ["ik_nope", "ik_" + "a" * 40, "", 12, "iat_not_a_key"])
def test_bad_auth_is_refused_and_closes_with_policy_violation(
    client: TestClient, api_key: object
) -> None:
    with client.websocket_connect("/v1/ws") as sock:
        sock.send_json({"type": "auth", "id": "a", "api_key": api_key})
        error = sock.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == "AUTHENTICATION_FAILED"
        with pytest.raises(WebSocketDisconnect) as closed:
            sock.receive_json()
    assert closed.value.code == 1008


def test_bad_handshake_key_closes_at_once(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws", headers=auth("ik_forged_key")) as sock:
        assert sock.receive_json()["error"]["code"] == "AUTHENTICATION_FAILED"
        with pytest.raises(WebSocketDisconnect) as closed:
            sock.receive_json()
    assert closed.value.code == 1008


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        ("not json", "JSON object"),
        ("[1, 2]", "JSON object"),
        ('{"type": "ping"}', "`id`"),
        ('{"type": "ping", "id": 7}', "`id`"),
        (json.dumps({"type": "ping", "id": "i" * 129}), "`id`"),
        ('{"type": "exec", "id": "e"}', "`type`"),
    ],
)
def test_malformed_messages_get_an_error_and_nothing_else(
    client: TestClient, frame: str, needle: str
) -> None:
    with client.websocket_connect("/v1/ws") as sock:
        sock.send_text(frame)
        error = sock.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == "INVALID_REQUEST"
        assert needle in error["error"]["message"]
        sock.send_json({"type": "ping", "id": "after"})
        assert sock.receive_json() == {"type": "pong", "id": "after"}


def test_binary_frame_is_refused(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as sock:
        sock.send_bytes(b"\x00\x01")
        assert sock.receive_json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"stream": True}, "stream"),
        ({"api_key": "ik_x"}, "api_key"),
        ({"evil": "__import__('os')"}, "evil"),
    ],
)
def test_invalid_inference_fields_name_the_field(
    client: TestClient, gguf_ready: dict[str, Any], fields: dict[str, Any], needle: str
) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        body = {
            "type": "inference",
            "id": "bad",
            "model_id": gguf_ready["id"],
            "prompt": "hi",
            **fields,
        }
        sock.send_json(body)
        error = sock.receive_json()
        assert error["type"] == "error" and error["id"] == "bad"
        assert error["error"]["code"] == "INVALID_REQUEST" and needle in error["error"]["message"]


def test_unknown_model_and_oversized_max_tokens(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        sock.send_json({"type": "inference", "id": "u", "model_id": "mdl_nope", "prompt": "hi"})
        assert sock.receive_json()["error"]["code"] == "MODEL_NOT_FOUND"
        sock.send_json(
            {
                "type": "inference",
                "id": "m",
                "model_id": gguf_ready["id"],
                "prompt": "hi",
                "max_tokens": 10**6,
            }
        )
        assert sock.receive_json()["error"]["code"] == "INVALID_REQUEST"


def test_oversized_frame_closes_with_1009(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        huge = "x" * (ws_module.MAX_MESSAGE_BYTES + 1)
        sock.send_json(
            {"type": "inference", "id": "h", "model_id": gguf_ready["id"], "prompt": huge}
        )
        assert sock.receive_json()["error"]["code"] == "INVALID_REQUEST"
        with pytest.raises(WebSocketDisconnect) as closed:
            sock.receive_json()
    assert closed.value.code == 1009


def test_no_auth_in_time_closes(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_module, "AUTH_TIMEOUT_S", 0.3)
    with client.websocket_connect("/v1/ws") as sock:
        error = sock.receive_json()
        assert (
            error["error"]["code"] == "AUTHENTICATION_FAILED"
            and "in time" in error["error"]["message"]
        )
        with pytest.raises(WebSocketDisconnect) as closed:
            sock.receive_json()
    assert closed.value.code == 1008


def test_cancel_of_unknown_id_is_an_error(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        sock.send_json({"type": "cancel", "id": "never-sent"})
        error = sock.receive_json()
        assert error["id"] == "never-sent" and error["error"]["code"] == "INVALID_REQUEST"


def test_cancel_asks_the_worker_to_stop_and_still_completes(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        sock.send_json(
            {
                "type": "inference",
                "id": "c",
                "model_id": gguf_ready["id"],
                "prompt": "Once",
                "max_tokens": 4096,
            }
        )
        accepted = sock.receive_json()
        first = sock.receive_json()  # running: a cancel sent earlier may stop it before it starts
        assert first["type"] == "token", first
        sock.send_json({"type": "cancel", "id": "c"})
        # The socket reads its messages in order: the pong says the cancel was handled.
        sock.send_json({"type": "ping", "id": "after-cancel"})
        tokens, done, late, pong = [first], None, None, False
        while done is None or not pong:
            message = sock.receive_json()
            if message["type"] == "pong":
                pong = True
            elif message["type"] == "token":
                tokens.append(message)
            elif message["type"] == "complete":
                done = message
            else:  # the job had ended when the cancel was read: nothing left to cancel
                assert message["error"]["code"] == "INVALID_REQUEST", message
                late = message
    assert done["job_id"] == accepted["job_id"]
    # The worker was asked to stop, unless the job had already ended (then the cancel is refused).
    assert bool(_redis(stack).exists(cancel_key(accepted["job_id"]))) == (late is None)
    assert late is None or done["status"] == "succeeded"
    # Either it finished before the cancel landed or it stopped; either way it is accounted.
    assert done["status"] in ("cancelled", "succeeded")
    if done["status"] == "cancelled":
        assert done["finish_reason"] == "cancelled"
    # Each streamed piece is at least one token (a piece may join tokens of one character).
    assert done["completion_tokens"] >= len(tokens) >= 1
    with session_scope(stack.settings) as s:
        usage = s.exec(select(UsageEvent).where(UsageEvent.job_id == done["job_id"])).one()
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        done["prompt_tokens"],
        done["completion_tokens"],
    )


def test_hanging_up_cancels_the_generations_in_flight(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    with client.websocket_connect("/v1/ws", headers=auth(gguf_ready["key"])) as sock:
        sock.send_json(
            {
                "type": "inference",
                "id": "g",
                "model_id": gguf_ready["id"],
                "prompt": "Once",
                "max_tokens": 4096,
            }
        )
        job_id = sock.receive_json()["job_id"]
    r = _redis(stack)
    deadline = time.monotonic() + 10
    while not r.exists(cancel_key(job_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.exists(cancel_key(job_id))

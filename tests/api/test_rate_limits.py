"""Per-key limits on the real stack: three uvicorn API processes share one Redis.

Keys are minted per test with their own limits, so no test sees another's counters. Where a
job must stay in flight, the stack's infer worker is paused (SIGSTOP) and, for a stream, the
test runs the job itself on a runner that emits a token every 50 ms until cancelled.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import col, select

from core import limits
from core.db import session_scope
from core.ids import new_id
from core.settings import Settings
from core.tables import Job, JobStatus, utcnow
from tests.utils.factories import auth, create_account, mint_key
from tests.utils.services import free_port
from tests.utils.sse import sse_events
from tests.utils.stack import ApiProcess, StackInfo, Worker, start_api

BODY: dict[str, Any] = {"prompt": "Once upon a time", "raw": True, "temperature": 0.0,
                        "max_tokens": 12, "seed": 1}  # fmt: skip
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.fixture(scope="module")
def apis(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three API processes on the stack's Redis and database: replicas behind a balancer."""
    logs = tmp_path_factory.mktemp("apis")
    started: list[ApiProcess] = []
    try:
        for i in range(3):
            started.append(start_api(stack.settings, free_port(), logs / f"api{i}.log"))
        yield [api.url for api in started]
    finally:
        for api in started:
            api.stop()


@pytest.fixture
def rds(stack: StackInfo) -> redis.Redis:  # type: ignore[type-arg]
    return redis.Redis.from_url(stack.settings.effective_redis_url)


@contextmanager
def paused(worker: Worker) -> Iterator[None]:
    """Jobs stay queued while the infer worker is stopped: every slot stays held."""
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)


def burst(
    urls: list[str], path: str, key: str, body: dict[str, Any], n: int
) -> list[httpx.Response]:
    """`n` requests released together, spread round-robin over the API processes."""
    gate = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        gate.wait()
        return httpx.post(f"{urls[i % len(urls)]}{path}", json=body, headers=auth(key), timeout=120)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert body["request_id"]
    error: dict[str, Any] = body["error"]
    return error


def cancel_all(client: TestClient, key: str, replies: list[httpx.Response]) -> None:
    for resp in replies:
        if resp.status_code == 202:
            client.post(f"/v1/jobs/{resp.json()['id']}/cancel", headers=auth(key))


# --- minting ----------------------------------------------------------------------------


def test_mint_stores_limits_budget_and_payload_logging(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_rpm=30, rate_limit_tpm=5000,
               rate_limit_concurrency=4, monthly_token_budget=10**9, log_payloads=True)  # fmt: skip
    listed = client.get("/v1/keys", headers=auth(gguf_ready["token"])).json()["data"]
    row = next(k for k in listed if k["id"] == key["id"])
    for public in (key, row):
        assert public["rate_limit_rpm"] == 30 and public["rate_limit_tpm"] == 5000
        assert public["rate_limit_concurrency"] == 4 and public["monthly_token_budget"] == 10**9
        assert public["log_payloads"] is True
    plain = mint_key(client, gguf_ready)
    assert plain["rate_limit_rpm"] is None and plain["log_payloads"] is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_limit_rpm", -1),
        ("rate_limit_rpm", "5"),
        ("rate_limit_rpm", 2.5),
        ("rate_limit_rpm", True),
        ("rate_limit_rpm", 10**30),
        ("rate_limit_rpm", 1201),  # over the server's default: only operators raise limits
        ("rate_limit_rpm", 0),  # unlimited, while the server limits
        ("rate_limit_tpm", 2_000_001),
        ("rate_limit_concurrency", 65),
        ("rate_limit_concurrency", [1]),
        ("monthly_token_budget", 0),
        ("monthly_token_budget", 10**16),
        ("monthly_token_budget", "1e9"),
        ("log_payloads", "yes"),
        ("rate_limit_rpm", {"$gt": 0}),
    ],
)
def test_mint_rejects_malformed_or_raised_limits(
    client: TestClient, gguf_ready: dict[str, Any], field: str, value: Any
) -> None:
    resp = client.post(f"/v1/models/{gguf_ready['id']}/keys", json={field: value},
                       headers=auth(gguf_ready["token"]))  # fmt: skip
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["code"] == "INVALID_REQUEST"
    assert field in resp.text


def test_key_cannot_raise_its_own_limits(client: TestClient, gguf_ready: dict[str, Any]) -> None:
    key = mint_key(client, gguf_ready, rate_limit_rpm=2)
    as_key = client.post(f"/v1/models/{gguf_ready['id']}/keys", json={"rate_limit_rpm": 1000},
                         headers=auth(key["key"]))  # fmt: skip
    assert as_key.status_code == 403 and error_of(as_key)["code"] == "AUTHENTICATION_FAILED"
    smuggled = client.post("/v1/infer", headers=auth(key["key"]),
                           json={"model_id": gguf_ready["id"], **BODY, "rate_limit_rpm": 1000})  # fmt: skip
    assert smuggled.status_code == 400 and error_of(smuggled)["code"] == "INVALID_REQUEST"
    stranger = create_account(client, "stranger")
    foreign = client.post(f"/v1/models/{gguf_ready['id']}/keys", json={"rate_limit_rpm": 5},
                          headers=auth(stranger))  # fmt: skip
    assert foreign.status_code == 404
    nobody = client.post(f"/v1/models/{gguf_ready['id']}/keys", json={"rate_limit_rpm": 5})
    assert nobody.status_code == 403
    huge = client.post(f"/v1/models/{gguf_ready['id']}/keys", headers=auth(gguf_ready["token"]),
                       json={"name": "x" * 10_000, "rate_limit_rpm": 5})  # fmt: skip
    assert huge.status_code == 400


# --- limits across API processes -------------------------------------------------------------


def test_requests_per_minute_hold_across_three_api_processes(
    client: TestClient, gguf_ready: dict[str, Any], apis: list[str]
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_rpm=3)  # one request back every 20 s
    replies = burst(apis, "/v1/jobs", key["key"], {"model_id": gguf_ready["id"], **BODY}, 10)
    accepted = [r for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code == 429]

    assert len(accepted) == 3 and len(refused) == 7, [r.status_code for r in replies]
    assert sorted(int(r.headers["x-ratelimit-remaining"]) for r in accepted) == [0, 1, 2]
    for resp in replies:
        assert resp.headers["x-ratelimit-limit"] == "3"
        assert 1 <= int(resp.headers["x-ratelimit-reset"]) <= 60
    for resp in refused:
        assert error_of(resp)["code"] == "RATE_LIMIT_EXCEEDED"
        assert error_of(resp)["details"]["limit"] == "requests_per_minute"
        assert 1 <= int(resp.headers["retry-after"]) <= 20
        assert resp.headers["x-ratelimit-remaining"] == "0"


def test_concurrency_holds_across_api_processes_and_cancel_frees_a_slot(
    client: TestClient, gguf_ready: dict[str, Any], apis: list[str], stack: StackInfo
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_concurrency=2)
    body = {"model_id": gguf_ready["id"], **BODY}
    with paused(stack.infer_worker):
        replies = burst(apis, "/v1/jobs", key["key"], body, 6)
        accepted = [r for r in replies if r.status_code == 202]
        refused = [r for r in replies if r.status_code == 429]
        try:
            assert len(accepted) == 2 and len(refused) == 4, [r.status_code for r in replies]
            for resp in refused:
                assert error_of(resp)["details"]["limit"] == "concurrent_requests"
                assert resp.headers["retry-after"] == "1"
                assert resp.headers["x-ratelimit-remaining-concurrency"] == "0"
            assert {r.headers["x-ratelimit-remaining-concurrency"] for r in accepted} == {"0", "1"}

            cancelled = client.post(f"/v1/jobs/{accepted[0].json()['id']}/cancel",
                                    headers=auth(key["key"]))  # fmt: skip
            assert cancelled.json()["status"] == "cancelled"
            again = httpx.post(f"{apis[2]}/v1/jobs", json=body, headers=auth(key["key"]))
            assert again.status_code == 202, again.text
            accepted.append(again)
        finally:
            cancel_all(client, key["key"], accepted)


def test_per_key_limits_beat_the_defaults(
    client: TestClient, gguf_ready: dict[str, Any], stack: StackInfo
) -> None:
    default = client.post("/v1/infer", json={"model_id": gguf_ready["id"], **BODY},
                          headers=auth(mint_key(client, gguf_ready)["key"]))  # fmt: skip
    own = client.post("/v1/infer", json={"model_id": gguf_ready["id"], **BODY},
                      headers=auth(mint_key(client, gguf_ready, rate_limit_rpm=7,
                                        rate_limit_concurrency=1)["key"]))  # fmt: skip
    assert default.status_code == own.status_code == 200
    assert default.headers["x-ratelimit-limit"] == str(stack.settings.rate_limit_rpm)
    assert default.headers["x-ratelimit-limit-tokens"] == str(stack.settings.rate_limit_tpm)
    limit = str(stack.settings.rate_limit_concurrency)
    assert default.headers["x-ratelimit-limit-concurrency"] == limit
    assert own.headers["x-ratelimit-limit"] == "7" and own.headers["x-ratelimit-remaining"] == "6"
    assert own.headers["x-ratelimit-limit-concurrency"] == "1"


# --- tokens: debited when the job ends ----------------------------------------------------


def test_tokens_per_minute_are_debited_and_then_refuse(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_tpm=2)  # one token back every 30 s
    body = {"model_id": gguf_ready["id"], **BODY}
    first = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    assert first.status_code == 200, first.text
    used = first.json()["tokens_used"]
    assert used > 2  # the prompt alone outweighs the limit
    assert first.headers["x-ratelimit-limit-tokens"] == "2"
    assert first.headers["x-ratelimit-remaining-tokens"] == "2"  # counted before the job ran

    second = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    assert second.status_code == 429
    assert error_of(second)["details"]["limit"] == "tokens_per_minute"
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    # in debt by used - 2 tokens: a token is back after (used - 1) * 30 s at most
    assert 1 <= int(second.headers["retry-after"]) <= (used - 1) * 30
    assert int(second.headers["x-ratelimit-reset-tokens"]) <= used * 30


def test_monthly_budget_is_exhausted_then_rebuilt_from_the_ledger(
    client: TestClient,
    gguf_ready: dict[str, Any],
    rds: redis.Redis,  # type: ignore[type-arg]
) -> None:
    key = mint_key(client, gguf_ready, monthly_token_budget=1)
    body = {"model_id": gguf_ready["id"], **BODY}
    first = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    assert first.status_code == 200, first.text
    used = first.json()["tokens_used"]

    second = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    assert second.status_code == 429, second.text
    assert error_of(second)["code"] == "BUDGET_EXCEEDED"
    assert error_of(second)["details"] == {"limit": "monthly_token_budget", "budget": 1,
                                           "spent": used}  # fmt: skip
    now = utcnow()
    to_next_month = (limits.next_month_start(now) - now).total_seconds()
    assert abs(int(second.headers["retry-after"]) - to_next_month) < 120

    rds.delete(limits.budget_key(key["id"], limits.month_of(now)))  # Redis lost its data
    third = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    assert third.status_code == 429 and error_of(third)["code"] == "BUDGET_EXCEEDED"
    assert error_of(third)["details"]["spent"] == used


def test_async_job_nobody_waits_for_is_debited_and_frees_its_slot(
    client: TestClient,
    gguf_ready: dict[str, Any],
    rds: redis.Redis,  # type: ignore[type-arg]
) -> None:
    key = mint_key(client, gguf_ready, monthly_token_budget=10**6, rate_limit_concurrency=1)
    created = client.post("/v1/jobs", json={"model_id": gguf_ready["id"], **BODY},
                          headers=auth(key["key"]))  # fmt: skip
    assert created.status_code == 202 and created.headers["x-ratelimit-limit-concurrency"] == "1"
    job = wait_ended(client, key["key"], created.json()["id"])
    assert job["status"] == "succeeded"

    spent = rds.get(limits.budget_key(key["id"], limits.month_of(utcnow())))
    assert spent is not None and int(spent) == job["result"]["tokens_used"]
    assert rds.zcard(limits.concurrency_key(key["id"])) == 0


def wait_ended(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


# --- headers on every response ----------------------------------------------------------


def test_json_sse_jobs_and_error_responses_carry_consistent_headers(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_rpm=5, rate_limit_concurrency=3)
    body = {"model_id": gguf_ready["id"], **BODY}
    plain = client.post("/v1/infer", json=body, headers=auth(key["key"]))
    with client.stream("POST", "/v1/infer", json={**body, "stream": True},
                       headers=auth(key["key"])) as streamed:  # fmt: skip
        events = sse_events(streamed.iter_lines())
    job = client.post("/v1/jobs", json=body, headers=auth(key["key"]))
    failed = client.post(
        "/v1/infer", json={**body, "max_tokens": 100_000}, headers=auth(key["key"])
    )

    assert (plain.status_code, streamed.status_code, job.status_code) == (200, 200, 202)
    assert events[-1]["done"] is True
    assert failed.status_code == 400 and error_of(failed)["code"] == "INVALID_REQUEST"
    replies = [plain, streamed, job, failed]
    assert [r.headers["x-ratelimit-remaining"] for r in replies] == ["4", "3", "2", "1"]
    for resp in replies:
        assert all(name in resp.headers for name in RATE_HEADERS)
        assert resp.headers["x-ratelimit-limit"] == "5"
        assert 1 <= int(resp.headers["x-ratelimit-reset"]) <= 60  # 12 s per request spent
        assert resp.headers["x-ratelimit-limit-concurrency"] == "3"
        assert "x-ratelimit-remaining-tokens" in resp.headers
        assert "retry-after" not in resp.headers
    wait_ended(client, key["key"], job.json()["id"])


def test_unauthenticated_requests_are_refused_before_any_limit(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    resp = client.post("/v1/infer", json={"model_id": gguf_ready["id"], **BODY},
                       headers=auth("ik_not-a-key"))  # fmt: skip
    assert resp.status_code == 403
    assert "x-ratelimit-limit" not in resp.headers


# --- slots: released on every path ------------------------------------------------------


def test_disconnected_stream_frees_its_slot_and_is_debited(
    client: TestClient, gguf_ready: dict[str, Any], apis: list[str], stack: StackInfo,
    rds: redis.Redis,  # type: ignore[type-arg]
) -> None:  # fmt: skip
    from tests.workers.test_inference import faulty
    from workers import inference

    key = mint_key(client, gguf_ready, rate_limit_concurrency=1, monthly_token_budget=10**6)
    body = {"model_id": gguf_ready["id"], **BODY, "max_tokens": 400, "stream": True}
    ex = inference.Executor(stack.settings)
    faulty(ex, "slow_endless")  # a token every 50 ms until cancelled
    outcome: list[str] = []
    try:
        with paused(stack.infer_worker):
            time.sleep(1.5)  # its pending BRPOP times out: the task stays in the queue for us

            def run() -> None:
                job_id, kwargs = take_task(rds, stack.settings, key["id"])
                outcome.append(inference.run_job(job_id, ex, **kwargs))

            runner = threading.Thread(target=run)
            runner.start()
            with httpx.stream("POST", f"{apis[0]}/v1/infer", json=body,
                              headers=auth(key["key"]), timeout=60) as resp:  # fmt: skip
                assert resp.status_code == 200
                assert resp.headers["x-ratelimit-remaining-concurrency"] == "0"
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                busy = httpx.post(f"{apis[1]}/v1/infer", json={**body, "stream": False},
                                  headers=auth(key["key"]))  # fmt: skip
                assert busy.status_code == 429
                assert error_of(busy)["details"]["limit"] == "concurrent_requests"
            runner.join(60)  # hung up: the API asks the runner to stop
            assert outcome == ["cancelled"]
            assert rds.zcard(limits.concurrency_key(key["id"])) == 0
            with session_scope(stack.settings) as s:
                job = s.exec(select(Job).where(col(Job.api_key_id) == key["id"])).one()
            assert job.status is JobStatus.CANCELLED and job.completion_tokens >= 1
            spent = rds.get(limits.budget_key(key["id"], limits.month_of(utcnow())))
            assert spent is not None and int(spent) == job.prompt_tokens + job.completion_tokens
            after = httpx.post(f"{apis[2]}/v1/jobs", json={**body, "stream": False},
                               headers=auth(key["key"]))  # fmt: skip
            assert after.status_code == 202, after.text
            cancel_all(client, key["key"], [after])
    finally:
        ex.close()


def _key_of_job(settings: Settings, job_id: str) -> str | None:
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
    return job.api_key_id if job else None


def take_task(
    rds: redis.Redis,  # type: ignore[type-arg]
    settings: Settings,
    key_id: str,
) -> tuple[str, dict[str, Any]]:
    """Take the key's infer task off the broker (no worker consumes it): its job id and the
    keyword arguments the worker would run it with (the job itself, whose row it writes)."""
    deadline = time.monotonic() + 60
    while True:
        for queue in rds.keys("infer*"):
            if rds.type(queue) != b"list":
                continue
            for raw in rds.lrange(queue, 0, -1):
                message = json.loads(raw)
                args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
                # The message carries the job, or (no live worker took carried jobs when it
                # was sent: a paused one's heartbeat may look stale) the API saved its row.
                owner = (kwargs.get("job") or {}).get("api_key_id") or _key_of_job(
                    settings, args[0]
                )
                if owner == key_id and rds.lrem(queue, 1, raw):
                    kwargs.pop("timeout_s", None)
                    return str(args[0]), {"carried": kwargs.pop("job", None), **kwargs}
        assert time.monotonic() < deadline, "the API queued no task"
        time.sleep(0.05)


def test_slot_of_a_dead_holder_expires_with_its_lease(
    rds: redis.Redis,  # type: ignore[type-arg]
) -> None:
    key_id = new_id("k", 10)
    keys = [limits.rpm_key(key_id), limits.tpm_key(key_id), limits.concurrency_key(key_id),
            limits.budget_key(key_id, "2026-01")]  # fmt: skip
    admit = limits.admit_script(rds)

    def ask(job: str, lease_ms: int) -> str:
        reply = admit(keys=keys, args=[0, 0, 1, 0, job, lease_ms])
        verdict: bytes = reply[0]
        return verdict.decode()

    assert ask("job_dead", 50) == "ok"  # its API process dies: nobody releases it
    assert ask("job_next", 60_000) == "concurrency"
    time.sleep(0.1)
    assert ask("job_next", 60_000) == "ok"
    assert 0 < rds.pttl(limits.concurrency_key(key_id)) <= 60_000  # the set itself expires too


def test_budget_months_follow_utc() -> None:
    from datetime import UTC, datetime

    dec = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert limits.month_of(dec) == "2026-12"
    assert limits.next_month_start(dec) == datetime(2027, 1, 1, tzinfo=UTC)
    assert limits.month_start(dec) == datetime(2026, 12, 1, tzinfo=UTC)


# --- reads: a bucket of their own --------------------------------------------------------


@contextmanager
def app_with(settings: Settings) -> Iterator[TestClient]:
    from api.main import create_app
    from core.settings import get_settings

    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_job_reads_have_a_per_minute_limit_per_key_and_per_account(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    settings = stack.settings.model_copy(update={"rate_limit_read_rpm": 3})
    with app_with(settings) as c:
        key = mint_key(c, gguf_ready)["key"]
        created = c.post("/v1/jobs", json={"model_id": gguf_ready["id"], **BODY}, headers=auth(key))
        assert created.status_code == 202, created.text
        job = f"/v1/jobs/{created.json()['id']}"
        for _ in range(50):  # a bad credential is refused before it can use anyone's bucket
            assert c.get(job, headers=auth("ik_not-a-key")).status_code == 403
        assert [c.get(job, headers=auth(key)).status_code for _ in range(3)] == [200] * 3
        over = c.get(job, headers=auth(key))
        assert over.status_code == 429
        error = error_of(over)
        assert error["code"] == "RATE_LIMIT_EXCEEDED"
        assert error["details"]["limit"] == "reads_per_minute"
        assert int(over.headers["retry-after"]) == error["details"]["retry_after_s"] >= 1
        # The stream and cancel draw from the same bucket.
        assert c.get(f"{job}/stream", headers=auth(key)).status_code == 429
        assert c.post(f"{job}/cancel", headers=auth(key)).status_code == 429
        # Other readers have buckets of their own; running jobs is limited apart from reading.
        assert c.get(job, headers=auth(gguf_ready["token"])).status_code == 200  # owner account
        assert (
            c.get(job, headers=auth(mint_key(c, gguf_ready)["key"])).status_code == 404
        )  # not its job
        again = c.post("/v1/jobs", json={"model_id": gguf_ready["id"], **BODY}, headers=auth(key))
        assert again.status_code == 202
        c.post(f"/v1/jobs/{again.json()['id']}/cancel", headers=auth(gguf_ready["token"]))


def test_job_reads_fail_open_without_redis_and_the_limit_can_be_off(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    key = mint_key(client, gguf_ready)["key"]
    created = client.post(
        "/v1/jobs", json={"model_id": gguf_ready["id"], **BODY}, headers=auth(key)
    )
    job = f"/v1/jobs/{created.json()['id']}"
    # The limit shields the database; with Redis unreachable a read still answers from it.
    down = stack.settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "rate_limit_read_rpm": 1}
    )
    with app_with(down) as c:
        assert [c.get(job, headers=auth(key)).status_code for _ in range(3)] == [200] * 3
    off = stack.settings.model_copy(update={"rate_limit_read_rpm": 0})
    with app_with(off) as c:
        assert {c.get(job, headers=auth(key)).status_code for _ in range(20)} == {200}

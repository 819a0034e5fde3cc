"""Streamed, cancelled and abandoned jobs on the real stack are billed for exactly their tokens.

The API, queue, workers and llama.cpp are real; only Stripe is the local fake server. Each
test bills a fresh key to its own Stripe customer, so a push touches only that test's usage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlmodel import select

from billing.pusher import push_all
from core.db import session_scope
from core.settings import Settings
from core.tables import Job, JobStatus, PushState, UsageEvent
from tests.conftest import SECRETS
from tests.utils.factories import auth
from tests.utils.fake_stripe import FakeStripe
from tests.utils.live_server import live_api
from tests.utils.sse import sse_events
from tests.utils.stack import StackInfo

OPERATOR = auth(SECRETS["operator_token"])
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT)
MAX_TOKENS = 240
LONG: dict[str, Any] = {
    "prompt": "Once upon a time",
    "raw": True,
    "temperature": 0.8,
    "max_tokens": MAX_TOKENS,
}


@dataclass
class Billed:
    key: str
    model_id: str
    customer: str
    stripe: Settings  # the stack's settings pointed at the fake Stripe server


@pytest.fixture
def billed(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any], fake_stripe: FakeStripe
) -> Billed:
    """A new key for the ready model, billed (by an operator) to a new Stripe customer."""
    customer = fake_stripe.add_customer("client")
    minted = client.post(f"/v1/models/{gguf_ready['id']}/keys", json={"name": "billed"},
                         headers=auth(gguf_ready["token"]))  # fmt: skip
    assert minted.status_code == 201, minted.text
    linked = client.put(f"/v1/keys/{minted.json()['id']}/billed-customer",
                        json={"stripe_customer_id": customer}, headers=OPERATOR)  # fmt: skip
    assert linked.status_code == 200, linked.text
    stripe = stack.settings.model_copy(
        update={
            "stripe_api_key": SecretStr(fake_stripe.api_key),
            "stripe_api_base": fake_stripe.url,
        }
    )
    return Billed(minted.json()["key"], gguf_ready["id"], customer, stripe)


def ended_job(settings: Settings, job_id: str, timeout: float = 120) -> Job:
    """The job row once its worker has written the terminal state (and usage with it)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings) as s:
            job = s.get(Job, job_id)
        if job is not None and job.status in ENDED:
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not end: {job}"
        time.sleep(0.05)


def assert_billed_exactly(billed: Billed, fake: FakeStripe, job: Job) -> UsageEvent:
    """Ledger row = job row, and after a push Stripe holds one event of prompt + completion."""
    with session_scope(billed.stripe) as s:
        rows = list(s.exec(select(UsageEvent).where(UsageEvent.job_id == job.id)))
    assert len(rows) == 1, rows
    usage = rows[0]
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        job.prompt_tokens,
        job.completion_tokens,
    )
    assert usage.stripe_customer_id == billed.customer

    report = push_all(billed.stripe, customer=billed.customer)

    assert report.pushed == 1 and report.failed == 0, report
    sent = fake.events()
    assert set(sent) == {usage.id}
    assert sent[usage.id].customer == billed.customer
    assert sent[usage.id].value == job.prompt_tokens + job.completion_tokens
    with session_scope(billed.stripe) as s:
        pushed = s.get(UsageEvent, usage.id)
    assert pushed is not None and pushed.push_state is PushState.PUSHED
    return usage


def test_streamed_infer_is_billed_for_the_streamed_tokens(
    client: TestClient, stack: StackInfo, billed: Billed, fake_stripe: FakeStripe
) -> None:
    body = {"model_id": billed.model_id, **LONG, "max_tokens": 24, "stream": True}
    with client.stream("POST", "/v1/infer", json=body, headers=auth(billed.key)) as resp:
        assert resp.status_code == 200, resp.read()
        job_id = resp.headers["x-job-id"]
        events = sse_events(resp.iter_lines())
    done = events[-1]
    assert done["done"] is True and done["completion_tokens"] >= 1

    job = ended_job(stack.settings, job_id)

    assert job.status is JobStatus.SUCCEEDED
    assert (job.prompt_tokens, job.completion_tokens) == (
        done["prompt_tokens"],
        done["completion_tokens"],
    )
    assert_billed_exactly(billed, fake_stripe, job)


def _first_token(stream: httpx.Response) -> None:
    for line in stream.iter_lines():
        if line.startswith("data: ") and "token" in json.loads(line[6:]):
            return
    pytest.fail("the stream ended before its first token")


def test_job_cancelled_while_running_is_billed_for_the_tokens_produced(
    stack: StackInfo, billed: Billed, fake_stripe: FakeStripe
) -> None:
    with live_api(stack.settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        created = http.post("/v1/jobs", json={"model_id": billed.model_id, **LONG},
                            headers=auth(billed.key))  # fmt: skip
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=auth(billed.key)) as s:
            _first_token(s)  # running, with tokens already produced
            cancel = http.post(f"/v1/jobs/{job_id}/cancel", headers=auth(billed.key))
        assert cancel.status_code == 200, cancel.text

    job = ended_job(stack.settings, job_id)

    # A tiny random model may reach its end first; either way it is billed for what it made.
    assert job.status in (JobStatus.CANCELLED, JobStatus.SUCCEEDED), job
    assert job.completion_tokens >= 1
    if job.status is JobStatus.CANCELLED:
        assert job.completion_tokens < MAX_TOKENS
    assert_billed_exactly(billed, fake_stripe, job)


def test_client_gone_mid_stream_is_billed_for_the_tokens_produced(
    stack: StackInfo, billed: Billed, fake_stripe: FakeStripe
) -> None:
    body = {"model_id": billed.model_id, **LONG, "stream": True}
    with (
        live_api(stack.settings) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/infer", json=body, headers=auth(billed.key)) as resp,
    ):
        assert resp.status_code == 200
        job_id = resp.headers["x-job-id"]
        _first_token(resp)
        # leaving the block hangs up with the generation still going

    job = ended_job(stack.settings, job_id)

    assert job.status in (JobStatus.CANCELLED, JobStatus.SUCCEEDED), job
    assert job.completion_tokens >= 1
    assert_billed_exactly(billed, fake_stripe, job)


def test_job_cancelled_mid_generation_is_billed_for_the_partial_tokens(
    stack: StackInfo, billed: Billed, fake_stripe: FakeStripe
) -> None:
    """Cancel surely lands mid-way: a runner that emits a token every 50 ms until stopped."""
    import threading

    from core import events
    from tests.workers.test_inference import faulty, make_job
    from workers import inference

    ex = inference.Executor(stack.settings)
    try:
        faulty(ex, "slow_endless")
        job_id = make_job(stack, {"key": billed.key, "id": billed.model_id},
                          params={"max_tokens": MAX_TOKENS})  # fmt: skip
        outcome: list[str] = []
        run = threading.Thread(target=lambda: outcome.append(inference.run_job(job_id, ex)))
        run.start()
        deadline = time.monotonic() + 60
        while ex.redis.xlen(events.stream_key(job_id)) < 4:  # status + a few tokens
            assert time.monotonic() < deadline, "the job produced no tokens"
            time.sleep(0.02)
        events.request_cancel(ex.redis, job_id)
        run.join(60)
    finally:
        ex.close()

    job = ended_job(stack.settings, job_id)

    assert outcome == ["cancelled"] and job.status is JobStatus.CANCELLED, job
    assert 1 <= job.completion_tokens < MAX_TOKENS
    assert_billed_exactly(billed, fake_stripe, job)

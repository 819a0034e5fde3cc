"""End-to-end ledger guarantees: a pusher SIGKILLed mid-batch, 1,000 mixed jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

from core.db import session_scope
from core.settings import Settings
from core.tables import Job, JobStatus, Model, PushState, utcnow
from tests.billing.conftest import make_account, make_key, make_usage, run_cli, usage_rows
from tests.utils.fake_stripe import FakeStripe
from tests.utils.stack import ROOT, env_for
from workers.jobs import JobContext, Terminal, finish


def test_pusher_killed_mid_batch_then_restarted_loses_and_duplicates_nothing(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    leased = settings.model_copy(update={"billing_claim_lease_s": 1})
    acct, model = make_account(settings)
    ids = make_usage(settings, acct, model, count=60, prompt=3, completion=4)
    fake_stripe.state.delay_each_s = 0.05
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "billing", "push"], cwd=ROOT, env=env_for(leased),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while len(fake_stripe.requests_to("/v1/billing/meter_events")) < 10:
            assert proc.poll() is None, "the pusher finished before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    while any(r.status == 0 for r in fake_stripe.requests_to("/")):  # the in-flight one lands
        time.sleep(0.01)
    sent_before = set(fake_stripe.events())
    assert 0 < len(sent_before) < len(ids)
    rows = usage_rows(settings)
    assert all(r.push_state is PushState.PENDING for r in rows.values())  # none marked yet
    leases = [r.claimed_until for r in rows.values() if r.claimed_until is not None]
    fake_stripe.state.delay_each_s = 0.0
    while utcnow() <= max(leases):  # the dead pusher's lease runs out
        time.sleep(0.1)

    result = run_cli(leased, "billing", "push")

    assert result.returncode == 0, result.stderr
    assert set(fake_stripe.events()) == set(ids)
    assert all(ev.value == 7 for ev in fake_stripe.events().values())
    assert fake_stripe.state.duplicates == len(sent_before)  # resent, refused as duplicates
    assert {r.push_state for r in usage_rows(settings).values()} == {PushState.PUSHED}


def _finish_jobs(settings: Settings, acct: str, model_id: str, key: str, n: int) -> dict[str, int]:
    """n real job endings through workers.jobs.finish; returns tokens produced per customer."""
    statuses = [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.TIMED_OUT]
    expected: dict[str, int] = {}
    with session_scope(settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
    for i in range(n):
        status = statuses[i % 4]
        use_key = i % 3 == 0
        job = Job(id=f"job_mixed{i:05d}", account_id=acct, model_id=model_id,
                  api_key_id=key if use_key else None, status=JobStatus.RUNNING)  # fmt: skip
        with session_scope(settings) as s:
            s.add(job)
        customer = "cus_client" if use_key else "cus_test1"
        completion = 0 if status is JobStatus.FAILED and i % 8 == 2 else (i % 17) + 1
        prompt = (i % 5) + 2
        end = Terminal(status=status, prompt_tokens=prompt, completion_tokens=completion)
        assert finish(settings, JobContext(job=job, model=model, files=[]), end)
        if completion > 0 or status is JobStatus.SUCCEEDED:
            expected[customer] = expected.get(customer, 0) + prompt + completion
    return expected


def test_ledger_totals_equal_stripe_totals_after_1000_mixed_jobs_with_faults(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    key = make_key(settings, acct, model, billed="cus_client")
    expected = _finish_jobs(settings, acct, model, key, 1000)
    path = "/v1/billing/meter_events"
    for status in (429, 500, 502, 503):
        fake_stripe.inject("status", path=path, status=status, count=4)
    fake_stripe.inject("drop", path=path, count=3, processed=True)
    fake_stripe.inject("drop", path=path, count=3, processed=False)
    fake_stripe.inject("timeout", path=path, count=2, delay_s=2.5)

    now = utcnow()
    for _ in range(20):
        report = fake_push(settings, now)
        if not any(r.push_state is PushState.PENDING for r in usage_rows(settings).values()):
            break
        now += timedelta(minutes=10)

    rows = usage_rows(settings).values()
    assert {r.push_state for r in rows} == {PushState.PUSHED}, report
    ledger: dict[str, int] = {}
    for r in rows:
        assert r.stripe_customer_id is not None
        ledger[r.stripe_customer_id] = (
            ledger.get(r.stripe_customer_id, 0) + r.prompt_tokens + r.completion_tokens
        )
    assert ledger == expected
    assert fake_stripe.totals_by_customer() == expected
    assert len(fake_stripe.events()) == len(rows)


def fake_push(settings: Settings, now: object) -> object:
    from billing.pusher import push_all

    return push_all(settings, now=now)  # type: ignore[arg-type]


def test_cli_push_without_stripe_says_so(settings: Settings, tmp_path) -> None:
    bare = settings.model_copy(update={"stripe_api_key": None})
    acct, model = make_account(settings)
    make_usage(settings, acct, model)
    result = run_cli(bare, "billing", "push")
    assert result.returncode == 0
    assert "INFERATECH_STRIPE_API_KEY" in result.stdout
    assert {r.push_state for r in usage_rows(settings).values()} == {PushState.PENDING}

"""Billing benchmarks: pusher throughput (v2 stream mode) and the cost of writing usage.

Targets are printed as PASS/FAIL, not asserted (a shared 2-core host is too noisy);
correctness is asserted. Run with `make bench`.
"""

from __future__ import annotations

import statistics
import time

import pytest
from sqlalchemy import update
from sqlmodel import col

from billing.pusher import push_all
from core.db import session_scope, update_rows
from core.settings import Settings
from core.tables import Job, JobStatus, Model, PushState, utcnow
from tests.billing.conftest import make_account, make_usage, usage_rows
from tests.utils.fake_stripe import FakeStripe
from workers.jobs import LIVE, JobContext, Terminal, finish

pytestmark = pytest.mark.bench
EVENTS = 5000
JOBS = 300


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<44} {value}")


def test_bench_pusher_stream_throughput(settings: Settings, fake_stripe: FakeStripe) -> None:
    stream = settings.model_copy(update={"stripe_meter_stream": True, "billing_push_batch": 1000})
    acct, model = make_account(settings)
    for _ in range(EVENTS // 1000):
        make_usage(settings, acct, model, count=1000)

    start = time.perf_counter()
    report = push_all(stream)
    elapsed = time.perf_counter() - start

    assert report.pushed == EVENTS
    assert len(fake_stripe.events()) == EVENTS
    assert {r.push_state for r in usage_rows(settings).values()} == {PushState.PUSHED}
    rate = EVENTS / elapsed
    db = settings.effective_database_url.split(":")[0]
    _table(f"pusher, v2 stream mode, {db}", [
        ("events", str(EVENTS)),
        ("seconds", f"{elapsed:.2f}"),
        ("events/s (target >= 1000)", f"{rate:.0f} {'PASS' if rate >= 1000 else 'FAIL'}"),
    ])  # fmt: skip


def _finish_without_usage(settings: Settings, job: Job, end: Terminal) -> bool:
    """finish() minus the usage event: the same terminal update and touches."""
    with session_scope(settings) as s:
        stmt = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_(LIVE))
            .values(status=end.status, prompt_tokens=end.prompt_tokens,
                    completion_tokens=end.completion_tokens, timings=end.timings,
                    finished_at=utcnow())
        )  # fmt: skip
        if update_rows(s, stmt) != 1:
            return False
        now = utcnow()
        update_rows(
            s, update(Model).where(col(Model.id) == job.model_id).values(last_invoked_at=now)
        )
    return True


def test_bench_usage_write_cost_per_job(settings: Settings) -> None:
    acct, model_id = make_account(settings)
    with session_scope(settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
    end = Terminal(status=JobStatus.SUCCEEDED, prompt_tokens=10, completion_tokens=20)
    timings: dict[str, list[float]] = {"with usage": [], "without usage": []}
    for i in range(JOBS):
        for label in ("with usage", "without usage"):
            job = Job(id=f"job_b{label[:5].strip()}{i:05d}", account_id=acct, model_id=model_id,
                      status=JobStatus.RUNNING)  # fmt: skip
            with session_scope(settings) as s:
                s.add(job)
            t0 = time.perf_counter()
            if label == "with usage":
                ok = finish(settings, JobContext(job, model, [], "cus_test1"), end)
            else:
                ok = _finish_without_usage(settings, job, end)
            timings[label].append((time.perf_counter() - t0) * 1000)
            assert ok
    with_ms = statistics.median(timings["with usage"])
    without_ms = statistics.median(timings["without usage"])
    delta = with_ms - without_ms
    db = settings.effective_database_url.split(":")[0]
    _table(f"job finish, median of {JOBS}, {db}", [
        ("finish with usage event (ms)", f"{with_ms:.3f}"),
        ("same path without it (ms)", f"{without_ms:.3f}"),
        ("added by the usage event (target <= 1 ms)", f"{delta:.3f} {'PASS' if delta <= 1 else 'FAIL'}"),
    ])  # fmt: skip
    assert len(usage_rows(settings)) == JOBS

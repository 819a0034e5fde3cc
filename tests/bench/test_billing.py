"""Billing benchmarks: pusher throughput (v2 stream mode) and the cost of writing usage.

Targets are printed as PASS/FAIL, not asserted (a shared 2-core host is too noisy);
correctness is asserted. Run with `make bench`.
"""

from __future__ import annotations

import statistics
import time

import pytest

from billing.pusher import push_all
from core.db import session_scope
from core.settings import Settings
from core.tables import Job, JobStatus, Model, PushState
from tests.billing.conftest import make_account, make_usage, usage_rows
from tests.utils.fake_stripe import FakeStripe
from workers.jobs import JobContext, Terminal, finish

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


def test_bench_usage_write_cost_per_job(settings: Settings) -> None:
    acct, model_id = make_account(settings)
    with session_scope(settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
    # The baseline is finish() itself on a job that writes no usage (failed before its first
    # token): the same UPDATE, the same touches, the same commit; only the usage write differs.
    ends = {
        "with usage": Terminal(status=JobStatus.SUCCEEDED, prompt_tokens=10, completion_tokens=20),
        "without usage": Terminal(status=JobStatus.FAILED, prompt_tokens=10, completion_tokens=0),
    }
    timings: dict[str, list[float]] = {"with usage": [], "without usage": []}
    for i in range(JOBS):
        order = list(ends) if i % 2 else list(reversed(ends))  # neither always runs first
        for label in order:
            job = Job(id=f"job_b{label[:5].strip()}{i:05d}", account_id=acct, model_id=model_id,
                      status=JobStatus.RUNNING)  # fmt: skip
            with session_scope(settings) as s:
                s.add(job)
            t0 = time.perf_counter()
            ok = finish(settings, JobContext(job, model, []), ends[label])
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

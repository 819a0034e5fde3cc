"""The pusher as deployed: Celery beat queues it every few seconds, a real worker runs it."""

from __future__ import annotations

import time
from pathlib import Path

from core.settings import Settings
from core.tables import PushState
from tests.billing.conftest import make_account, make_usage, usage_rows
from tests.utils.fake_stripe import FakeStripe
from tests.utils.stack import Worker, start_worker


def _wait_sent(fake: FakeStripe, worker: Worker, ids: set[str]) -> None:
    deadline = time.monotonic() + 60
    while not ids <= set(fake.events()):
        assert worker.alive(), worker.log()[-3000:]
        assert time.monotonic() < deadline, f"not pushed by beat:\n{worker.log()[-3000:]}"
        time.sleep(0.1)


def test_beat_pushes_due_usage_with_nobody_asking(
    settings: Settings, fake_stripe: FakeStripe, billing_redis: str, tmp_path: Path
) -> None:
    beat = settings.model_copy(update={"redis_url": billing_redis, "billing_push_interval_s": 0.5})
    acct, model = make_account(beat)
    first = set(make_usage(beat, acct, model, count=3, prompt=2, completion=3))
    worker = start_worker(beat, tmp_path / "worker.log", "background",
                          beat_schedule=tmp_path / "celerybeat-schedule")  # fmt: skip
    try:
        _wait_sent(fake_stripe, worker, first)
        later = set(make_usage(beat, acct, model, count=2, prompt=1, completion=1))
        _wait_sent(fake_stripe, worker, later)  # a later tick, still nobody calling push
    finally:
        worker.stop()

    assert set(fake_stripe.events()) == first | later
    assert fake_stripe.totals_by_customer() == {"cus_test1": 3 * 5 + 2 * 2}
    assert {r.push_state for r in usage_rows(beat).values()} == {PushState.PUSHED}
    assert "inferatech.billing_push" in worker.log()

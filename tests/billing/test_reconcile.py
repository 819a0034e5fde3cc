"""`inferatech billing reconcile`: ledger sums per meter, customer and hour against Stripe's.

With separate input and output meters, prompt tokens are compared with the input meter and
completion tokens with the output meter: tokens billed on the wrong meter are drift even when
the total is right.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from billing.pusher import push_all
from billing.reconcile import Drift, reconcile
from core.db import session_scope
from core.settings import Settings
from core.tables import utcnow
from tests.billing.conftest import make_account, make_usage, run_cli
from tests.utils.fake_stripe import FakeStripe, MeterEvent

SPLIT = {"stripe_input_meter_event_name": "tokens_in",
         "stripe_output_meter_event_name": "tokens_out"}  # fmt: skip


@pytest.fixture
def split(settings: Settings, fake_stripe: FakeStripe) -> Settings:
    """Settings with two meters, both known to the fake server."""
    fake_stripe.add_meter("tokens_in")
    fake_stripe.add_meter("tokens_out")
    return settings.model_copy(update=SPLIT)


def _hour_ago(hours: int) -> datetime:
    return utcnow().replace(minute=30, second=0, microsecond=0) - timedelta(hours=hours)


def _days(when: datetime) -> tuple[str, str]:
    """`--from` and `--to` dates around `when`."""
    day = timedelta(days=1)
    return (when - day).date().isoformat(), (when + day).date().isoformat()


def _drift(settings: Settings, when: datetime) -> list[Drift]:
    with session_scope(settings) as s:
        return reconcile(s, settings, when - timedelta(days=1), when + timedelta(days=1))


def _stray(fake: FakeStripe, name: str, value: int, when: datetime) -> None:
    """Something reached Stripe that the ledger never sent."""
    with fake.lock:
        fake.state.meter_events[f"stray_{name}"] = MeterEvent(
            f"stray_{name}", name, "cus_test1", value, int(when.timestamp()), "v1"
        )


def test_reconcile_reports_agreement_then_drift(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    when = _hour_ago(2)
    make_usage(settings, acct, model, count=4, prompt=5, completion=5, occurred_at=when)
    push_all(settings)

    start, end = _days(when)
    agree = run_cli(settings, "billing", "reconcile", "--from", start, "--to", end)
    assert agree.returncode == 0, agree.stdout + agree.stderr
    assert "agree" in agree.stdout

    _stray(fake_stripe, "tokens", 9, when)
    drift = run_cli(settings, "billing", "reconcile", "--from", start, "--to", end)
    assert drift.returncode == 1
    assert "cus_test1" in drift.stdout and "+9" in drift.stdout and "40" in drift.stdout


def test_reconcile_split_meters_agree_after_a_push(
    split: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(split)
    when = _hour_ago(3)
    make_usage(split, acct, model, count=3, prompt=4, completion=11, occurred_at=when)
    make_usage(
        split, acct, model, count=2, prompt=6, completion=0, occurred_at=when + timedelta(hours=1)
    )
    assert push_all(split).pushed == 5

    assert _drift(split, when) == []

    queried = {r.path.split("/")[4] for r in fake_stripe.requests_to("/v1/billing/meters/")}
    assert {fake_stripe.state.meters[m] for m in queried} == {"tokens_in", "tokens_out"}


def test_reconcile_split_meters_catch_tokens_on_the_wrong_meter(
    split: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(split)
    when = _hour_ago(2)
    [uid, _] = make_usage(split, acct, model, count=2, prompt=4, completion=11, occurred_at=when)
    push_all(split)
    with fake_stripe.lock:  # the same total, but 5 completion tokens billed as prompt tokens
        fake_stripe.state.meter_events[f"{uid}.prompt"].value += 5
        fake_stripe.state.meter_events[f"{uid}.completion"].value -= 5

    drift = _drift(split, when)

    hour = when.replace(minute=0)
    assert drift == [
        Drift("tokens_in", "cus_test1", hour, ledger=8, stripe=13),
        Drift("tokens_out", "cus_test1", hour, ledger=22, stripe=17),
    ]


def test_reconcile_split_meters_on_the_cli_name_the_meter(
    split: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(split)
    when = _hour_ago(2)
    make_usage(split, acct, model, count=3, prompt=2, completion=7, occurred_at=when)
    push_all(split)
    _stray(fake_stripe, "tokens_out", 9, when)

    start, end = _days(when)
    result = run_cli(split, "billing", "reconcile", "--from", start, "--to", end)

    assert result.returncode == 1, result.stdout + result.stderr
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines()]
    rows = [c for c in cells if c and c[0] == "tokens_out"]
    assert [r[:2] + r[3:] for r in rows] == [["tokens_out", "cus_test1", "21", "30", "+9"]]
    assert "meter" in result.stdout and "tokens_in" not in result.stdout


def test_reconcile_split_meters_need_both_meters_on_stripe(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    fake_stripe.add_meter("tokens_in")
    half = settings.model_copy(update=SPLIT)
    acct, model = make_account(half)
    when = _hour_ago(1)
    make_usage(half, acct, model, occurred_at=when)

    with pytest.raises(LookupError, match="tokens_out"):
        _drift(half, when)

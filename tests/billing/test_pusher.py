"""The pusher against the real SDK and the fake Stripe server, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from billing.pusher import push_all, push_once
from core.settings import Settings
from core.tables import PushState, utcnow
from tests.billing.conftest import billing_settings, make_account, make_key, make_usage, usage_rows
from tests.utils.fake_stripe import FakeStripe


def test_push_sends_one_meter_event_per_usage_event(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    when = utcnow() - timedelta(hours=3)
    ids = make_usage(settings, acct, model, count=3, prompt=7, completion=5, occurred_at=when)

    report = push_once(settings)

    assert (report.claimed, report.pushed, report.failed) == (3, 3, 0)
    events = fake_stripe.events()
    assert set(events) == set(ids)
    for ev in events.values():
        assert (ev.event_name, ev.customer, ev.value) == ("tokens", "cus_test1", 12)
        assert ev.timestamp == int(when.timestamp())
    rows = usage_rows(settings)
    assert all(r.push_state is PushState.PUSHED and r.attempts == 1 for r in rows.values())
    assert push_once(settings).claimed == 0  # nothing is sent twice


def test_push_without_stripe_idles_and_keeps_the_ledger(
    settings: Settings, fake_stripe: FakeStripe, tmp_path
) -> None:
    unconfigured = billing_settings(tmp_path, settings.database_url, None)
    acct, model = make_account(settings)
    make_usage(settings, acct, model, count=2)

    report = push_all(unconfigured)

    assert report.claimed == 0
    assert fake_stripe.requests_to("/") == []
    assert {r.push_state for r in usage_rows(settings).values()} == {PushState.PENDING}


def test_push_timeout_is_retried_and_stripe_keeps_one_event(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    [uid] = make_usage(settings, acct, model)
    fake_stripe.inject("timeout", path="/v1/billing/meter_events", delay_s=3.0)

    first = push_once(settings)
    assert (first.pushed, first.retried) == (0, 1)
    row = usage_rows(settings)[uid]
    assert row.push_state is PushState.PENDING and row.attempts == 1
    assert row.last_error and "APIConnectionError" in row.last_error
    assert row.next_attempt_at is not None
    assert push_once(settings, now=row.next_attempt_at - timedelta(milliseconds=1)).claimed == 0

    second = push_once(settings, now=row.next_attempt_at + timedelta(seconds=1))

    assert second.pushed == 1
    assert len(fake_stripe.requests_to("/v1/billing/meter_events")) == 2
    assert list(fake_stripe.events()) == [uid]
    assert fake_stripe.state.duplicates == 1
    assert usage_rows(settings)[uid].push_state is PushState.PUSHED


def test_push_retries_429_500_and_dropped_connections_with_backoff(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    ids = make_usage(settings, acct, model, count=3)
    fake_stripe.inject("status", path="/v1/billing/meter_events", status=429)
    fake_stripe.inject("status", path="/v1/billing/meter_events", status=500)
    fake_stripe.inject("drop", path="/v1/billing/meter_events", processed=False)

    first = push_once(settings)
    assert (first.pushed, first.retried) == (0, 3)
    rows = usage_rows(settings)
    errors = sorted(rows[i].last_error or "" for i in ids)
    assert any("429" in e for e in errors) and any("500" in e for e in errors)
    assert any("network" in e for e in errors)

    later = utcnow() + timedelta(seconds=5)
    assert push_once(settings, now=later).pushed == 3
    assert set(fake_stripe.events()) == set(ids)


def test_push_backoff_grows_with_attempts(settings: Settings, fake_stripe: FakeStripe) -> None:
    acct, model = make_account(settings)
    [uid] = make_usage(settings, acct, model)
    fake_stripe.inject("status", path="/v1/billing/meter_events", status=503, count=3)
    now = utcnow()
    delays = []
    for _ in range(3):
        push_once(settings, now=now)
        row = usage_rows(settings)[uid]
        assert row.next_attempt_at is not None
        delays.append((row.next_attempt_at - now).total_seconds())
        now = row.next_attempt_at
    assert delays == [1.0, 2.0, 4.0]
    assert push_once(settings, now=now).pushed == 1


def test_push_permanent_error_fails_the_event_for_operators(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings, customer="cus_gone")
    [bad] = make_usage(settings, acct, model, customer="cus_gone")
    fake_stripe.state.rejected_customers.add("cus_gone")

    report = push_all(settings)

    assert report.failed == 1
    row = usage_rows(settings)[bad]
    assert row.push_state is PushState.FAILED
    assert row.last_error and "No such customer" in row.last_error
    assert fake_stripe.events() == {}
    assert push_all(settings).claimed == 0  # never resent on its own


def test_push_expires_events_older_than_35_days_without_sending(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings)
    [old] = make_usage(settings, acct, model, occurred_at=utcnow() - timedelta(days=36))
    [recent] = make_usage(settings, acct, model, occurred_at=utcnow() - timedelta(days=34))

    report = push_all(settings)

    assert (report.expired, report.pushed) == (1, 1)
    rows = usage_rows(settings)
    assert rows[old].push_state is PushState.EXPIRED and rows[old].attempts == 0
    assert rows[recent].push_state is PushState.PUSHED
    assert list(fake_stripe.events()) == [recent]


def test_push_bills_the_key_customer_and_links_late_customers(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    acct, model = make_account(settings, customer=None)
    key = make_key(settings, acct, model, billed="cus_client")
    [billed] = make_usage(settings, acct, model, customer=None, key_id=key)
    [orphan] = make_usage(settings, acct, model, customer=None)

    report = push_all(settings)

    assert (report.pushed, report.failed) == (1, 1)
    assert fake_stripe.events()[billed].customer == "cus_client"
    row = usage_rows(settings)[orphan]
    assert row.push_state is PushState.FAILED and "no Stripe customer" in (row.last_error or "")


def test_push_split_meters_send_prompt_and_completion_apart(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    split = settings.model_copy(
        update={
            "stripe_input_meter_event_name": "tokens_in",
            "stripe_output_meter_event_name": "tokens_out",
        }
    )
    acct, model = make_account(settings)
    [uid] = make_usage(settings, acct, model, prompt=3, completion=9)

    assert push_once(split).pushed == 1

    events = fake_stripe.events()
    assert {k: (v.event_name, v.value) for k, v in events.items()} == {
        f"{uid}.prompt": ("tokens_in", 3),
        f"{uid}.completion": ("tokens_out", 9),
    }


def test_stream_mode_batches_up_to_100_events_per_request(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    stream = settings.model_copy(update={"stripe_meter_stream": True})
    acct, model = make_account(settings)
    ids = make_usage(settings, acct, model, count=250)

    report = push_all(stream)

    assert report.pushed == 250
    calls = fake_stripe.requests_to("/v2/billing/meter_event_stream")
    assert [len(c.body["events"]) for c in calls] == [100, 100, 50]
    assert set(fake_stripe.events()) == set(ids)
    assert all(ev.via == "v2" for ev in fake_stripe.events().values())


def test_stream_mode_renews_an_expired_session(settings: Settings, fake_stripe: FakeStripe) -> None:
    stream = settings.model_copy(update={"stripe_meter_stream": True})
    acct, model = make_account(settings)
    make_usage(settings, acct, model, count=2)
    push_all(stream)
    with fake_stripe.lock:  # Stripe ends every session after 15 minutes
        fake_stripe.state.sessions.clear()
    ids = make_usage(settings, acct, model, count=2)

    assert push_all(stream).pushed == 2

    assert set(ids) <= set(fake_stripe.events())
    assert len(fake_stripe.requests_to("/v2/billing/meter_event_session")) >= 2


def test_stream_mode_retries_a_failed_request(settings: Settings, fake_stripe: FakeStripe) -> None:
    stream = settings.model_copy(update={"stripe_meter_stream": True})
    acct, model = make_account(settings)
    ids = make_usage(settings, acct, model, count=5)
    fake_stripe.inject("timeout", path="/v2/billing/meter_event_stream", delay_s=3.0)

    assert push_once(stream).retried == 5
    assert push_once(stream, now=utcnow() + timedelta(seconds=5)).pushed == 5

    assert set(fake_stripe.events()) == set(ids)
    assert fake_stripe.state.duplicates == 5


def test_concurrent_pushers_split_the_backlog_without_duplicates(
    settings: Settings, fake_stripe: FakeStripe
) -> None:
    small = settings.model_copy(update={"billing_push_batch": 20})
    acct, model = make_account(settings)
    ids = make_usage(settings, acct, model, count=200)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            push_all(small)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert set(fake_stripe.events()) == set(ids)
    assert fake_stripe.state.duplicates == 0
    assert len(fake_stripe.requests_to("/v1/billing/meter_events")) == 200
    assert {r.push_state for r in usage_rows(settings).values()} == {PushState.PUSHED}

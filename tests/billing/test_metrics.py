"""Billing on `/metrics`: push lag and waiting events from the ledger, push failures via Redis."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from api.main import create_app
from billing.pusher import push_all
from core.settings import Settings, get_settings
from core.tables import utcnow
from tests.billing.conftest import make_account, make_usage
from tests.utils.fake_stripe import FakeStripe
from tests.utils.prom import scrape, series, value

METER = "/v1/billing/meter_events"


def test_push_lag_is_the_age_of_the_oldest_pending_event(api: tuple[TestClient, Settings]) -> None:
    client, settings = api
    acct, model = make_account(settings)
    make_usage(settings, acct, model, occurred_at=utcnow() - timedelta(seconds=600))
    make_usage(settings, acct, model, count=2)
    samples = scrape(client)
    assert value(samples, "inferatech_billing_events", state="pending") == 3
    assert value(samples, "inferatech_billing_events", state="failed") == 0
    assert 600 <= value(samples, "inferatech_billing_push_lag_seconds") < 900
    assert value(samples, "inferatech_metrics_source_up", source="database") == 1


def test_push_failures_are_counted_for_every_replica(
    api: tuple[TestClient, Settings], fake_stripe: FakeStripe
) -> None:
    client, settings = api
    acct, model = make_account(settings)
    make_usage(settings, acct, model, count=3)
    fake_stripe.inject("status", path=METER, status=500)  # backs off, stays pending
    fake_stripe.inject("status", path=METER, status=400)  # refused for good: failed
    report = push_all(settings)
    assert (report.pushed, report.retried, report.failed) == (1, 1, 1)
    samples = scrape(client)
    assert value(samples, "inferatech_billing_push_failures_total", kind="retry") == 1
    assert value(samples, "inferatech_billing_push_failures_total", kind="permanent") == 1
    assert value(samples, "inferatech_billing_events", state="pending") == 1
    assert value(samples, "inferatech_billing_events", state="failed") == 1
    assert value(samples, "inferatech_billing_push_lag_seconds") < 300

    assert push_all(settings, now=utcnow() + timedelta(minutes=10)).pushed == 1
    samples = scrape(client)
    assert value(samples, "inferatech_billing_events", state="pending") == 0
    assert value(samples, "inferatech_billing_push_lag_seconds") == 0
    assert value(samples, "inferatech_billing_push_failures_total", kind="retry") == 1


def test_no_push_lag_without_stripe(api: tuple[TestClient, Settings]) -> None:
    _, settings = api
    acct, model = make_account(settings)
    make_usage(settings, acct, model, occurred_at=utcnow() - timedelta(days=2))
    unbilled = settings.model_copy(update={"stripe_api_key": None})
    app = create_app(unbilled)
    app.dependency_overrides[get_settings] = lambda: unbilled
    samples = scrape(TestClient(app))
    assert series(samples, "inferatech_billing_push_lag_seconds") == []  # nothing pushes: no lag
    assert value(samples, "inferatech_billing_events", state="pending") == 1

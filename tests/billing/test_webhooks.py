"""`POST /v1/billing/webhooks/stripe`: signatures, once-only effects, ordering, suspension."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlmodel import select

from billing.ledger import NO_CUSTOMER
from core.db import session_scope
from core.settings import Settings
from core.tables import Account, BillingCustomer, ProcessedWebhookEvent, PushState, UsageEvent
from tests.billing.conftest import account_with_key, make_account, make_usage, usage_rows
from tests.utils.factories import auth
from tests.utils.fake_stripe import WEBHOOK_SECRET, FakeStripe, event, sign

URL = "/v1/billing/webhooks/stripe"
Api = tuple[TestClient, Settings]


def deliver(client: TestClient, body: bytes, signature: str | None = None) -> Any:
    headers = {"content-type": "application/json"}
    headers["stripe-signature"] = sign(body) if signature is None else signature
    return client.post(URL, content=body, headers=headers)


def subscription(customer: str, status: str, sub: str = "sub_1") -> dict[str, Any]:
    return {"id": sub, "object": "subscription", "customer": customer, "status": status}


def submit_job(client: TestClient, who: dict[str, str]) -> Any:
    body = {"model_id": who["model"], "prompt": "hello", "max_tokens": 4}
    return client.post("/v1/jobs", json=body, headers=auth(who["key"]))


def customer_state(settings: Settings, customer: str) -> BillingCustomer | None:
    with session_scope(settings) as s:
        return s.get(BillingCustomer, customer)


def processed(settings: Settings) -> list[str]:
    with session_scope(settings) as s:
        return [e.id for e in s.exec(select(ProcessedWebhookEvent))]


def test_webhook_unpaid_subscription_suspends_keys_until_paid(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    assert submit_job(client, who).status_code == 202
    now = int(time.time())

    assert (
        deliver(
            client,
            event(
                "customer.subscription.updated", subscription("cus_a", "unpaid"), created=now - 10
            ),
        ).status_code
        == 200
    )
    refused = submit_job(client, who)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "BILLING_INACTIVE"
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_a", "subscription": "sub_1"}
    assert deliver(client, event("invoice.paid", invoice, created=now)).status_code == 200

    assert submit_job(client, who).status_code == 202
    with session_scope(settings) as s:
        account = s.get(Account, who["account"])
        assert account is not None and account.billing_status == "active"


def test_webhook_payment_failed_records_past_due_and_keeps_serving(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_a", "subscription": "sub_1"}

    resp = deliver(client, event("invoice.payment_failed", invoice))

    assert resp.status_code == 200, resp.text
    state = customer_state(settings, "cus_a")
    assert state is not None and (state.status, state.subscription_id) == ("past_due", "sub_1")
    assert submit_job(client, who).status_code == 202  # Stripe is still retrying the card
    unpaid = subscription("cus_a", "unpaid")
    deliver(client, event("customer.subscription.updated", unpaid, created=int(time.time()) + 1))
    assert submit_job(client, who).json()["error"]["code"] == "BILLING_INACTIVE"


def test_webhook_suspends_a_key_billed_to_another_customer(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_owner", billed="cus_client")
    deliver(client, event("customer.subscription.deleted", subscription("cus_client", "canceled")))

    assert submit_job(client, who).json()["error"]["code"] == "BILLING_INACTIVE"


def test_webhook_refuses_a_signature_from_another_secret(api: Api) -> None:
    client, settings = api
    body = event("customer.subscription.updated", subscription("cus_a", "unpaid"))

    resp = deliver(client, body, sign(body, secret="whsec_someone_else"))

    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "WEBHOOK_SIGNATURE_INVALID"
    assert processed(settings) == [] and customer_state(settings, "cus_a") is None


def test_webhook_refuses_a_body_changed_by_one_byte(api: Api) -> None:
    client, settings = api
    body = event("customer.subscription.updated", subscription("cus_a", "unpaid"))
    signature = sign(body)
    tampered = body.replace(b'"unpaid"', b'"unpaie"')
    assert len(tampered) == len(body) and tampered != body

    resp = deliver(client, tampered, signature)

    assert resp.status_code == 400
    assert customer_state(settings, "cus_a") is None


def test_webhook_refuses_a_stale_timestamp(api: Api) -> None:
    client, settings = api
    body = event("customer.subscription.updated", subscription("cus_a", "unpaid"))

    resp = deliver(client, body, sign(body, timestamp=int(time.time()) - 301))

    assert resp.status_code == 400
    assert "tolerance" in resp.json()["error"]["message"]
    assert processed(settings) == []


def test_webhook_accepts_two_v1_signatures_when_one_is_valid(api: Api) -> None:
    client, settings = api
    body = event("customer.subscription.updated", subscription("cus_a", "past_due"))
    t = int(time.time())
    old = hmac.new(b"whsec_rotated_out", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    valid = sign(body, timestamp=t).split(",")[1]

    resp = deliver(client, body, f"t={t},v1={old},{valid}")

    assert resp.status_code == 200
    state = customer_state(settings, "cus_a")
    assert state is not None and state.status == "past_due"


def test_webhook_refuses_missing_or_garbled_signature_headers(api: Api) -> None:
    client, _ = api
    body = event("invoice.paid", {"id": "in_1", "customer": "cus_a"})
    for header in ("", "garbage", "t=notanumber,v1=abc", f"t={int(time.time())}"):
        resp = client.post(
            URL, content=body, headers={"stripe-signature": header} if header else {}
        )
        assert resp.status_code == 400, header
        assert resp.json()["error"]["code"] == "WEBHOOK_SIGNATURE_INVALID"


def test_webhook_refuses_malformed_and_oversized_bodies(api: Api) -> None:
    client, _ = api
    for body in (
        b"not json",
        b"[]",
        json.dumps({"type": "invoice.paid"}).encode(),
        json.dumps({"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {}}).encode(),
    ):
        resp = deliver(client, body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]["code"] == "INVALID_REQUEST"
    huge = b"{" + b" " * (1024 * 1024) + b"}"
    resp = deliver(client, huge)
    assert resp.status_code == 413


def test_webhook_without_a_configured_secret_answers_501(api: Api) -> None:
    client, settings = api
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]
    from core.settings import get_settings

    bare = settings.model_copy(update={"stripe_webhook_secret": None})
    client.app.dependency_overrides[get_settings] = lambda: bare  # type: ignore[attr-defined]
    body = event("invoice.paid", {"id": "in_1", "customer": "cus_a"})

    resp = deliver(client, body)

    assert resp.status_code == 501
    assert "INFERATECH_STRIPE_WEBHOOK_SECRET" in resp.json()["error"]["message"]


def test_webhook_same_event_twice_has_one_effect(api: Api, billing_redis: str) -> None:
    client, settings = api
    body = event("invoice.finalized", {"id": "in_1", "object": "invoice", "customer": "cus_a"})

    first, second = deliver(client, body), deliver(client, body)

    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.json()["duplicate"], second.json()["duplicate"]) == (False, True)
    assert len(processed(settings)) == 1
    queued = redis.Redis.from_url(billing_redis).lrange("background", 0, -1)
    pushes = [m for m in queued if b"inferatech.billing_push" in m]
    assert len(pushes) == 1 and b"cus_a" in pushes[0]


def test_webhook_deleted_before_updated_stays_cancelled(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    now = int(time.time())
    deleted = event("customer.subscription.deleted", subscription("cus_a", "canceled"), created=now)
    updated = event(
        "customer.subscription.updated", subscription("cus_a", "active"), created=now - 5
    )

    assert deliver(client, deleted).status_code == 200
    assert deliver(client, updated).status_code == 200

    state = customer_state(settings, "cus_a")
    assert state is not None and state.status == "canceled"
    assert submit_job(client, who).json()["error"]["code"] == "BILLING_INACTIVE"


def test_webhook_older_update_never_overrides_a_newer_one(api: Api) -> None:
    client, settings = api
    now = int(time.time())
    deliver(
        client, event("customer.subscription.updated", subscription("cus_a", "active"), created=now)
    )
    deliver(
        client,
        event("customer.subscription.updated", subscription("cus_a", "unpaid"), created=now - 60),
    )

    state = customer_state(settings, "cus_a")
    assert state is not None and state.status == "active"


def test_webhook_new_subscription_after_cancellation_reactivates(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    now = int(time.time())
    deliver(
        client,
        event("customer.subscription.deleted", subscription("cus_a", "canceled"), created=now - 10),
    )
    deliver(
        client,
        event(
            "customer.subscription.created", subscription("cus_a", "active", "sub_2"), created=now
        ),
    )

    assert submit_job(client, who).status_code == 202


def test_webhook_checkout_completed_links_the_account(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, None)
    (orphan,) = make_usage(settings, who["account"], who["model"], customer=None)
    with session_scope(settings) as s:  # set aside by the pusher for want of a customer
        row = s.get(UsageEvent, orphan)
        assert row is not None
        row.push_state, row.last_error = PushState.FAILED, NO_CUSTOMER
    session = {
        "id": "cs_1",
        "object": "checkout.session",
        "customer": "cus_new",
        "client_reference_id": who["account"],
        "subscription": "sub_9",
    }

    assert deliver(client, event("checkout.session.completed", session)).status_code == 200

    with session_scope(settings) as s:
        account = s.get(Account, who["account"])
        assert account is not None and account.stripe_customer_id == "cus_new"
    state = customer_state(settings, "cus_new")
    assert state is not None and state.status == "active" and state.subscription_id == "sub_9"
    assert usage_rows(settings)[orphan].push_state is PushState.PENDING  # billed to cus_new now


def test_webhook_meter_error_report_marks_events_failed(api: Api) -> None:
    client, settings = api
    acct, model = make_account(settings)
    bad, good = make_usage(settings, acct, model, count=2)
    report = {
        "id": "evt_thin_1",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-11-22T05:00:00.000Z",
        "data": {
            "reason": {
                "error_count": 1,
                "error_types": [
                    {
                        "code": "no_meter",
                        "error_count": 1,
                        "sample_errors": [
                            {"error_message": "No active meter", "api_request": {"identifier": bad}}
                        ],
                    }
                ],
            }
        },
    }
    body = json.dumps(report).encode()

    assert deliver(client, body).status_code == 200

    rows = usage_rows(settings)
    assert rows[bad].push_state is PushState.FAILED and "No active meter" in (
        rows[bad].last_error or ""
    )
    assert rows[good].push_state is PushState.PENDING


def test_webhook_unknown_event_types_are_acknowledged(api: Api) -> None:
    client, settings = api
    resp = deliver(client, event("charge.refunded", {"id": "ch_1", "customer": "cus_a"}))
    assert resp.status_code == 200
    assert customer_state(settings, "cus_a") is None


def test_webhook_secret_is_never_logged(api: Api, caplog: Any) -> None:
    client, _ = api
    body = event("invoice.paid", {"id": "in_1", "customer": "cus_a"})
    deliver(client, body, sign(body, secret="whsec_wrong"))
    deliver(client, body)
    assert WEBHOOK_SECRET not in caplog.text


def _thin_meter_error(event_id: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-11-22T05:00:00.000Z",
        "related_object": {"id": "mtr_tokens", "type": "billing.meter",
                           "url": "/v1/billing/meters/mtr_tokens"},
    }  # fmt: skip


def _full_meter_error(event_id: str, identifier: str) -> dict[str, Any]:
    sample = {"error_message": "Customer not found", "api_request": {"identifier": identifier}}
    reason = {"error_count": 1, "error_types": [
        {"code": "meter_event_customer_not_found", "error_count": 1, "sample_errors": [sample]}
    ]}  # fmt: skip
    return {**_thin_meter_error(event_id), "data": {"reason": reason}}


def test_webhook_thin_meter_error_is_fetched_and_marks_events_failed(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    acct, model = make_account(settings)
    bad, good = make_usage(settings, acct, model, count=2)
    fake_stripe.add_v2_event(_full_meter_error("evt_thin_2", bad))

    resp = deliver(client, json.dumps(_thin_meter_error("evt_thin_2")).encode())

    assert resp.status_code == 200, resp.text
    assert len(fake_stripe.requests_to("/v2/core/events/evt_thin_2")) == 1
    rows = usage_rows(settings)
    assert rows[bad].push_state is PushState.FAILED
    assert "Customer not found" in (rows[bad].last_error or "")
    assert rows[good].push_state is PushState.PENDING


def test_webhook_thin_meter_error_while_stripe_is_down_is_redelivered(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    acct, model = make_account(settings)
    (bad,) = make_usage(settings, acct, model)
    fake_stripe.add_v2_event(_full_meter_error("evt_thin_3", bad))
    fake_stripe.inject("status", path="/v2/core/events", status=500)
    body = json.dumps(_thin_meter_error("evt_thin_3")).encode()

    first = deliver(client, body)
    assert first.status_code == 503, first.text
    assert usage_rows(settings)[bad].push_state is PushState.PENDING
    with session_scope(settings) as s:
        assert s.get(ProcessedWebhookEvent, "evt_thin_3") is None  # not swallowed

    again = deliver(client, body)
    assert again.status_code == 200, again.text
    assert usage_rows(settings)[bad].push_state is PushState.FAILED

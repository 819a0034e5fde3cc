"""Accounts get their own Stripe customer at signup; a Stripe failure loses no account.

`POST /v1/accounts` creates the customer through the real SDK (idempotency key from the
account id); when Stripe fails the account is created unlinked and `POST /v1/billing/customer`
(or the portal) links it later, reusing the customer a lost answer had already created.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from billing.pusher import push_all
from core.db import session_scope
from core.settings import Settings, get_settings
from core.tables import Account, PushState
from tests.billing.conftest import account_with_key, make_usage, usage_rows
from tests.conftest import SECRETS
from tests.utils.factories import auth
from tests.utils.fake_stripe import FakeStripe

Api = tuple[TestClient, Settings]
OPERATOR = auth(SECRETS["operator_token"])
# What can go wrong on the way to Stripe: (fault kind, options) for FakeStripe.inject.
OUTAGES: dict[str, tuple[str, dict[str, Any]]] = {
    "500": ("status", {"status": 500}),
    "429": ("status", {"status": 429}),
    "dropped-before": ("drop", {"processed": False}),
    "dropped-after": ("drop", {"processed": True}),  # Stripe made the customer; answer lost
}


def _account(settings: Settings, account_id: str) -> Account:
    with session_scope(settings) as s:
        account = s.get(Account, account_id)
        assert account is not None
        return account


def _signup(client: TestClient, name: str = "acme") -> dict[str, Any]:
    resp = client.post("/v1/accounts", json={"name": name})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _link(client: TestClient, token: str, **kw: Any) -> Any:
    return client.post("/v1/billing/customer", headers=auth(token), **kw)


def test_signup_with_stripe_creates_and_links_a_customer(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api

    created = _signup(client, "acme")

    customer = created["stripe_customer_id"]
    assert customer and customer.startswith("cus_")
    assert _account(settings, created["id"]).stripe_customer_id == customer
    [made] = fake_stripe.customers_of(created["id"])
    assert (made["id"], made["name"]) == (customer, "acme")
    assert created["token"] not in str(fake_stripe.requests_to("/"))  # no secret leaves


def test_signup_without_stripe_links_nothing_and_calls_nobody(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    bare = settings.model_copy(update={"stripe_api_key": None})
    client.app.dependency_overrides[get_settings] = lambda: bare  # type: ignore[attr-defined]

    created = _signup(client)

    assert created["stripe_customer_id"] is None
    assert _account(settings, created["id"]).stripe_customer_id is None
    assert fake_stripe.requests_to("/") == []
    assert _link(client, created["token"]).status_code == 501


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_signup_while_stripe_fails_keeps_the_account_and_links_it_on_demand(
    api: Api, fake_stripe: FakeStripe, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, settings = api
    kind, options = OUTAGES[outage]
    fake_stripe.inject(kind, path="/v1/customers", **options)

    created = _signup(client)

    assert created["stripe_customer_id"] is None
    assert _account(settings, created["id"]).stripe_customer_id is None
    assert client.get("/v1/usage", headers=auth(created["token"])).status_code == 200
    assert "has no Stripe customer yet" in caplog.text
    assert settings.stripe_api_key is not None
    assert settings.stripe_api_key.get_secret_value() not in caplog.text

    linked = _link(client, created["token"])

    assert linked.status_code == 200, linked.text
    [made] = fake_stripe.customers_of(created["id"])  # a retry never makes a second one
    assert linked.json() == {"id": created["id"], "stripe_customer_id": made["id"]}
    assert _account(settings, created["id"]).stripe_customer_id == made["id"]


def test_billing_customer_returns_the_linked_customer_without_calling_stripe(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, _ = api
    created = _signup(client)
    calls = len(fake_stripe.requests_to("/"))

    again = _link(client, created["token"])

    assert again.status_code == 200
    assert again.json()["stripe_customer_id"] == created["stripe_customer_id"]
    assert len(fake_stripe.requests_to("/")) == calls


def test_billing_customer_keeps_an_operator_link(api: Api, fake_stripe: FakeStripe) -> None:
    client, _ = api
    fake_stripe.inject("status", path="/v1/customers", status=503)
    created = _signup(client)
    chosen = fake_stripe.add_customer("parent company")
    put = client.put(f"/v1/accounts/{created['id']}/stripe-customer",
                     json={"stripe_customer_id": chosen}, headers=OPERATOR)  # fmt: skip
    assert put.status_code == 200, put.text

    resp = _link(client, created["token"])

    assert resp.json()["stripe_customer_id"] == chosen
    assert fake_stripe.customers_of(created["id"]) == []


def test_billing_customer_while_stripe_is_down_is_503_then_links(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    fake_stripe.inject("status", path="/v1/customers", status=500, count=2)
    created = _signup(client)

    down = _link(client, created["token"])

    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "request_id" in down.json()
    assert _account(settings, created["id"]).stripe_customer_id is None
    up = _link(client, created["token"])
    assert up.status_code == 200 and up.json()["stripe_customer_id"].startswith("cus_")


def test_usage_set_aside_during_the_outage_is_billed_once_linked(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    fake_stripe.inject("status", path="/v1/customers", status=500)
    who = account_with_key(client, settings, None)
    (orphan,) = make_usage(settings, who["account"], who["model"], customer=None)
    assert push_all(settings).failed == 1  # nobody to bill yet: set aside, not lost
    assert usage_rows(settings)[orphan].push_state is PushState.FAILED

    customer = _link(client, who["token"]).json()["stripe_customer_id"]

    assert usage_rows(settings)[orphan].push_state is PushState.PENDING
    assert push_all(settings).pushed == 1
    sent = fake_stripe.events()
    assert set(sent) == {orphan} and (sent[orphan].customer, sent[orphan].value) == (customer, 30)


@pytest.mark.parametrize(
    "headers",
    [{}, auth("iat_garbage"), auth("ik_notanaccounttoken"), OPERATOR, {"Authorization": "Basic x"}],
)
def test_billing_customer_refuses_missing_or_wrong_tokens(
    api: Api, fake_stripe: FakeStripe, headers: dict[str, str]
) -> None:
    client, _ = api
    calls = len(fake_stripe.requests_to("/"))

    resp = client.post("/v1/billing/customer", headers=headers)

    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert len(fake_stripe.requests_to("/")) == calls


@pytest.mark.parametrize(
    "body",
    [
        {"content": b"{not json"},
        {"content": b"x" * (2 * 1024 * 1024)},
        {"json": {"stripe_customer_id": "cus_attacker", "name": "x' OR 1=1 --"}},
    ],
    ids=["malformed", "oversized", "picks-a-customer"],
)
def test_billing_customer_ignores_any_body(
    api: Api, fake_stripe: FakeStripe, body: dict[str, Any]
) -> None:
    client, _ = api
    fake_stripe.inject("status", path="/v1/customers", status=500)
    created = _signup(client, "acme")

    resp = _link(client, created["token"], **body)

    assert resp.status_code == 200, resp.text
    [made] = fake_stripe.customers_of(created["id"])
    assert resp.json()["stripe_customer_id"] == made["id"] != "cus_attacker"
    assert made["name"] == "acme"

"""Billing portal, usage report and operators' ledger view: happy paths and bad input."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from core.db import session_scope
from core.ids import new_id
from core.settings import GiB, Settings, get_settings
from core.tables import Model, ModelStatus, utcnow
from tests.billing.conftest import account_with_key, make_usage
from tests.conftest import SECRETS
from tests.utils.factories import auth
from tests.utils.fake_stripe import FakeStripe

Api = tuple[TestClient, Settings]
OPERATOR = auth(SECRETS["operator_token"])


def test_portal_creates_the_customer_once_and_returns_a_url(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    who = account_with_key(client, settings, None)  # signup's customer unlinked again
    creates = len(fake_stripe.requests_to("/v1/customers"))

    first = client.post("/v1/billing/portal", headers=auth(who["token"]))
    second = client.post("/v1/billing/portal", headers=auth(who["token"]))

    assert first.status_code == 200, first.text
    assert first.json()["url"].startswith("https://billing.stripe.test/p/session/")
    assert len(fake_stripe.requests_to("/v1/customers")) == creates + 1
    assert len(fake_stripe.customers_of(who["account"])) == 1  # same idempotency key, same one
    portals = fake_stripe.requests_to("/v1/billing_portal/sessions")
    assert len(portals) == 2 and portals[0].body["return_url"] == "http://testserver"
    assert second.status_code == 200


def test_portal_returns_to_the_configured_url(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    back = settings.model_copy(update={"billing_portal_return_url": "https://app.example/billing"})
    client.app.dependency_overrides[get_settings] = lambda: back  # type: ignore[attr-defined]

    resp = client.post("/v1/billing/portal", headers=auth(who["token"]))

    assert resp.status_code == 200, resp.text
    [portal] = fake_stripe.requests_to("/v1/billing_portal/sessions")
    assert portal.body == {"customer": "cus_a", "return_url": "https://app.example/billing"}


def test_portal_without_stripe_answers_501_naming_the_setting(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    bare = settings.model_copy(update={"stripe_api_key": None})
    client.app.dependency_overrides[get_settings] = lambda: bare  # type: ignore[attr-defined]

    resp = client.post("/v1/billing/portal", headers=auth(who["token"]))

    assert resp.status_code == 501
    assert "INFERATECH_STRIPE_API_KEY" in resp.json()["error"]["message"]


def test_portal_and_usage_refuse_missing_or_bad_tokens(api: Api) -> None:
    client, _ = api
    for headers in ({}, auth("iat_garbage"), auth("ik_notanaccounttoken")):
        assert client.post("/v1/billing/portal", headers=headers).status_code == 403
        assert client.get("/v1/usage", headers=headers).status_code == 403


def test_usage_groups_equal_the_ledger_and_carry_cost(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    other = account_with_key(client, settings, "cus_b")
    now = utcnow()
    make_usage(
        settings,
        who["account"],
        who["model"],
        count=3,
        prompt=100,
        completion=400,
        occurred_at=now - timedelta(days=2),
        key_id=who["key_id"],
    )
    make_usage(
        settings,
        who["account"],
        who["model"],
        count=2,
        prompt=1000,
        completion=0,
        occurred_at=now,  # two UTC days apart whatever the time of day (1 h ago was not, at 00:09)
    )
    make_usage(settings, other["account"], other["model"], count=5)

    by = {
        g: client.get("/v1/usage", params={"group_by": g}, headers=auth(who["token"])).json()
        for g in ("day", "model", "key")
    }

    for report in by.values():
        assert report["total"]["prompt_tokens"] == 2300
        assert report["total"]["completion_tokens"] == 1200
        assert report["total"]["events"] == 5
        # small model: $0.02 per 1K prompt, $0.04 per 1K completion
        assert report["total"]["cost_usd"] == "0.094000"
    assert len(by["day"]["data"]) == 2
    assert [g["group"] for g in by["model"]["data"]] == [who["model"]]
    assert {g["group"]: g["events"] for g in by["key"]["data"]} == {who["key_id"]: 3, "none": 2}


def test_usage_cost_uses_the_model_price_else_its_size_class(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    sizes = {"priced": 100, "medium": 2 * GiB, "large": 9 * GiB}
    ids = {}
    with session_scope(settings) as s:
        for name, size in sizes.items():
            model = Model(id=new_id("mdl"), account_id=who["account"], name=name,
                          status=ModelStatus.READY, total_bytes=size)  # fmt: skip
            s.add(model)
            ids[name] = model.id
    for name in sizes:
        make_usage(settings, who["account"], ids[name], prompt=1000, completion=2000)
    priced = settings.model_copy(
        update={"billing_model_prices": {ids["priced"]: {"prompt": 3, "completion": 0.5}}}
    )
    client.app.dependency_overrides[get_settings] = lambda: priced  # type: ignore[attr-defined]

    resp = client.get("/v1/usage", params={"group_by": "model"}, headers=auth(who["token"]))

    assert resp.status_code == 200, resp.text
    costs = {g["group"]: g["cost_usd"] for g in resp.json()["data"]}
    assert costs == {
        ids["priced"]: "4.000000",  # its own price: 3 + 2 * 0.5
        ids["medium"]: "0.500000",  # 0.1 + 2 * 0.2
        ids["large"]: "2.500000",  # 0.5 + 2 * 1.0
    }
    assert resp.json()["total"]["cost_usd"] == "7.000000"


def test_usage_window_excludes_events_outside_it(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    now = utcnow()
    make_usage(settings, who["account"], who["model"], occurred_at=now - timedelta(days=40))
    make_usage(settings, who["account"], who["model"], occurred_at=now - timedelta(days=2))
    params = {"from": (now - timedelta(days=3)).isoformat(), "to": now.isoformat()}

    resp = client.get("/v1/usage", params=params, headers=auth(who["token"]))

    assert resp.status_code == 200
    assert resp.json()["total"]["events"] == 1


def test_usage_refuses_bad_parameters(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    bad = [
        {"group_by": "hour"},
        {"from": "yesterday"},
        {"from": "2026-01-02", "to": "2026-01-01"},
        {"from": "2020-01-01", "to": "2026-01-01"},
        {"to": "x" * 5000},
    ]
    for params in bad:
        resp = client.get("/v1/usage", params=params, headers=auth(who["token"]))
        assert resp.status_code == 400, params
        assert resp.json()["error"]["code"] == "INVALID_REQUEST"


def test_billing_events_lists_failed_events_for_operators(
    api: Api, fake_stripe: FakeStripe
) -> None:
    from billing.pusher import push_all

    client, settings = api
    who = account_with_key(client, settings, "cus_gone")
    [failed] = make_usage(settings, who["account"], who["model"], customer="cus_gone")
    fake_stripe.state.rejected_customers.add("cus_gone")
    push_all(settings)

    resp = client.get("/v1/billing/events", params={"status": "failed"}, headers=OPERATOR)

    assert resp.status_code == 200
    [row] = resp.json()["data"]
    assert row["id"] == failed and "No such customer" in row["last_error"]
    assert (
        client.get("/v1/billing/events", params={"status": "pushed"}, headers=OPERATOR).json()[
            "count"
        ]
        == 0
    )


def test_billing_events_refuses_non_operators_and_bad_input(api: Api) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_a")
    for headers in ({}, auth(who["token"]), auth("wrong-operator-token")):
        assert client.get("/v1/billing/events", headers=headers).status_code == 403
    for params in ({"status": "lost"}, {"limit": 0}, {"limit": 100000}):
        resp = client.get("/v1/billing/events", params=params, headers=OPERATOR)
        assert resp.status_code == 400, params

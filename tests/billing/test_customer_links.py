"""Linking accounts and keys to Stripe customers: the API (operator token) and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from api import cli
from core.db import session_scope
from core.settings import Settings, get_settings
from core.tables import Account, ApiKey, BillingCustomer
from tests.billing.conftest import account_with_key
from tests.conftest import SECRETS
from tests.utils.factories import auth
from tests.utils.fake_stripe import FakeStripe
from tests.utils.live_server import live_api

Api = tuple[TestClient, Settings]
OPERATOR = auth(SECRETS["operator_token"])
MALFORMED = ["acct_123", "cus_", "cus_abc def", "cus_../../x", "CUS_abc", "cus_" + "a" * 97]


def _accounts(settings: Settings) -> dict[str, Account]:
    with session_scope(settings) as s:
        return {a.id: a for a in s.exec(select(Account))}


def _key(settings: Settings, key_id: str) -> ApiKey:
    with session_scope(settings) as s:
        key = s.get(ApiKey, key_id)
        assert key is not None
        return key


def test_create_account_with_known_customer_links_it(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api
    customer = fake_stripe.add_customer()

    resp = client.post(
        "/v1/accounts", json={"name": "acme", "stripe_customer_id": customer}, headers=OPERATOR
    )

    assert resp.status_code == 201, resp.text
    assert resp.json()["stripe_customer_id"] == customer
    assert resp.json()["token"].startswith("iat_")
    assert _accounts(settings)[resp.json()["id"]].stripe_customer_id == customer
    assert fake_stripe.requests_to(f"/v1/customers/{customer}")


@pytest.mark.parametrize("bad", MALFORMED)
def test_create_account_with_malformed_customer_is_refused(api: Api, bad: str) -> None:
    client, settings = api
    resp = client.post(
        "/v1/accounts", json={"name": "acme", "stripe_customer_id": bad}, headers=OPERATOR
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "INVALID_REQUEST"
    assert _accounts(settings) == {}


def test_create_account_with_customer_stripe_lacks_is_refused(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    resp = client.post(
        "/v1/accounts", json={"name": "acme", "stripe_customer_id": "cus_nobody"}, headers=OPERATOR
    )
    assert resp.status_code == 400, resp.text
    assert "cus_nobody" in resp.json()["error"]["message"]
    assert _accounts(settings) == {}


@pytest.mark.parametrize("token", [None, "wrong-operator-token", "account"])
def test_create_account_with_customer_needs_the_operator_token(
    api: Api, fake_stripe: FakeStripe, token: str | None
) -> None:
    client, settings = api
    customer = fake_stripe.add_customer()
    if token == "account":
        token = account_with_key(client, settings, None)["token"]
    headers = auth(token) if token else {}
    before = set(_accounts(settings))

    resp = client.post(
        "/v1/accounts", json={"name": "thief", "stripe_customer_id": customer}, headers=headers
    )

    assert resp.status_code == 403, resp.text
    assert set(_accounts(settings)) == before


def test_link_existing_account_takes_the_customer_status(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api
    who = account_with_key(client, settings, None)
    customer = fake_stripe.add_customer()
    with session_scope(settings) as s:
        s.add(BillingCustomer(id=customer, status="unpaid"))

    resp = client.put(
        f"/v1/accounts/{who['account']}/stripe-customer",
        json={"stripe_customer_id": customer},
        headers=OPERATOR,
    )

    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": who["account"], "stripe_customer_id": customer}
    account = _accounts(settings)[who["account"]]
    assert (account.stripe_customer_id, account.billing_status) == (customer, "suspended")
    infer = client.post("/v1/infer", json={"model_id": who["model"], "prompt": "hi"},
                        headers=auth(who["key"]))  # fmt: skip
    assert infer.status_code == 403 and infer.json()["error"]["code"] == "BILLING_INACTIVE"


def test_link_account_refuses_unknown_account_and_bad_customer(
    api: Api, fake_stripe: FakeStripe
) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_before")
    customer = fake_stripe.add_customer()

    unknown = client.put("/v1/accounts/acct_missing/stripe-customer",
                         json={"stripe_customer_id": customer}, headers=OPERATOR)  # fmt: skip
    malformed = client.put(f"/v1/accounts/{who['account']}/stripe-customer",
                           json={"stripe_customer_id": "sub_123"}, headers=OPERATOR)  # fmt: skip
    not_operator = client.put(f"/v1/accounts/{who['account']}/stripe-customer",
                              json={"stripe_customer_id": customer},
                              headers=auth(who["token"]))  # fmt: skip

    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "ACCOUNT_NOT_FOUND"
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "INVALID_REQUEST"
    assert not_operator.status_code == 403
    assert _accounts(settings)[who["account"]].stripe_customer_id == "cus_before"


def test_link_key_bills_another_customer_and_unlinks(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_owner")
    client_customer = fake_stripe.add_customer("client")
    path = f"/v1/keys/{who['key_id']}/billed-customer"

    linked = client.put(path, json={"stripe_customer_id": client_customer}, headers=OPERATOR)
    assert linked.status_code == 200, linked.text
    assert _key(settings, who["key_id"]).billed_customer_id == client_customer

    unlinked = client.put(path, json={"stripe_customer_id": None}, headers=OPERATOR)
    assert unlinked.json() == {"id": who["key_id"], "stripe_customer_id": None}
    assert _key(settings, who["key_id"]).billed_customer_id is None


def test_link_key_refuses_unknown_key_and_bad_customer(api: Api, fake_stripe: FakeStripe) -> None:
    client, settings = api
    who = account_with_key(client, settings, "cus_owner")
    customer = fake_stripe.add_customer()

    unknown = client.put("/v1/keys/k_missing/billed-customer",
                         json={"stripe_customer_id": customer}, headers=OPERATOR)  # fmt: skip
    missing = client.put(f"/v1/keys/{who['key_id']}/billed-customer",
                         json={"stripe_customer_id": "cus_gone"}, headers=OPERATOR)  # fmt: skip
    owner = client.put(f"/v1/keys/{who['key_id']}/billed-customer",
                       json={"stripe_customer_id": customer}, headers=auth(who["token"]))  # fmt: skip

    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "KEY_NOT_FOUND"
    assert missing.status_code == 400
    assert owner.status_code == 403
    assert _key(settings, who["key_id"]).billed_customer_id is None


def test_link_without_stripe_configured_records_a_well_formed_id(api: Api) -> None:
    client, settings = api
    bare = settings.model_copy(update={"stripe_api_key": None})
    client.app.dependency_overrides[get_settings] = lambda: bare  # type: ignore[attr-defined]

    good = client.post("/v1/accounts", json={"name": "a", "stripe_customer_id": "cus_later1"},
                       headers=OPERATOR)  # fmt: skip
    bad = client.post("/v1/accounts", json={"name": "a", "stripe_customer_id": "cus_-"},
                      headers=OPERATOR)  # fmt: skip

    assert good.status_code == 201, good.text
    assert _accounts(settings)[good.json()["id"]].stripe_customer_id == "cus_later1"
    assert bad.status_code == 400


# The CLI against a real HTTP server ------------------------------------------------------


@pytest.fixture
def server_url(api: Api) -> Iterator[str]:
    with live_api(api[1]) as url:
        yield url


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server_url: str) -> str:
    monkeypatch.setenv("INFERATECH_CONFIG", str(tmp_path / "credentials.json"))
    monkeypatch.setenv("INFERATECH_API_URL", server_url)
    return server_url


def test_cli_accounts_create_with_stripe_customer(
    cli_env: str, api: Api, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _client, settings = api
    customer = fake_stripe.add_customer()
    monkeypatch.setenv("INFERATECH_OPERATOR_TOKEN", SECRETS["operator_token"])

    code = cli.main(["accounts", "create", "--name", "acme", "--stripe-customer", customer])

    out = capsys.readouterr().out
    assert code == 0, out
    assert f"billed to {customer}" in out
    (account,) = _accounts(settings).values()
    assert account.stripe_customer_id == customer


def test_cli_accounts_create_without_customer_gets_its_own(
    cli_env: str, api: Api, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    _client, settings = api

    code = cli.main(["accounts", "create", "--name", "acme", "--no-save"])

    out = capsys.readouterr().out
    assert code == 0, out
    (account,) = _accounts(settings).values()
    [made] = fake_stripe.customers_of(account.id)
    assert account.stripe_customer_id == made["id"]
    assert f"billed to {made['id']}" in out


def test_cli_accounts_create_with_customer_refuses_bad_input(
    cli_env: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    _client, settings = api
    no_token = cli.main(["accounts", "create", "--name", "a", "--stripe-customer", "cus_x1"])
    assert no_token == 2 and "NO_OPERATOR_TOKEN" in capsys.readouterr().err

    token = ["--operator-token", SECRETS["operator_token"]]
    malformed = cli.main(["accounts", "create", "--name", "a", "--stripe-customer", "x1", *token])
    assert malformed == 2 and "INVALID_REQUEST" in capsys.readouterr().err
    unknown = cli.main(["accounts", "create", "--name", "a", "--stripe-customer", "cus_x1", *token])
    assert unknown == 2 and "cus_x1" in capsys.readouterr().err
    assert _accounts(settings) == {}


def test_cli_link_customer_for_account_and_key(
    cli_env: str, api: Api, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    client, settings = api
    who = account_with_key(client, settings, None)
    owner, payer = fake_stripe.add_customer("owner"), fake_stripe.add_customer("client")
    token = ["--operator-token", SECRETS["operator_token"]]

    assert cli.main(["accounts", "link-customer", who["account"], owner, *token]) == 0
    assert cli.main(["keys", "link-customer", who["key_id"], payer, *token]) == 0
    out = capsys.readouterr().out
    assert f"billed to {owner}" in out and f"billed to {payer}" in out
    assert _accounts(settings)[who["account"]].stripe_customer_id == owner
    assert _key(settings, who["key_id"]).billed_customer_id == payer

    assert cli.main(["accounts", "link-customer", "acct_missing", owner, *token]) == 2
    assert "ACCOUNT_NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["keys", "link-customer", who["key_id"], "none", *token]) == 0
    assert _key(settings, who["key_id"]).billed_customer_id is None


def test_linking_a_customer_requeues_usage_that_had_none(api: Api, fake_stripe: FakeStripe) -> None:
    from billing.pusher import push_all
    from core.tables import PushState
    from tests.billing.conftest import make_usage, usage_rows

    client, settings = api
    who = account_with_key(client, settings, None)
    (orphan,) = make_usage(settings, who["account"], who["model"], customer=None)
    other = account_with_key(client, settings, None)
    (stays,) = make_usage(settings, other["account"], other["model"], customer=None)
    report = push_all(settings)
    assert report.failed == 2 and not fake_stripe.events()  # nobody to bill: set aside
    customer = fake_stripe.add_customer()

    resp = client.put(f"/v1/accounts/{who['account']}/stripe-customer",
                      json={"stripe_customer_id": customer}, headers=OPERATOR)  # fmt: skip

    assert resp.status_code == 200, resp.text
    rows = usage_rows(settings)
    assert (rows[orphan].push_state, rows[orphan].last_error) == (PushState.PENDING, None)
    assert rows[stays].push_state is PushState.FAILED  # another account's usage is untouched
    assert push_all(settings).pushed == 1
    sent = fake_stripe.events()
    assert set(sent) == {orphan} and sent[orphan].customer == customer
    assert sent[orphan].value == 30

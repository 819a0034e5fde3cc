"""Stripe customers: subscription state from webhooks, key suspension, the billing portal."""

from __future__ import annotations

import logging
import re
from datetime import datetime

import stripe
from sqlalchemy import update
from sqlmodel import Session, col, select

from billing import ledger
from billing.stripe_api import client_for, describe
from core.db import update_rows
from core.errors import (
    AccountNotFound,
    BillingInactive,
    Conflict,
    InvalidRequest,
    KeyNotFound,
    ServiceUnavailable,
)
from core.settings import Settings
from core.tables import Account, ApiKey, BillingCustomer, utcnow

# Stripe customer ids: `cus_` and an alphanumeric tail (the column holds 100 characters).
CUSTOMER_ID = re.compile(r"^cus_[A-Za-z0-9]{1,96}$")

# Stripe subscription statuses that stop inference until an invoice is paid.
SUSPENDED = frozenset({"unpaid", "canceled", "incomplete_expired", "paused"})

log = logging.getLogger("inferatech.billing")


def apply_status(
    session: Session, customer: str, status: str, at: datetime, subscription: str | None
) -> bool:
    """Set a customer's status unless a newer event already spoke; False when ignored.

    Webhooks arrive out of order: an event older than the one that set the current status
    is dropped, and a cancelled subscription never comes back to life through a late update.
    """
    row = session.get(BillingCustomer, customer) or BillingCustomer(id=customer)
    if row.status_at is not None and at < row.status_at:
        return False
    if subscription and subscription in row.cancelled_subscription_ids and status != "canceled":
        return False
    if subscription is None and row.status == "canceled":
        return False  # an invoice with no subscription cannot revive a cancelled one
    row.status, row.status_at, row.updated_at = status, at, utcnow()
    row.subscription_id = subscription or row.subscription_id
    if status == "canceled" and subscription:
        row.cancelled_subscription_ids = [*row.cancelled_subscription_ids, subscription]
    session.add(row)
    billing_status = "suspended" if status in SUSPENDED else "active"
    for account in session.exec(select(Account).where(Account.stripe_customer_id == customer)):
        account.billing_status = billing_status
        session.add(account)
    return True


def ensure_active(session: Session, key: ApiKey) -> None:
    """Refuse inference for a key whose paying customer's subscription is unpaid or cancelled."""
    customer = key.billed_customer_id
    if customer is None:
        account = session.get(Account, key.account_id)
        customer = account.stripe_customer_id if account else None
    if customer is None:
        return
    row = session.get(BillingCustomer, customer)
    if row is not None and row.status in SUSPENDED:
        raise BillingInactive(
            f"billing is inactive for this key (subscription {row.status}); "
            "inference resumes once the outstanding invoice is paid",
            details={"subscription_status": row.status},
        )


def _create_customer(settings: Settings, account: Account) -> str:
    """A new Stripe customer for the account; raises the SDK's error.

    The idempotency key is the account id's: a retry after a lost answer, or two requests
    racing, get back the customer Stripe already made (within Stripe's 24-hour key window).
    """
    customer = client_for(settings).v1.customers.create(
        {"name": account.name, "metadata": {"inferatech_account_id": account.id}},
        {"idempotency_key": f"inferatech-customer-{account.id}"},
    )
    return str(customer.id)


def _link_created(session: Session, account: Account, customer: str) -> str:
    """Link a customer made for the account unless someone linked one meanwhile; the winner."""
    stmt = (
        update(Account)
        .where(col(Account.id) == account.id, col(Account.stripe_customer_id).is_(None))
        .values(stripe_customer_id=customer, billing_status=_status_of(session, customer))
    )
    if update_rows(session, stmt):
        ledger.requeue_unlinked(session, account_id=account.id)
    session.commit()
    session.refresh(account)
    return str(account.stripe_customer_id)


def ensure_customer(session: Session, settings: Settings, account: Account) -> str:
    """The account's Stripe customer, created through the API on first need."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    try:
        customer = _create_customer(settings, account)
    except stripe.StripeError as exc:
        raise ServiceUnavailable("Stripe could not create this account's customer; retry") from exc
    return _link_created(session, account, customer)


def link_new_account(session: Session, settings: Settings, account: Account) -> None:
    """At signup, give a committed account its own Stripe customer when Stripe is configured.

    A Stripe failure leaves the account unlinked rather than lost: it gets its customer on
    demand (`POST /v1/billing/customer`, the portal) or from an operator, and usage recorded
    meanwhile is set aside by the pusher and re-queued at that link.
    """
    if not settings.stripe_configured or account.stripe_customer_id:
        return
    try:
        customer = _create_customer(settings, account)
    except stripe.StripeError as exc:
        log.warning("account %s has no Stripe customer yet: %s", account.id, describe(exc))
        return
    _link_created(session, account, customer)


def portal_url(session: Session, settings: Settings, account: Account) -> str:
    """A Stripe billing-portal session for the account's customer."""
    customer = ensure_customer(session, settings, account)
    return_url = settings.billing_portal_return_url or settings.public_base_url
    try:
        portal = client_for(settings).v1.billing_portal.sessions.create(
            {"customer": customer, "return_url": return_url}
        )
    except stripe.InvalidRequestError as exc:
        raise Conflict(f"Stripe refused the portal session: {exc.user_message}") from exc
    except stripe.StripeError as exc:
        raise ServiceUnavailable("Stripe is unavailable; retry") from exc
    return str(portal.url)


def check_customer(settings: Settings, customer: str) -> None:
    """Refuse a malformed id and, when Stripe is configured, one Stripe does not know."""
    if not CUSTOMER_ID.fullmatch(customer):
        raise InvalidRequest(f"{customer!r} is not a Stripe customer id (cus_…)")
    if not settings.stripe_configured:
        return  # the embedded default: the link is recorded, usage is pushed once configured
    try:
        found = client_for(settings).v1.customers.retrieve(customer)
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            raise InvalidRequest(f"Stripe has no customer {customer!r}") from exc
        raise Conflict(f"Stripe refused the customer lookup: {exc.user_message}") from exc
    except stripe.StripeError as exc:
        raise ServiceUnavailable("Stripe is unavailable; retry") from exc
    if getattr(found, "deleted", False):
        raise InvalidRequest(f"Stripe customer {customer!r} is deleted")


def _status_of(session: Session, customer: str | None) -> str:
    row = session.get(BillingCustomer, customer) if customer else None
    return "suspended" if row is not None and row.status in SUSPENDED else "active"


def link_account(
    *, session: Session, settings: Settings, account_id: str, customer: str | None
) -> Account:
    """Bill an account's usage to `customer` from now on (None unlinks); earlier events keep
    the customer they were written with, and unlinked ones get it at push time."""
    account = session.get(Account, account_id)
    if account is None:
        raise AccountNotFound(f"no account {account_id!r}")
    if customer is not None:
        check_customer(settings, customer)
    account.stripe_customer_id = customer
    account.billing_status = _status_of(session, customer)
    session.add(account)
    if customer is not None:
        ledger.requeue_unlinked(session, account_id=account.id)
    session.commit()
    return account


def link_key(*, session: Session, settings: Settings, key_id: str, customer: str | None) -> ApiKey:
    """Bill a key's usage to another customer (an owner delivering a model to a client)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFound(f"no key {key_id!r}")
    if customer is not None:
        check_customer(settings, customer)
    key.billed_customer_id = customer
    session.add(key)
    if customer is not None:
        ledger.requeue_unlinked(session, api_key_id=key.id)
    session.commit()
    return key

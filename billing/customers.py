"""Stripe customers: subscription state from webhooks, key suspension, the billing portal."""

from __future__ import annotations

from datetime import datetime

import stripe
from sqlmodel import Session, select

from billing.stripe_api import client_for
from core.errors import BillingInactive, Conflict, ServiceUnavailable
from core.settings import Settings
from core.tables import Account, ApiKey, BillingCustomer, utcnow

# Stripe subscription statuses that stop inference until an invoice is paid.
SUSPENDED = frozenset({"unpaid", "canceled", "incomplete_expired", "paused"})


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


def ensure_customer(session: Session, settings: Settings, account: Account) -> str:
    """The account's Stripe customer, created through the API on first need."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    try:
        customer = client_for(settings).v1.customers.create(
            {"name": account.name, "metadata": {"inferatech_account_id": account.id}},
            {"idempotency_key": f"inferatech-customer-{account.id}"},
        )
    except stripe.StripeError as exc:
        raise ServiceUnavailable("Stripe is unavailable; retry") from exc
    account.stripe_customer_id = str(customer.id)
    session.add(account)
    session.commit()
    return account.stripe_customer_id


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

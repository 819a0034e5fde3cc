"""Accounts and their tokens."""

from __future__ import annotations

from sqlmodel import Session

from billing.customers import link_new_account
from core import keys
from core.ids import new_id
from core.settings import Settings
from core.tables import Account


def create_account(
    *, session: Session, settings: Settings, name: str, stripe_customer_id: str | None = None
) -> tuple[Account, str]:
    """A new account and its token's plaintext (shown once, stored only as a hash).

    With Stripe configured and no customer given, the account gets its own Stripe customer;
    the account is committed first, so a Stripe outage never loses a signup.
    """
    minted = keys.mint(keys.ACCOUNT_TOKEN_PREFIX, settings.key_pepper.get_secret_value())
    account = Account(
        id=new_id("acct"),
        name=name,
        token_id=minted.key_id,
        token_hash=minted.secret_hash,
        stripe_customer_id=stripe_customer_id,
    )
    session.add(account)
    session.commit()
    link_new_account(session, settings, account)
    return account, minted.plaintext

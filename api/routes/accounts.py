"""Signup, and operators linking accounts to Stripe customers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.deps import AuthCacheDep, SessionDep, SettingsDep, require_operator
from api.schemas import AccountCreate, AccountCreated, CustomerLink, CustomerLinked
from api.services.accounts import create_account
from billing.customers import check_customer, link_account
from core.errors import SignupDisabled

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])


@router.post("", status_code=201)
def signup(
    body: AccountCreate, request: Request, session: SessionDep, settings: SettingsDep
) -> AccountCreated:
    """Create an account; its token is returned exactly once.

    A Stripe customer in the body is an operator's act (operator token): it decides who pays.
    """
    customer = body.stripe_customer_id
    if customer is not None:
        require_operator(request, settings)
        check_customer(settings, customer)
    elif not settings.signup_enabled:
        raise SignupDisabled("signup is disabled on this server; ask an operator for an account")
    account, token = create_account(
        session=session, settings=settings, name=body.name, stripe_customer_id=customer
    )
    return AccountCreated(
        id=account.id,
        name=account.name,
        token=token,
        created_at=account.created_at,
        stripe_customer_id=account.stripe_customer_id,
    )


@router.put("/{account_id}/stripe-customer", dependencies=[Depends(require_operator)])
def link_customer(
    account_id: str,
    body: CustomerLink,
    session: SessionDep,
    settings: SettingsDep,
    auth_cache: AuthCacheDep,
) -> CustomerLinked:
    """Bill the account's usage to a Stripe customer from now on (operator token)."""
    account = link_account(
        session=session, settings=settings, account_id=account_id, customer=body.stripe_customer_id
    )
    auth_cache.clear()  # cached grants carry the billing state of the customer they bill
    return CustomerLinked(id=account.id, stripe_customer_id=account.stripe_customer_id)

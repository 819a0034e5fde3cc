"""API keys: mint, list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from sqlmodel import select

from api.deps import AuthCacheDep, CurrentAccount, SessionDep, SettingsDep, require_operator
from api.presenters import key_public
from api.schemas import CustomerLink, CustomerLinked, KeyCreate, KeyCreated, KeysPublic
from api.services import models as svc
from billing.customers import link_key
from core.errors import KeyNotFound, ModelNotReady
from core.tables import ApiKey, ModelStatus, utcnow

router = APIRouter(tags=["keys"])


@router.post("/v1/models/{model_id}/keys", status_code=201)
def mint(
    model_id: str,
    session: SessionDep,
    settings: SettingsDep,
    owner: CurrentAccount,
    body: KeyCreate | None = None,
) -> KeyCreated:
    """Mint another key for a ready model, with its own limits; the plaintext is shown once."""
    model = svc.get_owned_model(session, owner, model_id)
    if model.status is not ModelStatus.READY:
        raise ModelNotReady(f"model is {model.status.value}; keys are issued once it is ready")
    key, plaintext = svc.mint_key(session=session, settings=settings, model=model, key_in=body)
    session.commit()
    return KeyCreated(**key_public(key).model_dump(), key=plaintext)


@router.get("/v1/keys")
def list_keys(session: SessionDep, owner: CurrentAccount) -> KeysPublic:
    """The account's keys (prefixes only, never secrets)."""
    stmt = select(ApiKey).where(ApiKey.account_id == owner.id).order_by(ApiKey.created_at)  # type: ignore[arg-type]
    rows = [key_public(k) for k in session.exec(stmt)]
    return KeysPublic(data=rows, count=len(rows))


@router.delete("/v1/keys/{key_id}", status_code=204)
def revoke(
    key_id: str, session: SessionDep, owner: CurrentAccount, auth_cache: AuthCacheDep
) -> Response:
    """Revoke a key; it stops working at once (other API processes: within the cache TTL)."""
    key = session.get(ApiKey, key_id)
    if key is None or key.account_id != owner.id:
        raise KeyNotFound(f"no key {key_id!r} in this account")
    key.revoked_at = key.revoked_at or utcnow()
    session.add(key)
    session.commit()
    auth_cache.forget_key(key.id)
    return Response(status_code=204)


@router.put("/v1/keys/{key_id}/billed-customer", dependencies=[Depends(require_operator)])
def bill_key_to(
    key_id: str,
    body: CustomerLink,
    session: SessionDep,
    settings: SettingsDep,
    auth_cache: AuthCacheDep,
) -> CustomerLinked:
    """Bill a key's usage to another Stripe customer, or back to its owner (operator token)."""
    customer = body.stripe_customer_id
    key = link_key(session=session, settings=settings, key_id=key_id, customer=customer)
    auth_cache.forget_key(key.id)  # its cached grant carries the old customer's billing state
    return CustomerLinked(id=key.id, stripe_customer_id=key.billed_customer_id)

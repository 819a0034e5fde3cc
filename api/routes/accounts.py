"""Signup."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, SettingsDep
from api.schemas import AccountCreate, AccountCreated
from api.services.accounts import create_account
from core.errors import SignupDisabled

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])


@router.post("", status_code=201)
def signup(body: AccountCreate, session: SessionDep, settings: SettingsDep) -> AccountCreated:
    """Create an account; its token is returned exactly once."""
    if not settings.signup_enabled:
        raise SignupDisabled("signup is disabled on this server; ask an operator for an account")
    account, token = create_account(session=session, settings=settings, name=body.name)
    return AccountCreated(
        id=account.id, name=account.name, token=token, created_at=account.created_at
    )

"""FastAPI dependencies as `Annotated` aliases."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlmodel import Session, select
from starlette.requests import HTTPConnection

from api.inference.auth_cache import AuthCache
from core import keys
from core.db import get_engine
from core.errors import AuthenticationFailed, NotImplementedByConfig
from core.settings import Settings, get_settings
from core.storage import get_storage
from core.storage.base import ObjectStorage
from core.tables import Account


async def settings_of(conn: HTTPConnection) -> Settings:
    """The app's settings: `get_settings`, or what a test put in its place (HTTP routes and
    WebSockets alike).

    Async on purpose: FastAPI runs a plain-function dependency in its thread pool, and that
    hand-off (to a worker thread and back) was on every request's path, about a tenth of the
    API process's Python time under load (py-spy on the 2-vCPU host).
    """
    return conn.app.dependency_overrides.get(get_settings, get_settings)()  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(settings_of)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def storage_dep(settings: SettingsDep) -> ObjectStorage:
    return get_storage(settings)


StorageDep = Annotated[ObjectStorage, Depends(storage_dep)]


def celery_dep(request: Request) -> Celery:
    app: Celery = request.app.state.celery
    return app


CeleryDep = Annotated[Celery, Depends(celery_dep)]


def auth_cache_dep(request: Request) -> AuthCache:
    cache: AuthCache = request.app.state.auth_cache
    return cache


AuthCacheDep = Annotated[AuthCache, Depends(auth_cache_dep)]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("missing bearer token: send `Authorization: Bearer <token>`")
    return token.strip()


def current_account(request: Request, session: SessionDep, settings: SettingsDep) -> Account:
    """The account whose `iat_…` token authenticates the request."""
    parsed = keys.parse(bearer_token(request), keys.ACCOUNT_TOKEN_PREFIX)
    if parsed is None:
        raise AuthenticationFailed("malformed account token")
    account = session.exec(select(Account).where(Account.token_id == parsed.key_id)).first()
    pepper = settings.key_pepper.get_secret_value()
    if account is None or not keys.verify(parsed, account.token_hash, pepper):
        raise AuthenticationFailed("invalid account token")
    return account


CurrentAccount = Annotated[Account, Depends(current_account)]


def require_operator(request: Request, settings: SettingsDep) -> None:
    """The operator token (`INFERATECH_OPERATOR_TOKEN`), compared in constant time."""
    if settings.operator_token is None:
        raise NotImplementedByConfig("set INFERATECH_OPERATOR_TOKEN to enable operator endpoints")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    if not hmac.compare_digest(given, settings.operator_token.get_secret_value().encode()):
        raise AuthenticationFailed("operator token required")

"""Thin routes: `/v1/routers` (account token) and router-scoped keys."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import CurrentAccount, SessionDep, SettingsDep
from api.presenters import key_public
from api.prompt_routing import service as svc
from api.prompt_routing.protocol import RouterCreate, RouterPublic, RoutersPublic
from api.schemas import KeyCreate, KeyCreated

router = APIRouter(prefix="/v1/routers", tags=["routers"])


@router.post("", status_code=201)
def create(body: RouterCreate, session: SessionDep, owner: CurrentAccount) -> RouterPublic:
    """Create a prompt router over the account's ready models."""
    return svc.router_public(svc.create_router(session=session, owner=owner, router_in=body))


@router.get("")
def list_routers(session: SessionDep, owner: CurrentAccount) -> RoutersPublic:
    """The account's routers, newest first."""
    rows = [svc.router_public(r) for r in svc.list_routers(session, owner)]
    return RoutersPublic(data=rows, count=len(rows))


@router.get("/{router_id}")
def read(router_id: str, session: SessionDep, owner: CurrentAccount) -> RouterPublic:
    """One router and its rules."""
    return svc.router_public(svc.get_owned_router(session, owner, router_id))


@router.delete("/{router_id}", status_code=204)
def delete(router_id: str, session: SessionDep, owner: CurrentAccount) -> Response:
    """Delete a router and revoke the keys scoped to it."""
    svc.delete_router(session=session, router=svc.get_owned_router(session, owner, router_id))
    return Response(status_code=204)


@router.post("/{router_id}/keys", status_code=201)
def mint_key(
    router_id: str,
    session: SessionDep,
    settings: SettingsDep,
    owner: CurrentAccount,
    body: KeyCreate | None = None,
) -> KeyCreated:
    """Mint a key scoped to this router; the plaintext is returned once."""
    found = svc.get_owned_router(session, owner, router_id)
    key, plaintext = svc.mint_router_key(
        session=session, settings=settings, router=found, key_in=body or KeyCreate()
    )
    return KeyCreated(**key_public(key).model_dump(), key=plaintext)

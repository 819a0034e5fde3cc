"""Routers: create (every model the account's own and ready), read, delete, mint scoped keys."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.prompt_routing.protocol import RouterCreate, RouterPublic, Rule
from api.prompt_routing.rules import compile_rules
from api.schemas import KeyCreate
from api.services import models as model_svc
from core.errors import ModelNotFound, ModelNotReady, RouterNotFound
from core.ids import new_id
from core.settings import Settings
from core.tables import Account, ApiKey, Model, ModelStatus, Router, utcnow

ROUTER_PREFIX = "rtr"


def is_router_id(target_id: str) -> bool:
    return target_id.startswith(f"{ROUTER_PREFIX}_")


def _check_model(session: Session, owner: Account, model_id: str, field: str) -> None:
    model = session.get(Model, model_id)
    if model is None or model.account_id != owner.id or model.status is ModelStatus.DELETED:
        message = f"{field}: no model {model_id!r} in this account"
        raise ModelNotFound(message, details={"field": field})
    if model.status is not ModelStatus.READY:
        raise ModelNotReady(
            f"{field}: model {model_id!r} is {model.status.value}; routers take ready models only",
            details={"field": field},
        )


def create_router(*, session: Session, owner: Account, router_in: RouterCreate) -> Router:
    compile_rules(router_in.rules, router_in.default_model_id)  # 400 before anything is stored
    for i, rule in enumerate(router_in.rules):
        _check_model(session, owner, rule.model_id, f"rules.{i}.model_id")
    _check_model(session, owner, router_in.default_model_id, "default_model_id")
    router = Router(
        id=new_id(ROUTER_PREFIX),
        account_id=owner.id,
        name=router_in.name,
        rules=[r.model_dump(exclude_none=True) for r in router_in.rules],
        default_model_id=router_in.default_model_id,
    )
    session.add(router)
    session.commit()
    return router


def get_owned_router(session: Session, owner: Account, router_id: str) -> Router:
    """The owner's live router; another account's id is indistinguishable from a missing one."""
    router = session.get(Router, router_id)
    if router is None or router.account_id != owner.id or router.deleted_at is not None:
        raise RouterNotFound(f"no router {router_id!r} in this account")
    return router


def list_routers(session: Session, owner: Account) -> list[Router]:
    stmt = (
        select(Router)
        .where(col(Router.account_id) == owner.id, col(Router.deleted_at).is_(None))
        .order_by(col(Router.created_at).desc())
    )
    return list(session.exec(stmt))


def delete_router(*, session: Session, router: Router) -> list[str]:
    """Soft-delete the router and revoke its keys; returns the revoked key ids."""
    now = utcnow()
    router.deleted_at = now
    session.add(router)
    revoked = []
    for key in session.exec(select(ApiKey).where(col(ApiKey.router_id) == router.id)):
        key.revoked_at = key.revoked_at or now
        session.add(key)
        revoked.append(key.id)
    session.commit()
    return revoked


def mint_router_key(
    *, session: Session, settings: Settings, router: Router, key_in: KeyCreate
) -> tuple[ApiKey, str]:
    """A key that may call this router only (its `model_id` is the default, a placeholder).

    Its limits (`key_in`) apply to every call through the router, whichever model serves.
    """
    default = session.get(Model, router.default_model_id)
    assert default is not None  # a foreign key
    key, plaintext = model_svc.mint_key(
        session=session, settings=settings, model=default, key_in=key_in
    )
    key.router_id = router.id
    session.add(key)
    session.commit()
    return key, plaintext


def router_public(router: Router) -> RouterPublic:
    return RouterPublic(
        id=router.id,
        name=router.name,
        rules=[Rule.model_validate(r) for r in router.rules],
        default_model_id=router.default_model_id,
        created_at=router.created_at,
    )

"""The one resolver of a call's target: (key, model or router id, prompt) → model + routed_to.

Every route that accepts a model id calls `resolve_target`; a router id (`rtr_…`) is resolved
by its rules against the prompt. A router may be called only with a key scoped to it, and such a
key reaches the router's models only through the router (`authorize_model` refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session

from api.inference.auth import authenticate_key, grant_for
from api.inference.auth_cache import AuthCache, Grant
from api.prompt_routing.rules import RuleSet, rule_set_of
from api.prompt_routing.service import is_router_id
from billing.customers import ensure_active
from core.errors import AuthorizationFailed, ModelNotFound, ModelNotReady, RouterNotFound
from core.settings import Settings
from core.tables import ApiKey, Model, ModelStatus, Router


@dataclass(frozen=True)
class Target:
    """The model that will serve, and the router that chose it (None for a direct call)."""

    grant: Grant
    router_id: str | None = None

    @property
    def routed_to(self) -> str | None:
        return self.grant.model_id if self.router_id else None


@dataclass
class Scope:
    """What one key may call through one target id; reused for every prompt of a batch."""

    key_id: str
    account_id: str
    grant: Grant | None = None
    key: ApiKey | None = None
    router: Router | None = None
    rules: RuleSet | None = None
    _grants: dict[str, Grant] = field(default_factory=dict)

    def target_for(self, session: Session, prompt: str) -> Target:
        if self.grant is not None:
            return Target(self.grant)
        assert self.key is not None and self.router is not None and self.rules is not None
        model_id = self.rules.choose(prompt)
        grant = self._grants.get(model_id)
        if grant is None:
            model = _routed_model(session, self.key, model_id)
            grant = self._grants[model_id] = Grant.of(self.key, model)
        return Target(grant, self.router.id)


def _routed_model(session: Session, key: ApiKey, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.account_id != key.account_id or model.status is ModelStatus.DELETED:
        raise ModelNotFound(f"the router chose model {model_id!r}, which no longer exists")
    if model.status is not ModelStatus.READY:
        raise ModelNotReady(f"the router chose model {model_id!r}, which is {model.status.value}")
    return model


def open_scope(
    session: Session, settings: Settings, cache: AuthCache, token: str, target_id: str
) -> Scope:
    """Authenticate the key and check it may call `target_id` (a model or a router)."""
    if not is_router_id(target_id):
        grant = grant_for(session, settings, cache, token, target_id)
        return Scope(grant.key_id, grant.account_id, grant=grant)
    key = authenticate_key(session, settings, token)
    router = session.get(Router, target_id)
    if router is None or router.account_id != key.account_id or router.deleted_at is not None:
        raise RouterNotFound(f"no router {target_id!r}")
    if key.router_id != router.id:
        raise AuthorizationFailed(f"this API key is not valid for router {target_id!r}")
    ensure_active(session, key)
    rules = rule_set_of(router.id, router.rules, router.default_model_id)
    return Scope(key.id, key.account_id, key=key, router=router, rules=rules)


def resolve_target(
    session: Session,
    settings: Settings,
    cache: AuthCache,
    token: str,
    target_id: str,
    prompt: str,
) -> Target:
    """The model that serves this prompt for this key; raises the usual auth and model errors."""
    return open_scope(session, settings, cache, token, target_id).target_for(session, prompt)

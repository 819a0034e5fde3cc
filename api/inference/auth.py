"""API-key authentication and model scope for inference routes."""

from __future__ import annotations

from sqlmodel import Session

from api.inference.auth_cache import AuthCache, Grant
from billing.customers import ensure_active
from core import keys
from core.errors import AuthenticationFailed, AuthorizationFailed, ModelNotFound, ModelNotReady
from core.settings import Settings
from core.tables import ApiKey, Model, ModelStatus


def key_token(authorization: str | None, body_key: str | None) -> str:
    """The bearer token, or the body's `api_key` field (kept for older clients)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if body_key:
        return body_key
    raise AuthenticationFailed("missing API key: send `Authorization: Bearer ik_…`")


def _parse(token: str) -> keys.ParsedKey:
    parsed = keys.parse(token, keys.API_KEY_PREFIX)
    if parsed is None:
        raise AuthenticationFailed("malformed API key")
    return parsed


def authenticate_key(session: Session, settings: Settings, token: str) -> ApiKey:
    """A live key; malformed keys are refused before any query."""
    parsed = _parse(token)
    key = session.get(ApiKey, parsed.key_id)
    if key is None or not keys.verify(
        parsed, key.secret_hash, settings.key_pepper.get_secret_value()
    ):
        raise AuthenticationFailed("invalid API key")
    if key.revoked_at is not None:
        raise AuthenticationFailed("this API key has been revoked")
    return key


def authorize_model(session: Session, key: ApiKey, model_id: str) -> Model:
    """The model this key may call; another account's model is indistinguishable from none.

    A key whose paying customer's subscription is unpaid or cancelled gets BILLING_INACTIVE.
    """
    model = session.get(Model, model_id)
    if model is None or model.account_id != key.account_id or model.status is ModelStatus.DELETED:
        raise ModelNotFound(f"no model {model_id!r}")
    if model.id != key.model_id or key.router_id is not None:
        raise AuthorizationFailed(f"this API key is not valid for model {model_id!r}")
    if model.status is not ModelStatus.READY:
        raise ModelNotReady(f"model is {model.status.value}; it can be called once it is ready")
    ensure_active(session, key)
    return model


def cached_grant(settings: Settings, cache: AuthCache, token: str, model_id: str) -> Grant | None:
    """The key's cached grant to call `model_id` (its secret checked), or None: not cached."""
    parsed = _parse(token)
    cached = cache.get(parsed.key_id)
    if cached is None or cached.model_id != model_id:
        return None
    if not keys.verify(parsed, cached.secret_hash, settings.key_pepper.get_secret_value()):
        raise AuthenticationFailed("invalid API key")
    return cached


def grant_for(
    session: Session, settings: Settings, cache: AuthCache, token: str, model_id: str
) -> Grant:
    """The key's grant to call `model_id`: cached after one full check, secret checked always."""
    cached = cached_grant(settings, cache, token, model_id)
    if cached is not None:
        return cached
    generation = cache.generation()
    key = authenticate_key(session, settings, token)
    grant = Grant.of(key, authorize_model(session, key, model_id))
    cache.put(grant, generation)
    return grant

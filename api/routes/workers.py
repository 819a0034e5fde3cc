"""Operators' view of the fleet: live workers, their warm models and load."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Header

from api.deps import SettingsDep
from core.errors import AuthenticationFailed, NotImplementedByConfig
from core.events import read_heartbeats
from core.redis import get_redis

router = APIRouter(tags=["operators"])


@router.get("/v1/workers")
def list_workers(
    settings: SettingsDep, authorization: str | None = Header(default=None)
) -> dict[str, Any]:
    """Live workers from their heartbeats (operator token)."""
    if settings.operator_token is None:
        raise NotImplementedByConfig("set INFERATECH_OPERATOR_TOKEN to enable operator endpoints")
    given = (authorization or "").removeprefix("Bearer ").strip().encode()
    if not hmac.compare_digest(given, settings.operator_token.get_secret_value().encode()):
        raise AuthenticationFailed("operator token required")
    beats = read_heartbeats(get_redis(settings))
    return {"data": beats, "count": len(beats)}

"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SettingsDep, StorageDep
from core.db import get_engine
from core.redis import get_redis
from core.settings import Settings

router = APIRouter(tags=["health"])


def _ping_database(settings: Settings) -> None:
    with get_engine(settings).connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up: answered on the event loop, not a worker thread, so a probe
    measures the loop (and a full thread pool does not fail liveness)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    """Database, Redis and object storage are all reachable."""
    checks: dict[str, Any] = {}
    for name, probe in (
        ("database", lambda: _ping_database(settings)),
        ("redis", lambda: get_redis(settings).ping()),
        ("storage", storage.ping),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )

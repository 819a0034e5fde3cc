"""Bucket notification webhook (S3 via SNS/HTTP, MinIO `notify_webhook`)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import APIRouter, Request

from api.deps import CeleryDep, SessionDep, SettingsDep, StorageDep
from api.services.storage_events import handle_event
from core.errors import AuthenticationFailed, InvalidRequest, PayloadTooLarge

router = APIRouter(tags=["storage"])
MAX_BODY = 1 << 20


@router.post("/v1/storage/events")
async def storage_events(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Authenticated by the shared secret, sent raw or as a bearer token."""
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    expected = settings.storage_events_secret.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthenticationFailed("bad storage-events secret")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise PayloadTooLarge("event payload over 1 MiB")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidRequest("event payload is not JSON") from exc
    outcomes = handle_event(session=session, storage=storage, celery=celery, payload=payload)
    return {"received": len(outcomes), "outcomes": outcomes}

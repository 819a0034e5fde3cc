"""AWS Lambda entry point: API Gateway/Function URL requests via Mangum, S3 events directly."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

from mangum import Mangum
from sqlmodel import Session

from api.main import create_app
from api.services.storage_events import handle_event
from core.db import get_engine
from core.queue import make_celery
from core.settings import get_settings
from core.storage import get_storage


@lru_cache
def _http() -> Mangum:
    # "auto": the app's lifespan (its Redis clients and worker directory) runs around each
    # invocation; without it every inference route would fail on the missing state.
    return Mangum(create_app(), lifespan="auto")


def is_s3_event(event: Any) -> bool:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list) or not records:
        return False
    return all(isinstance(r, dict) and r.get("eventSource") == "aws:s3" for r in records)


def handle_s3_event(event: dict[str, Any]) -> dict[str, Any]:
    """S3 `ObjectCreated` notifications start validation exactly like `/v1/storage/events`."""
    settings = get_settings()
    with Session(get_engine(settings), expire_on_commit=False) as session:
        outcomes = handle_event(
            session=session,
            storage=get_storage(settings),
            celery=make_celery(settings),
            payload=event,
        )
    return {"received": len(outcomes), "outcomes": outcomes}


def _ensure_event_loop() -> None:
    """Mangum runs a request on `asyncio.get_event_loop()`, which raises once an
    `asyncio.run` in this thread (anything a warm container ran before) has unset the loop."""
    try:
        if not asyncio.get_event_loop_policy().get_event_loop().is_closed():
            return
    except RuntimeError:
        pass
    asyncio.set_event_loop(asyncio.new_event_loop())


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if is_s3_event(event):
        return handle_s3_event(event)
    _ensure_event_loop()
    response: dict[str, Any] = _http()(event, context)
    return response

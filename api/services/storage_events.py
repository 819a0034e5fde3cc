"""Bucket notifications (S3, MinIO, Lambda) that start validation once every file landed."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

from celery import Celery
from sqlmodel import Session

from api.services.models import complete_model
from core.storage.base import ObjectStorage
from core.tables import Model, ModelStatus

_KEY = re.compile(r"(?:^|/)(acct_[0-9A-Za-z]+)/(mdl_[0-9A-Za-z]+)/[^\x00]+$")
MAX_RECORDS = 1000


def object_keys(payload: Any) -> list[str]:
    """Object keys of `ObjectCreated` records; anything else in the payload is ignored."""
    records = payload.get("Records") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        return []
    keys = []
    for record in records[:MAX_RECORDS]:
        if not isinstance(record, dict):
            continue
        name = str(record.get("eventName", ""))
        key = (
            record.get("s3", {}).get("object", {}).get("key")
            if isinstance(record.get("s3"), dict)
            else None
        )
        if "ObjectCreated" in name and isinstance(key, str):
            keys.append(unquote_plus(key))
    return keys


def handle_event(
    *, session: Session, storage: ObjectStorage, celery: Celery, payload: Any
) -> list[dict[str, str]]:
    """Start validation of each model whose files are now all uploaded (idempotent)."""
    outcomes = []
    seen: set[str] = set()
    for key in object_keys(payload):
        m = _KEY.search(key)
        if m is None or m[2] in seen:
            continue
        seen.add(m[2])
        model = session.get(Model, m[2])
        if model is None or model.account_id != m[1]:
            outcomes.append({"key": key, "outcome": "unknown_model"})
            continue
        if model.status is ModelStatus.AWAITING_UPLOAD:
            complete_model(
                session=session, storage=storage, celery=celery, model=model, parts={}, strict=False
            )
        outcomes.append({"key": key, "model_id": model.id, "status": model.status.value})
    return outcomes

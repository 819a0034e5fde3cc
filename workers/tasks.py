"""Thin Celery tasks: they take ids, not objects."""

from __future__ import annotations

from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from core.errors import StorageError
from core.queue import VALIDATE_TASK
from core.settings import get_settings
from workers import validation
from workers.celery_app import app

_settings = get_settings()


@app.task(  # type: ignore[untyped-decorator]
    name=VALIDATE_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=_settings.validation_time_limit_s,
    time_limit=_settings.validation_time_limit_s + 60,
    autoretry_for=(StorageError,),
    retry_backoff=5,
    retry_backoff_max=300,
    max_retries=8,
)
def validate_model(self: Any, model_id: str) -> str:
    """Validate an uploaded bundle; idempotent and safe to redeliver."""
    try:
        return validation.run(model_id, get_settings())
    except validation.Busy as exc:
        raise self.retry(countdown=15, exc=exc) from exc
    except SoftTimeLimitExceeded:
        validation.reject(
            model_id, get_settings(), "VALIDATION_TIMEOUT", "validation took too long"
        )
        return "rejected"

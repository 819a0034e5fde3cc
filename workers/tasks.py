"""Thin Celery tasks: they take ids, not objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from billing import pusher
from core import lifecycle
from core.db import session_scope
from core.errors import StorageError
from core.logs import log_context
from core.queue import (
    BATCH_WEBHOOK_TASK,
    BILLING_PUSH_TASK,
    IDLE_MODELS_TASK,
    INFER_TASK,
    PURGE_TASK,
    VALIDATE_TASK,
    WEBHOOK_TASK,
)
from core.settings import get_settings
from core.storage import get_storage
from workers import inference, validation, webhooks
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


@app.task(  # type: ignore[untyped-decorator]
    name=INFER_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def infer(
    self: Any,
    job_id: str,
    timeout_s: float | None = None,
    live: bool = True,
    job: dict[str, Any] | None = None,
) -> str:
    """Run one inference job (idempotent by job id); `live` False: nobody streams it.

    `job`: the job itself, when the API left writing its row to the worker.
    """
    ex = inference.executor_for(get_settings())
    with log_context(job_id=job_id):
        outcome = inference.run_job(job_id, ex, timeout_s, live=live, carried=job)
    if outcome == "busy":  # another worker holds the job: look again later
        raise self.retry(countdown=5)
    return outcome


_WEBHOOK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "max_retries": None,
    "soft_time_limit": 60,
    "time_limit": 90,
}


@app.task(name=WEBHOOK_TASK, **_WEBHOOK_OPTIONS)  # type: ignore[untyped-decorator]
def deliver_webhook(self: Any, job_id: str) -> int:
    """Deliver a job's signed webhook; exponential backoff on failure, never on the worker path."""
    return _deliver(self, webhooks.deliver, job_id)


@app.task(name=BATCH_WEBHOOK_TASK, **_WEBHOOK_OPTIONS)  # type: ignore[untyped-decorator]
def deliver_batch_webhook(self: Any, batch_id: str) -> int:
    """Deliver a closed batch's signed webhook, retried like a job's."""
    return _deliver(self, webhooks.deliver_batch, batch_id)


def _deliver(task: Any, send: Callable[..., int], object_id: str) -> int:
    settings = get_settings()
    attempt = task.request.retries + 1
    error: Exception | None = None
    try:
        status = send(
            settings, object_id, attempt, allow_private=settings.webhook_allow_private_hosts
        )
    except webhooks.WebhookRefused:
        return -1
    except Exception as exc:  # network errors are retried like a 5xx
        status, error = -2, exc
    if 200 <= status < 300 or status == 0:
        return status
    if attempt >= settings.webhook_max_attempts:
        return status
    raise task.retry(countdown=min(2 ** (attempt - 1), 600), exc=error)


@app.task(name=PURGE_TASK, soft_time_limit=300, time_limit=360)  # type: ignore[untyped-decorator]
def purge_expired_payloads() -> int:
    """Retention: prompts and completions do not outlive their job's TTL."""
    with session_scope(get_settings()) as session:
        return lifecycle.purge_expired_payloads(session)


@app.task(name=IDLE_MODELS_TASK, soft_time_limit=600, time_limit=660)  # type: ignore[untyped-decorator]
def delete_idle_models() -> int:
    """Retention: models not invoked for `model_idle_delete_days` are deleted."""
    settings = get_settings()
    storage = get_storage(settings)
    deleted = 0
    with session_scope(settings) as session:
        for model in lifecycle.idle_models(session, settings.model_idle_delete_days):
            lifecycle.delete_model(session=session, storage=storage, model=model)
            deleted += 1
    return deleted


@app.task(name=BILLING_PUSH_TASK, soft_time_limit=120, time_limit=180)  # type: ignore[untyped-decorator]
def billing_push(customer: str | None = None) -> int:
    """Push due usage events to Stripe meter events (beat, and at once on invoice.finalized)."""
    report = pusher.push_all(get_settings(), customer=customer, max_batches=20)
    return report.pushed

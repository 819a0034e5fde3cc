"""Job state on the worker side: compare-and-set transitions, terminal state + usage together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, update
from sqlmodel import Session, col, select

from core.db import session_scope, update_rows
from core.ids import new_id
from core.settings import Settings
from core.tables import (
    Account,
    ApiKey,
    Job,
    JobStatus,
    Model,
    ModelFile,
    PushState,
    UsageEvent,
    utcnow,
)

LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
_INSERT_USAGE = insert(UsageEvent.__table__)  # type: ignore[attr-defined]


@dataclass
class JobContext:
    """Everything a worker needs to run a job, read in one short transaction."""

    job: Job
    model: Model
    files: list[ModelFile]
    customer: str | None
    log_payloads: bool = False  # the key opted in: its prompts and completions are logged


@dataclass
class Terminal:
    status: JobStatus
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    # An embedding job's vectors: they reach the caller on the stream, never the database.
    vectors: list[list[float]] | None = None

    def event(self) -> dict[str, Any]:
        ev: dict[str, Any] = {"type": "done", "status": self.status.value}
        if self.status is JobStatus.SUCCEEDED:
            ev["result"] = {
                "finish_reason": (self.result or {}).get("finish_reason"),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }
            if self.vectors is not None:
                ev["result"]["embeddings"] = self.vectors
        else:
            ev["error"] = {"code": self.error_code, "message": self.error_message}
            # What a cancelled or failed job still consumed (and is billed for).
            ev["usage"] = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }
        return ev


def _context(s: Session, job: Job) -> JobContext:
    model = s.get(Model, job.model_id)
    assert model is not None
    files = list(s.exec(select(ModelFile).where(ModelFile.model_id == model.id)))
    key = s.get(ApiKey, job.api_key_id) if job.api_key_id else None
    account = s.get(Account, job.account_id)
    customer = (key.billed_customer_id if key else None) or (
        account.stripe_customer_id if account else None
    )
    return JobContext(
        job=job,
        model=model,
        files=files,
        customer=customer,
        log_payloads=bool(key and key.log_payloads),
    )


def load(settings: Settings, job_id: str) -> JobContext | None:
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        return None if job is None else _context(s, job)


@dataclass
class Claim:
    """What `claim` found: a context to run, or why not (`ctx` is then set only to end it)."""

    ctx: JobContext | None
    expired: bool = False


def claim(settings: Settings, job_id: str) -> Claim:
    """`queued → running` (or a redelivered `running` job taken over) in one transaction.

    The compare-and-set and the reads a run needs share one commit (the hot path of every
    request). A job whose TTL ran out is not claimed: `expired` asks the caller to end it.
    """
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status not in LIVE:
            return Claim(None)
        if job.expires_at and utcnow() > job.expires_at:
            return Claim(_context(s, job), expired=True)
        stmt = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_(LIVE))
            .values(status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1)
        )
        if update_rows(s, stmt) != 1:
            return Claim(None)
        return Claim(_context(s, job))


def finish(settings: Settings, ctx: JobContext, end: Terminal) -> bool:
    """Write the terminal state and its usage event in one transaction; False if already ended."""
    job = ctx.job
    now = utcnow()
    with session_scope(settings) as s:
        stmt = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_(LIVE))
            .values(
                status=end.status,
                result=end.result,
                error_code=end.error_code,
                error_message=(end.error_message or None) and end.error_message[:2000],
                prompt_tokens=end.prompt_tokens,
                completion_tokens=end.completion_tokens,
                timings=end.timings,
                finished_at=now,
            )
        )
        if update_rows(s, stmt) != 1:
            return False
        if end.completion_tokens > 0 or end.status is JobStatus.SUCCEEDED:
            # A Core INSERT on the session's connection (same transaction): no ORM object,
            # identity map or unit-of-work flush on every request's path.
            row = {
                "id": new_id("ue"),
                "job_id": job.id,
                "account_id": job.account_id,
                "api_key_id": job.api_key_id,
                "model_id": job.model_id,
                "stripe_customer_id": ctx.customer,
                "prompt_tokens": end.prompt_tokens,
                "completion_tokens": end.completion_tokens,
                "occurred_at": now,
                "push_state": PushState.PENDING,
                "attempts": 0,
            }
            s.connection().execute(_INSERT_USAGE, row)
        if _due(f"model:{job.model_id}"):
            model_row = update(Model).where(col(Model.id) == job.model_id)
            update_rows(s, model_row.values(last_invoked_at=now))
        if job.api_key_id and _due(f"key:{job.api_key_id}"):
            key_row = update(ApiKey).where(col(ApiKey.id) == job.api_key_id)
            update_rows(s, key_row.values(last_used_at=now))
    return True


# `last_invoked_at` (idle deletion, days) and `last_used_at` (shown to owners) need not move on
# every request: each worker process writes them at most once a minute per model and key,
# which keeps two UPDATEs off the hot path.
TOUCH_EVERY_S = 60.0
_touched: dict[str, float] = {}
_touch_lock = threading.Lock()


def _due(name: str) -> bool:
    now = time.monotonic()
    with _touch_lock:
        if now - _touched.get(name, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return False
        if len(_touched) > 100_000:  # a long-lived worker serving many keys
            _touched.clear()
        _touched[name] = now
        return True

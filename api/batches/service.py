"""Batches: many jobs in one request, queued behind interactive work, read back as JSON lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import redis
from celery import Celery
from sqlalchemy import update
from sqlmodel import Session, col, select

from api.batches.protocol import (
    BatchCreate,
    BatchPublic,
    BatchRequest,
    BatchResult,
    BatchResultLine,
    Usage,
)
from api.inference.auth_cache import AuthCache
from api.inference.jobs import Reader
from api.inference.protocol import InferRequest, JobError
from api.inference.serving import GENERATION_FIELDS, JobSpec, enqueue, new_job
from api.prompt_routing.resolve import open_scope
from core import batches, events
from core.db import update_rows
from core.errors import BatchNotFound, InvalidRequest, ServiceUnavailable
from core.ids import new_id
from core.queue import BATCH_PRIORITY, BATCH_WEBHOOK_TASK, INFER_QUEUE, WEBHOOK_QUEUE
from core.redis import get_redis
from core.settings import Settings
from core.tables import Batch, Job, JobStatus, utcnow

log = logging.getLogger("inferatech.batches")


def _check(body: BatchCreate, settings: Settings) -> None:
    """Caps and per-request rules the schema cannot say: count, unique ids, prompt only."""
    if len(body.requests) > settings.batch_max_requests:
        raise InvalidRequest(
            f"a batch may hold at most {settings.batch_max_requests} requests",
            details={"field": "requests"},
        )
    seen: set[str] = set()
    for i, item in enumerate(body.requests):
        field = f"requests.{i}"
        if item.custom_id in seen:
            raise InvalidRequest(
                f"{field}.custom_id: {item.custom_id!r} is used twice",
                details={"field": f"{field}.custom_id"},
            )
        seen.add(item.custom_id)
        if (item.prompt is None) == (item.messages is None):
            raise InvalidRequest(
                f"{field}: send exactly one of `prompt` and `messages`",
                details={"field": f"{field}.prompt"},
            )
        if item.messages is not None and item.raw:
            raise InvalidRequest(
                f"{field}.raw: `messages` always go through the chat template",
                details={"field": f"{field}.raw"},
            )


def create_batch(
    *,
    session: Session,
    settings: Settings,
    cache: AuthCache,
    token: str,
    body: BatchCreate,
) -> Batch:
    """One job per request, saved together, then queued at batch priority on the shared queue."""
    _check(body, settings)
    scope = open_scope(session, settings, cache, token, body.model_id)
    batch = Batch(
        id=new_id("bat"),
        account_id=scope.account_id,
        api_key_id=scope.key_id,
        model_id=body.model_id,
        total=len(body.requests),
        webhook_url=body.webhook_url,
    )
    jobs: list[Job] = []
    for i, item in enumerate(body.requests):
        target = scope.target_for(session, item.routing_text())
        try:
            job = new_job(
                settings=settings,
                grant=target.grant,
                spec=_spec_of(item, body.model_id),
                router_id=target.router_id,
                batch_id=batch.id,
            )
        except InvalidRequest as exc:
            field = f"requests.{i}"
            raise InvalidRequest(f"{field}: {exc.message}", details={"field": field}) from exc
        jobs.append(job)
    batch.items = [[item.custom_id, job.id] for item, job in zip(body.requests, jobs, strict=True)]
    session.add(batch)
    session.flush()  # the batch row first: jobs refer to it
    session.add_all(jobs)
    session.commit()
    _enqueue_all(session, get_redis(settings), batch, jobs)
    return batch


def _spec_of(item: BatchRequest, model_id: str) -> JobSpec:
    if item.messages is None:
        fields = item.model_dump(exclude={"custom_id", "messages"})
        return JobSpec.of(InferRequest.model_validate({**fields, "model_id": model_id}))
    messages = [m.model_dump() for m in item.messages]
    sampling = item.model_dump(include=GENERATION_FIELDS - {"prompt", "raw"})
    return JobSpec(
        params={"messages": messages, **sampling},
        input_chars=sum(len(m["content"]) for m in messages),
        input_name="messages",
        max_tokens=item.max_tokens,
    )


def _enqueue_all(
    session: Session,
    broker: redis.Redis,  # type: ignore[type-arg]
    batch: Batch,
    jobs: list[Job],
) -> None:
    for job in jobs:
        try:
            enqueue(
                session=session,
                broker=broker,
                job=job,
                queue=INFER_QUEUE,  # any worker: a batch must not pile onto one warm worker
                live=False,  # read from the database; tokens go out with the terminal event
                priority=BATCH_PRIORITY,
            )
        except ServiceUnavailable as exc:
            stmt = (
                update(Job)
                .where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.QUEUED)
                .values(
                    status=JobStatus.FAILED,
                    error_code="SERVICE_UNAVAILABLE",
                    error_message="the task queue was unavailable",
                    finished_at=utcnow(),
                )
            )
            update_rows(session, stmt)
            session.commit()
            batches.close_if_done(session, batch.id)
            raise ServiceUnavailable(
                "the task queue became unavailable; the batch's unsent requests failed",
                details={"batch_id": batch.id},
            ) from exc


def readable_batch(session: Session, reader: Reader, batch_id: str) -> Batch:
    """The batch, for the key that created it or its owner account; any other is missing."""
    batch = session.get(Batch, batch_id)
    if batch is None or not reader.may_read(batch.api_key_id, batch.account_id):
        raise BatchNotFound(f"no batch {batch_id!r} for this caller")
    return batch


def batch_public(session: Session, celery: Celery, batch: Batch) -> BatchPublic:
    p = batches.progress(session, batch)
    if batch.finished_at is None and p.live == 0:
        # Normally the worker that ended the last job has closed it already; this also closes
        # a batch whose last worker died between its job's commit and the close.
        close_and_notify(session, celery, batch.id)
        session.refresh(batch)
    return BatchPublic(
        id=batch.id,
        model_id=batch.model_id,
        status=batches.status_of(batch, p),
        total=batch.total,
        pending=p.live,
        completed=p.succeeded,
        failed=p.failed,
        cancelled=p.cancelled,
        created_at=batch.created_at,
        cancelled_at=batch.cancelled_at,
        finished_at=batch.finished_at,
    )


def result_lines(session: Session, batch: Batch) -> Iterator[bytes]:
    """One JSON line per request, in request order."""
    jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.batch_id) == batch.id))}
    for custom_id, job_id in batch.items:
        job = jobs[job_id]
        result = None
        if job.status is JobStatus.SUCCEEDED and job.result is not None:
            r = job.result
            result = BatchResult(
                completion=r.get("completion", ""), finish_reason=r.get("finish_reason", "stop")
            )
        error = None
        if job.error_code:
            error = JobError(code=job.error_code, message=job.error_message or "")
        line = BatchResultLine(
            custom_id=custom_id,
            job_id=job.id,
            status=job.status.value,
            routed_to=job.model_id if job.router_id else None,
            result=result,
            error=error,
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=job.prompt_tokens + job.completion_tokens,
            ),
        )
        yield json.dumps(line.model_dump(mode="json"), separators=(",", ":")).encode() + b"\n"


def cancel_batch(*, session: Session, settings: Settings, celery: Celery, batch: Batch) -> Batch:
    """Queued jobs end `cancelled` here; running ones are asked to stop by their workers."""
    now = utcnow()
    batch.cancelled_at = batch.cancelled_at or now
    session.add(batch)
    session.commit()
    queued = _job_ids(session, batch.id, JobStatus.QUEUED)
    stmt = (
        update(Job)
        .where(col(Job.id).in_(queued), col(Job.status) == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            finished_at=now,
            error_code=events.CANCELLED_BEFORE_START["code"],
            error_message=events.CANCELLED_BEFORE_START["message"],
        )
    )
    update_rows(session, stmt)
    session.commit()
    # A job a worker claimed meanwhile is running now: it is flagged to stop instead.
    running = _job_ids(session, batch.id, JobStatus.RUNNING)
    ended = set(_job_ids(session, batch.id, JobStatus.CANCELLED)) & set(queued)
    events.cancel_many(get_redis(settings), sorted(ended), running)
    close_and_notify(session, celery, batch.id)
    session.refresh(batch)
    return batch


def _job_ids(session: Session, batch_id: str, status: JobStatus) -> list[str]:
    stmt = select(Job.id).where(col(Job.batch_id) == batch_id, col(Job.status) == status)
    return list(session.exec(stmt))


def close_and_notify(session: Session, celery: Celery, batch_id: str) -> None:
    """Close the batch if no job of it is live, and queue its webhook if this call closed it."""
    closed = batches.close_if_done(session, batch_id)
    if closed is None or not closed.webhook_url:
        return
    try:
        celery.send_task(BATCH_WEBHOOK_TASK, args=[batch_id], queue=WEBHOOK_QUEUE)
    except Exception:  # the batch is closed all the same; only its notification is lost
        log.warning("could not queue the webhook of batch %s", batch_id)

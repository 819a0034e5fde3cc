"""Reading and cancelling jobs: visible to the key that created them and to the owner account."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update
from sqlmodel import Session, select

from api.inference.auth import authenticate_key, key_token
from api.inference.limits import limit_reads
from api.inference.protocol import InferResponse, JobError, JobPublic, JobTimings
from core import events, keys, limits, sessions
from core.db import get_engine, update_rows
from core.errors import AuthenticationFailed, JobNotFound
from core.redis import get_redis
from core.settings import Settings
from core.tables import Account, Job, JobStatus, utcnow


def _account_id(session: Session, settings: Settings, token: str) -> str:
    """The account an `iat_…` account token acts for."""
    parsed = keys.parse(token, keys.ACCOUNT_TOKEN_PREFIX)
    if parsed is None:
        raise AuthenticationFailed("malformed token")
    account = session.exec(select(Account).where(Account.token_id == parsed.key_id)).first()
    if account is None or not keys.verify(
        parsed, account.token_hash, settings.key_pepper.get_secret_value()
    ):
        raise AuthenticationFailed("invalid account token")
    return account.id


@dataclass(frozen=True)
class Reader:
    """Who reads a job or batch: the API key that created it, or its owner account."""

    key_id: str | None
    account_id: str | None

    def may_read(self, api_key_id: str | None, account_id: str) -> bool:
        if self.key_id is not None:
            return api_key_id == self.key_id
        return account_id == self.account_id


def reader_of(session: Session, settings: Settings, authorization: str | None) -> Reader:
    """Authenticate an `ik_…` key or an `iat_…` account token, within its read limit."""
    token = key_token(authorization, None)
    if token.startswith(f"{keys.API_KEY_PREFIX}_"):
        reader = Reader(authenticate_key(session, settings, token).id, None)
    else:
        reader = Reader(None, _account_id(session, settings, token))
    limit_reads(get_redis(settings), settings, reader.key_id or reader.account_id or "")
    return reader


def readable_job(
    session: Session, settings: Settings, job_id: str, authorization: str | None
) -> Job:
    """The job, for the key that created it or its owner account; any other job is missing.

    The caller is authenticated before the job is looked up, so neither the answer nor the
    work done tells a stranger whether the job exists.
    """
    reader = reader_of(session, settings, authorization)
    job = session.get(Job, job_id)
    if job is None or not reader.may_read(job.api_key_id, job.account_id):
        raise JobNotFound(f"no job {job_id!r} for this caller")
    return job


def readable_job_standalone(settings: Settings, job_id: str, authorization: str | None) -> Job:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        return readable_job(session, settings, job_id, authorization)


def cancel(session: Session, settings: Settings, job: Job) -> Job:
    """Queued jobs end `cancelled` here; running ones are stopped by their worker."""
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)  # type: ignore[arg-type]
        .values(
            status=JobStatus.CANCELLED,
            finished_at=now,
            error_code="JOB_CANCELLED",
            error_message="cancelled before it started",
        )
    )
    cancelled_now = update_rows(session, stmt) == 1
    session.commit()
    client = get_redis(settings)
    events.request_cancel(client, job.id)
    if cancelled_now:
        if job.api_key_id:  # no worker will end it: free its concurrency slot here
            limits.release(client, job.api_key_id, job.id)
        if chain := job.params.get("session"):  # and its session's lock
            sessions.release(client, str(chain["id"]), job.id)
        error = {"code": "JOB_CANCELLED", "message": "cancelled before it started"}
        events.publish(client, job.id, {"type": "done", "status": "cancelled", "error": error})
    session.refresh(job)
    return job


def job_public(job: Job) -> JobPublic:
    result = None
    if job.status is JobStatus.SUCCEEDED and job.result:
        r = job.result
        result = InferResponse(
            id=job.id,
            model_id=job.model_id,
            completion=r.get("completion", ""),
            finish_reason=r.get("finish_reason", "stop"),
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            tokens_used=job.prompt_tokens + job.completion_tokens,
            latency_ms=float(r.get("latency_ms", 0.0)),
            routed_to=job.model_id if job.router_id else None,
        )
    error = (
        JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    )
    return JobPublic(
        id=job.id,
        model_id=job.model_id,
        router_id=job.router_id,
        routed_to=job.model_id if job.router_id else None,
        batch_id=job.batch_id,
        status=job.status.value,
        result=result,
        error=error,
        timings=JobTimings(
            **{k: job.timings.get(k) for k in ("queue_ms", "cold_start_ms", "run_ms")}
        ),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )

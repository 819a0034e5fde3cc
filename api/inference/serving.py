"""Inference jobs from the API's side: create, enqueue, follow the event stream, answer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from sqlmodel import Session

from api.inference.auth_cache import Grant
from api.inference.protocol import InferRequest, InferResponse, JobCreate
from core import events
from core.errors import JobTimeout, ServiceUnavailable, job_error
from core.ids import new_id
from core.queue import INFER_QUEUE, INFER_TASK
from core.settings import Settings
from core.tables import Job, JobStatus, utcnow

log = logging.getLogger("inferatech.inference")

GENERATION_FIELDS = {"prompt", "raw", "temperature", "max_tokens", "top_p", "top_k", "stop", "seed"}
WAIT_GRACE_S = 60


def create_job(
    *,
    session: Session,
    settings: Settings,
    celery: Celery,
    grant: Grant,
    req: InferRequest,
    queue: str = INFER_QUEUE,
    live: bool = True,
    job_id: str | None = None,
) -> Job:
    """Persist the job, then enqueue it by name; a broker outage fails it with 503.

    `live` False (a non-streaming `/v1/infer`: only this request ever reads the job) lets the
    worker publish the tokens with the terminal event instead of one by one.
    """
    if len(req.prompt) > settings.max_prompt_chars:
        raise job_error("INVALID_REQUEST", f"prompt is over {settings.max_prompt_chars} characters")
    if req.max_tokens > settings.max_completion_tokens:
        raise job_error(
            "INVALID_REQUEST", f"max_tokens is capped at {settings.max_completion_tokens}"
        )
    timeout, ttl = timeout_and_ttl(settings, req)
    webhook = req.webhook_url if isinstance(req, JobCreate) else None
    job = Job(
        id=job_id or new_id("job"),
        account_id=grant.account_id,
        model_id=grant.model_id,
        api_key_id=grant.key_id,
        params=req.model_dump(include=GENERATION_FIELDS),
        webhook_url=webhook,
        execution_timeout_s=timeout,
        expires_at=utcnow() + timedelta(seconds=ttl),
    )
    session.add(job)
    session.commit()
    try:
        celery.send_task(
            INFER_TASK,
            args=[job.id],
            kwargs={"timeout_s": job.execution_timeout_s, "live": live},
            queue=queue,
            task_id=job.id,
        )
    except Exception as exc:
        job.status, job.error_code = JobStatus.FAILED, "SERVICE_UNAVAILABLE"
        job.error_message, job.finished_at = "the task queue was unavailable", utcnow()
        session.add(job)
        session.commit()
        raise ServiceUnavailable("the task queue is unavailable; retry") from exc
    return job


def timeout_and_ttl(settings: Settings, req: InferRequest) -> tuple[int, int]:
    """The job's execution timeout and TTL (queue + run): settings, or the job's own asks."""
    if isinstance(req, JobCreate):
        timeout = min(req.execution_timeout_s or settings.execution_timeout_s,
                      settings.max_execution_timeout_s)  # fmt: skip
        return timeout, req.ttl_s or settings.job_ttl_s
    return settings.execution_timeout_s, settings.job_ttl_s


def slot_lease_s(settings: Settings, req: InferRequest) -> int:
    """How long a concurrency slot may outlive a dead holder: as long as the job may live.

    `/v1/infer` waits `timeout + WAIT_GRACE_S` at most; an async job may sit queued for its TTL.
    """
    timeout, ttl = timeout_and_ttl(settings, req)
    return timeout + WAIT_GRACE_S + (ttl if isinstance(req, JobCreate) else 0)


@dataclass
class Outcome:
    """What the event stream told us about one job."""

    text: list[str] = field(default_factory=list)
    queue_ms: float | None = None
    cold_start: bool = False
    done: dict[str, Any] | None = None


async def follow_until(
    aredis: aioredis.Redis,  # type: ignore[type-arg]
    job_id: str,
    outcome: Outcome,
    *,
    deadline: float,
    until: str = "done",
) -> AsyncIterator[dict[str, Any]]:
    """Events of the job, recorded in `outcome`, until the `until` event type (or done)."""
    async for _, event in events.afollow(aredis, job_id):
        if event is None:
            if time.monotonic() > deadline:
                raise JobTimeout("the job did not finish in time")
            continue
        kind = event.get("type")
        if kind == "status":
            outcome.queue_ms = event.get("queue_ms")
            outcome.cold_start = bool(event.get("cold_start"))
        elif kind == "token":
            outcome.text.append(event["text"])
        elif kind == "done":
            outcome.done = event
        yield event
        if kind in (until, "done"):
            return


def deadline_for(job: Job) -> float:
    return time.monotonic() + job.execution_timeout_s + WAIT_GRACE_S


def response_of(job: Job, outcome: Outcome, started: float) -> InferResponse:
    """The JSON answer of a finished job, or the error its terminal event carries."""
    done = outcome.done or {}
    if done.get("status") != JobStatus.SUCCEEDED.value:
        error = done.get("error") or {"code": "INFERENCE_FAILED", "message": "job failed"}
        raise job_error(error["code"], error["message"])
    result = done["result"]
    return InferResponse(
        id=job.id,
        model_id=job.model_id,
        completion="".join(outcome.text),
        finish_reason=result["finish_reason"],
        prompt_tokens=result["prompt_tokens"],
        completion_tokens=result["completion_tokens"],
        tokens_used=result["prompt_tokens"] + result["completion_tokens"],
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
    )


def headers_of(outcome: Outcome) -> dict[str, str]:
    headers = {"X-Cold-Start": "true" if outcome.cold_start else "false"}
    if outcome.queue_ms is not None:
        headers["X-Queue-Ms"] = f"{outcome.queue_ms:.3f}"
    return headers


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_event(event: dict[str, Any], started: float) -> bytes | None:
    """One stream event in the public SSE shape (None for internal events)."""
    kind = event.get("type")
    if kind == "token":
        return sse({"token": event["text"], "index": event["index"]})
    if kind != "done":
        return None
    if event.get("status") != JobStatus.SUCCEEDED.value:
        error = event.get("error") or {"code": "INFERENCE_FAILED", "message": "job failed"}
        return sse({"done": True, "status": event.get("status"), "error": error})
    result = event["result"]
    return sse(
        {
            "done": True,
            "finish_reason": result["finish_reason"],
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )

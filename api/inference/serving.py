"""Inference jobs from the API's side: create, enqueue, follow the event stream, answer."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlmodel import Session
from starlette.requests import HTTPConnection

from api.inference import limits, sessions
from api.inference.auth import cached_grant
from api.inference.auth_cache import AuthCache, Grant
from api.inference.protocol import InferRequest, InferResponse, JobCreate
from api.inference.routing import WorkerDirectory
from api.prompt_routing.resolve import Target
from api.prompt_routing.service import is_router_id
from core import events
from core import limits as core_limits
from core.db import get_engine
from core.errors import InferatechError, JobTimeout, ServiceUnavailable, job_error
from core.ids import new_id
from core.queue import (
    CARRIED_JOBS,
    INFER_QUEUE,
    INFER_TASK,
    INTERACTIVE_PRIORITY,
    carried_job,
    publish_task,
    pushed,
    task_message,
)
from core.redis import get_redis
from core.settings import Settings
from core.tables import Job, JobStatus, construct, utcnow

log = logging.getLogger("inferatech.inference")

GENERATION_FIELDS = {"prompt", "raw", "temperature", "max_tokens", "top_p", "top_k", "stop", "seed"}
WAIT_GRACE_S = 60


@dataclass(frozen=True)
class JobSpec:
    """What a job runs (the worker's params: a generation or an embedding) and its limits."""

    params: dict[str, Any]
    input_chars: int  # prompt, messages or embedding inputs, all counted
    input_name: str = "prompt"  # how the error about too many characters names the input
    max_tokens: int = 0
    execution_timeout_s: int | None = None
    ttl_s: int | None = None
    webhook_url: str | None = None
    detached: bool = False  # an async job (`/v1/jobs`): nobody waits for it
    # Its id is first shown once it runs (`/v1/infer`, OpenAI routes): the worker writes the
    # row when it claims the job, from the task message (`core.queue.carried_job`).
    row_by_worker: bool = False
    session_id: str | None = None  # a chain-mode session the job continues

    @classmethod
    def of(cls, req: InferRequest) -> JobSpec:
        """A `/v1/infer` or `/v1/jobs` body."""
        spec = cls(
            params=req.model_dump(include=GENERATION_FIELDS),
            input_chars=len(req.prompt),
            max_tokens=req.max_tokens,
            session_id=req.session_id,
            row_by_worker=not isinstance(req, JobCreate),  # `/v1/jobs` answers its id at once
        )
        if isinstance(req, JobCreate):
            spec = dataclasses.replace(
                spec,
                execution_timeout_s=req.execution_timeout_s,
                ttl_s=req.ttl_s,
                webhook_url=req.webhook_url,
                detached=True,
            )
        return spec


def start_job(
    *,
    conn: HTTPConnection,
    settings: Settings,
    authorize: Callable[[Session, AuthCache], Grant | Target],
    spec: JobSpec,
    live: bool,
) -> Job:
    """The one way every inference route starts a job: authorize, admit, pick the queue, enqueue.

    `conn` is the request (or WebSocket): its app's state has the worker directory and the
    auth cache, and its own state receives the key's `X-RateLimit-*` headers. `authorize`
    returns the caller's grant (or the target a prompt router chose); the key's limits are
    enforced right after it, holding a concurrency slot that the worker frees when the job
    ends.
    """
    state = conn.app.state
    directory: WorkerDirectory = state.workers
    with Session(get_engine(settings), expire_on_commit=False) as session:
        allowed = authorize(session, state.auth_cache)
        target = allowed if isinstance(allowed, Target) else Target(allowed)
        grant = target.grant
        conn.state.model_id = grant.model_id  # a metrics label only once it authenticated
        job_id = new_id("job")
        client = get_redis(settings)
        if spec.row_by_worker and not directory.all_support(CARRIED_JOBS):
            spec = dataclasses.replace(spec, row_by_worker=False)  # an older worker is up
        if spec.session_id is not None:  # holds the session's lock until the job ends
            spec = sessions.continued(client, spec, grant, job_id, timeout_and_ttl(settings, spec))
        try:
            limits.enforce(
                conn, client=client, session=session, settings=settings, grant=grant,
                job_id=job_id, lease_s=slot_lease_s(settings, spec),
            )  # fmt: skip
        except BaseException:
            sessions.release(client, spec, job_id)
            raise
        try:
            return create_job(
                session=session,
                settings=settings,
                broker=client,
                grant=grant,
                spec=spec,
                queue=directory.queue_for(grant.model_sha256 or grant.model_id),
                live=live,
                job_id=job_id,
                router_id=target.router_id,
            )
        except BaseException:
            core_limits.release(client, grant.key_id, job_id)  # no job, so no worker to free it
            sessions.release(client, spec, job_id)
            raise


def new_job(
    *,
    settings: Settings,
    grant: Grant,
    spec: JobSpec,
    job_id: str | None = None,
    router_id: str | None = None,
    batch_id: str | None = None,
) -> Job:
    """A checked, unsaved job row for `spec`, served by the grant's model."""
    if spec.input_chars > settings.max_prompt_chars:
        raise job_error(
            "INVALID_REQUEST", f"{spec.input_name} is over {settings.max_prompt_chars} characters"
        )
    if spec.max_tokens > settings.max_completion_tokens:
        raise job_error(
            "INVALID_REQUEST", f"max_tokens is capped at {settings.max_completion_tokens}"
        )
    timeout, ttl = timeout_and_ttl(settings, spec)
    return construct(
        Job,
        id=job_id or new_id("job"),
        account_id=grant.account_id,
        model_id=grant.model_id,
        api_key_id=grant.key_id,
        router_id=router_id,
        batch_id=batch_id,
        params=spec.params,
        webhook_url=spec.webhook_url,
        execution_timeout_s=timeout,
        expires_at=utcnow() + timedelta(seconds=ttl),
    )


def enqueue(
    *,
    session: Session | None,
    broker: redis.Redis,  # type: ignore[type-arg]
    job: Job,
    queue: str = INFER_QUEUE,
    live: bool = True,
    priority: int = INTERACTIVE_PRIORITY,
) -> None:
    """Send a job's task to `queue` (by name, one LPUSH); a broker outage fails it with 503.

    Without a session the job is unsaved: the message carries it and the worker writes its
    row (a failed send then leaves no row behind).
    """
    try:
        publish_task(broker, infer_message(job, queue, live, priority, carried=session is None))
    except Exception as exc:
        if session is None:
            raise ServiceUnavailable("the task queue is unavailable; retry") from exc
        job.status, job.error_code = JobStatus.FAILED, "SERVICE_UNAVAILABLE"
        job.error_message, job.finished_at = "the task queue was unavailable", utcnow()
        session.add(job)
        session.commit()
        raise ServiceUnavailable("the task queue is unavailable; retry") from exc


def infer_message(
    job: Job, queue: str, live: bool, priority: int = INTERACTIVE_PRIORITY, *, carried: bool
) -> dict[str, Any]:
    """The job's task message; `carried`: it holds the job, whose row its worker writes."""
    kwargs: dict[str, Any] = {"timeout_s": job.execution_timeout_s, "live": live}
    # What the worker logs of the task's arguments (its "received" line): never the prompt.
    shown = repr({**kwargs, "job": "<carried>"} if carried else kwargs)
    if carried:
        kwargs["job"] = carried_job(job)
    return task_message(INFER_TASK, job.id, [job.id], kwargs, queue=queue, priority=priority,
                        kwargsrepr=shown)  # fmt: skip


async def start_inline(
    *,
    conn: HTTPConnection,
    settings: Settings,
    spec: JobSpec,
    token: str,
    model_id: str,
    live: bool,
) -> Job | None:
    """`start_job` on the event loop, without its two thread hops, for the common case.

    That is: a model (not a router) whose grant this process has cached, no session, a job
    its worker writes, and workers' heartbeats read within the second. Anything else, or a
    month's budget counter to read from the database, returns None having admitted and
    queued nothing: the caller takes `start_job`. Errors are `start_job`'s; Redis down is a
    503 (`api.errors.is_outage`).
    """
    state = conn.app.state
    directory: WorkerDirectory = state.workers
    workers = directory.held()
    if (
        workers is None
        or spec.session_id is not None
        or not spec.row_by_worker
        or is_router_id(model_id)
        or not directory.all_support(CARRIED_JOBS, workers)
    ):
        return None
    grant = cached_grant(settings, state.auth_cache, token, model_id)
    if grant is None:
        return None
    conn.state.model_id = grant.model_id
    aredis, lease_s = state.aredis, slot_lease_s(settings, spec)
    try:
        job = new_job(settings=settings, grant=grant, spec=spec)
    except InferatechError:
        # As on `start_job`'s path, a request refused for its parameters is admitted first
        # (it spends a request and carries the limit headers), then its slot is freed.
        job_id = new_id("job")
        if not await limits.aenforce(conn, aredis=aredis, settings=settings, grant=grant,
                                     job_id=job_id, lease_s=lease_s):  # fmt: skip
            return None
        await limits.release(aredis, grant.key_id, job_id)
        raise
    queue = directory.queue_for(grant.model_sha256 or grant.model_id, workers)
    task = pushed(infer_message(job, queue, live, carried=True))
    # One round trip: the admission script queues the task once it admitted the request.
    admitted = await limits.aenforce(conn, aredis=aredis, settings=settings, grant=grant,
                                     job_id=job.id, lease_s=lease_s, push=task)  # fmt: skip
    return job if admitted else None


def create_job(
    *,
    session: Session,
    settings: Settings,
    broker: redis.Redis,  # type: ignore[type-arg]
    grant: Grant,
    spec: JobSpec,
    queue: str = INFER_QUEUE,
    live: bool = True,
    job_id: str | None = None,
    router_id: str | None = None,
) -> Job:
    """Persist the job (or let its worker do it), then enqueue it by name; a broker outage
    fails it with 503.

    `live` False (a non-streaming `/v1/infer`: only this request ever reads the job) lets the
    worker publish the tokens with the terminal event instead of one by one.
    """
    job = new_job(settings=settings, grant=grant, spec=spec, job_id=job_id, router_id=router_id)
    if spec.row_by_worker:
        enqueue(session=None, broker=broker, job=job, queue=queue, live=live)
        return job
    session.add(job)
    session.commit()
    enqueue(session=session, broker=broker, job=job, queue=queue, live=live)
    return job


def timeout_and_ttl(settings: Settings, spec: JobSpec) -> tuple[int, int]:
    """The job's execution timeout and TTL (queue + run): settings, or the job's own asks."""
    timeout = min(spec.execution_timeout_s or settings.execution_timeout_s,
                  settings.max_execution_timeout_s)  # fmt: skip
    return timeout, spec.ttl_s or settings.job_ttl_s


def slot_lease_s(settings: Settings, spec: JobSpec) -> int:
    """How long a concurrency slot may outlive a dead holder: as long as the job may live.

    A waited-for job lasts `timeout + WAIT_GRACE_S` at most; an async job may sit queued for
    its TTL.
    """
    timeout, ttl = timeout_and_ttl(settings, spec)
    return timeout + WAIT_GRACE_S + (ttl if spec.detached else 0)


@dataclass
class Outcome:
    """What the event stream told us about one job."""

    text: list[str] = field(default_factory=list)
    queue_ms: float | None = None
    cold_start: bool = False
    done: dict[str, Any] | None = None
    cursor: str = "0"  # the last stream entry read: a second follow resumes after it


async def follow_until(
    aredis: aioredis.Redis,  # type: ignore[type-arg]
    job_id: str,
    outcome: Outcome,
    *,
    deadline: float,
    until: str = "done",
) -> AsyncIterator[dict[str, Any]]:
    """Events of the job, recorded in `outcome`, until the `until` event type (or done).

    Every entry of the read that holds it is consumed: a worker that publishes its status
    with the first token answers a streaming client's headers and first token at once.
    """
    async for entries in events.afollow(aredis, job_id, after=outcome.cursor):
        if not entries and time.monotonic() > deadline:
            raise JobTimeout("the job did not finish in time")
        reached = False
        for entry_id, entry in entries:
            outcome.cursor = entry_id
            for event in events.expand(entry):
                kind = event.get("type")
                if kind == "status":
                    outcome.queue_ms = event.get("queue_ms")
                    outcome.cold_start = bool(event.get("cold_start"))
                elif kind == "token":
                    outcome.text.append(event["text"])
                elif kind == "done":
                    outcome.done = event
                reached = reached or kind in (until, "done")
                yield event
        if reached:
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
        routed_to=job.model_id if job.router_id else None,
    )


def routed_header(job: Job) -> dict[str, str]:
    """`X-Routed-To`: the model a router chose (absent on direct calls)."""
    return {"X-Routed-To": job.model_id} if job.router_id else {}


def headers_of(job: Job, outcome: Outcome) -> dict[str, str]:
    headers = {"X-Cold-Start": "true" if outcome.cold_start else "false", **routed_header(job)}
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


async def relay(
    aredis: aioredis.Redis,  # type: ignore[type-arg]
    job: Job,
    outcome: Outcome,
    head: list[dict[str, Any]],
) -> AsyncGenerator[dict[str, Any]]:
    """A streamed job's events: `head` (already read), then the rest until done.

    Closed early (the client went away), it asks the worker to stop; the worker still
    records the usage of what was generated.
    """
    finished = outcome.done is not None
    try:
        for event in head:
            yield event
        if finished:
            return
        async for event in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):
            yield event
        finished = True
    finally:
        if not finished:
            await events.arequest_cancel(aredis, job.id)

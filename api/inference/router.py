"""Thin routes: `/v1/infer` (JSON or SSE) and the async `/v1/jobs` API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import Session

from api.batches.service import close_and_notify
from api.deps import SessionDep, SettingsDep
from api.inference import jobs as job_svc
from api.inference import limits
from api.inference.auth import key_token
from api.inference.auth_cache import AuthCache
from api.inference.protocol import InferRequest, JobCreate, JobCreated, JobPublic
from api.inference.serving import (
    JobSpec,
    Outcome,
    deadline_for,
    follow_until,
    headers_of,
    response_of,
    routed_header,
    sse_event,
    start_inline,
    start_job,
)
from api.prompt_routing.resolve import Target, resolve_target
from core import events
from core.settings import Settings
from core.tables import Job

router = APIRouter(tags=["inference"])
Authorization = Annotated[str | None, Header()]


def _start(request: Request, settings: Settings, body: InferRequest, auth: str | None) -> Job:
    """Authenticate, admit under the key's limits, persist and enqueue the job."""

    def authorize(session: Session, cache: AuthCache) -> Target:
        token = key_token(auth, body.api_key)
        return resolve_target(session, settings, cache, token, body.model_id, body.prompt)

    return start_job(
        conn=request,
        settings=settings,
        authorize=authorize,
        spec=JobSpec.of(body),
        live=isinstance(body, JobCreate) or body.stream,
    )


@router.post("/v1/infer", response_model=None)
async def infer(
    body: InferRequest,
    request: Request,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JSONResponse | StreamingResponse:
    """Run one generation through the queue; JSON, or SSE with `"stream": true`."""
    started = time.perf_counter()
    job = await start_inline(
        conn=request,
        settings=settings,
        spec=JobSpec.of(body),
        token=key_token(authorization, body.api_key),
        model_id=body.model_id,
        live=body.stream,
    )
    if job is None:
        job = await run_in_threadpool(_start, request, settings, body, authorization)
    aredis = request.app.state.aredis
    outcome = Outcome()
    if not body.stream:
        try:
            async for _ in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):
                pass
        finally:
            if outcome.done is None:  # else the worker freed the slot before it answered
                await limits.release(aredis, job.api_key_id, job.id)
        reply = response_of(job, outcome, started)
        headers = {**headers_of(job, outcome), **limits.response_headers(request)}
        return JSONResponse(reply.model_dump(), headers=headers)
    try:
        head = [
            e
            async for e in follow_until(
                aredis, job.id, outcome, deadline=deadline_for(job), until="status"
            )
        ]
    except BaseException:
        await limits.release(aredis, job.api_key_id, job.id)
        raise
    return StreamingResponse(
        _sse(aredis, job, outcome, head, started),
        media_type="text/event-stream",
        headers={
            **headers_of(job, outcome),
            **limits.response_headers(request),
            "Cache-Control": "no-cache",
            "X-Job-Id": job.id,
        },
    )


async def _sse(
    aredis: object, job: Job, outcome: Outcome, head: list[dict[str, object]], started: float
) -> AsyncIterator[bytes]:
    finished = outcome.done is not None
    try:
        for event in head:
            if (chunk := sse_event(event, started)) is not None:
                yield chunk
        if finished:
            return
        async for event in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):  # type: ignore[arg-type]
            if (chunk := sse_event(event, started)) is not None:
                yield chunk
        finished = True
    finally:
        # A hang-up cancels this task (anyio: every later await too): shield the clean-up,
        # or the runner would never hear of it and the slot would wait for the job to end.
        with anyio.CancelScope(shield=True):
            if not finished:  # the client went away: stop generating; usage is still recorded
                await events.arequest_cancel(aredis, job.id)  # type: ignore[arg-type]
            if outcome.done is None:  # else the worker freed the slot before it answered
                await limits.release(aredis, job.api_key_id, job.id)  # type: ignore[arg-type]


@router.post("/v1/jobs", status_code=202, response_model=JobCreated)
async def submit(
    body: JobCreate, request: Request, settings: SettingsDep, authorization: Authorization = None
) -> JSONResponse:
    """Queue a job; poll `GET /v1/jobs/{id}` or follow `/stream`. Its slot ends with the job."""
    job = await run_in_threadpool(_start, request, settings, body, authorization)
    routed_to = job.model_id if job.router_id else None
    created = JobCreated(id=job.id, status="queued", routed_to=routed_to)
    headers = {**limits.response_headers(request), **routed_header(job)}
    return JSONResponse(created.model_dump(), status_code=202, headers=headers)


@router.get("/v1/jobs/{job_id}")
def read_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JobPublic:
    """Status, result or error, and timings; for the job's key or its owner account."""
    job = job_svc.readable_job(session, settings, job_id, authorization)
    return job_svc.job_public(job)


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JobPublic:
    """Cancel a queued job at once, or ask the worker to stop a running one."""
    job = job_svc.readable_job(session, settings, job_id, authorization)
    job = job_svc.cancel(session, settings, job)
    if job.batch_id is not None:  # it may have been its batch's last live job
        close_and_notify(session, request.app.state.celery, job.batch_id)
    return job_svc.job_public(job)


@router.get("/v1/jobs/{job_id}/stream")
async def stream_job(
    job_id: str, request: Request, settings: SettingsDep, authorization: Authorization = None
) -> StreamingResponse:
    """SSE replay from the first token; a client may connect late."""
    job = await run_in_threadpool(job_svc.readable_job_standalone, settings, job_id, authorization)
    aredis = request.app.state.aredis
    started = time.perf_counter()
    outcome = Outcome()

    async def body() -> AsyncIterator[bytes]:
        async for event in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):
            if (chunk := sse_event(event, started)) is not None:
                yield chunk

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )

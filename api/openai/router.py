"""Thin routes of the OpenAI-compatible API under `/openai/v1` (`base_url=".../openai/v1"`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep
from api.inference import limits
from api.inference.auth import key_token
from api.inference.serving import (
    JobSpec,
    Outcome,
    deadline_for,
    follow_until,
    headers_of,
    relay,
    sse,
    start_inline,
    start_job,
)
from api.openai import serving as svc
from api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from core.settings import Settings
from core.tables import Job

router = APIRouter(prefix="/openai/v1", tags=["openai"])
Authorization = Annotated[str | None, Header()]
DONE = b"data: [DONE]\n\n"


def _start(
    request: Request, settings: Settings, auth: str | None, model: str, spec: JobSpec, live: bool
) -> Job:
    """Every route here starts its job through `start_job`, the API's one seam for that.

    Ids are first shown with the first token or the answer: the worker writes the job's row.
    """
    spec = dataclasses.replace(spec, row_by_worker=True)
    authorize = svc.authorizer(settings, key_token(auth, None), model, svc.routing_text(spec))
    return start_job(conn=request, settings=settings, authorize=authorize, spec=spec, live=live)


async def _begin(
    request: Request, settings: Settings, auth: str | None, model: str, spec: JobSpec, live: bool
) -> Job:
    """On the event loop when the key's grant is cached (`start_inline`), else `_start`."""
    token = key_token(auth, None)
    model_id = svc.cached_model_id(request.app.state.auth_cache, token, model)
    if model_id is not None:
        inline = dataclasses.replace(spec, row_by_worker=True)
        job = await start_inline(conn=request, settings=settings, spec=inline, token=token,
                                 model_id=model_id, live=live)  # fmt: skip
        if job is not None:
            return job
    return await run_in_threadpool(_start, request, settings, auth, model, spec, live)


async def _run(
    request: Request,
    settings: Settings,
    auth: str | None,
    body: ChatCompletionRequest | CompletionRequest,
    spec: JobSpec,
    answer: Callable[[str, str, Outcome], BaseModel],
) -> JSONResponse | StreamingResponse:
    job = await _begin(request, settings, auth, body.model, spec, body.stream)
    aredis = request.app.state.aredis
    outcome = Outcome()
    if not body.stream:
        async for _ in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):
            pass
        reply = answer(job.id, body.model, outcome)
        return JSONResponse(
            reply.model_dump(),
            headers={
                **headers_of(job, outcome),
                **limits.response_headers(request),
                "X-Job-Id": job.id,
            },
        )
    # Read up to the first token: a job that fails before it (no chat template, context too
    # long) is still answered with an HTTP error, not a stream that carries one.
    head = [
        e
        async for e in follow_until(
            aredis, job.id, outcome, deadline=deadline_for(job), until="token"
        )
    ]
    if outcome.done is not None:
        svc.result_of(outcome)  # raises the job's error
    writer = svc.ChunkWriter(
        job.id,
        body.model,
        chat=isinstance(body, ChatCompletionRequest),
        include_usage=body.include_usage,
    )
    return StreamingResponse(
        _chunks(aredis, job, outcome, head, writer),
        media_type="text/event-stream",
        headers={
            **headers_of(job, outcome),
            **limits.response_headers(request),
            "Cache-Control": "no-cache",
            "X-Job-Id": job.id,
        },
    )


async def _chunks(
    aredis: Any, job: Job, outcome: Outcome, head: list[dict[str, Any]], writer: svc.ChunkWriter
) -> AsyncIterator[bytes]:
    async with aclosing(relay(aredis, job, outcome, head)) as job_events:
        async for event in job_events:
            for chunk in writer.chunks(event):
                yield sse(chunk)
    yield DONE


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JSONResponse | StreamingResponse:
    """A chat turn rendered with the model's own chat template; JSON or SSE chunks."""
    spec = svc.chat_spec(body, settings)
    return await _run(request, settings, authorization, body, spec, svc.chat_completion)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JSONResponse | StreamingResponse:
    """Legacy completion: the prompt goes to the model verbatim."""
    spec = svc.completion_spec(body, settings)
    return await _run(request, settings, authorization, body, spec, svc.completion)


@router.post("/embeddings", response_model=None)
async def embeddings(
    body: EmbeddingRequest,
    request: Request,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> JSONResponse:
    """One vector per input (GGUF: llama.cpp, transformers: mean pooling); usage = tokens."""
    spec = svc.embedding_spec(body, settings)
    job = await _begin(request, settings, authorization, body.model, spec, False)
    outcome = Outcome()
    aredis = request.app.state.aredis
    async for _ in follow_until(aredis, job.id, outcome, deadline=deadline_for(job)):
        pass
    reply = svc.embedding_list(body.model, outcome, body.encoding_format)
    return JSONResponse(
        reply.model_dump(),
        headers={
            **headers_of(job, outcome),
            **limits.response_headers(request),
            "X-Job-Id": job.id,
        },
    )


@router.get("/models")
def list_models(
    session: SessionDep, settings: SettingsDep, authorization: Authorization = None
) -> ModelList:
    """The models this API key may call."""
    return ModelList(data=svc.key_models(session, settings, key_token(authorization, None)))


@router.get("/models/{model}")
def read_model(
    model: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None
) -> ModelCard:
    """One model this API key may call, by id or name."""
    return svc.key_model(session, settings, key_token(authorization, None), model)

"""Thin routes: `/v1/batches` (API key to submit; the key or its owner account to read)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from sqlmodel import Session

from api.batches import service as svc
from api.batches.protocol import BatchCreate, BatchCreated, BatchPublic
from api.deps import CeleryDep, SessionDep, SettingsDep, settings_of
from api.inference.auth import key_token
from api.inference.jobs import reader_of
from core.db import get_engine
from core.errors import PayloadTooLarge
from core.settings import Settings

Authorization = Annotated[str | None, Header()]


async def _capped_body(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"a batch body may be at most {cap} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"a batch body may be at most {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class CappedBodyRoute(APIRoute):
    """Reads the body under `batch_max_body_bytes` before FastAPI parses it (which has no cap)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def capped(request: Request) -> Response:
            settings = await settings_of(request)
            # Starlette keeps the body here; FastAPI's own `await request.body()` reads it back.
            request._body = await _capped_body(request, settings.batch_max_body_bytes)
            return await handler(request)

        return capped


router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=CappedBodyRoute)


def _create(
    request: Request, settings: Settings, body: BatchCreate, auth: str | None
) -> BatchCreated:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        batch = svc.create_batch(
            session=session,
            settings=settings,
            cache=request.app.state.auth_cache,
            token=key_token(auth, None),
            body=body,
        )
        return BatchCreated(id=batch.id, status="queued", total=batch.total)


@router.post("", status_code=202)
async def create(
    body: BatchCreate, request: Request, settings: SettingsDep, authorization: Authorization = None
) -> BatchCreated:
    """Queue one job per request, at lower priority than interactive calls."""
    return await run_in_threadpool(_create, request, settings, body, authorization)


@router.get("/{batch_id}")
def read(
    batch_id: str,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    authorization: Authorization = None,
) -> BatchPublic:
    """Status and counts; for the batch's key or its owner account."""
    reader = reader_of(session, settings, authorization)
    return svc.batch_public(session, celery, svc.readable_batch(session, reader, batch_id))


@router.get("/{batch_id}/results")
def results(
    batch_id: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None
) -> StreamingResponse:
    """One JSON line per request, in request order (unfinished ones show their status)."""
    reader = reader_of(session, settings, authorization)
    batch = svc.readable_batch(session, reader, batch_id)
    lines = list(svc.result_lines(session, batch))
    return StreamingResponse(iter(lines), media_type="application/jsonl")


@router.post("/{batch_id}/cancel")
def cancel(
    batch_id: str,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    authorization: Authorization = None,
) -> BatchPublic:
    """Cancel the batch: queued requests never run, running ones are stopped."""
    reader = reader_of(session, settings, authorization)
    batch = svc.readable_batch(session, reader, batch_id)
    batch = svc.cancel_batch(session=session, settings=settings, celery=celery, batch=batch)
    return svc.batch_public(session, celery, batch)

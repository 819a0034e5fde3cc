"""`/v1/ws`: several generations over one WebSocket, multiplexed by the client's message ids.

Every message, both ways, is a JSON object with `type` and `id`:

- client → server: `auth` {api_key}, `inference` {model_id, prompt, and the `/v1/infer`
  generation fields}, `cancel` (the id of an inference), `ping`.
- server → client: `auth_ok`, `accepted` {job_id}, `token` {token, index}, `complete`
  {status, finish_reason, prompt_tokens, completion_tokens, latency_ms, …}, `pong`, `error`
  {error: {code, message, details}}.

A key may also be sent on the handshake (`Authorization: Bearer ik_…`). Errors about one
message never close the socket; only a failed `auth` (code 1008) and an oversized frame (1009)
do. A client that goes away cancels its generations; their tokens are still billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlmodel import Session
from starlette.datastructures import State

from api.deps import SettingsDep
from api.inference import limits
from api.inference.auth import authenticate_key, grant_for, key_token
from api.inference.auth_cache import AuthCache, Grant
from api.inference.protocol import InferRequest
from api.inference.serving import JobSpec, Outcome, deadline_for, follow_until, start_job
from core import events
from core.db import get_engine
from core.errors import AuthenticationFailed, InferatechError, InvalidRequest
from core.settings import Settings
from core.tables import Job

log = logging.getLogger("inferatech.ws")
router = APIRouter(tags=["inference"])

MAX_MESSAGE_BYTES = 1 << 20  # a 200,000-character prompt fits; anything bigger closes with 1009
MAX_IN_FLIGHT = 8
AUTH_TIMEOUT_S = 10.0
MAX_ID_CHARS = 128
POLICY_VIOLATION, MESSAGE_TOO_BIG = 1008, 1009


class _Connection:
    """One socket: its key, its in-flight generations, and one writer at a time."""

    def __init__(self, websocket: WebSocket, settings: Settings) -> None:
        self.ws = websocket
        self.settings = settings
        self.state: State = websocket.app.state
        self.token: str | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self.jobs: dict[str, str] = {}  # message id → job id
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def error(self, msg_id: Any, exc: InferatechError) -> None:
        body = {"code": exc.code, "message": exc.message, "details": exc.details}
        await self.send({"type": "error", "id": msg_id, "error": body})

    # -- messages -------------------------------------------------------------------------
    async def on_auth(self, msg_id: str, message: dict[str, Any]) -> bool:
        token = message.get("api_key")
        if not isinstance(token, str) or not token:
            await self.error(msg_id, AuthenticationFailed("`auth` needs an `api_key` string"))
            return False
        try:
            await run_in_threadpool(self._check_key, token)
        except InferatechError as exc:
            await self.error(msg_id, exc)
            return False
        self.token = token
        await self.send({"type": "auth_ok", "id": msg_id})
        return True

    def _check_key(self, token: str) -> None:
        with Session(get_engine(self.settings)) as session:
            authenticate_key(session, self.settings, token)

    async def on_inference(self, msg_id: str, message: dict[str, Any]) -> None:
        if self.token is None:
            raise AuthenticationFailed("send an `auth` message first")
        if msg_id in self.running:
            raise InvalidRequest(f"an inference with id {msg_id!r} is still running")
        if len(self.running) >= MAX_IN_FLIGHT:
            raise InvalidRequest(f"at most {MAX_IN_FLIGHT} inferences in flight per socket")
        fields = {k: v for k, v in message.items() if k not in ("type", "id")}
        if "stream" in fields or "api_key" in fields:
            raise InvalidRequest("`stream` and `api_key` are not inference fields on a socket")
        try:
            req = InferRequest.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise InvalidRequest(f"{field}: {first.get('msg', 'invalid')}") from None
        started = time.perf_counter()
        job = await run_in_threadpool(self._start, req)
        self.jobs[msg_id] = job.id
        await self.send({"type": "accepted", "id": msg_id, "job_id": job.id})
        task = asyncio.create_task(self._relay(msg_id, job, started))
        self.running[msg_id] = task
        task.add_done_callback(lambda _: self.running.pop(msg_id, None))

    def _start(self, req: InferRequest) -> Job:
        token = self.token
        assert token is not None

        def authorize(session: Session, cache: AuthCache) -> Grant:
            return grant_for(session, self.settings, cache, token, req.model_id)

        return start_job(
            conn=self.ws,
            settings=self.settings,
            authorize=authorize,
            spec=JobSpec.of(req),
            live=True,
        )

    async def _relay(self, msg_id: str, job: Job, started: float) -> None:
        outcome = Outcome()
        answered = False
        try:
            async for event in follow_until(
                self.state.aredis, job.id, outcome, deadline=deadline_for(job)
            ):
                if event.get("type") == "token":
                    token = {"token": event["text"], "index": event["index"]}
                    await self.send({"type": "token", "id": msg_id, **token})
            answered = True
            await self.send(_complete(msg_id, job, outcome, started))
        except InferatechError as exc:
            answered = True
            with contextlib.suppress(Exception):
                await self.error(msg_id, exc)
        except Exception:  # sending failed: the socket is gone
            log.info("websocket closed while job %s was streaming", job.id)
        finally:
            self.jobs.pop(msg_id, None)
            if not answered:  # stop generating; the tokens so far are still recorded as usage
                await _request_cancel(self.state.aredis, job.id)
            with contextlib.suppress(Exception):  # the worker frees it too, when the job ends
                await limits.release(self.state.aredis, job.api_key_id, job.id)

    async def on_cancel(self, msg_id: str) -> None:
        job_id = self.jobs.get(msg_id)
        if job_id is None:
            raise InvalidRequest(f"no running inference with id {msg_id!r}")
        await _request_cancel(self.state.aredis, job_id)

    async def hang_up(self) -> None:
        """The client went away: stop its generations (their usage is still recorded)."""
        for job_id in list(self.jobs.values()):
            await _request_cancel(self.state.aredis, job_id)
        for task in list(self.running.values()):
            task.cancel()


async def _request_cancel(aredis: Any, job_id: str) -> None:
    with contextlib.suppress(Exception):  # Redis down: the job ends at its own timeout
        await events.arequest_cancel(aredis, job_id)


def _complete(msg_id: str, job: Job, outcome: Outcome, started: float) -> dict[str, Any]:
    done = outcome.done or {}
    status = done.get("status")
    usage = done.get("result") or done.get("usage") or {}
    message: dict[str, Any] = {
        "type": "complete",
        "id": msg_id,
        "job_id": job.id,
        "status": status,
        "completion": "".join(outcome.text),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "cold_start": outcome.cold_start,
        "queue_ms": outcome.queue_ms,
    }
    if status == "succeeded":
        message["finish_reason"] = usage.get("finish_reason")
    elif status == "cancelled":
        message["finish_reason"] = "cancelled"
    else:
        message["error"] = done.get("error") or {"code": "INFERENCE_FAILED", "message": "failed"}
    return message


def _parse(text: str) -> tuple[str, dict[str, Any]]:
    """The message and its id; raises InvalidRequest for anything that is not one."""
    try:
        message = json.loads(text)
    except ValueError:
        raise InvalidRequest("a message must be a JSON object") from None
    if not isinstance(message, dict):
        raise InvalidRequest("a message must be a JSON object")
    msg_id = message.get("id")
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= MAX_ID_CHARS:
        raise InvalidRequest(
            f"every message needs an `id` string of 1 to {MAX_ID_CHARS} characters"
        )
    return msg_id, message


@router.websocket("/v1/ws")
async def socket(websocket: WebSocket, settings: SettingsDep) -> None:
    """Authenticate once, then run, stream and cancel generations by message id."""
    await websocket.accept()
    conn = _Connection(websocket, settings)
    header = websocket.headers.get("authorization")
    if header:
        try:
            conn.token = key_token(header, None)
            await run_in_threadpool(conn._check_key, conn.token)
        except InferatechError as exc:
            await conn.error(None, exc)
            await websocket.close(POLICY_VIOLATION)
            return
    try:
        await _serve(conn)
    except WebSocketDisconnect:
        pass
    finally:
        await conn.hang_up()


async def _serve(conn: _Connection) -> None:
    opened = time.monotonic()
    while True:
        timeout = None if conn.token else max(0.0, AUTH_TIMEOUT_S - (time.monotonic() - opened))
        try:
            text = await asyncio.wait_for(conn.ws.receive_text(), timeout)
        except TimeoutError:
            await conn.error(None, AuthenticationFailed("no `auth` message in time"))
            await conn.ws.close(POLICY_VIOLATION)
            return
        except KeyError:  # a binary frame: receive_text found no "text"
            await conn.error(None, InvalidRequest("send JSON text frames, not binary"))
            continue
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            await conn.error(
                None, InvalidRequest(f"a message is at most {MAX_MESSAGE_BYTES} bytes")
            )
            await conn.ws.close(MESSAGE_TOO_BIG)
            return
        msg_id: str | None = None
        try:
            parsed_id, message = _parse(text)
            msg_id = parsed_id
            kind = message.get("type")
            if kind == "ping":
                await conn.send({"type": "pong", "id": parsed_id})
            elif kind == "auth":
                if not await conn.on_auth(parsed_id, message):
                    await conn.ws.close(POLICY_VIOLATION)
                    return
            elif kind == "inference":
                await conn.on_inference(parsed_id, message)
            elif kind == "cancel":
                await conn.on_cancel(parsed_id)
            else:
                raise InvalidRequest(
                    "`type` must be one of auth, inference, cancel, ping", details={"type": kind}
                )
        except InferatechError as exc:
            await conn.error(msg_id, exc)

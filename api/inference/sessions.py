"""Chain mode: `/v1/sessions`, and how a request that names a session continues it.

The store and the turn format are in `core/sessions.py` (the worker appends the turns). A
session belongs to the API key that created it: any other key, the owner account's included,
gets 404, as for a session that never existed.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import redis
from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlmodel import Session

from api.deps import SettingsDep
from api.inference.auth import authenticate_key, grant_for, key_token
from api.inference.auth_cache import Grant
from core import sessions as store
from core.db import get_engine
from core.errors import InvalidRequest, SessionBusy, SessionNotFound
from core.ids import new_id
from core.redis import get_redis
from core.settings import Settings
from core.tables import utcnow

if TYPE_CHECKING:
    from api.inference.serving import JobSpec

router = APIRouter(tags=["sessions"])
Authorization = Annotated[str | None, Header()]
SESSION_ID = r"^ses_[A-Za-z0-9]{1,40}$"


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=40)
    max_context_tokens: StrictInt = Field(default=4096, ge=1)


class SessionPublic(BaseModel):
    id: str
    model_id: str
    max_context_tokens: int
    ttl_s: int
    created_at: datetime
    turns: int
    tokens: int  # all stored turns
    window_tokens: int  # what the next request would have prepended
    messages: list[dict[str, str]]  # the conversation so far, oldest first


def _public(meta: store.SessionMeta, turns: list[dict[str, Any]]) -> SessionPublic:
    _, window_tokens = store.window(turns, meta.max_context_tokens)
    return SessionPublic(
        id=meta.id,
        model_id=meta.model_id,
        max_context_tokens=meta.max_context_tokens,
        ttl_s=meta.ttl_s,
        created_at=datetime.fromisoformat(meta.created_at),
        turns=len(turns),
        tokens=sum(int(t["tokens"]) for t in turns),
        window_tokens=window_tokens,
        messages=[m for t in turns for m in t["messages"]],
    )


def _owned(
    client: redis.Redis,  # type: ignore[type-arg]
    session_id: str,
    key_id: str,
) -> tuple[store.SessionMeta, list[dict[str, Any]]]:
    loaded = store.load(client, session_id) if _well_formed(session_id) else None
    if loaded is None or loaded[0].key_id != key_id:
        raise SessionNotFound(f"no session {session_id!r}")
    return loaded


def _well_formed(session_id: str) -> bool:
    return re.fullmatch(SESSION_ID, session_id) is not None


def _key_id(settings: Settings, authorization: str | None) -> str:
    token = key_token(authorization, None)
    with Session(get_engine(settings)) as session:
        return authenticate_key(session, settings, token).id


@router.post("/v1/sessions", status_code=201)
def create_session(
    body: SessionCreate,
    request: Request,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> SessionPublic:
    """Start a conversation with the key's model; requests continue it with `session_id`."""
    if body.max_context_tokens > settings.session_max_context_tokens:
        raise InvalidRequest(
            f"max_context_tokens is capped at {settings.session_max_context_tokens}",
            details={"field": "max_context_tokens"},
        )
    token = key_token(authorization, None)
    with Session(get_engine(settings)) as session:
        grant = grant_for(session, settings, request.app.state.auth_cache, token, body.model_id)
    meta = store.SessionMeta(
        id=new_id("ses"),
        key_id=grant.key_id,
        model_id=grant.model_id,
        max_context_tokens=body.max_context_tokens,
        ttl_s=settings.session_ttl_s,
        created_at=utcnow().isoformat(),
    )
    store.create(get_redis(settings), meta)
    return _public(meta, [])


@router.get("/v1/sessions/{session_id}")
def read_session(
    session_id: str, settings: SettingsDep, authorization: Authorization = None
) -> SessionPublic:
    """The conversation so far and how much of it the next request carries."""
    key_id = _key_id(settings, authorization)
    return _public(*_owned(get_redis(settings), session_id, key_id))


@router.delete("/v1/sessions/{session_id}", status_code=204)
def delete_session(
    session_id: str, settings: SettingsDep, authorization: Authorization = None
) -> Response:
    """Forget the conversation now (it would expire after its idle TTL anyway)."""
    key_id = _key_id(settings, authorization)
    client = get_redis(settings)
    _owned(client, session_id, key_id)
    store.delete(client, session_id)
    return Response(status_code=204)


# --- continuing a session -------------------------------------------------------------------


def continued(
    client: redis.Redis,  # type: ignore[type-arg]
    spec: JobSpec,
    grant: Grant,
    job_id: str,
    timeout_and_ttl: tuple[int, int],
) -> JobSpec:
    """`spec` with the session's window prepended; takes the session lock.

    The request's leading system messages go first (chat templates want them there); the
    window's turns follow, then the request's own messages. The worker appends the turn.
    """
    assert spec.session_id is not None
    meta, turns = _owned(client, spec.session_id, grant.key_id)
    if meta.model_id != grant.model_id:
        raise InvalidRequest(
            f"session {meta.id} continues model {meta.model_id}, not {grant.model_id}",
            details={"field": "session_id"},
        )
    params = dict(spec.params)
    if params.pop("raw", False):
        raise InvalidRequest(
            "a session continues a chat through the model's template: `raw` cannot be used",
            details={"field": "raw"},
        )
    own = params.pop("messages", None) or [{"role": "user", "content": params.pop("prompt")}]
    params.pop("prompt", None)
    system = [m for m in own if m["role"] == "system"]
    said = [m for m in own if m["role"] != "system"]
    history, history_tokens = store.window(turns, meta.max_context_tokens)
    timeout, ttl = timeout_and_ttl
    # An async job may wait in the queue for its TTL before it runs.
    hold = timeout + (ttl if spec.detached else 0)
    if not store.lock(client, meta.id, job_id, hold):
        raise SessionBusy(f"session {meta.id} is answering another request; retry when it ends")
    params["messages"] = [*system, *history, *said]
    params["session"] = {
        "id": meta.id,
        "ttl_s": meta.ttl_s,
        "messages": said,
        "history_tokens": history_tokens,
    }
    return dataclasses.replace(spec, params=params)


def release(client: redis.Redis, spec: JobSpec, job_id: str) -> None:  # type: ignore[type-arg]
    """Free the session's lock when the job could not be queued (no worker will)."""
    if spec.session_id is not None:
        store.release(client, spec.session_id, job_id)

"""Chain-mode sessions in Redis: a conversation that later requests continue.

A session belongs to the API key that created it and to one model. Its turns (the messages a
request added, then the model's answer, and the tokens that turn took) live in a Redis list
with the session's idle TTL. A request that names the session gets the most recent turns that
fit in the session's `max_context_tokens` prepended to its own messages; when its job
succeeds the worker appends the new turn in the same round trip as the job's terminal event,
so a client that hung up still has its turn recorded, and `/v1/jobs` works like `/v1/infer`.

One request at a time per session (`SESSION_BUSY` otherwise): two concurrent turns would
each continue a conversation that is missing the other one. The lock is the running job's id,
freed by the worker when the job ends, by the API when the job could not be queued or was
cancelled while queued, and by its TTL if everything else died.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from core.redis import RELEASE_LUA, release_lock

MAX_TURNS = 500  # oldest turns beyond this are dropped whatever the window
LOCK_GRACE_S = 120


def meta_key(session_id: str) -> str:
    return f"session:{session_id}"


def turns_key(session_id: str) -> str:
    return f"session:{session_id}:turns"


def lock_key(session_id: str) -> str:
    return f"session:{session_id}:lock"


@dataclass(frozen=True)
class SessionMeta:
    id: str
    key_id: str
    model_id: str
    max_context_tokens: int
    ttl_s: int
    created_at: str

    def encode(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}

    @classmethod
    def decode(cls, raw: dict[bytes, bytes]) -> SessionMeta:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=d["id"],
            key_id=d["key_id"],
            model_id=d["model_id"],
            max_context_tokens=int(d["max_context_tokens"]),
            ttl_s=int(d["ttl_s"]),
            created_at=d["created_at"],
        )


def create(client: redis.Redis, meta: SessionMeta) -> None:  # type: ignore[type-arg]
    pipe = client.pipeline(transaction=True)
    pipe.hset(meta_key(meta.id), mapping=meta.encode())  # type: ignore[arg-type]
    pipe.expire(meta_key(meta.id), meta.ttl_s)
    pipe.execute()


def load(
    client: redis.Redis,  # type: ignore[type-arg]
    session_id: str,
) -> tuple[SessionMeta, list[dict[str, Any]]] | None:
    """The session and its turns (oldest first), or None when it expired or never was."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(meta_key(session_id))
    pipe.lrange(turns_key(session_id), 0, -1)
    raw, turns = pipe.execute()
    if not raw:
        return None
    return SessionMeta.decode(raw), [json.loads(t) for t in turns]


def delete(client: redis.Redis, session_id: str) -> None:  # type: ignore[type-arg]
    client.delete(meta_key(session_id), turns_key(session_id), lock_key(session_id))


def window(turns: list[dict[str, Any]], max_tokens: int) -> tuple[list[dict[str, str]], int]:
    """The messages of the newest whole turns whose tokens fit in `max_tokens`, and their sum."""
    kept: list[dict[str, Any]] = []
    total = 0
    for turn in reversed(turns):
        if total + int(turn["tokens"]) > max_tokens:
            break
        kept.append(turn)
        total += int(turn["tokens"])
    messages = [m for turn in reversed(kept) for m in turn["messages"]]
    return messages, total


def lock(client: redis.Redis, session_id: str, job_id: str, ttl_s: int) -> bool:  # type: ignore[type-arg]
    return bool(client.set(lock_key(session_id), job_id, nx=True, ex=ttl_s + LOCK_GRACE_S))


def release(client: redis.Redis, session_id: str, job_id: str) -> None:  # type: ignore[type-arg]
    release_lock(client, lock_key(session_id), job_id)


def queue_turn(
    pipe: redis.client.Pipeline,  # type: ignore[type-arg]
    session: dict[str, Any],
    job_id: str,
    *,
    completion: str | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    """On the worker's end-of-job pipeline: append the turn (if the job succeeded), unlock.

    `session` is what the API put in the job's params: id, ttl_s, the request's own
    `messages` and `history_tokens` (the prompt tokens of the prepended turns, so that this
    turn is charged only for what it added, template overhead included).
    """
    sid = str(session["id"])
    if completion is not None:
        added = max(1, prompt_tokens - int(session.get("history_tokens", 0)))
        turn = {
            "messages": [*session["messages"], {"role": "assistant", "content": completion}],
            "tokens": added + completion_tokens,
            "job_id": job_id,
        }
        ttl = int(session["ttl_s"])
        pipe.rpush(turns_key(sid), json.dumps(turn, separators=(",", ":")))
        pipe.ltrim(turns_key(sid), -MAX_TURNS, -1)
        pipe.expire(turns_key(sid), ttl)
        pipe.expire(meta_key(sid), ttl)
    pipe.eval(RELEASE_LUA, 1, lock_key(sid), job_id)

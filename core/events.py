"""Job event streams on Redis: the worker appends, the API follows (no result-backend polling).

A job's events live in the stream `job:{id}`: `status` (running, cold start, queue time),
`token` (text, index) and exactly one terminal `done` (status, result or error). Any reader can
replay from the start, so a client may connect late.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis

STREAM_TTL_S = 24 * 3600
STREAM_MAXLEN = 100_000
CANCELLED_BEFORE_START = {"code": "JOB_CANCELLED", "message": "cancelled before it started"}


def stream_key(job_id: str) -> str:
    return f"job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"cancel:{job_id}"


def run_lock_key(job_id: str) -> str:
    """The job's run lock: held by the worker running it, released after its ending."""
    return f"lock:job:{job_id}"


def cancel_channel(client: redis.Redis | aioredis.Redis) -> str:  # type: ignore[type-arg]
    """Where cancels are announced (Redis pub/sub spans databases, so the channel names one)."""
    return f"cancels:{client.connection_pool.connection_kwargs.get('db', 0)}"


def publish(client: redis.Redis, job_id: str, event: dict[str, Any]) -> None:  # type: ignore[type-arg]
    key = stream_key(job_id)
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, {"e": json.dumps(event, separators=(",", ":"))}, maxlen=STREAM_MAXLEN)
    if event.get("type") in ("done", "status"):
        pipe.expire(key, STREAM_TTL_S)
    pipe.execute()


def publish_many(client: redis.Redis, job_id: str, batch: list[dict[str, Any]]) -> None:  # type: ignore[type-arg]
    """Append several events in one round trip, in order; MULTI/EXEC when there are several,
    so a reader blocked in XREAD wakes once with all of them (a plain pipeline woke it after
    the first). A lone event (most of a stream's tokens) skips it: ~35 µs a token here."""
    pipe = client.pipeline(transaction=len(batch) > 1)
    queue_events(pipe, job_id, batch)
    pipe.execute()


def queue_events(
    pipe: redis.client.Pipeline,  # type: ignore[type-arg]
    job_id: str,
    batch: list[dict[str, Any]],
) -> None:
    """Queue the appends on a pipeline the caller executes (with its other commands)."""
    key = stream_key(job_id)
    for event in batch:
        pipe.xadd(key, {"e": json.dumps(event, separators=(",", ":"))}, maxlen=STREAM_MAXLEN)
    if any(event.get("type") in ("done", "status") for event in batch):
        pipe.expire(key, STREAM_TTL_S)


def batched(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of token events as one `tokens` event each (`expand` gives them back).

    A deferred job's tokens all reach the stream at its end: one entry instead of one per
    token, for the worker that writes them and the API that reads them.
    """
    out: list[dict[str, Any]] = []
    for event in batch:
        if event.get("type") != "token":
            out.append(event)
        elif out and out[-1].get("type") == "tokens":
            out[-1]["texts"].append(event["text"])
        else:
            out.append({"type": "tokens", "index": event["index"], "texts": [event["text"]]})
    return out


def expand(event: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream event as the token, status and done events readers handle."""
    if event.get("type") != "tokens":
        return [event]
    first = int(event["index"])
    return [
        {"type": "token", "text": text, "index": first + i} for i, text in enumerate(event["texts"])
    ]


def request_cancel(client: redis.Redis, job_id: str, ttl_s: int = STREAM_TTL_S) -> None:  # type: ignore[type-arg]
    """Flag the job to stop and tell the workers at once (one round trip).

    The flag is the record (a worker polls it now and then, and checks it before starting);
    the announcement wakes the worker running the job within a round trip.
    """
    pipe = client.pipeline(transaction=False)
    pipe.set(cancel_key(job_id), b"1", ex=ttl_s)
    pipe.publish(cancel_channel(client), job_id)
    pipe.execute()


async def arequest_cancel(aredis: aioredis.Redis, job_id: str) -> None:  # type: ignore[type-arg]
    """`request_cancel` from the API's event loop."""
    async with aredis.pipeline(transaction=False) as pipe:
        pipe.set(cancel_key(job_id), b"1", ex=STREAM_TTL_S)
        pipe.publish(cancel_channel(aredis), job_id)
        await pipe.execute()


def cancel_many(client: redis.Redis, ended: list[str], running: list[str]) -> None:  # type: ignore[type-arg]
    """Flag jobs to stop, in one round trip.

    `ended` jobs (cancelled before they ran) also get their terminal event, so whoever follows
    their stream stops waiting.
    """
    done = {"type": "done", "status": "cancelled", "error": CANCELLED_BEFORE_START}
    payload = {"e": json.dumps(done, separators=(",", ":"))}
    pipe = client.pipeline(transaction=False)
    for job_id in [*ended, *running]:
        pipe.set(cancel_key(job_id), b"1", ex=STREAM_TTL_S)
    for job_id in ended:
        pipe.xadd(stream_key(job_id), payload, maxlen=STREAM_MAXLEN)
        pipe.expire(stream_key(job_id), STREAM_TTL_S)
    for job_id in running:
        pipe.publish(cancel_channel(client), job_id)
    pipe.execute()


def cancels_requested(client: redis.Redis, job_ids: list[str]) -> list[bool]:  # type: ignore[type-arg]
    """Whether each job was asked to stop, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.exists(cancel_key(job_id))
    return [bool(flag) for flag in pipe.execute()]


def _decode(fields: dict[Any, Any]) -> dict[str, Any]:
    raw: bytes | str = fields.get(b"e") or fields.get("e") or b"{}"
    event: dict[str, Any] = json.loads(raw)
    return event


async def afollow(
    client: aioredis.Redis,  # type: ignore[type-arg]
    job_id: str,
    *,
    after: str = "0",
    block_ms: int = 1000,
) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Yield each XREAD's `(entry_id, event)` entries forever; an empty list is an idle
    wake-up (a heartbeat). One blocked XREAD per waiting request, on the API's event loop.
    """
    key = stream_key(job_id)
    last = after
    while True:
        reply = await client.xread({key: last}, count=256, block=block_ms)
        entries = []
        for entry_id, fields in reply[0][1] if reply else ():
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            entries.append((last, _decode(fields)))
        yield entries


def read_heartbeats(client: redis.Redis) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    """Heartbeats of live workers; an expired one means a dead or stuck worker."""
    from core.queue import HEARTBEAT_INDEX, HEARTBEAT_PREFIX

    names = [
        n.decode() if isinstance(n, bytes) else n for n in client.zrange(HEARTBEAT_INDEX, 0, -1)
    ]
    if not names:
        return []
    raw = client.mget([HEARTBEAT_PREFIX + n for n in names])
    return [json.loads(r) for r in raw if r]

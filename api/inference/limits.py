"""Per-key limits on the inference routes: admit a request in one Redis round trip.

`enforce` is the one entry point a route calls once it knows the key (the OpenAI routes
too): it admits or raises 429, and leaves the `X-RateLimit-*` headers on `request.state`
so the success response and any later error envelope carry them. The headers describe:

- `X-RateLimit-Limit` / `-Remaining` / `-Reset`: requests per minute (reset: seconds until
  the bucket is full again);
- `X-RateLimit-Limit-Tokens` / `-Remaining-Tokens` / `-Reset-Tokens`: tokens per minute;
- `X-RateLimit-Limit-Concurrency` / `-Remaining-Concurrency`: requests in flight.

A limit that is off (0) sends none of its headers.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlalchemy import func
from sqlmodel import Session, col, select
from starlette.requests import HTTPConnection

from api.inference.auth_cache import Grant
from core import limits
from core.errors import BudgetExceeded, RateLimitExceeded, ServiceUnavailable
from core.settings import Settings
from core.tables import UsageEvent, utcnow

log = logging.getLogger("inferatech.limits")

_LIMIT_NAMES = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "concurrency": "concurrent requests",
    "reads": "reads per minute",
}


def limits_of(grant: Grant, settings: Settings) -> limits.KeyLimits:
    """The key's own limits where it was minted with them, the server's defaults otherwise."""

    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return limits.KeyLimits(
        rpm=pick(grant.rate_limit_rpm, settings.rate_limit_rpm),
        tpm=pick(grant.rate_limit_tpm, settings.rate_limit_tpm),
        concurrency=pick(grant.rate_limit_concurrency, settings.rate_limit_concurrency),
        monthly_budget=grant.monthly_token_budget,
    )


def enforce(
    request: HTTPConnection,
    *,
    client: redis.Redis,  # type: ignore[type-arg]
    session: Session,
    settings: Settings,
    grant: Grant,
    job_id: str,
    lease_s: float,
) -> dict[str, str]:
    """Admit one request (holding a concurrency slot for `job_id`) or raise 429."""
    lim = limits_of(grant, settings)
    now = utcnow()
    keys, args = _admission(grant.key_id, lim, job_id, lease_s, now)
    reply: list[Any] = limits.admit_script(client)(keys=keys, args=args)
    if reply[0] == b"seed":  # first request of the month, or Redis lost the counter
        _seed_budget(client, session, grant.key_id, now)
        reply = limits.admit_script(client)(keys=keys, args=args)
    return _judge(request, lim, reply, now)


async def aenforce(
    request: HTTPConnection,
    *,
    aredis: aioredis.Redis,  # type: ignore[type-arg]
    settings: Settings,
    grant: Grant,
    job_id: str,
    lease_s: float,
    push: tuple[str, str] | None = None,
) -> bool:
    """`enforce` on the event loop; False (nothing admitted) where the month's budget
    counter must first be read from the database: the caller takes `enforce`'s path.

    `push` (a queue's list and a task message): queued by the same script once admitted.
    """
    lim = limits_of(grant, settings)
    now = utcnow()
    keys, args = _admission(grant.key_id, lim, job_id, lease_s, now)
    if push is not None:
        keys.append(push[0])
        args.append(push[1])
    reply: list[Any] = await limits.async_admit_script(aredis)(keys=keys, args=args)
    if reply[0] == b"seed":
        return False
    _judge(request, lim, reply, now)
    return True


def _judge(
    request: HTTPConnection, lim: limits.KeyLimits, reply: list[Any], now: datetime
) -> dict[str, str]:
    """The admission script's reply: the headers of an admitted request, or the 429."""
    verdict = reply[0].decode()
    if verdict == "seed":  # the counter vanished between two round trips (eviction)
        raise ServiceUnavailable("could not read this key's token budget; retry")
    headers = _headers(lim, float(reply[1]), float(reply[2]), int(reply[3]))
    request.state.response_headers = headers
    if verdict == "budget":
        retry = math.ceil((limits.next_month_start(now) - now).total_seconds())
        raise BudgetExceeded(
            f"this key's monthly budget of {lim.monthly_budget} tokens is spent",
            details={"limit": "monthly_token_budget", "budget": lim.monthly_budget,
                     "spent": int(reply[4])},
            headers={"Retry-After": str(retry)},
        )  # fmt: skip
    if verdict != "ok":
        raise _over(verdict, int(reply[4]))
    return headers


def limit_reads(client: redis.Redis, settings: Settings, reader_id: str) -> None:  # type: ignore[type-arg]
    """One token from the reader's (key's or account's) read bucket, or 429.

    Fails open: with Redis unreachable, reads (which need only the database) still answer;
    this limit shields the database, it decides nothing.
    """
    rpm = settings.rate_limit_read_rpm
    if not rpm:
        return
    bucket = limits.read_key(reader_id)  # the admission script with only its rpm bucket
    try:
        reply = limits.admit_script(client)(keys=[bucket] * 4, args=[rpm, 0, 0, 0, "", 0])
    except redis.RedisError as exc:
        log.warning("read limit not checked, Redis unreachable: %s", type(exc).__name__)
        return
    if reply[0] != b"ok":
        raise _over("reads", int(reply[4]))


def _over(verdict: str, retry_ms: int) -> RateLimitExceeded:
    retry = max(1, math.ceil(retry_ms / 1000))
    return RateLimitExceeded(
        f"rate limit reached: {_LIMIT_NAMES[verdict]}; retry in {retry} s",
        details={"limit": _LIMIT_NAMES[verdict].replace(" ", "_"), "retry_after_s": retry},
        headers={"Retry-After": str(retry)},
    )


def response_headers(conn: HTTPConnection) -> dict[str, str]:
    """The `X-RateLimit-*` headers `enforce` left for this request (none before admission)."""
    headers: dict[str, str] = getattr(conn.state, "response_headers", {})
    return headers


async def release(aredis: aioredis.Redis, key_id: str | None, job_id: str) -> None:  # type: ignore[type-arg]
    """Free the request's slot now (the worker frees it too when the job ends)."""
    if key_id:
        await aredis.zrem(limits.concurrency_key(key_id), job_id)


def _admission(
    key_id: str, lim: limits.KeyLimits, job_id: str, lease_s: float, now: datetime
) -> tuple[list[str], list[Any]]:
    """The admission script's keys and arguments for one request."""
    keys = [
        limits.rpm_key(key_id),
        limits.tpm_key(key_id),
        limits.concurrency_key(key_id),
        limits.budget_key(key_id, limits.month_of(now)),
    ]
    args = [lim.rpm, lim.tpm, lim.concurrency, lim.monthly_budget or 0, job_id, int(lease_s * 1000)]
    return keys, args


def _seed_budget(client: redis.Redis, session: Session, key_id: str, now: datetime) -> None:  # type: ignore[type-arg]
    """Start this month's counter from the ledger (first request of the month, or Redis lost)."""
    tokens = col(UsageEvent.prompt_tokens) + col(UsageEvent.completion_tokens)
    stmt = select(func.coalesce(func.sum(tokens), 0)).where(
        col(UsageEvent.api_key_id) == key_id,
        col(UsageEvent.occurred_at) >= limits.month_start(now),
    )
    spent = int(session.exec(stmt).one())
    key = limits.budget_key(key_id, limits.month_of(now))
    client.set(key, spent, nx=True, ex=limits.BUDGET_TTL_S)


def _headers(
    lim: limits.KeyLimits, rpm_level: float, tpm_level: float, used: int
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if lim.rpm:
        headers["X-RateLimit-Limit"] = str(lim.rpm)
        headers["X-RateLimit-Remaining"] = str(max(0, math.floor(rpm_level)))
        headers["X-RateLimit-Reset"] = str(_refill_s(lim.rpm, rpm_level))
    if lim.tpm:
        headers["X-RateLimit-Limit-Tokens"] = str(lim.tpm)
        headers["X-RateLimit-Remaining-Tokens"] = str(max(0, math.floor(tpm_level)))
        headers["X-RateLimit-Reset-Tokens"] = str(_refill_s(lim.tpm, tpm_level))
    if lim.concurrency:
        headers["X-RateLimit-Limit-Concurrency"] = str(lim.concurrency)
        headers["X-RateLimit-Remaining-Concurrency"] = str(max(0, lim.concurrency - used))
    return headers


def _refill_s(per_minute: int, level: float) -> int:
    """Seconds until a bucket of `per_minute` at `level` is full again."""
    return max(0, math.ceil((per_minute - level) * 60 / per_minute))

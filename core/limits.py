"""Per-key rate limits in Redis: one Lua script admits a request, one settles its job.

Requests and tokens per minute are token buckets (capacity = the per-minute limit, refilled
continuously), so a burst of up to the limit is allowed and nothing resets all at once on a
minute boundary. Concurrency is a sorted set of job ids scored by lease expiry: a slot is
freed when the job ends (by the worker, or the API on its own failure paths), and a slot
whose holder died is dropped once its lease passes. The monthly budget is a counter seeded
from the usage ledger. Every clock reading is Redis's own (`TIME`), so replicas agree.

Tokens are known only when a job ends: admission lets a key in while its token bucket holds
at least one token, and the worker debits the real count (possibly into debt, which delays
the next requests) in the same round trip that publishes the job's terminal event.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

BUDGET_TTL_S = 40 * 24 * 3600  # a month's counter outlives the month

# KEYS: rpm bucket, tpm bucket, concurrency set, budget counter[, queue list].
# ARGV: rpm, tpm, concurrency, budget (0 = none), job id, lease in ms[, task message].
# With the queue list and message, an admitted request's task is queued in the same round
# trip (LPUSH, as kombu's Redis transport would); a refused one queues nothing.
# Reply: {verdict, rpm level, tpm level, slots in use, retry after ms (budget: tokens spent)};
# verdict is "ok", "rpm", "tpm", "concurrency", "budget" or "seed" (no budget counter yet).
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local conc, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease = tonumber(ARGV[6])

local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000)
end

local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local r, k, used = 0, 0, 0
if rpm > 0 then r = level(KEYS[1], rpm) end
if tpm > 0 then k = level(KEYS[2], tpm) end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  used = redis.call('ZCARD', KEYS[3])
end
local verdict, retry = 'ok', 0
if budget > 0 then
  local spent = redis.call('GET', KEYS[4])
  if not spent then return {'seed', '0', '0', 0, 0} end
  if tonumber(spent) >= budget then verdict, retry = 'budget', tonumber(spent) end
end
if verdict ~= 'ok' then
  -- the budget has decided
elseif rpm > 0 and r < 1 then
  verdict, retry = 'rpm', math.ceil((1 - r) * 60000 / rpm)
elseif tpm > 0 and k < 1 then
  verdict, retry = 'tpm', math.ceil((1 - k) * 60000 / tpm)
elseif conc > 0 and used >= conc then
  verdict, retry = 'concurrency', 1000
end
if verdict ~= 'ok' then
  return {verdict, tostring(r), tostring(k), used, retry}
end
if rpm > 0 then
  r = r - 1
  redis.call('HSET', KEYS[1], 'l', tostring(r), 't', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((rpm - r) * 60000 / rpm) + 1000)
end
if tpm > 0 then
  -- the bucket must outlive the job: the worker debits it when the job ends
  redis.call('HSET', KEYS[2], 'l', tostring(k), 't', now, 'c', tpm)
  keep(KEYS[2], math.max(math.ceil((tpm - k) * 60000 / tpm), lease) + 1000)
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
  keep(KEYS[3], lease)
  used = used + 1
end
if KEYS[5] then redis.call('LPUSH', KEYS[5], ARGV[7]) end
return {'ok', tostring(r), tostring(k), used, 0}
"""

# KEYS: tpm bucket, concurrency set, budget counter. ARGV: tokens, job id.
SETTLE_LUA = """
redis.call('ZREM', KEYS[2], ARGV[2])
local tokens = tonumber(ARGV[1])
if tokens <= 0 then return 0 end
local v = redis.call('HMGET', KEYS[1], 'l', 't', 'c')
if v[1] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local cap = tonumber(v[3])
  local l = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000) - tokens
  redis.call('HSET', KEYS[1], 'l', tostring(l), 't', now)
  local ms = math.ceil((cap - l) * 60000 / cap) + 1000
  if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
end
-- only a seeded counter counts: a missing one is rebuilt from the ledger, this job included
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('INCRBY', KEYS[3], tokens) end
return 1
"""


@dataclass(frozen=True)
class KeyLimits:
    """A key's effective limits; 0 means unlimited, a budget of None means none."""

    rpm: int
    tpm: int
    concurrency: int
    monthly_budget: int | None


def month_of(now: datetime) -> str:
    # Not strftime: glibc's re-reads the time zone (a stat of /etc/localtime) on every call,
    # and this runs on every request.
    utc = now.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


# A hash tag keeps one key's counters in one Redis Cluster slot (a script needs them together).
def rpm_key(key_id: str) -> str:
    return f"rl:{{{key_id}}}:rpm"


def tpm_key(key_id: str) -> str:
    return f"rl:{{{key_id}}}:tpm"


def concurrency_key(key_id: str) -> str:
    return f"rl:{{{key_id}}}:conc"


def budget_key(key_id: str, month: str) -> str:
    return f"rl:{{{key_id}}}:budget:{month}"


def read_key(reader_id: str) -> str:
    """Job and batch reads of one key or account (`ADMIT_LUA` with only its rpm bucket)."""
    return f"rl:{{{reader_id}}}:reads"


@functools.lru_cache(maxsize=8)
def admit_script(client: redis.Redis) -> Script:  # type: ignore[type-arg]
    """EVALSHA through redis-py's `Script`: one round trip; it reloads after a NOSCRIPT."""
    return client.register_script(ADMIT_LUA)


@functools.lru_cache(maxsize=8)
def async_admit_script(client: aioredis.Redis) -> AsyncScript:  # type: ignore[type-arg]
    """`admit_script` for an asyncio client (the script's digest computed once)."""
    return client.register_script(ADMIT_LUA)


def queue_settle(
    pipe: redis.client.Pipeline,  # type: ignore[type-arg]
    *,
    key_id: str,
    job_id: str,
    tokens: int,
    now: datetime,
) -> None:
    """Free the job's slot and debit its tokens, as part of a pipeline the caller executes.

    EVAL with the script's text, not EVALSHA: redis-py checks a pipeline's scripts with an
    extra SCRIPT EXISTS round trip, and a NOSCRIPT inside a pipeline could not be retried
    without republishing the events queued beside it.
    """
    keys = [tpm_key(key_id), concurrency_key(key_id), budget_key(key_id, month_of(now))]
    pipe.eval(SETTLE_LUA, len(keys), *keys, tokens, job_id)


def release(client: redis.Redis, key_id: str, job_id: str) -> None:  # type: ignore[type-arg]
    """Free a job's concurrency slot; a no-op once freed (every end path may call it)."""
    client.zrem(concurrency_key(key_id), job_id)

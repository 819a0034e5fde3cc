"""Metrics that outlive one process: workers add to Redis hashes, every API replica reads them.

A job's numbers (queue time, cold start, time to first token, duration, tokens, outcome) are
known only on the worker that ran it, and workers come and go (scaled from zero), so they are
kept as cluster-wide sums in Redis rather than per worker: any API replica's `/metrics` shows
the same values. Histograms are stored per bucket (not cumulative) and cumulated on read.
The worker writes them in the same pipeline as the job's terminal event: no extra round trip,
and a client that has its answer sees them counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import redis

KEY_PREFIX = "metrics:"
TOKENS_KEY = KEY_PREFIX + "tokens"  # "<model>|prompt" / "<model>|completion" → tokens
JOBS_KEY = KEY_PREFIX + "jobs"  # "<model>|<status>" → jobs ended
BILLING_KEY = KEY_PREFIX + "billing"  # "retry" / "permanent" → failed push attempts

# Seconds; from a warm token (milliseconds) to a large model's cold start (minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HISTOGRAMS = {
    "job_queue_seconds": "Time a job waited in the queue before a worker took it.",
    "cold_start_seconds": "Time to start a runner and load a model (cold starts only).",
    "time_to_first_token_seconds": "From the job's creation to its first generated token.",
    "job_duration_seconds": "From the job's creation to its terminal state.",
}


def hist_key(name: str) -> str:
    return f"{KEY_PREFIX}hist:{name}"


def bucket_of(value: float) -> str:
    """The field of the first bucket whose upper bound holds `value`."""
    for bound in BUCKETS:
        if value <= bound:
            return repr(bound)
    return "+Inf"


@dataclass(frozen=True)
class JobMetrics:
    """What one ended job adds; the durations are seconds, None when not applicable."""

    model_id: str
    status: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    cold_start_s: float | None = None
    first_token_s: float | None = None
    duration_s: float | None = None


# One EVAL instead of up to 15 commands on the end-of-job pipeline: each command is a
# dispatch and a reply for Redis and for redis-py (~0.2 ms a job on a 2-vCPU host).
# KEYS: jobs, tokens, then one histogram per observed value.
# ARGV: the job's field, how many token fields, (field, count)..., then (bucket, value)...
RECORD_LUA = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local n = tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for k = 3, #KEYS do
  redis.call('HINCRBY', KEYS[k], ARGV[i], 1)
  redis.call('HINCRBYFLOAT', KEYS[k], 'sum', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[k], 'count', 1)
  i = i + 2
end
return 1
"""


def record_job(pipe: redis.client.Pipeline, m: JobMetrics) -> None:  # type: ignore[type-arg]
    """Queue the job's increments on `pipe` (the caller executes it), as one script.

    EVAL with the script's text, as `core.limits.queue_settle` does, and for its reasons.
    """
    keys: list[str] = [JOBS_KEY, TOKENS_KEY]
    tokens: list[str | int] = []
    if m.prompt_tokens:
        tokens += [f"{m.model_id}|prompt", m.prompt_tokens]
    if m.completion_tokens:
        tokens += [f"{m.model_id}|completion", m.completion_tokens]
    observations: list[str] = []
    observed = (
        ("job_queue_seconds", m.queue_s),
        ("cold_start_seconds", m.cold_start_s),
        ("time_to_first_token_seconds", m.first_token_s),
        ("job_duration_seconds", m.duration_s),
    )
    for name, value in observed:
        if value is not None and math.isfinite(value):
            value = max(value, 0.0)  # clock skew between API and worker hosts
            keys.append(hist_key(name))
            observations += [bucket_of(value), repr(value)]
    args = [f"{m.model_id}|{m.status}", len(tokens) // 2, *tokens, *observations]
    pipe.eval(RECORD_LUA, len(keys), *keys, *args)


def record_push_failures(client: redis.Redis, *, retried: int, failed: int) -> None:  # type: ignore[type-arg]
    """Billing push attempts that failed: `retry` (backing off) and `permanent` (4xx)."""
    pipe = client.pipeline(transaction=False)
    if retried:
        pipe.hincrby(BILLING_KEY, "retry", retried)
    if failed:
        pipe.hincrby(BILLING_KEY, "permanent", failed)
    pipe.execute()


@dataclass
class Histogram:
    buckets: list[tuple[str, float]]  # cumulative, "+Inf" last
    sum: float = 0.0


@dataclass
class Snapshot:
    histograms: dict[str, Histogram] = field(default_factory=dict)
    tokens: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, kind)
    jobs: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, status)
    push_failures: dict[str, float] = field(default_factory=dict)  # kind


def read(client: redis.Redis) -> Snapshot:  # type: ignore[type-arg]
    """Every cluster-wide metric, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for name in HISTOGRAMS:
        pipe.hgetall(hist_key(name))
    for key in (TOKENS_KEY, JOBS_KEY, BILLING_KEY):
        pipe.hgetall(key)
    replies: list[dict[bytes, bytes]] = pipe.execute()
    snap = Snapshot()
    for name, raw in zip(HISTOGRAMS, replies, strict=False):
        snap.histograms[name] = _histogram(_decode(raw))
    tokens, jobs, billing = (_decode(r) for r in replies[len(HISTOGRAMS) :])
    snap.tokens = _pairs(tokens)
    snap.jobs = _pairs(jobs)
    snap.push_failures = billing
    return snap


def _decode(raw: dict[Any, Any]) -> dict[str, float]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}


def _pairs(fields: dict[str, float]) -> dict[tuple[str, str], float]:
    out = {}
    for name, value in fields.items():
        first, sep, second = name.rpartition("|")
        if sep:
            out[(first, second)] = value
    return out


def _histogram(fields: dict[str, float]) -> Histogram:
    running = 0.0
    cumulative = []
    for bound in (*(repr(b) for b in BUCKETS), "+Inf"):
        running += fields.get(bound, 0.0)
        cumulative.append((bound, running))
    return Histogram(cumulative, fields.get("sum", 0.0))

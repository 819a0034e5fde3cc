"""Job state on the worker side: compare-and-set transitions, terminal state + usage together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Insert, Update, bindparam, func, insert, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db import get_engine, session_scope, update_rows
from core.ids import new_id
from core.settings import Settings
from core.tables import (
    Account,
    ApiKey,
    Job,
    JobStatus,
    Model,
    ModelFile,
    PushState,
    UsageEvent,
    utcnow,
)

LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class JobContext:
    """Everything a worker needs to run a job, read in one short transaction."""

    job: Job
    model: Model
    files: list[ModelFile]
    log_payloads: bool = False  # the key opted in: its prompts and completions are logged
    # Its row is not written yet (`claim_unsaved`): `finish` inserts it, already ended.
    unsaved: bool = False


@dataclass
class Terminal:
    status: JobStatus
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    # An embedding job's vectors: they reach the caller on the stream, never the database.
    vectors: list[list[float]] | None = None

    def event(self) -> dict[str, Any]:
        ev: dict[str, Any] = {"type": "done", "status": self.status.value}
        if self.status is JobStatus.SUCCEEDED:
            ev["result"] = {
                "finish_reason": (self.result or {}).get("finish_reason"),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }
            if self.vectors is not None:
                ev["result"]["embeddings"] = self.vectors
        else:
            ev["error"] = {"code": self.error_code, "message": self.error_message}
            # What a cancelled or failed job still consumed (and is billed for).
            ev["usage"] = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }
        return ev


# What a job runs on, read once per worker process and model (or key) for this long: a model's
# files are written once, and the claim that every request makes is then one statement.
CONTEXT_TTL_S = 30.0
_served: dict[str, tuple[float, Model, list[ModelFile]]] = {}
_payload_keys: dict[str, tuple[float, bool]] = {}
_context_lock = threading.Lock()


def forget_model(model_id: str) -> None:
    """Drop a model's cached rows (its files changed: a legacy upload was converted)."""
    with _context_lock:
        _served.pop(model_id, None)


def _context(settings: Settings, job: Job) -> JobContext:
    now = time.monotonic()
    with _context_lock:
        cached = _served.get(job.model_id)
        logged = _payload_keys.get(job.api_key_id) if job.api_key_id else (now, False)
    if cached is None or cached[0] < now or logged is None or logged[0] < now:
        with session_scope(settings) as s:
            model = s.get(Model, job.model_id)
            assert model is not None
            files = list(s.exec(select(ModelFile).where(ModelFile.model_id == model.id)))
            key = s.get(ApiKey, job.api_key_id) if job.api_key_id else None
        cached = (now + CONTEXT_TTL_S, model, files)
        logged = (now + CONTEXT_TTL_S, bool(key and key.log_payloads))
        with _context_lock:
            if len(_served) > 10_000:  # a long-lived worker that served many models
                _served.clear()
                _payload_keys.clear()
            _served[job.model_id] = cached
            if job.api_key_id:
                _payload_keys[job.api_key_id] = logged
    return JobContext(job=job, model=cached[1], files=list(cached[2]), log_payloads=logged[1])


def load(settings: Settings, job_id: str, carried: Job | None = None) -> JobContext | None:
    """The job's context; a carried job with no row yet gets its row (still `queued`)."""
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
    if job is None and carried is not None:
        job = _insert_carried(settings, carried, JobStatus.QUEUED)
    return None if job is None else _context(settings, job)


def _insert_carried(settings: Settings, carried: Job, status: JobStatus) -> Job | None:
    """Write a carried job's row; None if a row is there already (a redelivered message)."""
    started = utcnow() if status is JobStatus.RUNNING else None
    row = {name: getattr(carried, name) for name in _JOB_COLUMNS}
    row.update(status=status, started_at=started, attempts=int(started is not None))
    try:
        with get_engine(settings).begin() as conn:
            conn.execute(_INSERT_JOB, row)
    except IntegrityError:
        if not _has_row(settings, carried.id):  # not a duplicate id: a broken reference
            raise
        return None
    carried.status, carried.started_at, carried.attempts = status, started, row["attempts"]
    return carried


def _has_row(settings: Settings, job_id: str) -> bool:
    with session_scope(settings) as s:
        return s.get(Job, job_id) is not None


_INSERT_JOB = insert(Job.__table__)  # type: ignore[attr-defined]
_JOB_COLUMNS = tuple(column.name for column in Job.__table__.columns)  # type: ignore[attr-defined]


@dataclass
class Claim:
    """What `claim` found: a context to run, or why not (`ctx` is then set only to end it)."""

    ctx: JobContext | None
    expired: bool = False


def claim(
    settings: Settings, job_id: str, carried: Job | None = None, *, fresh_tried: bool = False
) -> Claim:
    """`queued → running` (or a redelivered `running` job taken over) in one transaction.

    A carried job (its row not written by the API) is claimed by inserting its row as
    `running` (`claim_fresh`), unless `fresh_tried` says the caller did that already. A job
    whose TTL ran out is not claimed: `expired` asks the caller to end it.
    """
    if carried is not None and not fresh_tried:
        fresh = claim_fresh(settings, carried)
        if fresh is not None:
            return fresh
        # A row exists: a redelivered message, its first copy's worker died. Take it over.
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.status not in LIVE:
            return Claim(None)
        if job.expires_at and utcnow() > job.expires_at:
            return Claim(_context(settings, job), expired=True)
        stmt = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_(LIVE))
            .values(status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1)
        )
        if update_rows(s, stmt) != 1:
            return Claim(None)
    return Claim(_context(settings, job))


def claim_fresh(settings: Settings, carried: Job) -> Claim | None:
    """A carried job's first claim: its row inserted as `running`, one statement on the hot
    path of every request; None if a row is there already (a redelivered message).

    Safe before the run lock is known to be held: a fresh insert means no other copy has
    claimed the job, and a copy that holds the lock takes the row over. A job whose TTL ran
    out gets its row (`queued`) and comes back `expired`.
    """
    if carried.expires_at and utcnow() > carried.expires_at:
        ctx = load(settings, carried.id, carried)
        if ctx is None or ctx.job.status not in LIVE:  # another copy ended it
            return Claim(None)
        return Claim(ctx, expired=True)
    job = _insert_carried(settings, carried, JobStatus.RUNNING)
    return None if job is None else Claim(_context(settings, job))


def claim_unsaved(settings: Settings, carried: Job) -> Claim:
    """A carried job taken without writing anything: its row is inserted once, ended, by
    `finish` (one write on the request's path instead of two).

    For a job only its caller waits for (a non-streaming `/v1/infer`: nobody can ask about
    it before the answer names it), taken under its run lock, not past its TTL, and with no
    stream yet (a redelivered copy of an ended job finds its events: `JobLock.ended`).
    """
    carried.status, carried.started_at, carried.attempts = JobStatus.RUNNING, utcnow(), 1
    ctx = _context(settings, carried)
    ctx.unsaved = True
    return Claim(ctx)


def unclaim(settings: Settings, job_id: str) -> None:
    """Undo `claim_fresh` (`running → queued`) for a job found cancelled before it ran."""
    stmt = (
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, started_at=None, attempts=Job.attempts - 1)
    )
    with session_scope(settings) as s:
        update_rows(s, stmt)


def finish(settings: Settings, ctx: JobContext, end: Terminal) -> bool:
    """Write the terminal state and its usage event in one transaction; False if already ended.

    An unsaved job's row is inserted here, ended; if a row is there already (another copy
    wrote it), a live one is ended as a saved job's is and an ended one is left alone.
    """
    job = ctx.job
    now = utcnow()
    ended = {
        "job_id": job.id,
        "status": end.status,
        "result": end.result,
        "error_code": end.error_code,
        "error_message": (end.error_message or None) and end.error_message[:2000],
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "timings": end.timings,
        "finished_at": now,
    }
    usage, touches = _usage_of(job, end, now), None
    if ctx.unsaved:
        touches = _touches(job, now)  # due ones pick the transaction
        row = {name: getattr(job, name) for name in _JOB_COLUMNS}
        row.update({name: ended[name] for name in _ENDED_COLUMNS})
        try:
            engine = get_engine(settings)
            if usage is not None and not touches and engine.dialect.name == "postgresql":
                # One statement, atomic on its own: one round trip in autocommit instead of
                # BEGIN, two INSERTs and COMMIT (0.54 → 0.28 ms on the local PostgreSQL).
                both = {**row, **{f"u_{name}": value for name, value in usage.items()}}
                with engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.execute(_INSERT_ENDED_WITH_USAGE, both)
            else:
                with engine.begin() as conn:
                    conn.execute(_INSERT_JOB, row)
                    _record_usage(conn, usage, touches)
            ctx.unsaved = False
            return True
        except IntegrityError:
            # A row is there: another copy wrote it (an older worker's claim, or a copy
            # that ended it). A live row is taken over below; an ended one is left as is.
            if not _has_row(settings, job.id):  # not a duplicate id: a broken reference
                raise
            ctx.unsaved = False
    # Prebuilt Core statements on one connection: no ORM session, identity map, flush or
    # statement building on the path of every request.
    with get_engine(settings).begin() as conn:
        if conn.execute(_FINISH_JOB, ended).rowcount != 1:
            return False  # taken only once a row is ended: an ignored end touches nothing
        _record_usage(conn, usage, _touches(job, now) if touches is None else touches)
    return True


def _usage_of(job: Job, end: Terminal, now: datetime) -> dict[str, Any] | None:
    """The ended job's usage event; None when it produced nothing billable."""
    if end.completion_tokens <= 0 and end.status is not JobStatus.SUCCEEDED:
        return None
    return {
        "id": new_id("ue"),
        "job_id": job.id,
        "account_id": job.account_id,
        "api_key_id": job.api_key_id,
        "model_id": job.model_id,
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "occurred_at": now,
        "push_state": PushState.PENDING,
        "attempts": 0,
        "key_of_customer": job.api_key_id,
        "account_of_customer": job.account_id,
    }


def _touches(job: Job, now: datetime) -> list[Update]:
    """The once-a-minute touches of the job's model and key that are due (now taken)."""
    due: list[Update] = []
    if _due(f"model:{job.model_id}"):
        model_row = update(Model).where(col(Model.id) == job.model_id)
        due.append(model_row.values(last_invoked_at=now))
    if job.api_key_id and _due(f"key:{job.api_key_id}"):
        key_row = update(ApiKey).where(col(ApiKey.id) == job.api_key_id)
        due.append(key_row.values(last_used_at=now))
    return due


def _record_usage(conn: Connection, usage: dict[str, Any] | None, touches: list[Update]) -> None:
    """The usage event and the due touches, on the finishing transaction."""
    if usage is not None:
        conn.execute(_INSERT_USAGE, usage)
    for touch in touches:
        conn.execute(touch)


_ENDED_COLUMNS = ("status", "result", "error_code", "error_message", "prompt_tokens",
                  "completion_tokens", "timings", "finished_at")  # fmt: skip
_FINISH_JOB = (
    update(Job)
    .where(col(Job.id) == bindparam("job_id"), col(Job.status).in_(LIVE))
    .values({name: bindparam(name) for name in _ENDED_COLUMNS})
)


# The Stripe customer the usage is billed to, read in the same statement as it is at this
# commit (not at the claim): the key's own, else its account's.
def _customer(prefix: str = "") -> Any:
    return func.coalesce(
        select(ApiKey.billed_customer_id)
        .where(col(ApiKey.id) == bindparam(f"{prefix}key_of_customer"))
        .scalar_subquery(),
        select(Account.stripe_customer_id)
        .where(col(Account.id) == bindparam(f"{prefix}account_of_customer"))
        .scalar_subquery(),
    )


_INSERT_USAGE = insert(UsageEvent.__table__).values(stripe_customer_id=_customer())  # type: ignore[attr-defined]


def _insert_ended_with_usage() -> Insert:
    """PostgreSQL's one-statement finish of an unsaved job: its ended row (the `_INSERT_JOB`
    parameters) and its usage event (`_INSERT_USAGE`'s, prefixed `u_`), the event reading the
    job id the row's INSERT returned. A duplicate job id fails the whole statement."""
    job_table, usage_table = Job.__table__, UsageEvent.__table__  # type: ignore[attr-defined]
    row = {name: bindparam(name, type_=job_table.c[name].type) for name in _JOB_COLUMNS}
    written = insert(job_table).values(row).returning(job_table.c.id).cte("ended_job")
    names = ("id", "account_id", "api_key_id", "model_id", "prompt_tokens",
             "completion_tokens", "occurred_at", "push_state", "attempts")  # fmt: skip
    values = [bindparam(f"u_{name}", type_=usage_table.c[name].type) for name in names]
    source = sa_select(*values, written.c.id, _customer("u_"))
    columns = [*names, "job_id", "stripe_customer_id"]
    return insert(usage_table).from_select(columns, source)


_INSERT_ENDED_WITH_USAGE = _insert_ended_with_usage()


# `last_invoked_at` (idle deletion, days) and `last_used_at` (shown to owners) need not move on
# every request: each worker process writes them at most once a minute per model and key,
# which keeps two UPDATEs off the hot path.
TOUCH_EVERY_S = 60.0
_touched: dict[str, float] = {}
_touch_lock = threading.Lock()


def _due(name: str) -> bool:
    now = time.monotonic()
    with _touch_lock:
        if now - _touched.get(name, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return False
        if len(_touched) > 100_000:  # a long-lived worker serving many keys
            _touched.clear()
        _touched[name] = now
        return True

"""Batch progress, read from its jobs' states, and closing a batch exactly once.

Shared by the API (cancel) and the workers (a batch job ended): whoever ends the last live
job of a batch closes it, and only the call that closes it sends the batch's webhook.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from core.db import update_rows
from core.tables import Batch, Job, JobStatus, utcnow

LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class Progress:
    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0  # failed or timed out
    cancelled: int = 0

    @property
    def live(self) -> int:
        return self.queued + self.running


def progress(session: Session, batch: Batch) -> Progress:
    stmt = (
        select(Job.status, func.count())
        .where(col(Job.batch_id) == batch.id)
        .group_by(col(Job.status))
    )
    n = {JobStatus(status): count for status, count in session.exec(stmt)}
    return Progress(
        total=batch.total,
        queued=n.get(JobStatus.QUEUED, 0),
        running=n.get(JobStatus.RUNNING, 0),
        succeeded=n.get(JobStatus.SUCCEEDED, 0),
        failed=n.get(JobStatus.FAILED, 0) + n.get(JobStatus.TIMED_OUT, 0),
        cancelled=n.get(JobStatus.CANCELLED, 0),
    )


def status_of(batch: Batch, p: Progress) -> str:
    """`queued | running | completed | cancelled`."""
    if batch.cancelled_at is not None:
        return "cancelled"
    if batch.finished_at is not None:
        return "completed"
    return "queued" if p.queued == p.total else "running"


def close_if_done(session: Session, batch_id: str) -> Batch | None:
    """Mark the batch finished once no job of it is live; the batch if this call closed it.

    Called after the caller's own job change committed, so the last of several concurrent
    callers always sees every job ended; the compare-and-set lets exactly one close it.
    """
    live = select(func.count()).where(col(Job.batch_id) == batch_id, col(Job.status).in_(LIVE))
    if session.exec(live).one() > 0:
        return None
    stmt = (
        update(Batch)
        .where(col(Batch.id) == batch_id, col(Batch.finished_at).is_(None))
        .values(finished_at=utcnow())
    )
    closed = update_rows(session, stmt) == 1
    session.commit()
    return session.get(Batch, batch_id) if closed else None

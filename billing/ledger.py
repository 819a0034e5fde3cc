"""The usage ledger's push state: claiming under concurrency, and recording outcomes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from core.db import update_rows
from core.ids import new_id
from core.tables import Account, ApiKey, PushState, UsageEvent

# Stripe refuses meter events older than 35 days; a margin keeps a send from racing the edge.
STRIPE_WINDOW = timedelta(days=35) - timedelta(minutes=10)
EXPIRED_MESSAGE = "older than Stripe's 35-day meter event window; never sent"
_CHUNK = 500


def _free(now: datetime) -> object:
    return or_(col(UsageEvent.claimed_until).is_(None), col(UsageEvent.claimed_until) < now)


def expire_old(session: Session, now: datetime) -> int:
    """Pending events Stripe would refuse become `expired` (operators see them; never sent)."""
    stmt = (
        update(UsageEvent)
        .where(col(UsageEvent.push_state) == PushState.PENDING)
        .where(col(UsageEvent.occurred_at) < now - STRIPE_WINDOW, _free(now))  # type: ignore[arg-type]
        .values(push_state=PushState.EXPIRED, last_error=EXPIRED_MESSAGE, claim_token=None)
    )
    return update_rows(session, stmt)


def claim(
    session: Session, *, now: datetime, limit: int, lease_s: int, customer: str | None = None
) -> tuple[str, list[UsageEvent]]:
    """Lease up to `limit` due pending events to a new claim token, oldest first.

    PostgreSQL: the inner SELECT takes row locks with SKIP LOCKED, so concurrent pushers
    split the backlog. SQLite: one UPDATE statement runs under the database's single write
    lock, which gives the same exclusion. A pusher that dies loses its lease at
    `claimed_until`; the next one resends with the same identifiers, which Stripe dedups.
    """
    token = new_id("clm")
    due = (
        select(UsageEvent.id)
        .where(col(UsageEvent.push_state) == PushState.PENDING, _free(now))  # type: ignore[arg-type]
        .where(
            or_(col(UsageEvent.next_attempt_at).is_(None), col(UsageEvent.next_attempt_at) <= now)
        )
        .order_by(col(UsageEvent.occurred_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if customer is not None:
        due = due.where(col(UsageEvent.stripe_customer_id) == customer)
    stmt = (
        update(UsageEvent)
        .where(col(UsageEvent.id).in_(due.scalar_subquery()))
        .values(claim_token=token, claimed_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    update_rows(session, stmt)
    session.commit()
    rows = session.exec(select(UsageEvent).where(col(UsageEvent.claim_token) == token))
    return token, sorted(rows, key=lambda e: e.occurred_at)


def fill_customers(session: Session, events: Sequence[UsageEvent]) -> None:
    """Events written before their account was linked to a customer get it now."""
    for event in events:
        if event.stripe_customer_id:
            continue
        key = session.get(ApiKey, event.api_key_id) if event.api_key_id else None
        account = session.get(Account, event.account_id)
        event.stripe_customer_id = (key.billed_customer_id if key else None) or (
            account.stripe_customer_id if account else None
        )
        if event.stripe_customer_id:
            session.add(event)


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def mark_pushed(session: Session, token: str, ids: Sequence[str], now: datetime) -> int:
    done = 0
    for chunk in _chunks(ids):
        stmt = (
            update(UsageEvent)
            .where(col(UsageEvent.id).in_(chunk), col(UsageEvent.claim_token) == token)
            .values(
                push_state=PushState.PUSHED,
                pushed_at=now,
                attempts=UsageEvent.attempts + 1,
                claim_token=None,
                claimed_until=None,
                last_error=None,
            )
        )
        done += update_rows(session, stmt)
    return done


def mark_retry(
    session: Session, token: str, event: UsageEvent, error: str, now: datetime, max_s: int
) -> None:
    """Back off exponentially (1 s, 2 s, 4 s … `max_s`); the identifier stays the same."""
    attempts = event.attempts + 1
    delay = min(2 ** min(attempts - 1, 30), max_s)
    stmt = (
        update(UsageEvent)
        .where(col(UsageEvent.id) == event.id, col(UsageEvent.claim_token) == token)
        .values(
            attempts=attempts,
            last_error=error[:2000],
            next_attempt_at=now + timedelta(seconds=delay),
            claim_token=None,
            claimed_until=None,
        )
    )
    update_rows(session, stmt)


NO_CUSTOMER = "no Stripe customer is linked to this account or key"


def requeue_unlinked(
    session: Session, *, account_id: str | None = None, api_key_id: str | None = None
) -> int:
    """Usage set aside for want of a customer goes back to pending once one is linked."""
    stmt = update(UsageEvent).where(
        col(UsageEvent.push_state) == PushState.FAILED,
        col(UsageEvent.last_error) == NO_CUSTOMER,
        col(UsageEvent.stripe_customer_id).is_(None),
    )
    if account_id is not None:
        stmt = stmt.where(col(UsageEvent.account_id) == account_id)
    if api_key_id is not None:
        stmt = stmt.where(col(UsageEvent.api_key_id) == api_key_id)
    values = {"push_state": PushState.PENDING, "last_error": None, "next_attempt_at": None}
    return update_rows(session, stmt.values(**values))


def mark_failed(
    session: Session, token: str | None, ids: Sequence[str], error: str, *, bump: bool = True
) -> int:
    """Permanent failure: visible to operators, never resent automatically."""
    done = 0
    for chunk in _chunks(ids):
        stmt = update(UsageEvent).where(col(UsageEvent.id).in_(chunk))
        if token is not None:
            stmt = stmt.where(col(UsageEvent.claim_token) == token)
        values: dict[str, object] = {
            "push_state": PushState.FAILED,
            "last_error": error[:2000],
            "claim_token": None,
            "claimed_until": None,
        }
        if bump:
            values["attempts"] = UsageEvent.attempts + 1
        done += update_rows(session, stmt.values(**values))
    return done

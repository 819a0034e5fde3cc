"""Ledger sums per customer and hour against Stripe's meter event summaries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from billing.stripe_api import client_for
from core.settings import Settings
from core.tables import PushState, UsageEvent

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Drift:
    customer: str
    hour: datetime
    ledger: int
    stripe: int

    @property
    def delta(self) -> int:
        return self.stripe - self.ledger


def _hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ledger_sums(
    session: Session, start: datetime, end: datetime
) -> dict[tuple[str, datetime], int]:
    """Tokens the ledger says Stripe should hold: pushed and pending events with a customer."""
    stmt = (
        select(UsageEvent)
        .where(col(UsageEvent.occurred_at) >= start, col(UsageEvent.occurred_at) < end)
        .where(col(UsageEvent.stripe_customer_id).is_not(None))
        .where(col(UsageEvent.push_state).in_([PushState.PUSHED, PushState.PENDING]))
    )
    sums: dict[tuple[str, datetime], int] = {}
    for e in session.exec(stmt):
        key = (str(e.stripe_customer_id), _hour(e.occurred_at))
        sums[key] = sums.get(key, 0) + e.prompt_tokens + e.completion_tokens
    return sums


def stripe_sums(
    settings: Settings, customers: set[str], start: datetime, end: datetime
) -> dict[tuple[str, datetime], int]:
    client = client_for(settings)
    meters = client.v1.billing.meters.list()
    meter = next((m for m in meters.data if m.event_name == settings.stripe_meter_event_name), None)
    if meter is None:
        raise LookupError(f"no Stripe meter with event name {settings.stripe_meter_event_name!r}")
    sums: dict[tuple[str, datetime], int] = {}
    for customer in sorted(customers):
        params = {"customer": customer, "start_time": int(start.timestamp()),
                  "end_time": int(end.timestamp()), "value_grouping_window": "hour"}  # fmt: skip
        page = client.v1.billing.meters.event_summaries.list(meter.id, params)  # type: ignore[arg-type]
        for summary in page.auto_paging_iter():
            hour = datetime.fromtimestamp(summary.start_time, UTC)
            sums[(customer, hour)] = int(summary.aggregated_value)
    return sums


def reconcile(session: Session, settings: Settings, start: datetime, end: datetime) -> list[Drift]:
    """Every (customer, hour) where the ledger and Stripe disagree; empty means in sync."""
    start, end = _hour(start), _hour(end + HOUR - timedelta(microseconds=1))
    ours = ledger_sums(session, start, end)
    theirs = stripe_sums(settings, {c for c, _ in ours}, start, end)
    drift = [
        Drift(c, h, ours.get((c, h), 0), theirs.get((c, h), 0))
        for c, h in sorted(set(ours) | set(theirs))
        if ours.get((c, h), 0) != theirs.get((c, h), 0)
    ]
    return drift

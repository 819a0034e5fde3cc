"""Ledger sums per customer, meter and hour against Stripe's meter event summaries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from billing.pusher import meter_events
from billing.stripe_api import client_for
from core.settings import Settings
from core.tables import PushState, UsageEvent

HOUR = timedelta(hours=1)
Sums = dict[tuple[str, str, datetime], int]  # (meter event name, customer, hour) → tokens


@dataclass(frozen=True)
class Drift:
    meter: str  # the meter's event name
    customer: str
    hour: datetime
    ledger: int
    stripe: int

    @property
    def delta(self) -> int:
        return self.stripe - self.ledger


def _hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def meter_names(settings: Settings) -> list[str]:
    """The meters the pusher sends to under the current settings."""
    inp, out = settings.stripe_input_meter_event_name, settings.stripe_output_meter_event_name
    return [inp, out] if inp and out else [settings.stripe_meter_event_name]


def ledger_sums(session: Session, settings: Settings, start: datetime, end: datetime) -> Sums:
    """Tokens the ledger says each meter should hold: pushed and pending events with a customer.

    The split into meter events is the pusher's own, so with separate input and output meters
    prompt tokens are expected on the first and completion tokens on the second.
    """
    stmt = (
        select(UsageEvent)
        .where(col(UsageEvent.occurred_at) >= start, col(UsageEvent.occurred_at) < end)
        .where(col(UsageEvent.stripe_customer_id).is_not(None))
        .where(col(UsageEvent.push_state).in_([PushState.PUSHED, PushState.PENDING]))
    )
    sums: Sums = {}
    for event in session.exec(stmt):
        for ev in meter_events(settings, event):
            key = (ev.event_name, ev.customer, _hour(ev.timestamp))
            sums[key] = sums.get(key, 0) + ev.value
    return sums


def stripe_sums(settings: Settings, customers: set[str], start: datetime, end: datetime) -> Sums:
    client = client_for(settings)
    by_name = {m.event_name: m.id for m in client.v1.billing.meters.list().auto_paging_iter()}
    sums: Sums = {}
    for name in meter_names(settings):
        if name not in by_name:
            raise LookupError(f"no Stripe meter with event name {name!r}")
        for customer in sorted(customers):
            params = {"customer": customer, "start_time": int(start.timestamp()),
                      "end_time": int(end.timestamp()),
                      "value_grouping_window": "hour"}  # fmt: skip
            page = client.v1.billing.meters.event_summaries.list(by_name[name], params)  # type: ignore[arg-type]
            for summary in page.auto_paging_iter():
                hour = datetime.fromtimestamp(summary.start_time, UTC)
                sums[(name, customer, hour)] = int(summary.aggregated_value)
    return sums


def reconcile(session: Session, settings: Settings, start: datetime, end: datetime) -> list[Drift]:
    """Every (meter, customer, hour) where the ledger and Stripe disagree; empty means in sync."""
    start, end = _hour(start), _hour(end + HOUR - timedelta(microseconds=1))
    ours = ledger_sums(session, settings, start, end)
    theirs = stripe_sums(settings, {c for _, c, _ in ours}, start, end)
    return [
        Drift(m, c, h, ours.get((m, c, h), 0), theirs.get((m, c, h), 0))
        for m, c, h in sorted(set(ours) | set(theirs))
        if ours.get((m, c, h), 0) != theirs.get((m, c, h), 0)
    ]

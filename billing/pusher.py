"""Sends ledger events to Stripe meter events: identifier = usage event id, time = occurrence."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import stripe

from billing import ledger
from billing.stripe_api import Outcome, classify, client_for, describe
from core.cluster_metrics import record_push_failures
from core.db import session_scope
from core.redis import get_redis
from core.settings import Settings
from core.tables import UsageEvent, utcnow

log = logging.getLogger("inferatech.billing")

STREAM_MAX_EVENTS = 100  # Stripe's limit per v2 meter_event_stream request
NO_CUSTOMER = ledger.NO_CUSTOMER


@dataclass(frozen=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: datetime


@dataclass
class PushReport:
    claimed: int = 0
    pushed: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: PushReport) -> None:
        self.claimed += other.claimed
        self.pushed += other.pushed
        self.retried += other.retried
        self.failed += other.failed
        self.expired += other.expired
        self.errors.extend(other.errors[:10])


def meter_events(settings: Settings, event: UsageEvent) -> list[MeterEvent]:
    """One `tokens` event by default; prompt and completion apart when two meters are set."""
    assert event.stripe_customer_id is not None
    when, cus = event.occurred_at, event.stripe_customer_id
    inp, out = settings.stripe_input_meter_event_name, settings.stripe_output_meter_event_name
    if inp and out:
        pairs = [(f"{event.id}.prompt", inp, event.prompt_tokens),
                 (f"{event.id}.completion", out, event.completion_tokens)]  # fmt: skip
        return [MeterEvent(i, n, cus, v, when) for i, n, v in pairs if v > 0]
    total = event.prompt_tokens + event.completion_tokens
    name = settings.stripe_meter_event_name
    return [MeterEvent(event.id, name, cus, total, when)] if total > 0 else []


# Senders: each returns, per usage event id, None (accepted) or the failure -----------------

Failure = tuple[Outcome, str]
Results = dict[str, Failure | None]


def send_v1(client: stripe.StripeClient, batch: Sequence[tuple[str, list[MeterEvent]]]) -> Results:
    results: Results = {}
    for usage_id, events in batch:
        results[usage_id] = None
        for ev in events:
            params: Any = {
                "event_name": ev.event_name,
                "identifier": ev.identifier,
                "timestamp": int(ev.timestamp.timestamp()),
                "payload": {"stripe_customer_id": ev.customer, "value": str(ev.value)},
            }
            try:
                client.v1.billing.meter_events.create(params)
            except stripe.StripeError as exc:
                outcome = classify(exc)
                if outcome is not Outcome.DUPLICATE:  # already there: as good as accepted
                    results[usage_id] = (outcome, describe(exc))
                    break
        failure = results[usage_id]
        if failure is not None and failure[0] is Outcome.CREDENTIALS:
            break  # every later call would fail the same way; they stay pending
    return results


class StreamSession:
    """A v2 meter event session token, shared by one process's pushers, renewed before expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = datetime.min.replace(tzinfo=UTC)

    def token(self, client: stripe.StripeClient, *, renew: bool = False) -> str:
        with self._lock:
            if renew or self._token is None or self._expires - timedelta(minutes=1) < utcnow():
                session = client.v2.billing.meter_event_session.create()
                self._token = str(session.authentication_token)
                expires = session.expires_at
                self._expires = (
                    expires if isinstance(expires, datetime)
                    else datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
                )  # fmt: skip
            return self._token


_SESSIONS: dict[stripe.StripeClient, StreamSession] = {}  # one per API key and address


def _stream_request(client: stripe.StripeClient, events: list[MeterEvent]) -> None:
    body: Any = {
        "events": [
            {
                "event_name": ev.event_name,
                "identifier": ev.identifier,
                "timestamp": ev.timestamp.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "payload": {"stripe_customer_id": ev.customer, "value": str(ev.value)},
            }
            for ev in events
        ]
    }
    session = _SESSIONS.setdefault(client, StreamSession())
    for renew in (False, True):
        token = session.token(client, renew=renew)
        try:
            client.v2.billing.meter_event_stream.create(body, {"api_key": token})
            return
        except stripe.StripeError as exc:
            if classify(exc) is not Outcome.SESSION or renew:
                raise


def send_stream(
    client: stripe.StripeClient, batch: Sequence[tuple[str, list[MeterEvent]]]
) -> Results:
    """Up to 100 meter events a request; a request's outcome is each of its events' outcome."""
    results: Results = {}
    chunk: list[tuple[str, list[MeterEvent]]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not chunk:
            return
        failure: Failure | None = None
        try:
            _stream_request(client, [ev for _, evs in chunk for ev in evs])
        except stripe.StripeError as exc:
            failure = (classify(exc), describe(exc))
        for usage_id, _ in chunk:
            results[usage_id] = failure
        chunk.clear()
        size = 0

    for usage_id, events in batch:
        if size + len(events) > STREAM_MAX_EVENTS:
            flush()
        chunk.append((usage_id, events))
        size += len(events)
    flush()
    return results


Sender = Callable[[stripe.StripeClient, Sequence[tuple[str, list[MeterEvent]]]], Results]


def push_once(
    settings: Settings, *, now: datetime | None = None, customer: str | None = None
) -> PushReport:
    """Claim one batch of due events and send it; idles when Stripe is not configured."""
    report = PushReport()
    if not settings.stripe_configured:
        return report
    explicit, now = now is not None, now or utcnow()
    with session_scope(settings) as s:
        report.expired = ledger.expire_old(s, now)
    with session_scope(settings) as s:
        token, events = ledger.claim(
            s, now=now, limit=settings.billing_push_batch,
            lease_s=settings.billing_claim_lease_s, customer=customer,
        )  # fmt: skip
        ledger.fill_customers(s, events)
    report.claimed = len(events)
    if not events:
        return report
    orphans = [e.id for e in events if not e.stripe_customer_id]
    batch = [(e.id, meter_events(settings, e)) for e in events if e.stripe_customer_id]
    sender: Sender = send_stream if settings.stripe_meter_stream else send_v1
    results = sender(client_for(settings), [b for b in batch if b[1]])
    # Backoff counts from the failure (a timeout may have taken a while), or the caller's clock.
    _record(settings, token, events, orphans, batch, results, now if explicit else utcnow(), report)
    return report


def _record(
    settings: Settings,
    token: str,
    events: Sequence[UsageEvent],
    orphans: list[str],
    batch: Sequence[tuple[str, list[MeterEvent]]],
    results: Results,
    now: datetime,
    report: PushReport,
) -> None:
    by_id = {e.id: e for e in events}
    done = [uid for uid, evs in batch if not evs or (uid in results and results[uid] is None)]
    with session_scope(settings) as s:
        report.pushed = ledger.mark_pushed(s, token, done, utcnow())
        report.failed = ledger.mark_failed(s, token, orphans, NO_CUSTOMER)
        for uid, evs in batch:
            if not evs or uid in done:
                continue
            outcome, error = results.get(uid) or (Outcome.RETRY, "not sent: batch stopped")
            if outcome is Outcome.PERMANENT:
                report.failed += ledger.mark_failed(s, token, [uid], error)
            else:
                ledger.mark_retry(s, token, by_id[uid], error, now, settings.billing_retry_max_s)
                report.retried += 1
            if len(report.errors) < 10:
                report.errors.append(f"{uid}: {error}")
    if report.errors:
        log.warning("billing push: %d retried, %d failed; first: %s",
                    report.retried, report.failed, report.errors[0])  # fmt: skip


def push_all(
    settings: Settings, *, now: datetime | None = None, customer: str | None = None,
    max_batches: int = 1000,
) -> PushReport:  # fmt: skip
    """Push batches until none is due (events backing off or leased elsewhere stay)."""
    total = PushReport()
    for _ in range(max_batches):
        report = push_once(settings, now=now, customer=customer)
        total.add(report)
        if report.claimed < settings.billing_push_batch:
            break
    if total.retried or total.failed:
        _count_failures(settings, total)
    return total


def _count_failures(settings: Settings, report: PushReport) -> None:
    """For `/metrics`, through Redis; a metric is never a reason for a push to fail."""
    try:
        record_push_failures(get_redis(settings), retried=report.retried, failed=report.failed)
    except (redis.RedisError, RuntimeError):  # RuntimeError: no Redis configured (the CLI)
        log.warning("could not count billing push failures in Redis")

"""Stripe webhooks: signature check, once-only processing, out-of-order tolerant effects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from billing import ledger
from billing.customers import SUSPENDED, apply_status
from billing.stripe_api import client_for
from core.errors import InvalidRequest, NotImplementedByConfig, ServiceUnavailable
from core.settings import Settings
from core.tables import Account, ProcessedWebhookEvent, PushState, UsageEvent

TOLERANCE_S = 300
METER_ERROR = "v1.billing.meter.error_report_triggered"
MAX_BODY_BYTES = 1024 * 1024


class WebhookSignatureInvalid(InvalidRequest):
    code = "WEBHOOK_SIGNATURE_INVALID"


@dataclass
class Handled:
    event_id: str
    type: str
    duplicate: bool = False
    flush_customer: str | None = None  # invoice.finalized: push this customer's usage now


def verify(settings: Settings, payload: bytes, signature: str | None) -> dict[str, Any]:
    """The event, once its `Stripe-Signature` (any of its v1 signatures) checks out."""
    if settings.stripe_webhook_secret is None:
        raise NotImplementedByConfig(
            "Stripe webhooks are not configured: set INFERATECH_STRIPE_WEBHOOK_SECRET"
        )
    if not signature:
        raise WebhookSignatureInvalid("missing Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
        secret = settings.stripe_webhook_secret.get_secret_value()
        stripe.WebhookSignature.verify_header(text, signature, secret, TOLERANCE_S)
    except (UnicodeDecodeError, stripe.SignatureVerificationError) as exc:
        raise WebhookSignatureInvalid(f"signature verification failed: {exc}") from None
    try:
        event = json.loads(text)
    except ValueError:
        raise InvalidRequest("webhook body is not JSON") from None
    if not isinstance(event, dict) or not _is_event(event):
        raise InvalidRequest("webhook body is not a Stripe event (id and type required)")
    return event


def complete(settings: Settings, event: dict[str, Any]) -> dict[str, Any]:
    """A thin (v2) meter error event names the error but carries no details: fetch them.

    Runs before the event is recorded, so a Stripe outage answers 503 and Stripe redelivers.
    """
    if event["type"] != METER_ERROR or _reason(event) is not None:
        return event
    if not settings.stripe_configured:
        return event  # without an API key nothing was pushed, so no meter error is ours
    try:
        full = client_for(settings).v2.core.events.retrieve(event["id"])
    except stripe.StripeError as exc:
        raise ServiceUnavailable("Stripe is unavailable to expand a thin event; retry") from exc
    data: dict[str, Any] = json.loads(str(full)).get("data") or {}
    return {**event, "data": data}


def _reason(event: dict[str, Any]) -> dict[str, Any] | None:
    data = event.get("data")
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, dict) else None


def _is_event(event: dict[str, Any]) -> bool:
    ident, kind = event.get("id"), event.get("type")
    return isinstance(ident, str) and 0 < len(ident) <= 100 and isinstance(kind, str)


def _at(event: dict[str, Any]) -> datetime:
    created = event.get("created")
    if isinstance(created, int | float):
        return datetime.fromtimestamp(created, UTC)
    if isinstance(created, str):  # v2 (thin) events carry RFC 3339 times
        return datetime.fromisoformat(created.replace("Z", "+00:00"))
    raise InvalidRequest("webhook event has no `created` time")


def _obj(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{event['type']} event without data.object")
    return obj


def _str(value: Any) -> str | None:
    if isinstance(value, dict):  # an expanded object
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _invoice_subscription(invoice: dict[str, Any]) -> str | None:
    sub = _str(invoice.get("subscription"))
    parent = invoice.get("parent")
    if sub is None and isinstance(parent, dict):
        details = parent.get("subscription_details")
        sub = _str(details.get("subscription")) if isinstance(details, dict) else None
    return sub


def handle(session: Session, event: dict[str, Any]) -> Handled:
    """Record the event id and apply its effect in one transaction; a replay is a no-op."""
    handled = Handled(event["id"], event["type"])
    session.add(ProcessedWebhookEvent(id=event["id"], type=event["type"][:100]))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        handled.duplicate = True
        return handled
    _apply(session, event, handled)
    session.commit()
    return handled


def _apply(session: Session, event: dict[str, Any], handled: Handled) -> None:
    kind, at = event["type"], _at(event)
    if kind == METER_ERROR:
        _meter_errors(session, event)
        return
    if not kind.startswith(("customer.subscription.", "invoice.", "checkout.session.")):
        return  # acknowledged, nothing to do
    obj = _obj(event)
    customer = _str(obj.get("customer"))
    if customer is None:
        return
    if kind == "checkout.session.completed":
        _link_account(session, _str(obj.get("client_reference_id")), customer)
        if _str(obj.get("subscription")):
            apply_status(session, customer, "active", at, _str(obj.get("subscription")))
    elif kind in ("customer.subscription.created", "customer.subscription.updated"):
        apply_status(session, customer, str(obj.get("status") or ""), at, _str(obj.get("id")))
    elif kind == "customer.subscription.deleted":
        apply_status(session, customer, "canceled", at, _str(obj.get("id")))
    elif kind == "invoice.paid":
        apply_status(session, customer, "active", at, _invoice_subscription(obj))
    elif kind == "invoice.payment_failed":
        apply_status(session, customer, "past_due", at, _invoice_subscription(obj))
    elif kind == "invoice.finalized":
        handled.flush_customer = customer


def _link_account(session: Session, account_id: str | None, customer: str) -> None:
    account = session.get(Account, account_id) if account_id else None
    if account is not None and account.stripe_customer_id in (None, customer):
        account.stripe_customer_id = customer
        session.add(account)
        ledger.requeue_unlinked(session, account_id=account.id)


def _meter_errors(session: Session, event: dict[str, Any]) -> None:
    """Stripe rejected some meter events after accepting them: mark those ledger rows failed."""
    reason = _reason(event)
    types = reason.get("error_types") if reason is not None else None
    for err in types if isinstance(types, list) else []:
        if not isinstance(err, dict):
            continue
        for sample in err.get("sample_errors") or []:
            request = (sample.get("api_request") or sample.get("request") or {}) if isinstance(
                sample, dict
            ) else {}  # fmt: skip
            ident = _str(request.get("identifier")) if isinstance(request, dict) else None
            if ident is None:
                continue
            usage_id = ident.removesuffix(".prompt").removesuffix(".completion")
            message = f"Stripe meter error {err.get('code')}: {sample.get('error_message')}"
            stmt = (
                update(UsageEvent)
                .where(col(UsageEvent.id) == usage_id)
                .values(push_state=PushState.FAILED, last_error=message[:2000])
            )
            session.execute(stmt)


__all__ = ["MAX_BODY_BYTES", "SUSPENDED", "Handled", "complete", "handle", "verify"]

"""Billing: Stripe webhooks, the billing portal, usage reports, operators' view of the ledger."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, col, select

from api.deps import AuthCacheDep, CurrentAccount, SessionDep, SettingsDep, require_operator
from api.inference.auth_cache import AuthCache
from api.schemas import CustomerLinked
from billing import webhooks
from billing.customers import ensure_customer, portal_url
from billing.stripe_api import require_configured
from billing.usage import usage_report
from core.db import get_engine
from core.errors import InvalidRequest, PayloadTooLarge
from core.queue import BILLING_PUSH_TASK
from core.settings import Settings
from core.tables import PushState, UsageEvent, utcnow

router = APIRouter(tags=["billing"])
MAX_USAGE_SPAN = timedelta(days=366)


async def _raw_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"webhook bodies are limited to {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"webhook bodies are limited to {limit} bytes")
    return bytes(body)


def _process(
    settings: Settings, celery: Celery, auth_cache: AuthCache, payload: bytes, sig: str | None
) -> Any:
    event = webhooks.complete(settings, webhooks.verify(settings, payload, sig))
    with Session(get_engine(settings), expire_on_commit=False) as session:
        handled = webhooks.handle(session, event)
    auth_cache.clear()  # a subscription may have been suspended: re-check every key
    if handled.flush_customer:  # invoice.finalized: its usage goes out before anything else
        celery.send_task(BILLING_PUSH_TASK, kwargs={"customer": handled.flush_customer})
    return {"received": True, "id": handled.event_id, "duplicate": handled.duplicate}


@router.post("/v1/billing/webhooks/stripe")
async def stripe_webhook(
    request: Request,
    settings: SettingsDep,
    stripe_signature: Annotated[str | None, Header()] = None,
) -> Any:
    """Stripe's signed events; a duplicate delivery is acknowledged and changes nothing."""
    payload = await _raw_body(request, webhooks.MAX_BODY_BYTES)
    return await run_in_threadpool(
        _process,
        settings,
        request.app.state.celery,
        request.app.state.auth_cache,
        payload,
        stripe_signature,
    )


@router.post("/v1/billing/portal")
def billing_portal(session: SessionDep, settings: SettingsDep, account: CurrentAccount) -> Any:
    """A Stripe billing-portal link for the account (501 when Stripe is not configured)."""
    require_configured(settings)
    return {"url": portal_url(session, settings, account)}


@router.post("/v1/billing/customer")
def billing_customer(
    session: SessionDep, settings: SettingsDep, account: CurrentAccount, auth_cache: AuthCacheDep
) -> CustomerLinked:
    """The account's Stripe customer, created now if signup could not reach Stripe (501 without)."""
    require_configured(settings)
    before = account.stripe_customer_id
    customer = ensure_customer(session, settings, account)
    if customer != before:
        auth_cache.clear()  # cached grants were checked against the old (absent) customer
    return CustomerLinked(id=account.id, stripe_customer_id=customer)


@router.get("/v1/usage")
def usage(
    session: SessionDep,
    settings: SettingsDep,
    account: CurrentAccount,
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
    group_by: Literal["day", "model", "key"] = "day",
) -> Any:
    """Tokens and cost from the ledger, per day, model or key (default: the last 30 days)."""
    end = _aware(end) if end else utcnow()
    start = _aware(start) if start else end - timedelta(days=30)
    if start >= end:
        raise InvalidRequest("`from` must be before `to`")
    if end - start > MAX_USAGE_SPAN:
        raise InvalidRequest("a usage report spans at most 366 days")
    report = usage_report(
        session, settings, account_id=account.id, start=start, end=end, group_by=group_by
    )
    return {"from": start, "to": end, **report}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


@router.get("/v1/billing/events", dependencies=[Depends(require_operator)])
def billing_events(
    session: SessionDep,
    status: PushState = PushState.FAILED,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """Ledger events by push state, newest first (operator token)."""
    stmt = (
        select(UsageEvent)
        .where(col(UsageEvent.push_state) == status)
        .order_by(col(UsageEvent.occurred_at).desc())
        .limit(limit)
    )
    rows = [_event_public(e) for e in session.exec(stmt)]
    return {"data": rows, "count": len(rows)}


def _event_public(e: UsageEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "account_id": e.account_id,
        "api_key_id": e.api_key_id,
        "model_id": e.model_id,
        "stripe_customer_id": e.stripe_customer_id,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "occurred_at": e.occurred_at,
        "push_state": e.push_state.value,
        "attempts": e.attempts,
        "last_error": e.last_error,
        "pushed_at": e.pushed_at,
    }

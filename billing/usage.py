"""Usage reports from the ledger: tokens and cost, grouped by day, model or key."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from billing.pricing import price_for
from core.settings import Settings
from core.tables import Model, PushState, UsageEvent

GroupBy = Literal["day", "model", "key"]
MICRO = Decimal("0.000001")


def _group_column(session: Session, group_by: GroupBy) -> Any:
    if group_by == "model":
        return col(UsageEvent.model_id)
    if group_by == "key":
        return func.coalesce(col(UsageEvent.api_key_id), "")
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", col(UsageEvent.occurred_at)), "YYYY-MM-DD")
    return func.substr(col(UsageEvent.occurred_at), 1, 10)  # SQLite stores UTC text


def usage_report(
    session: Session,
    settings: Settings,
    *,
    account_id: str,
    start: datetime,
    end: datetime,
    group_by: GroupBy,
) -> dict[str, Any]:
    """Sums per group (and model, for pricing); the totals are the ledger's totals."""
    group = _group_column(session, group_by).label("grp")
    stmt = (
        sa_select(
            group,
            col(UsageEvent.model_id),
            func.sum(col(UsageEvent.prompt_tokens)),
            func.sum(col(UsageEvent.completion_tokens)),
            func.count(),
        )
        .where(col(UsageEvent.account_id) == account_id)
        .where(col(UsageEvent.occurred_at) >= start, col(UsageEvent.occurred_at) < end)
        .where(col(UsageEvent.push_state) != PushState.EXPIRED)
        .group_by(group, col(UsageEvent.model_id))
    )
    rows = session.execute(stmt).all()
    sizes = _model_sizes(session, {r[1] for r in rows})
    groups: dict[str, dict[str, Any]] = {}
    for grp, model_id, prompt, completion, events in rows:
        price = price_for(settings, model_id, sizes.get(model_id, 0))
        g = groups.setdefault(str(grp or "none"), _zero())
        g["prompt_tokens"] += int(prompt or 0)
        g["completion_tokens"] += int(completion or 0)
        g["events"] += int(events)
        g["cost"] += price.cost(int(prompt or 0), int(completion or 0))
    total = _zero()
    data = []
    for name in sorted(groups):
        g = groups[name]
        for field in ("prompt_tokens", "completion_tokens", "events", "cost"):
            total[field] += g[field]
        data.append({"group": name, **_public(g)})
    return {"group_by": group_by, "data": data, "total": _public(total)}


def _zero() -> dict[str, Any]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "events": 0, "cost": Decimal(0)}


def _public(g: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": g["prompt_tokens"],
        "completion_tokens": g["completion_tokens"],
        "total_tokens": g["prompt_tokens"] + g["completion_tokens"],
        "events": g["events"],
        "cost_usd": str(g["cost"].quantize(MICRO)),
    }


def _model_sizes(session: Session, ids: set[str]) -> dict[str, int]:
    if not ids:
        return {}
    stmt = select(Model.id, Model.total_bytes).where(col(Model.id).in_(ids))
    return {mid: size for mid, size in session.exec(stmt)}

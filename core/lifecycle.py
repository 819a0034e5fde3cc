"""Model and job data lifecycle shared by the API (owner deletes) and beat tasks (retention)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.storage.base import ObjectStorage
from core.tables import ApiKey, Job, Model, ModelStatus, utcnow

PURGE_BATCH = 500
# What a caller sent that retention drops: a prompt, a chat, texts to embed.
PAYLOAD_PARAMS = frozenset({"prompt", "messages", "input", "session"})


def delete_model(*, session: Session, storage: ObjectStorage, model: Model) -> None:
    """Soft-delete the row, revoke its keys, remove its objects."""
    now = utcnow()
    model.status = ModelStatus.DELETED
    model.deleted_at = model.updated_at = now
    session.add(model)
    # Router-scoped keys name the router's default model only as a placeholder: they stay.
    stmt = select(ApiKey).where(col(ApiKey.model_id) == model.id, col(ApiKey.router_id).is_(None))
    for key in session.exec(stmt):
        key.revoked_at = key.revoked_at or now
        session.add(key)
    session.commit()
    storage.delete_prefix(f"{model.account_id}/{model.id}/")


def idle_models(session: Session, days: int) -> list[Model]:
    """Ready models not invoked (or, never invoked, not validated) for `days` days."""
    cutoff = utcnow() - timedelta(days=days)
    last = func.coalesce(col(Model.last_invoked_at), col(Model.validated_at), col(Model.created_at))
    stmt = select(Model).where(col(Model.status) == ModelStatus.READY, last < cutoff)
    return list(session.exec(stmt))


def purge_expired_payloads(session: Session) -> int:
    """Drop prompts and completions of jobs past their TTL; counts and timings stay."""
    now = utcnow()
    stmt = (
        select(Job)
        .where(col(Job.finished_at).is_not(None), col(Job.expires_at) < now)
        .where(col(Job.purged_at).is_(None))
        .limit(PURGE_BATCH)
    )
    jobs = list(session.exec(stmt))
    for job in jobs:
        job.params = {k: v for k, v in job.params.items() if k not in PAYLOAD_PARAMS}
        if job.result:
            job.result = {k: v for k, v in job.result.items() if k != "completion"}
        job.purged_at = now
        session.add(job)
    session.commit()
    return len(jobs)

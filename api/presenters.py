"""Table rows → public response models."""

from __future__ import annotations

from sqlmodel import Session, select

from api.schemas import (
    KeyPublic,
    ModelFilePublic,
    ModelPublic,
    PartUrlPublic,
    Rejection,
    UploadPublic,
)
from api.services.models import files_of
from core.storage.base import UploadPlan
from core.tables import ApiKey, Model, ModelStatus


def model_public(session: Session, model: Model, *, api_key: str | None = None) -> ModelPublic:
    first_key = session.exec(
        select(ApiKey).where(ApiKey.model_id == model.id).order_by(ApiKey.created_at)  # type: ignore[arg-type]
    ).first()
    rejection = None
    if model.status is ModelStatus.REJECTED and model.rejection_code:
        rejection = Rejection(code=model.rejection_code, message=model.rejection_message or "")
    return ModelPublic(
        id=model.id,
        name=model.name,
        status=model.status.value,
        format=model.format,
        sha256=model.sha256,
        total_bytes=model.total_bytes,
        files=[
            ModelFilePublic(
                path=f.path,
                size_bytes=f.size_bytes,
                uploaded=f.uploaded,
                sha256=f.sha256,
                kind=f.kind,
                converted_from=f.converted_from,
            )
            for f in files_of(session, model.id)
        ],
        rejection=rejection,
        created_at=model.created_at,
        updated_at=model.updated_at,
        validated_at=model.validated_at,
        api_key=api_key,
        api_key_prefix=first_key.display_prefix if first_key else None,
    )


def upload_public(path: str, plan: UploadPlan) -> UploadPublic:
    return UploadPublic(
        path=path,
        method=plan.method,
        url=plan.url,
        headers=plan.headers,
        upload_id=plan.upload_id,
        part_size=plan.part_size,
        parts=[PartUrlPublic(part_number=p.part_number, url=p.url) for p in plan.parts],
        expires_at=plan.expires_at,
    )


def key_public(key: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=key.id,
        name=key.name,
        model_id=key.model_id,
        router_id=key.router_id,
        prefix=key.display_prefix,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
        rate_limit_rpm=key.rate_limit_rpm,
        rate_limit_tpm=key.rate_limit_tpm,
        rate_limit_concurrency=key.rate_limit_concurrency,
        monthly_token_budget=key.monthly_token_budget,
        log_payloads=key.log_payloads,
    )

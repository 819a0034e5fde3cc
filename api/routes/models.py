"""Models: declare a bundle, upload, complete, read, delete."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import select

from api.deps import (
    AuthCacheDep,
    CeleryDep,
    CurrentAccount,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from api.presenters import model_public, upload_public
from api.schemas import (
    ModelComplete,
    ModelCreate,
    ModelCreated,
    ModelPublic,
    ModelsPublic,
    UploadPublic,
)
from api.services import models as svc
from core.tables import Model, ModelStatus

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201)
def create(
    body: ModelCreate,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: CurrentAccount,
) -> ModelCreated:
    """Declare a bundle's files; returns one signed upload plan per file."""
    model, plans = svc.create_model(
        session=session, storage=storage, settings=settings, owner=owner, model_in=body
    )
    public = model_public(session, model)
    return ModelCreated(
        **public.model_dump(), uploads=[upload_public(p, plan) for p, plan in plans]
    )


@router.post("/{model_id}/uploads")
def replan(
    model_id: str, session: SessionDep, storage: StorageDep, owner: CurrentAccount
) -> list[UploadPublic]:
    """Fresh upload URLs for the files not uploaded yet."""
    model = svc.get_owned_model(session, owner, model_id)
    return [
        upload_public(p, plan)
        for p, plan in svc.replan_uploads(session=session, storage=storage, model=model)
    ]


@router.post("/{model_id}/complete", status_code=202)
def complete(
    model_id: str,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: CurrentAccount,
    body: ModelComplete | None = None,
) -> ModelPublic:
    """Finalise the uploads and start validation (idempotent)."""
    model = svc.get_owned_model(session, owner, model_id)
    parts = body.parts if body else {}
    svc.complete_model(session=session, storage=storage, celery=celery, model=model, parts=parts)
    return model_public(session, model)


@router.get("/{model_id}")
def read(
    model_id: str, session: SessionDep, settings: SettingsDep, owner: CurrentAccount
) -> ModelPublic:
    """A model; the first read after it is ready carries its API key in plaintext, once."""
    model = svc.get_owned_model(session, owner, model_id)
    plaintext = svc.deliver_first_key(session=session, settings=settings, model=model)
    return model_public(session, model, api_key=plaintext)


@router.get("")
def list_models(session: SessionDep, owner: CurrentAccount) -> ModelsPublic:
    """The account's models, newest first."""
    stmt = (
        select(Model)
        .where(Model.account_id == owner.id, Model.status != ModelStatus.DELETED)
        .order_by(Model.created_at.desc())  # type: ignore[attr-defined]
    )
    rows = [model_public(session, m) for m in session.exec(stmt)]
    return ModelsPublic(data=rows, count=len(rows))


@router.delete("/{model_id}", status_code=204)
def delete(
    model_id: str,
    session: SessionDep,
    storage: StorageDep,
    owner: CurrentAccount,
    auth_cache: AuthCacheDep,
) -> Response:
    """Delete a model, revoke its keys and remove its files."""
    model = svc.get_owned_model(session, owner, model_id)
    svc.delete_model(session=session, storage=storage, model=model)
    auth_cache.forget_model(model.id)
    return Response(status_code=204)

"""Model lifecycle: upload plans, completion, validation start, key delivery, deletion."""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import update
from sqlmodel import Session, select

from api.schemas import CompletedPartIn, KeyCreate, ModelCreate
from core import keys
from core.bundles import path_problem
from core.db import update_rows
from core.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UploadIncomplete,
)
from core.ids import new_id
from core.lifecycle import delete_model as delete_model
from core.queue import VALIDATE_QUEUE, VALIDATE_TASK
from core.settings import Settings
from core.storage.base import CompletedPart, ObjectStorage, UploadPlan, UploadRejected
from core.tables import Account, ApiKey, Model, ModelFile, ModelStatus, utcnow

log = logging.getLogger("inferatech.models")


def object_key(account_id: str, model_id: str, path: str) -> str:
    return f"{account_id}/{model_id}/{path}"


def check_declaration(model_in: ModelCreate, settings: Settings) -> None:
    """Refuse unsafe names, unknown file types, too many files and oversized bundles."""
    if len(model_in.files) > settings.max_files_per_model:
        raise InvalidRequest(
            f"a bundle may hold at most {settings.max_files_per_model} files",
            details={"field": "files"},
        )
    seen: set[str] = set()
    for i, f in enumerate(model_in.files):
        problem = path_problem(f.path, max_length=settings.max_file_path_length)
        if problem:
            raise InvalidRequest(
                f"file path {f.path!r} {problem}", details={"field": f"files.{i}.path"}
            )
        if f.path.lower() in seen:
            raise InvalidRequest(
                f"file path {f.path!r} is listed twice", details={"field": f"files.{i}.path"}
            )
        seen.add(f.path.lower())
    total = sum(f.size_bytes for f in model_in.files)
    if total > settings.max_model_bytes:
        raise PayloadTooLarge(
            f"bundle is {total} bytes; the limit is {settings.max_model_bytes} bytes",
            details={"total_bytes": total, "max_model_bytes": settings.max_model_bytes},
        )


def create_model(
    *,
    session: Session,
    storage: ObjectStorage,
    settings: Settings,
    owner: Account,
    model_in: ModelCreate,
) -> tuple[Model, list[tuple[str, UploadPlan]]]:
    check_declaration(model_in, settings)
    model = Model(
        id=new_id("mdl"),
        account_id=owner.id,
        name=model_in.name,
        total_bytes=sum(f.size_bytes for f in model_in.files),
    )
    session.add(model)
    plans = []
    for decl in model_in.files:
        row = ModelFile(
            model_id=model.id,
            path=decl.path,
            size_bytes=decl.size_bytes,
            object_key=object_key(owner.id, model.id, decl.path),
        )
        plan = storage.plan_upload(row.object_key, row.size_bytes)
        _remember_plan(row, plan)
        session.add(row)
        plans.append((decl.path, plan))
    session.commit()
    return model, plans


def replan_uploads(
    *, session: Session, storage: ObjectStorage, model: Model
) -> list[tuple[str, UploadPlan]]:
    """Fresh upload URLs for the files not uploaded yet (expired URLs, a rejected part)."""
    if model.status is not ModelStatus.AWAITING_UPLOAD:
        raise InvalidRequest(f"model is {model.status.value}; uploads are closed")
    plans = []
    for row in files_of(session, model.id):
        if not row.uploaded:
            plan = storage.plan_upload(row.object_key, row.size_bytes)
            _remember_plan(row, plan)
            session.add(row)
            plans.append((row.path, plan))
    session.commit()
    return plans


def _remember_plan(row: ModelFile, plan: UploadPlan) -> None:
    row.upload_method = plan.method
    row.upload_id = plan.upload_id
    row.part_size = plan.part_size
    row.part_count = len(plan.parts)


def _plan_of(row: ModelFile) -> UploadPlan:
    return UploadPlan(
        method="multipart" if row.upload_method == "multipart" else "put",
        expires_at=utcnow(),
        upload_id=row.upload_id,
        part_size=row.part_size,
        parts=[],
    )


def files_of(session: Session, model_id: str) -> list[ModelFile]:
    stmt = select(ModelFile).where(ModelFile.model_id == model_id).order_by(ModelFile.path)
    return list(session.exec(stmt))


def get_owned_model(session: Session, owner: Account, model_id: str) -> Model:
    """The owner's live model; another account's id is indistinguishable from a missing one."""
    model = session.get(Model, model_id)
    if model is None or model.account_id != owner.id or model.status is ModelStatus.DELETED:
        raise ModelNotFound(f"no model {model_id!r} in this account")
    return model


def finalise_uploads(
    *,
    session: Session,
    storage: ObjectStorage,
    model: Model,
    parts: dict[str, list[CompletedPartIn]],
    strict: bool = True,
) -> bool:
    """Check every file's object against its declaration; True when all are in place.

    With `strict`, a missing object is an error the client sees (409); storage events pass
    `strict=False` because they arrive one file at a time.
    """
    unknown = set(parts) - {row.path for row in files_of(session, model.id)}
    if unknown:
        raise InvalidRequest(f"parts given for files not in the bundle: {sorted(unknown)}")
    missing = []
    for row in files_of(session, model.id):
        if row.uploaded:
            continue
        client_parts = [CompletedPart(p.part_number, p.etag) for p in parts.get(row.path, [])]
        try:
            storage.complete_upload(
                row.object_key, row.size_bytes, _plan_of(row), client_parts or None
            )
        except UploadRejected as exc:
            if exc.code == "UPLOAD_MISSING":
                missing.append(row.path)
                continue
            session.commit()  # keep the files already finalised
            raise InvalidRequest(
                f"{row.path}: {exc.message}; request new upload URLs with "
                f"POST /v1/models/{model.id}/uploads and upload it again",
                details={"code": exc.code, "path": row.path},
            ) from exc
        row.uploaded = True
        session.add(row)
    session.commit()
    if missing and strict:
        raise UploadIncomplete(
            f"not uploaded yet: {', '.join(missing)}", details={"missing": missing}
        )
    return not missing


def start_validation(*, session: Session, celery: Celery, model: Model) -> bool:
    """Move `awaiting_upload → validating` once and enqueue the task; False if already moved."""
    stmt = (
        update(Model)
        .where(Model.id == model.id, Model.status == ModelStatus.AWAITING_UPLOAD)  # type: ignore[arg-type]
        .values(status=ModelStatus.VALIDATING, validation_started_at=utcnow(), updated_at=utcnow())
    )
    moved = update_rows(session, stmt) == 1
    session.commit()
    if not moved:
        session.refresh(model)
        return False
    try:
        celery.send_task(
            VALIDATE_TASK, args=[model.id], queue=VALIDATE_QUEUE, task_id=f"validate-{model.id}"
        )
    except Exception as exc:
        # Roll the state back so the client (or the next storage event) can retry.
        model.status = ModelStatus.AWAITING_UPLOAD
        session.add(model)
        session.commit()
        log.warning("could not enqueue validation of %s: %s", model.id, type(exc).__name__)
        raise ServiceUnavailable("the task queue is unavailable; retry") from exc
    session.refresh(model)
    return True


def complete_model(
    *,
    session: Session,
    storage: ObjectStorage,
    celery: Celery,
    model: Model,
    parts: dict[str, list[CompletedPartIn]],
    strict: bool = True,
) -> Model:
    """Idempotent: a second call, or a duplicate storage event, starts nothing new."""
    if model.status is ModelStatus.AWAITING_UPLOAD and finalise_uploads(
        session=session, storage=storage, model=model, parts=parts, strict=strict
    ):
        start_validation(session=session, celery=celery, model=model)
    return model


LIMIT_FIELDS = ("rate_limit_rpm", "rate_limit_tpm", "rate_limit_concurrency")


def mint_key(
    *, session: Session, settings: Settings, model: Model, key_in: KeyCreate | None = None
) -> tuple[ApiKey, str]:
    """A new key; its limits may tighten the server's defaults, never loosen them."""
    key_in = key_in or KeyCreate()
    for name in LIMIT_FIELDS:
        value, ceiling = getattr(key_in, name), getattr(settings, name)
        if value is not None and ceiling and not 0 < value <= ceiling:
            raise InvalidRequest(
                f"{name} may be at most {ceiling}, the server's limit (so not 0, unlimited)",
                details={"field": name, "max": ceiling},
            )
    minted = keys.mint(keys.API_KEY_PREFIX, settings.key_pepper.get_secret_value())
    key = ApiKey(
        id=minted.key_id,
        account_id=model.account_id,
        model_id=model.id,
        secret_hash=minted.secret_hash,
        display_prefix=minted.display_prefix,
        **key_in.model_dump(),
    )
    session.add(key)
    return key, minted.plaintext


def deliver_first_key(*, session: Session, settings: Settings, model: Model) -> str | None:
    """Mint the model's first key on the owner's first read after `ready`, exactly once.

    Minting at delivery time means the plaintext never rests anywhere, not even briefly.
    """
    if model.status is not ModelStatus.READY or model.key_delivered:
        return None
    stmt = (
        update(Model)
        .where(Model.id == model.id, Model.key_delivered == False)  # type: ignore[arg-type] # noqa: E712
        .values(key_delivered=True)
    )
    if update_rows(session, stmt) != 1:
        session.rollback()
        return None
    _, plaintext = mint_key(session=session, settings=settings, model=model)
    session.commit()
    session.refresh(model)
    return plaintext

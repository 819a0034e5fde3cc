"""Run the validators over a model's uploaded objects and record the verdict."""

from __future__ import annotations

import logging
import uuid
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlmodel import select

from core.db import session_scope, update_rows
from core.redis import get_redis
from core.settings import Settings
from core.storage import get_storage
from core.storage.base import ObjectStorage
from core.tables import Model, ModelFile, ModelStatus, utcnow
from validators.base import BundleReport, Finding
from validators.pipeline import BundleFile, validate_bundle
from workers.smoke import smoke_test
from workers.weight_cache import CachedFile

log = logging.getLogger("inferatech.validation")


class Busy(Exception):
    """Another worker holds this model's validation lock."""


def _bundle(storage: ObjectStorage, rows: list[ModelFile]) -> list[BundleFile]:
    def opener(key: str) -> Any:
        return lambda: storage.open_read(key)

    return [BundleFile(path=r.path, size=r.size_bytes, open=opener(r.object_key)) for r in rows]


def run(model_id: str, settings: Settings) -> str:
    """Validate once: a redelivered task finds the verdict already recorded and stops."""
    with session_scope(settings) as s:
        model = s.get(Model, model_id)
        if model is None or model.status is not ModelStatus.VALIDATING:
            return "skipped"
        rows = list(s.exec(select(ModelFile).where(ModelFile.model_id == model_id)))
    lock = get_redis(settings).lock(
        f"lock:validate:{model_id}", timeout=settings.validation_time_limit_s + 120, blocking=False
    )
    if not lock.acquire(token=uuid.uuid4().hex.encode()):
        raise Busy(model_id)
    try:
        try:
            report = validate_bundle(
                _bundle(get_storage(settings), rows),
                max_pickle_bytes=settings.validation_max_pickle_bytes,
            )
        except Exception as exc:
            if _is_transient(exc):
                raise
            # Fail closed: a validator that cannot cope with a file refuses it.
            log.exception("validator crashed on %s", model_id)
            reject(model_id, settings, "VALIDATOR_ERROR", "the bundle could not be parsed safely")
            return "rejected"
        if report.ok and settings.validation_smoke_test:
            _smoke(model_id, settings, report, rows)
        return record(model_id, settings, report)
    finally:
        lock.release()


def _smoke(model_id: str, settings: Settings, report: BundleReport, rows: list[ModelFile]) -> None:
    """Load the model once in a runner; a failure becomes the report's LOAD_FAILED finding."""
    storage = get_storage(settings)
    keys = {r.path: r.object_key for r in rows}
    files = [
        CachedFile(f.path, f.sha256, f.size, partial(storage.open_read, keys[f.path]))
        for f in report.files
    ]
    fmt = report.format.value if report.format else ""
    try:
        result = smoke_test(settings, report.sha256 or "", fmt, files)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if _is_transient(exc):
            raise
        # Fail closed, never stuck in `validating`: a model we cannot test gets no key.
        log.exception("smoke test crashed on %s", model_id)
        message = f"the test load failed in the worker ({type(exc).__name__}); quote the model id"
        report.findings.append(Finding("LOAD_FAILED", message))
        return
    if result.ok:
        report.metadata |= result.details
    else:
        report.findings.append(Finding(result.code, result.message))


def _is_transient(exc: Exception) -> bool:
    from core.errors import StorageError

    return isinstance(exc, StorageError | ConnectionError | TimeoutError)


def record(model_id: str, settings: Settings, report: BundleReport) -> str:
    rejection = report.rejection
    with session_scope(settings) as s:
        for fr in report.files:
            update_rows(
                s,
                update(ModelFile)
                .where(ModelFile.model_id == model_id, ModelFile.path == fr.path)  # type: ignore[arg-type]
                .values(sha256=fr.sha256, kind=fr.kind.value),
            )
        values: dict[str, Any] = {"updated_at": utcnow(), "validated_at": utcnow()}
        if rejection is None:
            values |= {
                "status": ModelStatus.READY,
                "format": report.format.value if report.format else None,
                "sha256": report.sha256,
                "details": _jsonable(report.metadata),
            }
        else:
            values |= {
                "status": ModelStatus.REJECTED,
                "rejection_code": rejection.code,
                "rejection_message": _message(rejection.path, rejection.message),
            }
        moved = update_rows(
            s,
            update(Model)
            .where(Model.id == model_id, Model.status == ModelStatus.VALIDATING)  # type: ignore[arg-type]
            .values(**values),
        )
    verdict = "ready" if rejection is None else "rejected"
    log.info("model %s %s%s", model_id, verdict, f" ({rejection.code})" if rejection else "")
    return verdict if moved else "skipped"


def reject(model_id: str, settings: Settings, code: str, message: str) -> None:
    with session_scope(settings) as s:
        update_rows(
            s,
            update(Model)
            .where(Model.id == model_id, Model.status == ModelStatus.VALIDATING)  # type: ignore[arg-type]
            .values(
                status=ModelStatus.REJECTED,
                rejection_code=code,
                rejection_message=message,
                updated_at=utcnow(),
                validated_at=utcnow(),
            ),
        )


def _message(path: str | None, message: str) -> str:
    named = not path or message.startswith(path) or f" {path} " in message
    return (message if named else f"{path}: {message}")[:2000]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)

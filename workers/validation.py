"""Run the validators over a model's uploaded objects and record the verdict.

Order: structure and safety checks of every file (no ML library), then pickle-based weights
converted to safetensors in a sandbox (`workers.conversion`), then a smoke load of the bundle
runners will get (the converted one), then one transaction with the verdict and the files.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from core.db import session_scope, update_rows
from core.redis import get_redis
from core.settings import Settings
from core.storage import get_storage
from core.storage.base import ObjectStorage
from core.tables import Model, ModelFile, ModelStatus, utcnow
from validators.base import BundleReport, Finding
from validators.pipeline import BundleFile, bundle_digest, validate_bundle
from workers.conversion import PICKLE_KINDS, ConversionRejected, ConvertedFile, convert_bundle
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
        prefix = f"{model.account_id}/{model.id}/"
        # Converted files of an earlier, interrupted run are the worker's, not the upload.
        rows = [r for r in _rows(s, model_id) if r.converted_from is None]
    lock = _lock(settings, model_id, blocking=False)
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
        converted = _convert(model_id, settings, report, rows, prefix) if report.ok else []
        if report.ok and settings.validation_smoke_test:
            _smoke(model_id, settings, report, rows, converted)
        return record(model_id, settings, report, converted)
    finally:
        lock.release()


def convert_legacy(model_id: str, settings: Settings) -> list[ModelFile] | None:
    """Convert the pickle weights of a model made ready before conversion existed.

    Such a model has pickle rows and no converted rows, and runners refuse pickles: the
    first job after an upgrade converts it here (validators re-run first, with today's
    rules), records the converted rows, and gets the model's files back. None when the model
    needs nothing or could not be converted (the job then fails to load, as before).
    """
    lock = _lock(settings, model_id, blocking_timeout=settings.validation_convert_timeout_s + 60)
    if not lock.acquire(token=uuid.uuid4().hex.encode()):
        return None
    try:
        with session_scope(settings) as s:
            model = s.get(Model, model_id)
            rows = _rows(s, model_id)
        if model is None or model.status is not ModelStatus.READY:
            return None
        if not needs_conversion(rows):
            return rows  # another worker converted it while this one waited for the lock
        report = validate_bundle(
            _bundle(get_storage(settings), rows),
            max_pickle_bytes=settings.validation_max_pickle_bytes,
        )
        prefix = f"{model.account_id}/{model.id}/"
        converted = _convert(model_id, settings, report, rows, prefix) if report.ok else []
        if not converted:
            log.warning("legacy model %s not converted: %s", model_id, report.rejection)
            return None
        with session_scope(settings) as s:
            _record_converted(s, model_id, converted)
        with session_scope(settings) as s:
            rows = _rows(s, model_id)
        log.info("legacy model %s converted (%d files)", model_id, len(converted))
        return rows
    finally:
        lock.release()


_PICKLE_KIND_NAMES = frozenset(k.value for k in PICKLE_KINDS)


def needs_conversion(rows: Sequence[ModelFile]) -> bool:
    """Pickle weights recorded at validation, and no conversion of them (checked per job)."""
    return any(r.kind in _PICKLE_KIND_NAMES for r in rows) and not any(
        r.converted_from for r in rows
    )


def _rows(s: Session, model_id: str) -> list[ModelFile]:
    return list(s.exec(select(ModelFile).where(ModelFile.model_id == model_id)))


def _lock(settings: Settings, model_id: str, **wait: Any) -> Any:
    """The model's validation lock (validation and the legacy conversion share it)."""
    key = f"lock:validate:{model_id}"
    return get_redis(settings).lock(key, timeout=settings.validation_time_limit_s + 120, **wait)


def _convert(
    model_id: str, settings: Settings, report: BundleReport, rows: list[ModelFile], prefix: str
) -> list[ConvertedFile]:
    """Pickle-based weights → safetensors in the sandbox; a failure rejects the model."""
    keys = {r.path: r.object_key for r in rows}
    try:
        return convert_bundle(settings, get_storage(settings), prefix, report, keys)
    except ConversionRejected as exc:
        report.findings.append(Finding(exc.code, exc.message, path=exc.path))
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if _is_transient(exc):
            raise
        log.exception("conversion crashed on %s", model_id)
        message = f"the weights could not be converted ({type(exc).__name__}); quote the model id"
        report.findings.append(Finding("CONVERSION_FAILED", message))
    return []


def _smoke(
    model_id: str,
    settings: Settings,
    report: BundleReport,
    rows: list[ModelFile],
    converted: list[ConvertedFile],
) -> None:
    """Load the served bundle once in a runner; a failure becomes a LOAD_FAILED finding."""
    storage = get_storage(settings)
    keys = {r.path: r.object_key for r in rows}
    replaced = {c.source for c in converted}
    files = [
        CachedFile(f.path, f.sha256, f.size, partial(storage.open_read, keys[f.path]))
        for f in report.files
        if f.path not in replaced
    ] + [
        CachedFile(c.path, c.sha256, c.size, partial(storage.open_read, c.object_key))
        for c in converted
    ]
    fmt = report.format.value if report.format else ""
    digest = bundle_digest([(f.path, f.sha256) for f in files])
    try:
        result = smoke_test(settings, digest, fmt, files)
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


def record(
    model_id: str,
    settings: Settings,
    report: BundleReport,
    converted: Sequence[ConvertedFile] = (),
) -> str:
    rejection = report.rejection
    with session_scope(settings) as s:
        for fr in report.files:
            update_rows(
                s,
                update(ModelFile)
                .where(ModelFile.model_id == model_id, ModelFile.path == fr.path)  # type: ignore[arg-type]
                .values(sha256=fr.sha256, kind=fr.kind.value),
            )
        _record_converted(s, model_id, converted)
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


def _record_converted(s: Session, model_id: str, converted: Sequence[ConvertedFile]) -> None:
    """The converted files, replacing any an interrupted earlier run recorded."""
    s.execute(
        delete(ModelFile).where(
            col(ModelFile.model_id) == model_id, col(ModelFile.converted_from).is_not(None)
        )
    )
    for c in converted:
        s.add(
            ModelFile(
                model_id=model_id,
                path=c.path,
                size_bytes=c.size,
                object_key=c.object_key,
                uploaded=True,
                sha256=c.sha256,
                kind=c.kind,
                converted_from=c.source,
            )
        )


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

"""The validation task's idempotency and mutual exclusion, on the real database and Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.db import session_scope
from core.redis import get_redis
from core.tables import Model, ModelStatus
from tests.utils.factories import validating_model
from tests.utils.stack import StackInfo
from workers import validation


def _validating_model(client: TestClient, stack: StackInfo, gguf: Path) -> str:
    return validating_model(client, stack.settings, {"tiny.gguf": gguf})


def _status(stack: StackInfo, model_id: str) -> ModelStatus:
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        return model.status


def test_run_validation_twice_records_one_verdict(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    model_id = _validating_model(client, stack, gguf_model)
    assert validation.run(model_id, stack.settings) == "ready"
    with session_scope(stack.settings) as s:
        first = s.get(Model, model_id)
        assert first is not None
        stamp = first.validated_at
    assert validation.run(model_id, stack.settings) == "skipped"
    with session_scope(stack.settings) as s:
        again = s.get(Model, model_id)
        assert again is not None and again.validated_at == stamp


def test_run_validation_while_locked_elsewhere_is_busy(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    model_id = _validating_model(client, stack, gguf_model)
    lock = get_redis(stack.settings).lock(f"lock:validate:{model_id}", timeout=30)
    assert lock.acquire(blocking=False)
    try:
        with pytest.raises(validation.Busy):
            validation.run(model_id, stack.settings)
        assert _status(stack, model_id) is ModelStatus.VALIDATING
    finally:
        lock.release()
    assert validation.run(model_id, stack.settings) == "ready"


def test_verdict_is_not_recorded_over_a_deleted_model(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    from validators.base import BundleReport, ModelFormat

    model_id = _validating_model(client, stack, gguf_model)
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        model.status = ModelStatus.DELETED
        s.add(model)
    report = BundleReport(format=ModelFormat.GGUF, sha256="0" * 64)
    assert validation.record(model_id, stack.settings, report) == "skipped"
    assert _status(stack, model_id) is ModelStatus.DELETED


def test_unknown_model_is_skipped(stack: StackInfo) -> None:
    assert validation.run("mdl_doesnotexist", stack.settings) == "skipped"

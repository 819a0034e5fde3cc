"""The validation smoke test: a model the engine refuses is rejected before it gets a key."""

from __future__ import annotations

import hashlib
import json
import struct
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from core.db import session_scope
from core.settings import Settings
from core.tables import Model, ModelStatus
from tests.utils.factories import (
    Content,
    bundle_dir,
    create_account,
    upload_model,
    validating_model,
)
from tests.utils.stack import StackInfo
from tests.workers.conftest import fault_argv, runner_processes
from workers import smoke, validation
from workers.runner.process import Runner
from workers.weight_cache import CachedFile


def _gguf_with_more_blocks(gguf: Path, out: Path) -> Path:
    """block_count 7 for 2 layers of tensors: our validators pass it, llama.cpp refuses it."""
    data = gguf.read_bytes()
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    kind, _ = struct.unpack_from("<II", data, at)
    path = out / "model.gguf"
    path.write_bytes(data[:at] + struct.pack("<II", kind, 7) + data[at + 8 :])
    return path


def _details(stack: StackInfo, model_id: str) -> tuple[ModelStatus, dict[str, Any]]:
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        return model.status, dict(model.details)


def _validating_model(client: TestClient, stack: StackInfo, files: dict[str, Content]) -> str:
    return validating_model(client, stack.settings, files)


def _runner_children(worker_pid: int) -> list[psutil.Process]:
    procs = psutil.Process(worker_pid).children(recursive=True)
    return [p for p in procs if "workers.runner.child" in " ".join(p.cmdline())]


def test_upload_gguf_llama_cpp_refuses_is_rejected_load_failed(
    client: TestClient, stack: StackInfo, gguf_model: Path, tmp_path: Path
) -> None:
    bad = _gguf_with_more_blocks(gguf_model, tmp_path)
    verdict = upload_model(client, create_account(client), {"model.gguf": bad})
    assert verdict["status"] == "rejected", verdict
    assert verdict["rejection"]["code"] == "LOAD_FAILED"
    message = verdict["rejection"]["message"]
    assert "failed to load" in message and "blk.2" in message  # the engine's own reason
    assert str(stack.settings.data_dir) not in message  # no host paths
    assert verdict["api_key"] is None
    assert stack.worker.alive(), stack.worker.log()[-2000:]
    assert not _runner_children(stack.worker.process.pid)


def test_upload_transformers_config_disagreeing_with_weights_is_rejected_load_failed(
    client: TestClient, stack: StackInfo, transformers_bundle: Path, tmp_path: Path
) -> None:
    files = bundle_dir(transformers_bundle)
    config = json.loads(Path(files["config.json"]).read_text())  # type: ignore[arg-type]
    config["hidden_size"] *= 2
    files["config.json"] = json.dumps(config).encode()
    verdict = upload_model(client, create_account(client), files)
    assert verdict["status"] == "rejected", verdict
    assert verdict["rejection"]["code"] == "LOAD_FAILED"
    assert "transformers could not load" in verdict["rejection"]["message"]
    assert stack.worker.alive()


def test_upload_gguf_good_is_ready_with_smoke_details_and_cached_weights(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    verdict = upload_model(client, create_account(client), {"tiny.gguf": gguf_model})
    assert verdict["status"] == "ready", verdict
    status, details = _details(stack, verdict["id"])
    assert status is ModelStatus.READY
    assert details["context_length"] == 256 and details["has_chat_template"] is True
    assert details["device"] in ("cpu", "cuda") and details["load_ms"] > 0
    cached = stack.settings.effective_weight_cache_dir / "models" / verdict["sha256"]
    assert (cached / "tiny.gguf").is_file()  # the first inference on this host is a cache hit
    assert not _runner_children(stack.worker.process.pid)  # validation keeps no runner warm


def test_run_validation_with_smoke_test_disabled_skips_it(
    client: TestClient, stack: StackInfo, gguf_model: Path, tmp_path: Path
) -> None:
    bad = _gguf_with_more_blocks(gguf_model, tmp_path)
    model_id = _validating_model(client, stack, {"model.gguf": bad})
    settings = stack.settings.model_copy(update={"validation_smoke_test": False})
    assert validation.run(model_id, settings) == "ready"  # only the smoke test catches it
    status, details = _details(stack, model_id)
    assert status is ModelStatus.READY and "load_ms" not in details
    assert not runner_processes()


def test_run_validation_when_smoke_test_crashes_rejects_model(
    client: TestClient, stack: StackInfo, gguf_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> smoke.SmokeResult:
        raise RuntimeError("bug in the smoke test")

    monkeypatch.setattr(validation, "smoke_test", crash)
    model_id = _validating_model(client, stack, {"tiny.gguf": gguf_model})
    assert validation.run(model_id, stack.settings) == "rejected"  # never stuck in validating
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None and model.rejection_code == "LOAD_FAILED"


def test_smoke_test_when_generation_dies_fails_and_cleans_up(
    gguf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = hashlib.sha256(gguf_model.read_bytes()).hexdigest()
    files = [
        CachedFile("model.gguf", sha, gguf_model.stat().st_size, partial(gguf_model.open, "rb"))
    ]
    made: list[Runner] = []

    class Recording(Runner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(smoke, "Runner", Recording)
    settings = Settings(data_dir=tmp_path)
    result = smoke.smoke_test(settings, sha, "gguf", files, argv=fault_argv("exit_in_generate"))
    assert not result.ok and result.message.startswith("generation failed")
    assert "exited with code 3" in result.message
    assert made and all(r.tmpdir is not None and not r.tmpdir.exists() for r in made)
    assert not runner_processes()

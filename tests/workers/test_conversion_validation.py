"""Pickle-based uploads through the real stack: converted at validation, served as safetensors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, delete, select

from core.db import session_scope
from core.storage import get_storage
from core.tables import Model, ModelFile, ModelStatus
from tests.api.test_infer import GREEDY, infer
from tests.utils.factories import (
    Content,
    bundle_dir,
    create_account,
    upload_model,
    validating_model,
)
from tests.utils.hostile_pickles import canary_pickle, torch_like_zip, zip_members
from tests.utils.stack import StackInfo
from tests.workers.conftest import fault_convert_argv, runner_processes
from validators.sniff import HEAD_BYTES, sniff
from workers import conversion, validation
from workers.conversion import PICKLE_KINDS
from workers.runner import converter as converter_module


def _rows(stack: StackInfo, model_id: str) -> list[ModelFile]:
    with session_scope(stack.settings) as s:
        return list(s.exec(select(ModelFile).where(ModelFile.model_id == model_id)))


def _model(stack: StackInfo, model_id: str) -> Model:
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        return model


def _pickles_in_weight_cache(stack: StackInfo) -> list[Path]:
    """Every file a runner could be handed (cached bundles) whose bytes are a pickle."""
    found = []
    for path in (stack.settings.effective_weight_cache_dir / "models").rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                if sniff(f.read(HEAD_BYTES)) in PICKLE_KINDS:
                    found.append(path)
    return found


@pytest.fixture(scope="module")
def reference_completion(stack: StackInfo, transformers_bundle: Path) -> str:
    """The greedy completion of the same weights uploaded as safetensors (seed 0 everywhere)."""
    from api.main import create_app
    from core.settings import get_settings

    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        token = create_account(c, "reference")
        verdict = upload_model(c, token, bundle_dir(transformers_bundle), name="reference")
        assert verdict["status"] == "ready", verdict
        resp = infer(c, verdict["api_key"], verdict["id"], raw=True, **GREEDY)
    assert resp.status_code == 200, resp.text
    completion: str = resp.json()["completion"]
    return completion


@pytest.mark.parametrize(
    ("fixture", "fmt", "pickle_path"),
    [
        ("transformers_bin_bundle", "transformers", "pytorch_model.bin"),
        ("pytorch_bundle", "pytorch", "model.pt"),
    ],
)
def test_upload_pickle_bundle_is_converted_stored_and_served_as_safetensors(
    client: TestClient,
    stack: StackInfo,
    request: pytest.FixtureRequest,
    reference_completion: str,
    fixture: str,
    fmt: str,
    pickle_path: str,
) -> None:
    verdict = upload_model(
        client, create_account(client), bundle_dir(request.getfixturevalue(fixture))
    )
    assert verdict["status"] == "ready", verdict
    assert verdict["format"] == fmt
    listed = {f["path"]: f for f in verdict["files"]}
    converted = listed["model.safetensors"]
    assert converted["converted_from"] == pickle_path and converted["kind"] == "safetensors"
    assert listed[pickle_path]["converted_from"] is None  # the upload stays, for its owner
    row = next(r for r in _rows(stack, verdict["id"]) if r.converted_from)
    model = _model(stack, verdict["id"])
    assert row.object_key == f"{model.account_id}/{model.id}/converted/{row.sha256}"
    with get_storage(stack.settings).open_read(row.object_key) as f:
        stored = f.read()
    assert hashlib.sha256(stored).hexdigest() == row.sha256 and len(stored) == row.size_bytes
    assert stored[8:9] == b"{"  # a safetensors header, not a pickle

    resp = infer(client, verdict["api_key"], verdict["id"], raw=True, **GREEDY)
    assert resp.status_code == 200, resp.text
    assert resp.json()["completion"] == reference_completion  # the same weights, unpickled once
    assert not _pickles_in_weight_cache(stack)  # no runner was ever handed the pickle
    assert stack.worker.alive() and stack.infer_worker.alive()


def _hostile_pt(fx: Path, canary: Path) -> dict[str, Content]:
    members = zip_members((fx / "model.pt").read_bytes())
    poisoned = [(n, canary_pickle(canary) if n.endswith("data.pkl") else c) for n, c in members]
    files = {k: v for k, v in bundle_dir(fx).items() if k != "model.pt"}
    return {**files, "model.pt": torch_like_zip(poisoned)}


class _Recording(converter_module.Converter):
    made: ClassVar[list[_Recording]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _Recording.made.append(self)


def test_validation_hostile_pickle_never_reaches_the_converter(
    client: TestClient,
    stack: StackInfo,
    pytorch_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conversion, "Converter", _Recording)
    _Recording.made.clear()
    canary = tmp_path / "canary"
    model_id = validating_model(client, stack.settings, _hostile_pt(pytorch_bundle, canary))
    assert validation.run(model_id, stack.settings) == "rejected"
    assert _model(stack, model_id).rejection_code == "PICKLE_UNSAFE_GLOBAL"
    assert not _Recording.made and not canary.exists()
    assert not [r for r in _rows(stack, model_id) if r.converted_from]
    # The spy does see a conversion when the scan passes.
    good = validating_model(client, stack.settings, bundle_dir(pytorch_bundle))
    assert validation.run(good, stack.settings) == "ready"
    assert len(_Recording.made) == 1


@pytest.mark.parametrize(
    ("mode", "code", "reason"),
    [
        ("exit", "CONVERSION_FAILED", "exit status 3"),
        ("hang", "CONVERSION_TIMEOUT", "longer than 3s"),
        ("garbage", "CONVERSION_INVALID", "not valid safetensors"),
        ("huge_header", "CONVERSION_INVALID", "not valid safetensors"),
        ("symlink", "CONVERSION_INVALID", "cannot be opened"),
        ("fifo", "CONVERSION_INVALID", "other than a file"),
    ],
)
def test_validation_conversion_that_fails_or_is_tampered_rejects_the_model(
    client: TestClient,
    stack: StackInfo,
    pytorch_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    code: str,
    reason: str,
) -> None:
    monkeypatch.setattr(converter_module, "converter_argv", lambda: fault_convert_argv(mode))
    settings = stack.settings.model_copy(update={"validation_convert_timeout_s": 3.0})
    model_id = validating_model(client, settings, bundle_dir(pytorch_bundle))
    assert validation.run(model_id, settings) == "rejected"  # the worker carries on
    model = _model(stack, model_id)
    assert model.rejection_code == code, model.rejection_message
    assert model.rejection_message and reason in model.rejection_message
    assert "model.pt" in model.rejection_message
    assert not [r for r in _rows(stack, model_id) if r.converted_from]
    assert not runner_processes()  # the converter child was killed, and no runner started
    assert stack.worker.alive()


def test_validation_rerun_after_interruption_replaces_converted_rows(
    client: TestClient, stack: StackInfo, pytorch_bundle: Path
) -> None:
    model_id = validating_model(client, stack.settings, bundle_dir(pytorch_bundle))
    assert validation.run(model_id, stack.settings) == "ready"
    first = [(r.path, r.sha256, r.object_key) for r in _rows(stack, model_id) if r.converted_from]
    with session_scope(stack.settings) as s:  # as if the worker died before its verdict landed
        model = s.get(Model, model_id)
        assert model is not None
        model.status = ModelStatus.VALIDATING
        s.add(model)
    assert validation.run(model_id, stack.settings) == "ready"
    again = [(r.path, r.sha256, r.object_key) for r in _rows(stack, model_id) if r.converted_from]
    assert again == first and len(first) == 1  # same content-addressed object, one row


def test_sharded_bin_bundle_gets_a_safetensors_index_and_serves(
    client: TestClient, stack: StackInfo, transformers_bin_bundle: Path, tmp_path: Path
) -> None:
    import json

    import torch

    bundle = tmp_path / "sharded"
    shutil.copytree(transformers_bin_bundle, bundle)
    state = torch.load(bundle / "pytorch_model.bin", weights_only=True)
    (bundle / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    weight_map: dict[str, str] = {}
    for shard, keys in halves.items():
        torch.save({k: state[k] for k in keys}, bundle / shard)
        weight_map |= dict.fromkeys(keys, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (bundle / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    verdict = upload_model(client, create_account(client), bundle_dir(bundle))
    assert verdict["status"] == "ready", verdict
    converted = {f["path"]: f["converted_from"] for f in verdict["files"] if f["converted_from"]}
    assert converted == {
        "model-00001-of-00002.safetensors": "pytorch_model-00001-of-00002.bin",
        "model-00002-of-00002.safetensors": "pytorch_model-00002-of-00002.bin",
        "model.safetensors.index.json": "pytorch_model.bin.index.json",
    }
    resp = infer(client, verdict["api_key"], verdict["id"], raw=True, **GREEDY)
    assert resp.status_code == 200, resp.text
    assert resp.json()["completion_tokens"] >= 1


def test_model_ready_before_conversion_existed_is_converted_by_its_first_job(
    client: TestClient, stack: StackInfo, pytorch_bundle: Path, reference_completion: str
) -> None:
    verdict = upload_model(client, create_account(client), bundle_dir(pytorch_bundle))
    assert verdict["status"] == "ready", verdict
    model_id = verdict["id"]
    with session_scope(stack.settings) as s:  # as an older version recorded it: no conversion
        s.execute(
            delete(ModelFile).where(
                col(ModelFile.model_id) == model_id, col(ModelFile.converted_from).is_not(None)
            )
        )
    assert validation.needs_conversion(_rows(stack, model_id))

    resp = infer(client, verdict["api_key"], model_id, raw=True, **GREEDY)
    assert resp.status_code == 200, resp.text
    assert resp.json()["completion"] == reference_completion
    rows = _rows(stack, model_id)
    assert not validation.needs_conversion(rows)
    assert [r.converted_from for r in rows if r.converted_from] == ["model.pt"]
    assert not _pickles_in_weight_cache(stack)
    again = infer(client, verdict["api_key"], model_id, raw=True, **GREEDY)  # nothing to redo
    assert again.json()["completion"] == reference_completion
    assert len(_rows(stack, model_id)) == len(rows)

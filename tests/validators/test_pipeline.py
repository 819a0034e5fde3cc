"""validate_bundle: real bundles of every format pass; bad files and bundles get one code."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from tests.utils.bad_files import (
    GgufSpec,
    PatternStream,
    dir_files,
    mem_file,
    safetensors_bytes,
    st_entry,
    tar_head,
)
from validators import pipeline
from validators.base import BundleReport, FileKind, ModelFormat, Rejected, Severity
from validators.pipeline import BundleFile, bundle_sha256, plan_format, validate_bundle

CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode()
WEIGHTS = safetensors_bytes({"w": st_entry("F32", [2], 0, 8)}, b"\0" * 8)


def _hf_files(**overrides: bytes) -> list[BundleFile]:
    files = {"config.json": CONFIG, "tokenizer.json": TOKENIZER, "model.safetensors": WEIGHTS}
    files.update(overrides)
    return [mem_file(path, data) for path, data in files.items()]


def _code(report: BundleReport) -> str | None:
    return None if report.rejection is None else report.rejection.code


def test_validate_bundle_gguf_fixture_is_gguf(gguf_model: Path) -> None:
    files = [BundleFile("tiny.gguf", gguf_model.stat().st_size, lambda: gguf_model.open("rb"))]
    report = validate_bundle(files)
    assert report.ok, report.findings
    assert report.format is ModelFormat.GGUF
    assert report.sha256 == hashlib.sha256(gguf_model.read_bytes()).hexdigest()
    assert report.metadata["has_chat_template"] is True
    assert report.metadata["context_length"] == 256
    assert report.files[0].metadata["chat_template"]


def test_validate_bundle_gguf_with_readme_is_gguf() -> None:
    files = [mem_file("m.gguf", GgufSpec().build()), mem_file("README.md", b"# hi\n")]
    report = validate_bundle(files)
    assert (report.format, report.ok) == (ModelFormat.GGUF, True)


def test_validate_bundle_transformers_fixture_is_transformers(transformers_bundle: Path) -> None:
    report = validate_bundle(dir_files(transformers_bundle))
    assert report.ok, report.findings
    assert report.format is ModelFormat.TRANSFORMERS
    assert report.metadata["architecture"] == "LlamaForCausalLM"
    by_path = {f.path: f for f in report.files}
    weights = (transformers_bundle / "model.safetensors").read_bytes()
    assert by_path["model.safetensors"].sha256 == hashlib.sha256(weights).hexdigest()
    assert by_path["model.safetensors"].kind is FileKind.SAFETENSORS


def test_validate_bundle_transformers_bin_fixture_is_transformers(
    transformers_bin_bundle: Path,
) -> None:
    report = validate_bundle(dir_files(transformers_bin_bundle))
    assert report.ok, report.findings
    assert report.format is ModelFormat.TRANSFORMERS


def test_validate_bundle_pytorch_fixture_is_pytorch(pytorch_bundle: Path) -> None:
    report = validate_bundle(dir_files(pytorch_bundle))
    assert report.ok, report.findings
    assert report.format is ModelFormat.PYTORCH


def test_validate_bundle_onnx_fixture_is_onnx(onnx_bundle: Path) -> None:
    report = validate_bundle(dir_files(onnx_bundle))
    assert report.ok, report.findings
    assert report.format is ModelFormat.ONNX


def test_validate_bundle_onnx_external_data_fixture_is_onnx(onnx_external_bundle: Path) -> None:
    report = validate_bundle(dir_files(onnx_external_bundle))
    assert report.ok, report.findings
    by_path = {f.path: f for f in report.files}
    assert by_path["model.onnx.data"].kind is FileKind.RAW


def test_validate_bundle_onnx_without_its_data_file_is_rejected(
    onnx_external_bundle: Path,
) -> None:
    files = [f for f in dir_files(onnx_external_bundle) if f.path != "model.onnx.data"]
    assert _code(validate_bundle(files)) == "ONNX_EXTERNAL_DATA_MISSING"


@pytest.mark.parametrize(("offset", "data_size"), [("0", 8), ("4096", 24), ("24", 24)])
def test_validate_bundle_onnx_external_range_past_data_file_is_rejected(
    offset: str, data_size: int
) -> None:
    from tests.utils.onnx_builders import external_tensor, matmul_graph, model_of

    model = model_of(matmul_graph(external_tensor("w.data", offset=offset)))
    files = [
        mem_file("model.onnx", model.SerializeToString()),
        mem_file("w.data", b"\0" * data_size),
        mem_file("tokenizer.json", TOKENIZER),
    ]
    assert _code(validate_bundle(files)) == "ONNX_EXTERNAL_DATA_OUT_OF_RANGE"
    files[1] = mem_file("w.data", b"\0" * (int(offset) + 24))
    assert validate_bundle(files).ok


def test_validate_bundle_bundle_sha_is_independent_of_order() -> None:
    first = validate_bundle(_hf_files())
    second = validate_bundle(list(reversed(_hf_files())))
    assert first.ok and first.sha256 == second.sha256
    assert first.sha256 == bundle_sha256(first.files)
    assert first.sha256 != first.files[0].sha256


def test_validate_bundle_pickle_named_safetensors_is_format_mismatch() -> None:
    files = _hf_files(**{"model.safetensors": pickle.dumps({"w": [1.0]}, protocol=2)})
    report = validate_bundle(files)
    assert _code(report) == "FORMAT_MISMATCH"
    assert report.rejection is not None and report.rejection.path == "model.safetensors"


def test_validate_bundle_safetensors_named_gguf_is_format_mismatch() -> None:
    assert _code(validate_bundle([mem_file("m.gguf", WEIGHTS)])) == "FORMAT_MISMATCH"


def test_validate_bundle_bad_gguf_stops_at_first_error() -> None:
    report = validate_bundle([mem_file("m.gguf", GgufSpec(magic=b"GGUF", n_kv=1 << 40).build())])
    assert _code(report) == "GGUF_INVALID"
    assert report.files[0].findings[0].code == "GGUF_INVALID"
    assert report.sha256 is None


def test_validate_bundle_tar_checkpoint_is_legacy_tar_format() -> None:
    files = [*_hf_files(), mem_file("model.pt", tar_head())]
    files = [f for f in files if f.path != "model.safetensors"]
    report = validate_bundle(files)
    assert _code(report) == "LEGACY_TAR_FORMAT"
    assert report.rejection is not None and "torch.save" in report.rejection.message


def test_validate_bundle_stream_longer_than_declared_is_size_mismatch() -> None:
    data = GgufSpec().build()
    report = validate_bundle([mem_file("m.gguf", data + b"\0" * 32, size=len(data))])
    assert _code(report) == "SIZE_MISMATCH"


def test_validate_bundle_stream_shorter_than_declared_is_truncated() -> None:
    data = GgufSpec().build()
    report = validate_bundle([mem_file("m.gguf", data[:-16], size=len(data))])
    assert _code(report) == "TRUNCATED"


@pytest.mark.parametrize(
    ("path", "code"),
    [("modeling_llama.py", "REMOTE_CODE"), ("run.exe", "UNSUPPORTED_FILE"),
     ("../model.gguf", "UNSUPPORTED_FILE"), ("a/../../b.json", "UNSUPPORTED_FILE")],
)  # fmt: skip
def test_validate_bundle_forbidden_file_name_is_rejected(path: str, code: str) -> None:
    assert _code(validate_bundle([*_hf_files(), mem_file(path, b"x")])) == code


@pytest.mark.parametrize(
    "paths",
    [
        [],
        ["a.gguf", "b.gguf"],
        ["a.gguf", "model.safetensors", "config.json"],
        ["a.gguf", "config.json"],
        ["model.safetensors", "tokenizer.json"],
        ["config.json", "tokenizer.json"],
        ["config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin"],
        ["config.json", "tokenizer.json", "training_args.bin"],
        ["config.json", "tokenizer.json", "model.safetensors", "x.onnx_data"],
        ["config.json", "tokenizer.json", "a.pt", "b.pth"],
        ["a.onnx", "b.onnx", "tokenizer.json"],
        ["config.json", "Config.json", "model.safetensors"],
    ],
)
def test_plan_format_invalid_bundle_is_rejected(paths: list[str]) -> None:
    with pytest.raises(Rejected) as info:
        plan_format(paths)
    assert info.value.code == "BUNDLE_INVALID"
    assert "a valid bundle is one of" in info.value.message or "twice" in info.value.message


@pytest.mark.parametrize(
    ("paths", "fmt"),
    [
        (["m.gguf", "LICENSE.txt"], ModelFormat.GGUF),
        (["config.json", "pytorch_model-00001-of-00002.bin"], ModelFormat.TRANSFORMERS),
        (["config.json", "model.pth"], ModelFormat.PYTORCH),
        (["onnx/model.onnx", "onnx/model.onnx_data", "tokenizer.json"], ModelFormat.ONNX),
    ],
)
def test_plan_format_valid_names_choose_format(paths: list[str], fmt: ModelFormat) -> None:
    assert plan_format(paths) is fmt


def test_validate_bundle_config_with_auto_map_is_remote_code() -> None:
    config = json.dumps({**json.loads(CONFIG), "auto_map": {"AutoConfig": "x.Y"}}).encode()
    assert _code(validate_bundle(_hf_files(**{"config.json": config}))) == "REMOTE_CODE"


def test_validate_bundle_tokenizer_config_with_auto_map_is_remote_code() -> None:
    extra = {"tokenizer_config.json": b'{"auto_map": {"AutoTokenizer": ["t.T", null]}}'}
    assert _code(validate_bundle(_hf_files(**extra))) == "REMOTE_CODE"


def test_validate_bundle_unknown_architecture_is_rejected() -> None:
    config = b'{"architectures": ["EvilForCausalLM"], "model_type": "evil"}'
    report = validate_bundle(_hf_files(**{"config.json": config}))
    assert _code(report) == "UNSUPPORTED_ARCHITECTURE"


@pytest.mark.parametrize("data", [b'{"model": ', b"not json at all", b'{"version": "1"}'])
def test_validate_bundle_broken_tokenizer_json_is_tokenizer_invalid(data: bytes) -> None:
    assert _code(validate_bundle(_hf_files(**{"tokenizer.json": data}))) == "TOKENIZER_INVALID"


def test_validate_bundle_without_tokenizer_is_tokenizer_missing() -> None:
    files = [f for f in _hf_files() if f.path != "tokenizer.json"]
    assert _code(validate_bundle(files)) == "TOKENIZER_MISSING"


def test_validate_bundle_duplicate_json_key_is_json_invalid() -> None:
    config = b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "model_type": "x"}'
    assert _code(validate_bundle(_hf_files(**{"config.json": config}))) == "JSON_INVALID"


def test_validate_bundle_json_over_cap_is_file_too_large() -> None:
    assert _code(validate_bundle(_hf_files(), max_json_bytes=16)) == "FILE_TOO_LARGE"


def test_validate_bundle_binary_json_is_format_mismatch() -> None:
    report = validate_bundle(_hf_files(**{"config.json": b"\0\1\2\3"}))
    assert _code(report) == "FORMAT_MISMATCH"


def test_validate_bundle_validator_crash_becomes_rejection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(reader: Any) -> dict[str, Any]:
        raise ZeroDivisionError

    monkeypatch.setattr(pipeline, "validate_safetensors", boom)
    report = validate_bundle(_hf_files())
    assert _code(report) == "VALIDATOR_ERROR"
    assert report.rejection is not None and report.rejection.severity is Severity.ERROR


def test_validate_bundle_storage_error_propagates() -> None:
    def broken() -> io.BytesIO:
        raise OSError("storage unreachable")

    with pytest.raises(OSError, match="storage unreachable"):
        validate_bundle([BundleFile("m.gguf", 10, broken)])


def test_validate_bundle_negative_size_is_rejected() -> None:
    assert _code(validate_bundle([mem_file("m.gguf", b"", size=-1)])) == "SIZE_MISMATCH"


def test_validate_bundle_large_weights_keep_memory_bounded() -> None:
    size = 192 << 20
    header = json.dumps({"w": st_entry("U8", [size], 0, size)}).encode()
    prefix = len(header).to_bytes(8, "little") + header
    total = len(prefix) + size
    files = [
        *_hf_files()[:2],
        BundleFile(
            "model.safetensors", total, lambda: cast(BinaryIO, PatternStream(prefix, total))
        ),
    ]
    tracemalloc.start()
    try:
        report = validate_bundle(files)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok, report.findings
    assert peak < 16 << 20

"""validate_safetensors: real files pass; malformed headers and layouts are refused by code."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.utils.bad_files import reader_for, safetensors_bytes, st_entry
from validators.base import Rejected
from validators.safetensors import validate_safetensors

TWO = {"a": st_entry("F32", [2], 0, 8), "b": st_entry("F16", [2, 2], 8, 16)}


def _code(data: bytes) -> str:
    with pytest.raises(Rejected) as info:
        validate_safetensors(reader_for(data))
    return info.value.code


def _file(header: dict[str, Any], data_size: int = 16) -> bytes:
    return safetensors_bytes(header, b"\x01" * data_size)


def test_validate_safetensors_library_file_returns_summary(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    tensors: dict[str, Any] = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float16)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    reader = reader_for(data)
    summary = validate_safetensors(reader)
    assert summary["tensor_count"] == 2
    assert summary["total_params"] == 40
    assert summary["dtypes"] == {"F32": 1, "F16": 1}
    assert summary["metadata"] == {"format": "pt"}
    assert reader.finish() == hashlib.sha256(data).hexdigest()


def test_validate_safetensors_tiny_llama_fixture_passes(transformers_bundle: Path) -> None:
    data = (transformers_bundle / "model.safetensors").read_bytes()
    assert validate_safetensors(reader_for(data))["total_params"] > 100_000


def test_validate_safetensors_struct_built_file_passes() -> None:
    assert validate_safetensors(reader_for(_file(TWO)))["tensor_count"] == 2


def test_validate_safetensors_empty_tensor_passes() -> None:
    header = {**TWO, "empty": st_entry("F32", [0, 3], 16, 16)}
    assert validate_safetensors(reader_for(_file(header)))["tensor_count"] == 3


@pytest.mark.parametrize(
    ("length", "code"),
    [((1 << 64) - 1, "SAFETENSORS_INVALID"), (100_000_001, "SAFETENSORS_INVALID"),
     (10_000, "TRUNCATED")],
)  # fmt: skip
def test_validate_safetensors_bad_header_length_is_rejected(length: int, code: str) -> None:
    assert _code(safetensors_bytes(TWO, b"\0" * 16, length=length)) == code


def test_validate_safetensors_short_file_is_truncated() -> None:
    assert _code(b"\x10\0\0") == "TRUNCATED"


def test_validate_safetensors_invalid_utf8_is_rejected() -> None:
    raw = b'{"a\xff": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}'
    assert _code(safetensors_bytes(raw, b"\0" * 4)) == "SAFETENSORS_INVALID"


def test_validate_safetensors_header_not_starting_with_brace_is_rejected() -> None:
    raw = b' {"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}'
    with pytest.raises(Rejected, match="start with"):
        validate_safetensors(reader_for(safetensors_bytes(raw, b"\0" * 4)))


def test_validate_safetensors_invalid_json_is_rejected() -> None:
    assert _code(safetensors_bytes(b'{"a": ', b"")) == "SAFETENSORS_INVALID"


def test_validate_safetensors_deep_nesting_is_rejected() -> None:
    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _code(safetensors_bytes(raw)) == "SAFETENSORS_INVALID"


def test_validate_safetensors_nan_constant_is_rejected() -> None:
    raw = b'{"__metadata__": {"x": NaN}}'
    assert _code(safetensors_bytes(raw)) == "SAFETENSORS_INVALID"


def test_validate_safetensors_duplicate_names_are_rejected() -> None:
    raw = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    with pytest.raises(Rejected, match="twice"):
        validate_safetensors(reader_for(safetensors_bytes(raw, b"\0" * 8)))


def test_validate_safetensors_gap_is_rejected() -> None:
    header = {"a": st_entry("F32", [2], 0, 8), "b": st_entry("F32", [1], 12, 16)}
    with pytest.raises(Rejected, match="gap"):
        validate_safetensors(reader_for(_file(header)))


def test_validate_safetensors_overlap_is_rejected() -> None:
    header = {"a": st_entry("F32", [2], 0, 8), "b": st_entry("F32", [2], 4, 12)}
    with pytest.raises(Rejected, match="overlaps"):
        validate_safetensors(reader_for(_file(header, 12)))


def test_validate_safetensors_not_starting_at_zero_is_rejected() -> None:
    assert _code(_file({"a": st_entry("F32", [2], 8, 16)})) == "SAFETENSORS_INVALID"


def test_validate_safetensors_reversed_offsets_are_rejected() -> None:
    header = {"a": st_entry("F32", [2], 8, 0)}
    with pytest.raises(Rejected, match="reversed"):
        validate_safetensors(reader_for(_file(header, 8)))


def test_validate_safetensors_offsets_past_file_are_truncated() -> None:
    header = {"a": st_entry("F32", [4], 0, 16)}
    assert _code(_file(header, 8)) == "TRUNCATED"


def test_validate_safetensors_trailing_bytes_are_rejected() -> None:
    with pytest.raises(Rejected, match="unexpected bytes"):
        validate_safetensors(reader_for(_file(TWO, 20)))


def test_validate_safetensors_shape_overflow_is_rejected() -> None:
    header = {"a": st_entry("F32", [1 << 62, 1 << 62], 0, 16)}
    with pytest.raises(Rejected, match="overflows"):
        validate_safetensors(reader_for(_file(header)))


def test_validate_safetensors_shape_size_mismatch_is_rejected() -> None:
    assert _code(_file({"a": st_entry("F32", [3], 0, 16)})) == "SAFETENSORS_INVALID"


@pytest.mark.parametrize("shape", [[-1], [1.5], ["2"], [True], "4"])
def test_validate_safetensors_non_integer_shape_is_rejected(shape: Any) -> None:
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}
    assert _code(_file(header)) == "SAFETENSORS_INVALID"


def test_validate_safetensors_unknown_dtype_is_rejected() -> None:
    with pytest.raises(Rejected, match="unknown dtype"):
        validate_safetensors(reader_for(_file({"a": st_entry("F128", [1], 0, 16)})))


def test_validate_safetensors_extra_entry_key_is_rejected() -> None:
    header = {"a": {**st_entry("F32", [4], 0, 16), "note": "x"}}
    assert _code(_file(header)) == "SAFETENSORS_INVALID"


@pytest.mark.parametrize("metadata", [{"n": 1}, {"n": None}, ["x"], "x"])
def test_validate_safetensors_non_string_metadata_is_rejected(metadata: Any) -> None:
    header = {"__metadata__": metadata, **TWO}
    with pytest.raises(Rejected, match="__metadata__"):
        validate_safetensors(reader_for(_file(header)))


def test_validate_safetensors_sub_byte_dtype_counts_bits() -> None:
    header = {"a": st_entry("F4", [4], 0, 2)}
    assert validate_safetensors(reader_for(_file(header, 2)))["total_params"] == 4


def test_validate_safetensors_header_padding_spaces_pass() -> None:
    raw = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}' + b" " * 7
    data = struct.pack("<Q", len(raw)) + raw + b"\0\0"
    assert validate_safetensors(reader_for(data))["dtypes"] == {"U8": 1}

"""Structural check of a safetensors file: a strict JSON header that tiles the data exactly."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from validators.base import HashingReader, Rejected

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_LIMIT = 1 << 63
MAX_DIMS = 64  # torch's own limit; also keeps the shape product cheap to compute
# dtype -> bits per element, as the safetensors Dtype enum (sub-byte floats included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _invalid(message: str) -> Rejected:
    return Rejected("SAFETENSORS_INVALID", message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _invalid(f"the header names {key!r} twice")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise _invalid(f"the header contains the non-JSON constant {name}")


def _read_header(reader: HashingReader) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", reader.read_exact(8))
    if length > MAX_HEADER_BYTES:
        raise _invalid(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if length > reader.remaining:
        raise Rejected(
            "TRUNCATED", f"header length {length} is larger than the {reader.remaining} bytes left"
        )
    raw = reader.read_exact(length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(
            f"the header is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    if not text.startswith("{"):
        raise _invalid("the header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _invalid("the header is not a JSON object")
    return header


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _invalid("__metadata__ must map strings to strings")
    return value


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _LIMIT


def _entry_span(name: str, entry: Any) -> tuple[int, int, int, str]:
    """(begin, end, element count, dtype) of one tensor, checked against its dtype and shape."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _invalid(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise _invalid(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(_is_uint, shape)):
        raise _invalid(f"tensor {name!r} shape must be a list of at most {MAX_DIMS} ints >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets)):
        raise _invalid(f"tensor {name!r} data_offsets must be two non-negative ints")
    begin, end = offsets
    if begin > end:
        raise _invalid(f"tensor {name!r} data_offsets are reversed ({begin} > {end})")
    elements = math.prod(shape)
    nbits = elements * DTYPE_BITS[dtype]
    if nbits >= _LIMIT * 8:
        raise _invalid(f"tensor {name!r} shape {shape} overflows")
    if nbits % 8 or nbits // 8 != end - begin:
        raise _invalid(
            f"tensor {name!r}: {dtype} {shape} needs {nbits / 8:g} bytes, "
            f"data_offsets span {end - begin}"
        )
    return begin, end, elements, dtype


def _check_tiling(spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must cover the data section exactly: from 0, no gap, no overlap, no tail."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise _invalid(f"tensor {name!r} at offset {begin} {what} (expected {position})")
        position = end
    if position > data_size:
        raise Rejected(
            "TRUNCATED", f"tensor data needs {position} bytes, the file holds {data_size}"
        )
    if position < data_size:
        raise _invalid(f"{data_size - position} unexpected bytes after the last tensor")


def validate_safetensors(reader: HashingReader) -> dict[str, Any]:
    """Check the header and layout of a safetensors file, skip its data; return a summary."""
    header = _read_header(reader)
    metadata = _metadata(header.pop("__metadata__", {}))
    spans: list[tuple[int, int, str]] = []
    total = 0
    dtypes: dict[str, int] = {}
    for name, entry in header.items():
        begin, end, elements, dtype = _entry_span(name, entry)
        spans.append((begin, end, name))
        total += elements
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    _check_tiling(spans, reader.remaining)
    reader.skip(reader.remaining)
    return {
        "tensor_count": len(spans),
        "total_params": total,
        "dtypes": dtypes,
        "metadata": metadata,
    }

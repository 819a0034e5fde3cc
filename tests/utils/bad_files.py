"""Byte-level builders for well-formed and deliberately broken model files.

Everything is built with `struct` and `json` so a test states exactly which field is wrong.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from validators.base import HashingReader
from validators.pipeline import BundleFile

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def reader_for(data: bytes, size: int | None = None, path: str = "f") -> HashingReader:
    """A HashingReader over in-memory bytes (declared size defaults to the real one)."""
    return HashingReader(io.BytesIO(data), len(data) if size is None else size, path=path)


def gguf_str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gguf_str(key) + struct.pack("<II", U32, value)


def kv_string(key: str, value: str) -> bytes:
    return gguf_str(key) + struct.pack("<I", STRING) + gguf_str(value)


def kv_string_array(key: str, values: Sequence[str]) -> bytes:
    body = b"".join(gguf_str(v) for v in values)
    return gguf_str(key) + struct.pack("<IIQ", ARRAY, STRING, len(values)) + body


@dataclass
class GgufTensor:
    name: str
    dims: list[int]
    ggml_type: int = GGML_F32
    offset: int = 0

    def info(self) -> bytes:
        dims = struct.pack(f"<I{len(self.dims)}Q", len(self.dims), *self.dims)
        return gguf_str(self.name) + dims + struct.pack("<IQ", self.ggml_type, self.offset)


def default_kv(block_count: int = 2) -> list[bytes]:
    return [
        kv_string("general.architecture", "llama"),
        kv_u32("llama.block_count", block_count),
        kv_u32("llama.context_length", 128),
        kv_string("tokenizer.ggml.model", "gpt2"),
        kv_string_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"]),
        kv_string("tokenizer.chat_template", "{{ messages }}"),
    ]


@dataclass
class GgufSpec:
    """A small GGUF: every field can be overridden to make it wrong."""

    magic: bytes = b"GGUF"
    version_bytes: bytes = struct.pack("<I", 3)
    kv: list[bytes] = field(default_factory=default_kv)
    tensors: list[GgufTensor] = field(
        default_factory=lambda: [GgufTensor("a", [8]), GgufTensor("b", [4, 2], offset=32)]
    )
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32
    data_size: int | None = None  # defaults to the padded end of the last tensor

    def build(self) -> bytes:
        n_t = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kv) if self.n_kv is None else self.n_kv
        head = self.magic + self.version_bytes + struct.pack("<QQ", n_t, n_kv)
        head += b"".join(self.kv) + b"".join(t.info() for t in self.tensors)
        head += b"\0" * (-len(head) % self.alignment)
        return head + b"\x11" * self._data_size()

    def _data_size(self) -> int:
        if self.data_size is not None:
            return self.data_size
        end = max((t.offset + _f32_nbytes(t) for t in self.tensors), default=0)
        return end + (-end % self.alignment)


def _f32_nbytes(t: GgufTensor) -> int:
    n = 4 if t.ggml_type == GGML_F32 else 2
    for d in t.dims:
        n *= d
    return n


# --- safetensors -----------------------------------------------------------------------


def safetensors_bytes(
    header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None
) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def st_entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --- other kinds --------------------------------------------------------------------------


def zip_head(first_member: str = "archive/data.pkl") -> bytes:
    """The first local file header of a zip archive."""
    name = first_member.encode()
    return b"PK\x03\x04" + b"\0" * 22 + struct.pack("<HH", len(name), 0) + name + b"\0" * 64


def tar_head(name: str = "storages") -> bytes:
    block = bytearray(512)
    block[: len(name)] = name.encode()
    block[257:263] = b"ustar\0"
    return bytes(block)


def onnx_head(ir_version: int = 8) -> bytes:
    """ModelProto: ir_version, producer_name, then a graph tag."""
    return bytes([0x08, ir_version, 0x12, 0x07]) + b"pytorch" + b"\x3a\x10" + b"\0" * 16


def sentencepiece_head() -> bytes:
    """ModelProto.pieces[0] = {piece: "<unk>", score: 0.0, type: 2}."""
    piece = b"\x0a\x05<unk>" + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x02"
    return b"\x0a" + bytes([len(piece)]) + piece


# --- bundles -----------------------------------------------------------------------------


def mem_file(path: str, data: bytes, *, size: int | None = None) -> BundleFile:
    """A bundle file served from memory; `size` may lie about the length."""
    return BundleFile(path, len(data) if size is None else size, lambda: io.BytesIO(data))


def _open_binary(path: Path) -> BinaryIO:
    return path.open("rb")


def dir_files(root: Path) -> list[BundleFile]:
    """Every file under `root` as a bundle file with its relative POSIX path."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out.append(BundleFile(rel, p.stat().st_size, functools.partial(_open_binary, p)))
    return out


class PatternStream(io.RawIOBase):
    """`prefix` followed by generated filler bytes, never materialised as a whole."""

    def __init__(self, prefix: bytes, total: int) -> None:
        self._prefix = prefix
        self._total = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._total - self._pos if n < 0 else min(n, self._total - self._pos)
        start, self._pos = self._pos, self._pos + n
        head = self._prefix[start : start + n]
        return head + b"\0" * (n - len(head))

"""Structural check of a GGUF v2/v3 file: header, metadata, tensor table and data layout.

llama.cpp trusts much of the header and aborts the whole process (GGML_ASSERT) on some bad
values, so everything it would read is bounded here first, without loading tensor data.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from validators.base import CHUNK, HashingReader, Rejected

MAX_TENSORS = 65536
MAX_KV = 65536
MAX_KEY_BYTES = 256
MAX_STRING_BYTES = 8 << 20  # a chat template or an embedded tokenizer.json, never more
MAX_METADATA_BYTES = 64 << 20  # all strings and arrays of the header together
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
MAX_BLOCK_COUNT = 512  # llama.cpp's LLAMA_MAX_LAYERS; more aborts the loader
MAX_ALIGNMENT = 65536
DEFAULT_ALIGNMENT = 32
_LIMIT = 1 << 63
_ARCH = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# ggml type id -> (elements per block, bytes per block), as gguf-py's GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
    40: (64, 36), 41: (128, 18),
}  # fmt: skip

STRING, ARRAY = 8, 9
# GGUF value type -> struct format of a scalar.
_SCALARS: dict[int, struct.Struct] = {
    t: struct.Struct(f) for t, f in {
        0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
        10: "<Q", 11: "<q", 12: "<d",
    }.items()
}  # fmt: skip
_INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_U32 = _SCALARS[4]
_U64 = _SCALARS[10]
_SPECIAL_TOKENS = ("bos", "eos", "unknown", "separator", "padding", "eot", "eom", "mask")


@dataclass(frozen=True)
class GGUFArray:
    """An array value, kept as its element type and length only."""

    item_type: int
    count: int


@dataclass(frozen=True)
class _Tensor:
    name: str
    offset: int
    nbytes: int


def _invalid(message: str) -> Rejected:
    return Rejected("GGUF_INVALID", message)


class _Cursor:
    """Buffered little-endian reads over a HashingReader (header fields are tiny and many)."""

    def __init__(self, reader: HashingReader) -> None:
        self._reader = reader
        self._buf = b""
        self._i = 0

    @property
    def pos(self) -> int:
        return self._reader.tell() - (len(self._buf) - self._i)

    @property
    def remaining(self) -> int:
        return self._reader.size - self.pos

    def _ensure(self, n: int, what: str) -> None:
        avail = len(self._buf) - self._i
        if n <= avail:
            return
        if n > self.remaining:
            raise Rejected(
                "TRUNCATED",
                f"the file ends inside {what} at offset {self.pos} "
                f"({n} bytes needed, {self.remaining} left)",
            )
        more = max(n - avail, min(CHUNK, self._reader.remaining))
        self._buf = self._buf[self._i :] + self._reader.read_exact(more)
        self._i = 0

    def take(self, n: int, what: str) -> bytes:
        self._ensure(n, what)
        out = self._buf[self._i : self._i + n]
        self._i += n
        return out

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        self._ensure(fmt.size, what)
        (value,) = fmt.unpack_from(self._buf, self._i)
        self._i += fmt.size
        return value

    def seek(self, offset: int) -> None:
        """Jump forward to absolute `offset`, hashing but never keeping what lies between."""
        if offset <= self._reader.tell():
            self._i += offset - self.pos
            return
        self._buf, self._i = b"", 0
        self._reader.seek_forward(offset)


class _Parser:
    def __init__(self, reader: HashingReader) -> None:
        self.cur = _Cursor(reader)
        self.budget = MAX_METADATA_BYTES

    def _spend(self, n: int, what: str) -> None:
        self.budget -= n
        if self.budget < 0:
            raise _invalid(f"metadata exceeds {MAX_METADATA_BYTES} bytes at {what}")

    def string(self, what: str, cap: int = MAX_STRING_BYTES, keep: bool = True) -> str:
        n = self.cur.scalar(_U64, what)
        if n > cap:
            raise _invalid(f"{what} is {n} bytes long, the limit is {cap}")
        self._spend(n, what)
        if not keep:
            self.cur.take(n, what)
            return ""
        return self.cur.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.cur.scalar(_SCALARS[vtype], f"the value of {key!r}")
        if vtype == STRING:
            return self.string(f"the value of {key!r}")
        if vtype != ARRAY:
            raise _invalid(f"key {key!r} has unknown value type {vtype}")
        item_type = self.cur.scalar(_U32, f"the array type of {key!r}")
        count = self.cur.scalar(_U64, f"the array length of {key!r}")
        if item_type == ARRAY:
            raise _invalid(f"key {key!r} is an array of arrays, which GGUF readers refuse")
        if item_type == STRING:
            self._spend(8 * count, key)
            for _ in range(count):
                self.string(f"an item of {key!r}", keep=False)
        elif item_type in _SCALARS:
            nbytes = _SCALARS[item_type].size * count
            self._spend(nbytes, key)
            self.cur.take(nbytes, f"the array {key!r}")
        else:
            raise _invalid(f"array {key!r} has unknown item type {item_type}")
        return GGUFArray(item_type, count)

    def metadata(self, n_kv: int) -> dict[str, tuple[int, Any]]:
        kv: dict[str, tuple[int, Any]] = {}
        for index in range(n_kv):
            key_bytes = self.cur.take(self._key_len(index), f"key #{index}")
            try:
                key = key_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid(f"key #{index} is not valid UTF-8") from None
            if key in kv:
                raise _invalid(f"duplicate metadata key {key!r}")
            vtype = self.cur.scalar(_U32, f"the type of {key!r}")
            kv[key] = (vtype, self.value(vtype, key))
        return kv

    def _key_len(self, index: int) -> int:
        n: int = self.cur.scalar(_U64, f"the length of key #{index}")
        if not 0 < n <= MAX_KEY_BYTES:
            raise _invalid(f"key #{index} is {n} bytes long; keys are 1..{MAX_KEY_BYTES} bytes")
        return n

    def tensor(self, index: int) -> tuple[str, int, int]:
        name = self.string(f"the name of tensor #{index}", cap=MAX_TENSOR_NAME)
        if not name:
            raise _invalid(f"tensor #{index} has an empty name")
        n_dims = self.cur.scalar(_U32, f"the dimensions of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _invalid(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1..{MAX_DIMS}")
        dims = [self.cur.scalar(_U64, f"the shape of {name!r}") for _ in range(n_dims)]
        ggml_type = self.cur.scalar(_U32, f"the type of {name!r}")
        offset = self.cur.scalar(_U64, f"the offset of {name!r}")
        return name, offset, _tensor_nbytes(name, dims, ggml_type)


def _tensor_nbytes(name: str, dims: list[int], ggml_type: int) -> int:
    if ggml_type not in GGML_TYPES:
        raise _invalid(f"tensor {name!r} has unknown ggml type {ggml_type}")
    block, type_size = GGML_TYPES[ggml_type]
    elements = 1
    for dim in dims:
        elements *= dim
        if dim < 1 or elements >= _LIMIT:
            raise _invalid(f"tensor {name!r} has an invalid shape {dims}")
    if dims[0] % block:
        raise _invalid(f"tensor {name!r}: first dimension {dims[0]} is not a multiple of {block}")
    nbytes = elements // block * type_size
    if nbytes >= _LIMIT:
        raise _invalid(f"tensor {name!r} of shape {dims} is larger than 2^63 bytes")
    return nbytes


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    if cur.take(4, "the magic") != b"GGUF":
        raise Rejected("GGUF_BAD_MAGIC", "the file does not start with the GGUF magic")
    version = cur.scalar(_U32, "the version")
    if version in (2 << 24, 3 << 24):
        raise Rejected(
            "GGUF_UNSUPPORTED_VERSION", "this GGUF is big-endian; convert it little-endian"
        )
    if version not in (2, 3):
        raise Rejected(
            "GGUF_UNSUPPORTED_VERSION", f"GGUF version {version} is not supported (2 or 3 are)"
        )
    n_tensors = cur.scalar(_U64, "the tensor count")
    n_kv = cur.scalar(_U64, "the metadata count")
    if not 1 <= n_tensors <= MAX_TENSORS:
        raise _invalid(f"the file declares {n_tensors} tensors; 1..{MAX_TENSORS} are allowed")
    if n_kv > MAX_KV:
        raise _invalid(f"the file declares {n_kv} metadata keys; at most {MAX_KV} are allowed")
    return version, n_tensors, n_kv


def _get(kv: dict[str, tuple[int, Any]], key: str, types: frozenset[int]) -> Any:
    """The value of `key`, or None when absent; a value of the wrong type is refused."""
    if key not in kv:
        return None
    vtype, value = kv[key]
    if vtype not in types:
        raise _invalid(f"key {key!r} has value type {vtype}, expected one of {sorted(types)}")
    return value


def _alignment(kv: dict[str, tuple[int, Any]]) -> int:
    align = _get(kv, "general.alignment", frozenset({4}))
    if align is None:
        return DEFAULT_ALIGNMENT
    if not 1 <= align <= MAX_ALIGNMENT or align & (align - 1):
        raise _invalid(f"general.alignment {align} is not a power of two in 1..{MAX_ALIGNMENT}")
    return int(align)


def _model_metadata(kv: dict[str, tuple[int, Any]]) -> dict[str, Any]:
    arch = _get(kv, "general.architecture", frozenset({STRING}))
    if arch is None or not _ARCH.match(arch):
        raise _invalid(f"general.architecture is missing or malformed ({arch!r})")
    block_count = _get(kv, f"{arch}.block_count", _INTEGER_TYPES)
    if block_count is None or not 1 <= block_count <= MAX_BLOCK_COUNT:
        raise _invalid(f"{arch}.block_count is {block_count}; 1..{MAX_BLOCK_COUNT} is required")
    context_length = _get(kv, f"{arch}.context_length", _INTEGER_TYPES)
    if context_length is not None and context_length < 1:
        raise _invalid(f"{arch}.context_length is {context_length}")
    template = _get(kv, "tokenizer.chat_template", frozenset({STRING}))
    return {
        "architecture": arch,
        "block_count": block_count,
        "context_length": context_length,
        "has_chat_template": template is not None,
        "chat_template": template,
        **_tokenizer_metadata(kv),
    }


def _tokenizer_metadata(kv: dict[str, tuple[int, Any]]) -> dict[str, Any]:
    # llama.cpp aborts on a tokenizer without a vocabulary and indexes token arrays by id.
    model = _get(kv, "tokenizer.ggml.model", frozenset({STRING}))
    tokens = _get(kv, "tokenizer.ggml.tokens", frozenset({ARRAY}))
    if tokens is not None and tokens.item_type != STRING:
        raise _invalid("tokenizer.ggml.tokens must be an array of strings")
    vocab = tokens.count if tokens is not None else 0
    if model in (None, "none", "no_vocab") or vocab == 0:
        raise _invalid(
            f"no usable tokenizer (tokenizer.ggml.model {model!r}, {vocab} tokens); "
            "convert the model with its vocabulary"
        )
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        other = _get(kv, key, frozenset({ARRAY}))
        if other is not None and other.count != vocab:
            raise _invalid(f"{key} has {other.count} entries for {vocab} tokens")
    merges = _get(kv, "tokenizer.ggml.merges", frozenset({ARRAY}))
    if merges is not None and merges.item_type != STRING:
        raise _invalid("tokenizer.ggml.merges must be an array of strings")
    for name in _SPECIAL_TOKENS:
        token_id = _get(kv, f"tokenizer.ggml.{name}_token_id", _INTEGER_TYPES)
        if token_id is not None and not 0 <= token_id < vocab:
            raise _invalid(f"tokenizer.ggml.{name}_token_id {token_id} is outside the vocabulary")
    return {"tokenizer_model": model, "vocab_size": vocab}


def _check_layout(tensors: list[_Tensor], data_start: int, size: int, align: int) -> int:
    """Offsets aligned, ascending, non-overlapping, inside the file; returns the data end."""
    end = 0
    for t in tensors:
        if t.offset % align:
            raise _invalid(f"tensor {t.name!r} offset {t.offset} is not a multiple of {align}")
        if t.offset < end:
            raise _invalid(
                f"tensor {t.name!r} at offset {t.offset} overlaps or precedes the "
                f"previous tensor, which ends at {end}"
            )
        if data_start + t.offset > size:
            raise _invalid(f"tensor {t.name!r} starts past the end of the file")
        end = t.offset + t.nbytes
        if data_start + end > size:
            raise Rejected(
                "TRUNCATED",
                f"tensor {t.name!r} ends at byte {data_start + end} but the file has {size} bytes",
            )
    padded_end = data_start + _align_up(end, align)
    if size > padded_end:
        raise _invalid(f"{size - padded_end} unexpected bytes after the last tensor")
    return data_start + end


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def read_integers(raw: BinaryIO, size: int) -> tuple[str, dict[str, int]]:
    """The architecture and the header's integer metadata, parsed under validation's
    bounds, reading nothing past the header.

    For a worker sizing a validated file (its KV cache) without a second, unbounded parser.
    Raises Rejected where validation would.
    """
    parser = _Parser(HashingReader(raw, size))
    _, _, n_kv = _read_preamble(parser.cur)
    kv = parser.metadata(n_kv)
    arch = _get(kv, "general.architecture", frozenset({STRING}))
    if not isinstance(arch, str):
        raise _invalid("general.architecture is missing")
    return arch, {key: int(value) for key, (vtype, value) in kv.items() if vtype in _INTEGER_TYPES}


def validate_gguf(reader: HashingReader) -> dict[str, Any]:
    """Parse and check a whole GGUF header, skip the tensor data; return model metadata."""
    parser = _Parser(reader)
    version, n_tensors, n_kv = _read_preamble(parser.cur)
    kv = parser.metadata(n_kv)
    align = _alignment(kv)
    meta = _model_metadata(kv)
    tensors: list[_Tensor] = []
    names: set[str] = set()
    for index in range(n_tensors):
        name, offset, nbytes = parser.tensor(index)
        if name in names:
            raise _invalid(f"duplicate tensor name {name!r}")
        names.add(name)
        tensors.append(_Tensor(name, offset, nbytes))
    data_start = _align_up(parser.cur.pos, align)
    if data_start > reader.size:
        raise Rejected("TRUNCATED", "the file ends before its tensor data section")
    data_end = _check_layout(tensors, data_start, reader.size, align)
    parser.cur.seek(data_end)
    return {"version": version, "n_tensors": n_tensors, "alignment": align, **meta}

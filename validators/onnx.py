"""ONNX models: a streaming protobuf wire-format walker (no `onnx` import, no full-file load).

The walk reads field headers straight from the stream and descends into the messages that can
hold tensors or nodes (graph, nodes, attributes, sub-graphs, local functions, training info);
everything else, raw tensor bytes included, is skipped without being held in memory.
Field numbers are those of onnx.proto (onnx 1.23).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from validators.base import HashingReader, Rejected

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MIN_IR, _MAX_IR = 3, 14  # 14 is onnx 1.23's IR_VERSION; ORT loads nothing older than 3
_MAX_DEPTH = 64  # nested messages (graph → node → attribute → graph … )
_MAX_DIMS = 1024
_MAX_STRING = 64 << 10
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
_BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_INTEGER_RE = re.compile(r"[0-9]{1,20}")
# Bits per element by TensorProto.DataType; STRING (8) has no fixed size.
# fmt: off
_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
    14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8,
    25: 2, 26: 2, 27: 6, 28: 6,
}
# fmt: on


def _invalid(message: str, wire: _Wire) -> Rejected:
    return Rejected("ONNX_INVALID", message, path=wire.reader.path or None)


class _Wire:
    """Protobuf primitives over the stream; every read is bounded by its message's end."""

    def __init__(self, reader: HashingReader) -> None:
        self.reader = reader

    def tell(self) -> int:
        return self.reader.tell()

    def varint(self, end: int) -> int:
        head = self.reader.peek(10)
        size = next((i + 1 for i, byte in enumerate(head) if byte < 0x80), 0)
        if not size or self.tell() + size > end:
            raise _invalid(f"bad varint at offset {self.tell()}", self)
        value = 0
        for shift, byte in enumerate(self.reader.read_exact(size)):
            value |= (byte & 0x7F) << (7 * shift)
        if value >> 64:
            raise _invalid(f"varint over 64 bits at offset {self.tell()}", self)
        return value

    def int64(self, wire: int, end: int) -> int:
        if wire != _VARINT:
            raise _invalid(f"integer field with wire type {wire}", self)
        value = self.varint(end)
        return value - (1 << 64) if value >> 63 else value

    def fields(self, end: int) -> Iterator[tuple[int, int]]:
        """(field number, wire type) of each field until `end`; the caller consumes values."""
        while self.tell() < end:
            key = self.varint(end)
            number, wire = key >> 3, key & 7
            if number == 0 or wire not in (_VARINT, _I64, _LEN, _I32):
                raise _invalid(f"bad field key {key} at offset {self.tell()}", self)
            yield number, wire
        if self.tell() != end:
            raise _invalid("a field runs past the end of its message", self)

    def length(self, wire: int, end: int) -> int:
        """The end offset of a length-delimited value that starts here."""
        if wire != _LEN:
            raise _invalid(f"expected a length-delimited field, got wire type {wire}", self)
        size = self.varint(end)
        if size > end - self.tell():
            raise _invalid(f"length {size} runs past its message at {self.tell()}", self)
        return self.tell() + size

    def string(self, wire: int, end: int) -> str:
        stop = self.length(wire, end)
        if stop - self.tell() > _MAX_STRING:
            raise _invalid("string field too long", self)
        try:
            return self.reader.read_exact(stop - self.tell()).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("string field is not UTF-8", self) from None

    def skip(self, wire: int, end: int) -> None:
        if wire == _VARINT:
            self.varint(end)
            return
        stop = self.length(wire, end) if wire == _LEN else self.tell() + (8 if wire == _I64 else 4)
        if stop > end:
            raise _invalid("a fixed-size field runs past its message", self)
        self.reader.skip(stop - self.tell())


@dataclass
class _Model:
    """What the walk collects."""

    ir_version: int | None = None
    opsets: dict[str, int] = field(default_factory=dict)
    has_graph: bool = False
    n_initializers: int = 0
    n_nodes: int = 0
    node_domains: dict[str, str] = field(default_factory=dict)  # domain → an op using it
    function_domains: set[str] = field(default_factory=set)
    external_refs: list[dict[str, Any]] = field(default_factory=list)


_Walker = Callable[[_Wire, int, _Model, int], None]


def _descend(w: _Wire, wire: int, end: int, model: _Model, depth: int, walker: _Walker) -> None:
    if depth >= _MAX_DEPTH:
        raise _invalid(f"messages nested deeper than {_MAX_DEPTH}", w)
    walker(w, w.length(wire, end), model, depth + 1)


def _location_problem(location: str) -> str | None:
    """Why an external-data location could reach outside the bundle, or None."""
    if "_ORT_MEM_ADDR_" in location:
        return "is onnxruntime's in-memory address marker"
    if location.startswith("/") or "\\" in location or ":" in location:
        return "is absolute or not a plain relative path"
    if any(ord(c) < 0x20 for c in location):
        return "contains control characters"
    if any(part in ("", ".", "..") for part in location.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def _external_ref(entries: list[tuple[str, str]], nbytes: int | None, w: _Wire) -> dict[str, Any]:
    info = dict(entries)
    unknown = sorted({k for k, _ in entries} - _EXTERNAL_KEYS)
    if unknown or len(info) != len(entries):
        what = f"unknown key {unknown[0]!r}" if unknown else "a repeated key"
        raise _invalid(f"external data has {what}", w)
    for key in ("location", "basepath"):
        problem = _location_problem(info[key]) if info.get(key) else None
        if problem is not None:
            raise Rejected(
                "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE",
                f"external data {key} {info[key]!r:.200} {problem}",
                path=w.reader.path or None,
            )
    if not info.get("location"):
        raise _invalid("external data without a location", w)
    ref: dict[str, Any] = {"location": info["location"], "offset": 0, "length": None}
    for key in ("offset", "length"):
        if key in info:
            if not _INTEGER_RE.fullmatch(info[key]):
                raise _invalid(f"external data {key} {info[key]!r:.40} is not an integer", w)
            ref[key] = int(info[key])
    if nbytes is not None and ref["length"] not in (None, nbytes):
        raise _invalid(f"external data length {ref['length']} but tensor needs {nbytes}", w)
    return ref | {"nbytes": nbytes}


def _dims(w: _Wire, wire: int, end: int, dims: list[int]) -> None:
    """One dimension (wire type 0) or a packed run of them (wire type 2)."""
    stop = w.length(wire, end) if wire == _LEN else None
    while stop is None or w.tell() < stop:
        dims.append(w.int64(_VARINT, end if stop is None else stop))
        if len(dims) > _MAX_DIMS or dims[-1] < 0:
            raise _invalid("tensor with a negative or excessive dimension list", w)
        if stop is None:
            return


def _walk_tensor(w: _Wire, end: int, model: _Model, depth: int) -> None:
    dims: list[int] = []
    data_type, location, raw_len = 0, 0, None
    entries: list[tuple[str, str]] = []
    for number, wire in w.fields(end):
        if number == 1:
            _dims(w, wire, end, dims)
        elif number == 2:
            data_type = w.int64(wire, end)
        elif number == 14:
            location = w.int64(wire, end)
        elif number == 9:  # raw_data: only its length matters, the bytes are skipped
            stop = w.length(wire, end)
            raw_len = stop - w.tell()
            w.reader.skip(raw_len)
        elif number == 13:
            entries.append(_string_pair(w, w.length(wire, end)))
        else:
            w.skip(wire, end)
    bits = _BITS.get(data_type)
    nbytes = None if bits is None else math.ceil(math.prod(dims) * bits / 8)
    if location not in (0, _EXTERNAL) or (entries and location != _EXTERNAL):
        raise _invalid(f"tensor data_location {location} does not match its external data", w)
    if location == _EXTERNAL:
        if raw_len is not None:
            raise _invalid("external tensor that also carries raw_data", w)
        model.external_refs.append(_external_ref(entries, nbytes, w))
    elif raw_len is not None and nbytes is None:
        raise _invalid(f"raw_data for tensor data type {data_type}, which has no fixed size", w)
    elif raw_len is not None and raw_len != nbytes:
        raise _invalid(f"tensor raw_data has {raw_len} bytes, dims and type need {nbytes}", w)


def _string_pair(w: _Wire, end: int) -> tuple[str, str]:
    """A StringStringEntryProto (key = 1, value = 2)."""
    pair = {1: "", 2: ""}
    for number, wire in w.fields(end):
        if number in pair:
            pair[number] = w.string(wire, end)
        else:
            w.skip(wire, end)
    return pair[1], pair[2]


def _walk_sparse(w: _Wire, end: int, model: _Model, depth: int) -> None:
    for number, wire in w.fields(end):
        if number in (1, 2):  # values, indices
            _descend(w, wire, end, model, depth, _walk_tensor)
        else:
            w.skip(wire, end)


def _walk_attribute(w: _Wire, end: int, model: _Model, depth: int) -> None:
    walkers: dict[int, _Walker] = {5: _walk_tensor, 10: _walk_tensor, 6: _walk_graph}
    walkers |= {11: _walk_graph, 22: _walk_sparse, 23: _walk_sparse}
    for number, wire in w.fields(end):
        if number in walkers:
            _descend(w, wire, end, model, depth, walkers[number])
        else:
            w.skip(wire, end)


def _walk_node(w: _Wire, end: int, model: _Model, depth: int) -> None:
    domain, op_type = "", ""
    for number, wire in w.fields(end):
        if number == 7:
            domain = w.string(wire, end)
        elif number == 4:
            op_type = w.string(wire, end)
        elif number == 5:
            _descend(w, wire, end, model, depth, _walk_attribute)
        else:
            w.skip(wire, end)
    model.n_nodes += 1
    model.node_domains.setdefault(domain, op_type)


def _walk_graph(w: _Wire, end: int, model: _Model, depth: int) -> None:
    walkers: dict[int, _Walker] = {1: _walk_node, 5: _walk_tensor, 15: _walk_sparse}
    for number, wire in w.fields(end):
        if number in walkers:
            if number == 5 and depth == 1:  # initializers of the main graph
                model.n_initializers += 1
            _descend(w, wire, end, model, depth, walkers[number])
        else:
            w.skip(wire, end)


def _walk_function(w: _Wire, end: int, model: _Model, depth: int) -> None:
    for number, wire in w.fields(end):
        if number == 10:
            model.function_domains.add(w.string(wire, end))
        elif number == 7:
            _descend(w, wire, end, model, depth, _walk_node)
        elif number == 11:  # attribute_proto: default attribute values may hold tensors
            _descend(w, wire, end, model, depth, _walk_attribute)
        else:
            w.skip(wire, end)


def _walk_training(w: _Wire, end: int, model: _Model, depth: int) -> None:
    for number, wire in w.fields(end):
        if number in (1, 2):  # initialization, algorithm
            _descend(w, wire, end, model, depth, _walk_graph)
        else:
            w.skip(wire, end)


def _read_opset(w: _Wire, end: int, model: _Model) -> None:
    domain, version = "", 0
    for number, wire in w.fields(end):
        if number == 1:
            domain = w.string(wire, end)
        elif number == 2:
            version = w.int64(wire, end)
        else:
            w.skip(wire, end)
    if domain in model.opsets or version < 1:
        raise _invalid(f"opset_import for {domain!r} repeated or without a version", w)
    model.opsets[domain] = version


def _walk_model(w: _Wire, end: int, model: _Model) -> None:
    walkers: dict[int, _Walker] = {7: _walk_graph, 20: _walk_training, 25: _walk_function}
    for number, wire in w.fields(end):
        if number == 1:
            model.ir_version = w.int64(wire, end)
        elif number == 8:
            _read_opset(w, w.length(wire, end), model)
        elif number in walkers:
            if number == 7 and model.has_graph:
                raise _invalid("the model has two graph fields", w)
            model.has_graph = model.has_graph or number == 7
            _descend(w, wire, end, model, 0, walkers[number])
        else:
            w.skip(wire, end)


def validate_onnx(reader: HashingReader) -> dict[str, Any]:
    """Walk a whole ONNX ModelProto from the stream; raise `Rejected` on any problem."""
    wire = _Wire(reader)
    model = _Model()
    _walk_model(wire, reader.tell() + reader.remaining, model)
    if model.ir_version is None or not _MIN_IR <= model.ir_version <= _MAX_IR:
        raise _invalid(f"ir_version {model.ir_version} is missing or unsupported", wire)
    if not model.has_graph or not model.opsets:
        raise _invalid("the model has no graph or no opset_import", wire)
    allowed = _BUILTIN_DOMAINS | model.function_domains
    unknown = sorted(set(model.node_domains) - allowed)
    if unknown:
        raise Rejected(
            "ONNX_UNKNOWN_DOMAIN",
            f"operator {model.node_domains[unknown[0]]!r} is from domain {unknown[0]!r}, "
            "which no supported runtime or local function provides",
            path=reader.path or None,
        )
    return {
        "ir_version": model.ir_version,
        "opsets": model.opsets,
        "external_data": sorted({ref["location"] for ref in model.external_refs}),
        "external_refs": model.external_refs,
        "n_initializers": model.n_initializers,
        "n_nodes": model.n_nodes,
        "domains": sorted(model.node_domains),
    }

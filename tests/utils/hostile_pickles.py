"""Hand-assembled pickles and zips for the pickle scanner and torch archive tests.

Pickles are built opcode by opcode so each test controls exactly how a global is reached
(GLOBAL, STACK_GLOBAL, memoized STACK_GLOBAL, INST, OBJ). Zips are written by a tiny writer
so a test can break exactly one field (CRC, names, flags, method, central directory).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Style = Literal["proto0", "proto2", "proto4", "proto4-memo"]
STYLES: tuple[Style, ...] = ("proto0", "proto2", "proto4", "proto4-memo")

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
STOP = b"."


def unicode(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def global_op(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str, *, memoized: bool = False) -> bytes:
    """Push `module.name` with STACK_GLOBAL; memoized operands are fetched back with BINGET."""
    if not memoized:
        return unicode(module) + unicode(name) + b"\x93"
    # MEMOIZE then POP each string, so the scanner must follow the memo to resolve them
    stash = unicode(module) + b"\x94" + b"0" + unicode(name) + b"\x94" + b"0"
    return stash + b"h\x00h\x01\x93"


def call_payload(module: str, name: str, arg: str, style: Style) -> bytes:
    """`module.name(arg)` as a complete pickle in the given protocol style."""
    if style == "proto0":
        return global_op(module, name) + b"(" + f"S'{arg}'\n".encode() + b"tR" + STOP
    if style == "proto2":
        return PROTO2 + global_op(module, name) + unicode(arg) + b"\x85R" + STOP
    memoized = style == "proto4-memo"
    return PROTO4 + stack_global(module, name, memoized=memoized) + unicode(arg) + b"\x85R" + STOP


class _Canary:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.path}",)


def canary_pickle(path: Path, protocol: int = 2) -> bytes:
    """A real `pickle.dumps` payload that creates `path` when unpickled."""
    return pickle.dumps(_Canary(path), protocol=protocol)


@dataclass
class RawEntry:
    name: str | bytes
    data: bytes
    method: int = 0
    flags: int = 0
    crc: int | None = None  # None: the right CRC
    central_name: str | bytes | None = None  # None: same as `name`

    @property
    def raw_name(self) -> bytes:
        return self.name if isinstance(self.name, bytes) else self.name.encode()


def build_zip(entries: list[RawEntry], *, before: bytes = b"", after: bytes = b"") -> bytes:
    """A plain zip (no descriptors, no zip64) whose fields come from `entries` verbatim."""
    out = bytearray(before)
    central = bytearray()
    for e in entries:
        offset = len(out)
        payload = zlib.compress(e.data)[2:-4] if e.method == 8 else e.data
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        sizes = (crc, len(payload), len(e.data), len(e.raw_name), 0)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, e.flags, e.method, 0, 0, *sizes)
        out += e.raw_name + payload
        cname = e.raw_name if e.central_name is None else e.central_name
        cname = cname if isinstance(cname, bytes) else cname.encode()
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, e.flags, e.method, 0, 0,
            crc, len(payload), len(e.data), len(cname), 0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += cname
    cd_offset = len(out)
    out += central
    n = len(entries)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(out) + after


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, content) of each member of a real zip, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def torch_like_zip(members: list[tuple[str, bytes]]) -> bytes:
    """Members rewritten by the tiny writer (no descriptors), so single fields can be broken."""
    return build_zip([RawEntry(name, content) for name, content in members])


# --- executable payload chains ------------------------------------------------------------
# Each helper returns opcodes that push one value in protocol 2 (protocol 4 where noted), so
# a chain reads like the Python it would run: call(GLOBAL, arg, ...) is `fn(arg, ...)`.


def text(value: str) -> bytes:
    """BINUNICODE: a string of any length."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def call(fn: bytes, *args: bytes) -> bytes:
    """`fn(*args)`: MARK, the arguments, TUPLE, REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def str_list(*items: str) -> bytes:
    return b"](" + b"".join(text(i) for i in items) + b"e"


def proto2(body: bytes) -> bytes:
    return PROTO2 + body + STOP


def proto4(body: bytes) -> bytes:
    return PROTO4 + body + STOP


def popen_payload(argv: tuple[str, ...], style: Style) -> bytes:
    """`subprocess.Popen(argv)` with a tuple argv, in each protocol style."""
    if style == "proto0":
        items = b"".join(f"S'{a}'\n".encode() for a in argv)
        return global_op("subprocess", "Popen") + b"((" + items + b"ttR" + STOP
    fn = (
        global_op("subprocess", "Popen")
        if style == "proto2"
        else stack_global("subprocess", "Popen", memoized=style == "proto4-memo")
    )
    items = b"".join(unicode(a) for a in argv)
    head = PROTO2 if style == "proto2" else PROTO4
    return head + fn + b"(" + items + b"t\x85R" + STOP

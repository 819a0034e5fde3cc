"""Zip containers that different readers see differently, or that cost more than they weigh."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from tests.adversarial.case import Bases, Case, small_state_members
from tests.utils.hostile_pickles import RawEntry, build_zip, canary_pickle


def _entries() -> list[RawEntry]:
    return [RawEntry(name, content) for name, content in small_state_members()]


def _pkl(entries: list[RawEntry]) -> RawEntry:
    return next(e for e in entries if e.raw_name.endswith(b"/data.pkl"))


def _central_offsets(data: bytes) -> list[int]:
    """Offsets of the central directory headers of a zip built by `build_zip`."""
    out, pos = [], data.find(b"PK\x01\x02")
    while pos != -1:
        out.append(pos)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return out


def _point_central_at(data: bytes, index: int, local_offset: int) -> bytes:
    """Make central entry `index` name the local header at `local_offset`."""
    out = bytearray(data)
    struct.pack_into("<I", out, _central_offsets(data)[index] + 42, local_offset)
    return bytes(out)


def zip_cases(b: Bases) -> Iterator[Case]:
    def case(name: str, data: bytes, code: str, canary: str | None = None) -> Case:
        path = b.canary(canary) if canary else None
        return Case(f"zip-{name}", "zip", b.pytorch_with(data), code, path)

    yield case("junk-before", build_zip(_entries(), before=b"\x00JUNK" * 8), "FORMAT_MISMATCH")
    yield case("junk-after", build_zip(_entries(), after=b"JUNKJUNK"), "ZIP_INVALID")
    entries = _entries()
    _pkl(entries).method = 8
    yield case("deflated-data-pkl", build_zip(entries), "ZIP_COMPRESSED_ENTRY")
    entries = _entries()
    for e in entries:
        e.flags = 1
    yield case("encrypted", build_zip(entries), "ZIP_ENCRYPTED")
    bomb = [*_entries(), RawEntry("archive/data/99", b"\0" * (16 << 20), method=8)]
    yield case("deflate-bomb", build_zip(bomb), "ZIP_COMPRESSED_ENTRY")
    # Every central entry names the first local header: a quoted-overlap bomb for readers
    # that trust the central directory.
    data = build_zip(_entries())
    for i in range(1, len(_central_offsets(data))):
        data = _point_central_at(data, i, 0)
    yield case("overlapping-entries", data, "ZIP_INCONSISTENT")
    # Two data.pkl: the honest one first for streaming readers, the payload second.
    payload = RawEntry("archive/data.pkl", canary_pickle(b.canary("zip-duplicate-data-pkl")))
    yield case("duplicate-data-pkl", build_zip([*_entries(), payload]), "ZIP_DUPLICATE_ENTRY",
               "zip-duplicate-data-pkl")  # fmt: skip
    # The central directory (what torch reads) points data.pkl at a hidden payload entry.
    entries = [*_entries(), RawEntry("archive/data/hidden", canary_pickle(b.canary("zip-cd")))]
    data = build_zip(entries)
    hidden_at = data.index(b"archive/data/hidden") - 30  # its local header
    pkl_index = [e.raw_name for e in entries].index(_pkl(entries).raw_name)
    yield case("central-directory-redirect", _point_central_at(data, pkl_index, hidden_at),
               "ZIP_INCONSISTENT", "zip-cd")  # fmt: skip
    entries = _entries()
    _pkl(entries).central_name = "archive/data.pkX"
    yield case("local-central-name-mismatch", build_zip(entries), "ZIP_INCONSISTENT")
    entries = _entries()
    entries[-1].crc = 0xDEADBEEF
    yield case("bad-crc", build_zip(entries), "ZIP_BAD_CRC")
    yield case("dotdot-entry", build_zip([*_entries(), RawEntry("../x", b"x")]), "ZIP_UNSAFE_PATH")
    yield case("absolute-entry", build_zip([*_entries(), RawEntry("/x", b"x")]), "ZIP_UNSAFE_PATH")
    entries = _entries()
    for e in entries:
        if e.raw_name.endswith(b"/byteorder"):
            e.data = b"big"
    yield case("big-endian", build_zip(entries), "TORCH_BIG_ENDIAN")

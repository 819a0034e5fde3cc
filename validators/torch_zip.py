"""PyTorch archives: a strict one-pass zip parser, then the torch layout and its pickle.

`torch.load` (through miniz) trusts the central directory, while a streaming reader sees the
local headers; we read every local header and payload in order, then require the central
directory to describe exactly the same entries, so both views of the file are one and the same.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from validators.base import CHUNK, HashingReader, Rejected
from validators.pickle_scan import StorageRef, scan_pickle, verdict, walk

LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
DESCRIPTOR_SIG = b"PK\x07\x08"
ZIP64_EOCD_SIG = b"PK\x06\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
EOCD_SIG = b"PK\x05\x06"
_ZIP64_EXTRA = 0x0001
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_FLAG_ENCRYPTED = 0x0001 | 0x0040  # traditional and strong encryption
_FLAG_DESCRIPTOR = 0x0008
_SMALL_RECORD_LIMIT = 1024
# Records torch.save writes beside data.pkl and data/<key>; they are tiny text values.
SMALL_RECORDS = frozenset(
    {"byteorder", "version", ".format_version", ".storage_alignment", ".data/version"}
    | {".data/serialization_id"}
)
_DATA_RE = re.compile(r"data/[A-Za-z0-9_]{1,64}")
_TORCHSCRIPT_FILES = frozenset({"constants.pkl", "bytecode.pkl"})
_TORCHSCRIPT_DIRS = ("code/", "constants/", "extra/")
_RESAVE = "re-save it with a current torch.save (zip format) or as safetensors"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5  # magic, protocol, sys_info, data, storage keys


@dataclass
class _Entry:
    name: str
    offset: int  # of the local header
    flags: int
    crc: int
    size: int  # stored entries: compressed size == uncompressed size
    data: bytes | None  # kept only for data.pkl and the small records


def _reject(code: str, message: str, reader: HashingReader) -> Rejected:
    return Rejected(code, message, path=reader.path or None)


def _reject_tar(reader: HashingReader) -> None:
    """Very old torch.save wrote a tar (`sys_info`, `pickle`, `storages`, `tensors`)."""
    if reader.peek(262)[257:262] == b"ustar":
        raise _reject("LEGACY_TAR_FORMAT", f"a legacy tar checkpoint; {_RESAVE}", reader)


def _check_name(raw: bytes, reader: HashingReader) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject("ZIP_UNSAFE_PATH", f"entry name {raw!r:.80} is not UTF-8", reader) from None
    bad_char = any(c in name for c in "\\:") or any(ord(c) < 0x20 for c in name)
    segments = name.split("/")
    if bad_char or name.startswith("/") or any(s in ("", ".", "..") for s in segments):
        raise _reject("ZIP_UNSAFE_PATH", f"entry name {name!r:.120} is not a safe path", reader)
    return name


def _refuse_torchscript(record: str, reader: HashingReader) -> None:
    if record in _TORCHSCRIPT_FILES or record.startswith(_TORCHSCRIPT_DIRS):
        raise _reject(
            "TORCHSCRIPT",
            "TorchScript archives are not accepted: upload a state_dict or safetensors",
            reader,
        )


def _parse_extra(extra: bytes, reader: HashingReader) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _reject("ZIP_INVALID", "truncated extra field", reader)
        field_id, size = struct.unpack_from("<HH", extra, pos)
        if field_id in fields or pos + 4 + size > len(extra):
            raise _reject("ZIP_INVALID", f"malformed extra field 0x{field_id:04x}", reader)
        fields[field_id] = extra[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return fields


def _keep_limit(name: str, max_pickle_bytes: int) -> tuple[int, str]:
    """How many bytes of an entry we hold in memory, and the code when it has more."""
    parts = name.split("/", 1)
    record = parts[1] if len(parts) == 2 else ""
    if record == "data.pkl":
        return max_pickle_bytes, "PICKLE_TOO_LARGE"
    if record in SMALL_RECORDS:
        return _SMALL_RECORD_LIMIT, "TORCH_INVALID"
    return 0, ""


class _Payload:
    """Collects an entry's bytes: CRC of everything, a copy only of what we keep."""

    def __init__(self, name: str, max_pickle_bytes: int, reader: HashingReader) -> None:
        self.limit, self.code = _keep_limit(name, max_pickle_bytes)
        self.name, self.reader = name, reader
        self.crc = 0
        self.size = 0
        self.parts: list[bytes] = []

    def take(self, n: int, crc: int | None = None) -> None:
        """Consume `n` bytes; `crc` is given when the caller already computed it."""
        if self.limit and self.size + n > self.limit:
            raise _reject(self.code, f"{self.name} is larger than {self.limit} bytes", self.reader)
        while n:
            chunk = self.reader.read_exact(min(n, CHUNK))
            if crc is None:
                self.crc = zlib.crc32(chunk, self.crc)
            if self.limit:
                self.parts.append(chunk)
            self.size += len(chunk)
            n -= len(chunk)
        if crc is not None:
            self.crc = crc

    @property
    def data(self) -> bytes | None:
        return b"".join(self.parts) if self.limit else None


def _find_descriptor(window: bytes, crc: int, size: int) -> tuple[int, int, int, bool] | None:
    """(offset, length, crc of the data before it, CRC matches) of the first data descriptor.

    A stored entry with bit 3 set has no length up front: a descriptor is recognised where its
    sizes equal the bytes before it; the central directory must agree afterwards, so the
    entry boundaries we settle on are the ones torch's reader will use.
    """
    start = done = 0
    running = crc
    while (idx := window.find(DESCRIPTOR_SIG, start)) != -1 and idx < CHUNK:
        running = zlib.crc32(window[done:idx], running)
        done = idx
        for fmt in ("<III", "<IQQ"):
            body = window[idx + 4 : idx + 4 + struct.calcsize(fmt)]
            if len(body) == struct.calcsize(fmt):
                got_crc, csize, usize = struct.unpack(fmt, body)
                if csize == usize == size + idx:
                    return idx, 4 + len(body), running, got_crc == running
        start = idx + 1
    return None


def _read_described(payload: _Payload) -> None:
    reader = payload.reader
    while True:
        window = reader.peek(CHUNK + 24)
        found = _find_descriptor(window, payload.crc, payload.size)
        if found is not None:
            idx, length, crc, crc_ok = found
            if not crc_ok:
                raise _reject("ZIP_BAD_CRC", f"{payload.name}: CRC-32 does not match", reader)
            payload.take(idx, crc)
            reader.skip(length)
            return
        if len(window) < 16:
            raise _reject("ZIP_INVALID", f"{payload.name} has no data descriptor", reader)
        payload.take(min(len(window), CHUNK))


def _read_local(reader: HashingReader, max_pickle_bytes: int) -> _Entry:
    offset = reader.tell()
    head = struct.unpack("<IHHHHHIIIHH", reader.read_exact(30))
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = head
    if flags & _FLAG_ENCRYPTED:
        raise _reject("ZIP_ENCRYPTED", "encrypted zip entries are not accepted", reader)
    name = _check_name(reader.read_exact(name_len), reader)
    _refuse_torchscript(name.partition("/")[2], reader)  # before its deflated code entries
    if method != 0:
        raise _reject("ZIP_COMPRESSED_ENTRY", f"{name} is compressed; torch.save stores", reader)
    zip64 = _parse_extra(reader.read_exact(extra_len), reader).get(_ZIP64_EXTRA)
    if _U32 in (csize, usize):
        if zip64 is None or len(zip64) < 16:
            raise _reject("ZIP_INVALID", f"{name} lacks its zip64 sizes", reader)
        usize, csize = struct.unpack_from("<QQ", zip64)
    payload = _Payload(name, max_pickle_bytes, reader)
    if flags & _FLAG_DESCRIPTOR:
        _read_described(payload)
        declared = (crc, csize, usize)
        if declared != (0, 0, 0) and declared != (payload.crc, payload.size, payload.size):
            raise _reject("ZIP_INCONSISTENT", f"{name}: header and descriptor differ", reader)
    else:
        if csize != usize:
            raise _reject("ZIP_INVALID", f"{name}: stored entry with two sizes", reader)
        payload.take(usize)
        if payload.crc != crc:
            raise _reject("ZIP_BAD_CRC", f"{name}: CRC-32 does not match its data", reader)
    return _Entry(name, offset, flags, payload.crc, payload.size, payload.data)


def _read_central(reader: HashingReader, entry: _Entry) -> None:
    """One central header; it must describe `entry` exactly."""
    fields = struct.unpack("<4x4xHH4xIIIHHHH6xI", reader.read_exact(46))
    flags, method, crc, csize, usize, name_len, extra_len, comment_len, disk, offset = fields
    name = reader.read_exact(name_len)
    zip64 = _parse_extra(reader.read_exact(extra_len), reader).get(_ZIP64_EXTRA, b"")
    reader.skip(comment_len)
    values = [usize, csize, offset]
    pos = 0
    for i, value in enumerate(values):  # zip64 carries only the fields that overflowed
        if value == _U32:
            if pos + 8 > len(zip64):
                raise _reject("ZIP_INVALID", "central entry lacks its zip64 values", reader)
            values[i] = struct.unpack_from("<Q", zip64, pos)[0]
            pos += 8
    expected = (entry.name.encode(), entry.flags, 0, entry.crc, [entry.size] * 2 + [entry.offset])
    if (name, flags, method, crc, values) != expected or disk != 0:
        raise _reject("ZIP_INCONSISTENT", f"central directory disagrees on {entry.name}", reader)


def _read_end(reader: HashingReader, count: int, cd_start: int, cd_size: int) -> None:
    """Zip64 end record and locator (optional), then the end record, then nothing."""
    big: tuple[int, ...] | None = None
    if reader.peek(4) == ZIP64_EOCD_SIG:
        at = reader.tell()
        rec = struct.unpack("<IQHHIIQQQQ", reader.read_exact(56))
        if not 44 <= rec[1] <= 44 + _SMALL_RECORD_LIMIT or rec[4] or rec[5]:
            raise _reject("ZIP_INVALID", "bad zip64 end of central directory", reader)
        reader.skip(rec[1] - 44)
        loc = struct.unpack("<4sIQI", reader.read_exact(20))
        if loc != (ZIP64_LOCATOR_SIG, 0, at, 1):
            raise _reject("ZIP_INVALID", "bad zip64 end of central directory locator", reader)
        big = rec[6:]
    end = struct.unpack("<4sHHHHIIH", reader.read_exact(22))
    if end[0] != EOCD_SIG or end[1] or end[2]:
        raise _reject("ZIP_INVALID", "bad end of central directory", reader)
    if end[7] or reader.remaining:  # a comment could hide a second end record for other readers
        raise _reject("ZIP_INVALID", "data after the end of central directory", reader)
    want = (count, count, cd_size, cd_start)
    sentinels = (_U16, _U16, _U32, _U32)
    for small, sentinel, i, expected in zip(end[3:7], sentinels, range(4), want, strict=True):
        wide = big[i] if big is not None else None
        ok = small == expected or (small == sentinel and wide == expected)
        if not ok or wide not in (None, expected):
            raise _reject("ZIP_INCONSISTENT", "end of central directory disagrees", reader)


def read_zip(reader: HashingReader, *, max_pickle_bytes: int) -> list[_Entry]:
    """Parse a whole stored zip front to back; return its entries (kept payloads included)."""
    if reader.peek(4) != LOCAL_SIG:
        _reject_tar(reader)
        raise _reject("ZIP_INVALID", "data before the first local file header", reader)
    entries: list[_Entry] = []
    seen: set[str] = set()
    while reader.peek(4) == LOCAL_SIG:
        entry = _read_local(reader, max_pickle_bytes)
        if entry.name in seen:
            raise _reject("ZIP_DUPLICATE_ENTRY", f"{entry.name} appears twice", reader)
        seen.add(entry.name)
        entries.append(entry)
    cd_start = reader.tell()
    for entry in entries:
        if reader.peek(4) != CENTRAL_SIG:
            what = "a central directory entry" if entry is not entries[0] else "central directory"
            raise _reject("ZIP_INVALID", f"junk where {what} should be", reader)
        _read_central(reader, entry)
    if reader.peek(4) == CENTRAL_SIG:
        raise _reject("ZIP_INCONSISTENT", "central directory lists extra entries", reader)
    _read_end(reader, len(entries), cd_start, reader.tell() - cd_start)
    return entries


def _records(entries: list[_Entry], reader: HashingReader) -> tuple[str, dict[str, _Entry]]:
    """The archive folder and its entries by relative name, refusing TorchScript."""
    tops = {e.name.split("/", 1)[0] for e in entries}
    if len(tops) != 1 or any("/" not in e.name for e in entries):
        raise _reject("TORCH_INVALID", "a torch archive has exactly one top-level folder", reader)
    top = tops.pop()
    records = {e.name[len(top) + 1 :]: e for e in entries}
    unknown = sorted(r for r in records if r not in SMALL_RECORDS and r != "data.pkl")
    unknown = [r for r in unknown if not _DATA_RE.fullmatch(r)]
    if unknown or "data.pkl" not in records:
        what = f"unexpected entry {unknown[0]}" if unknown else "no data.pkl"
        raise _reject("TORCH_INVALID", f"not a torch.save archive: {what}", reader)
    return top, records


def _check_storages(
    storages: dict[str, StorageRef], records: dict[str, _Entry], reader: HashingReader
) -> None:
    """Each data/<key> record holds exactly its storage's bytes; no record is unreferenced."""
    for key, ref in sorted(storages.items()):
        entry = records.get(f"data/{key}")
        if entry is None or entry.size != ref.nbytes:
            have = "missing" if entry is None else f"{entry.size} bytes"
            raise _reject(
                "TORCH_STORAGE_MISMATCH",
                f"storage {key} needs {ref.nbytes} bytes of data/{key}, which is {have}",
                reader,
            )
    stray = sorted(r for r in records if r.startswith("data/") and r[5:] not in storages)
    if stray:
        raise _reject(
            "TORCH_STORAGE_MISMATCH", f"{stray[0]} is not a storage the pickle refers to", reader
        )


def validate_torch_zip(
    reader: HashingReader, *, max_pickle_bytes: int = 64 << 20
) -> dict[str, Any]:
    """Validate a `torch.save` zip archive read once from offset 0; raise `Rejected`."""
    entries = read_zip(reader, max_pickle_bytes=max_pickle_bytes)
    top, records = _records(entries, reader)
    byteorder = records["byteorder"].data if "byteorder" in records else b"little"
    if byteorder != b"little":
        code = "TORCH_BIG_ENDIAN" if byteorder == b"big" else "TORCH_INVALID"
        raise _reject(code, f"byteorder {byteorder!r:.40}: only little-endian is loaded", reader)
    scan = scan_pickle(records["data.pkl"].data or b"", path=reader.path or None)
    _check_storages(scan.storages, records, reader)
    return {
        "archive": top,
        "entries": len(entries),
        "tensors": len(scan.storages),
        "pickle_globals": scan.global_names,
    }


def validate_legacy_pickle(
    reader: HashingReader, *, max_pickle_bytes: int = 64 << 20
) -> dict[str, Any]:
    """A bare pickle stream (legacy `torch.save`): report unsafe content first, then refuse."""
    _reject_tar(reader)
    capped = reader.remaining > max_pickle_bytes
    data = reader.read_exact(min(reader.remaining, max_pickle_bytes))
    scans = [walk(data, legacy=True)]
    if scans[0].invalid is None and scans[0].value == _LEGACY_MAGIC:
        while len(scans) < _LEGACY_PICKLES and scans[-1].invalid is None:
            scans.append(walk(data, start=scans[-1].end, legacy=True))
    elif scans[0].invalid is None and scans[0].end != len(data) and not capped:
        scans[0].invalid = "trailing data after STOP"
    found = [v for v in map(verdict, scans) if v is not None]
    for code in ("PICKLE_UNSAFE_GLOBAL", "PICKLE_UNSAFE_OPCODE", "PICKLED_MODULE"):
        for hit in found:
            if hit[0] == code:
                raise _reject(*hit, reader)
    if found and not capped:
        raise _reject(*found[0], reader)
    raise _reject("LEGACY_PICKLE_FORMAT", f"a legacy (non-zip) torch.save file; {_RESAVE}", reader)

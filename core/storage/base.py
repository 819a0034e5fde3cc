"""The object-storage interface: server-chosen keys, signed uploads, streaming reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from core.errors import InvalidRequest

# S3's own limits; the local backend keeps them so both behave the same.
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class PartUrl:
    part_number: int
    url: str


@dataclass(frozen=True)
class UploadPlan:
    """How a client uploads one file: a single PUT, or signed multipart part URLs."""

    method: Literal["put", "multipart"]
    expires_at: datetime
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    upload_id: str | None = None
    part_size: int | None = None
    parts: list[PartUrl] = field(default_factory=list)


@dataclass(frozen=True)
class CompletedPart:
    part_number: int
    etag: str


class UploadRejected(Exception):
    """The uploaded object does not match what was declared; it has been discarded."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidObjectKey(InvalidRequest, ValueError):
    """A key that could escape the bucket prefix or storage root."""


@dataclass(frozen=True)
class StoredPart:
    """One multipart part as the storage itself reports it (never as the client claims)."""

    part_number: int
    size: int
    etag: str


def check_key(key: str, *, is_prefix: bool = False) -> str:
    """Refuse keys with `..`/`.`/empty segments, absolute paths, backslashes or NUL.

    Keys are chosen by the server, so this is defence in depth against a path slipping
    through upstream checks. A prefix may end with `/`.
    """
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"object key must be 1 to {MAX_KEY_BYTES} bytes")
    if "\x00" in key or "\\" in key or key.startswith("/"):
        raise InvalidObjectKey(f"object key {key!r} is absolute or holds a NUL or backslash")
    segments = key.split("/")
    if is_prefix and len(segments) > 1 and segments[-1] == "":
        segments.pop()
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidObjectKey(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def part_sizes(size: int, part_size: int) -> list[int]:
    """The exact size of every part when `size` bytes are cut into `part_size` pieces."""
    if size < 0 or part_size <= 0:
        raise ValueError("size must be >= 0 and part_size > 0")
    count = max(1, -(-size // part_size))
    if count > MAX_PARTS:
        raise ValueError(
            f"{size} bytes need {count} parts of {part_size}; the limit is {MAX_PARTS}"
        )
    return [part_size] * (count - 1) + [size - part_size * (count - 1)]


def _bare_etag(etag: str) -> str:
    return etag.strip().strip('"')


def check_parts(
    stored: list[StoredPart], size: int, part_size: int, client: list[CompletedPart] | None
) -> None:
    """Raise `UploadRejected` unless the stored parts add up to exactly the declared upload.

    The expected count comes from the declared size, not from the plan's URL list, so a
    plan rebuilt from the database (without URLs) is checked just as strictly.
    """
    expected = part_sizes(size, part_size)
    numbers = [p.part_number for p in stored]
    if numbers != list(range(1, len(expected) + 1)):
        raise UploadRejected(
            "UPLOAD_PARTS_MISMATCH",
            f"expected parts 1..{len(expected)}, storage holds {numbers[:20]}",
        )
    for part, want in zip(stored, expected, strict=True):
        if part.size != want:
            raise UploadRejected(
                "UPLOAD_PART_SIZE_MISMATCH",
                f"part {part.part_number} is {part.size} bytes; expected {want}",
            )
    if client:
        given = {p.part_number: _bare_etag(p.etag) for p in client}
        if given != {p.part_number: _bare_etag(p.etag) for p in stored}:
            raise UploadRejected(
                "UPLOAD_ETAG_MISMATCH", "the part ETags given do not match the stored parts"
            )


class ObjectStorage(Protocol):
    """What the platform needs from S3 or the local disk."""

    def plan_upload(self, key: str, size: int) -> UploadPlan:
        """Signed URL(s) for uploading exactly `size` bytes to `key`."""
        ...

    def complete_upload(
        self, key: str, size: int, plan: UploadPlan, parts: list[CompletedPart] | None
    ) -> None:
        """Check the object (or its parts) holds exactly `size` bytes and finalise it.

        Raises `UploadRejected` (and discards the object/aborts the multipart upload) on any
        violation; raises `UploadRejected("UPLOAD_MISSING", …)` if nothing was uploaded yet.
        Calling it again after success is a no-op.
        """
        ...

    def size_of(self, key: str) -> int | None:
        """The stored object's size, or None when it does not exist."""
        ...

    def open_read(self, key: str) -> BinaryIO:
        """A forward-only binary stream of the object (bounded memory)."""
        ...

    def put_file(self, key: str, source: Path) -> bool:
        """Store a file the platform made (never a client's) at `key`, write-once.

        Returns False, leaving the stored object as it is, when `key` already exists: callers
        use content-addressed keys, so an existing object is the same bytes (and the weight
        cache verifies every object against its recorded SHA-256 anyway).
        """
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object (and pending multipart upload) under `prefix`; returns count."""
        ...

    def ping(self) -> None:
        """Raise if the storage is unreachable."""
        ...

"""Private, atomic file writes for the local-disk backend."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from core.storage.base import UploadRejected

_WRITE_BATCH = 1024 * 1024  # hand writes to a thread in 1 MiB batches, not per small chunk


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, all private (`mkdir(parents=True)` is not)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def finish(out: BinaryIO, tail: bytes | bytearray) -> None:
    out.write(tail)
    out.flush()
    os.fsync(out.fileno())


async def stream_into(out: BinaryIO, chunks: AsyncIterator[bytes], expected: int) -> str:
    """Write exactly `expected` bytes from `chunks`, stopping at the first byte too many."""
    md5 = hashlib.md5(usedforsecurity=False)
    received = 0
    pending = bytearray()
    async for chunk in chunks:
        received += len(chunk)
        if received > expected:
            raise UploadRejected(
                "UPLOAD_TOO_LARGE", f"more than the declared {expected} bytes arrived"
            )
        md5.update(chunk)
        pending += chunk
        if len(pending) >= _WRITE_BATCH:
            await asyncio.to_thread(out.write, pending)
            pending.clear()
    if received != expected:
        raise UploadRejected(
            "UPLOAD_SIZE_MISMATCH", f"only {received} of the declared {expected} bytes arrived"
        )
    await asyncio.to_thread(finish, out, pending)
    return md5.hexdigest()


def remove_tree(entry: Path) -> int:
    """Delete a file or a whole directory tree; the number of files removed."""
    if entry.is_dir() and not entry.is_symlink():
        count = sum(len(files) for _, _, files in os.walk(entry))
        shutil.rmtree(entry, ignore_errors=True)
        return count
    entry.unlink(missing_ok=True)
    return 1

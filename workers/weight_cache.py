"""Host-local, content-addressed cache of model weights, with an LRU disk budget.

    blobs/<sha256>                  one verified, read-only copy of each distinct file
    models/<model_sha256>/<path>    hard links to blobs, in the bundle's original layout
    locks/                          flock files: per blob, per model, leases, eviction

Every write is a temp file or temp dir in the same directory, renamed into place, so a reader
sees a whole blob or none and a crash leaves only `.tmp-*` debris (cleared on start). Locks
are `fcntl.flock`, so threads and processes on the host coordinate the same way. A model in
use holds a shared lease lock; eviction takes it exclusively without blocking and skips
anything it cannot get.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK = 1 << 20
DEBRIS_AGE_S = 3600
_SHA = re.compile(r"^[0-9a-f]{64}$")


class CacheIntegrityError(Exception):
    """A fetched file did not match its recorded size or SHA-256."""


@dataclass(frozen=True)
class CachedFile:
    path: str  # relative path inside the bundle
    sha256: str
    size: int
    open: Callable[[], BinaryIO]


class WeightCache:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.blobs, self.models, self.locks = (self.root / d for d in ("blobs", "models", "locks"))
        for d in (self.blobs, self.models, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._counter_lock = threading.Lock()
        self._clear_debris()

    # --- public ----------------------------------------------------------------------------

    @contextmanager
    def use(self, model_sha256: str, files: list[CachedFile]) -> Iterator[Path]:
        """The bundle's directory, protected from eviction until the block ends."""
        with self._flock(f"lease-{_check_sha(model_sha256)}", shared=True):
            yield self.materialize(model_sha256, files)

    def materialize(self, model_sha256: str, files: list[CachedFile]) -> Path:
        """Build (once) and return `models/<model_sha256>`; hold `use()` to keep it."""
        target = self.models / _check_sha(model_sha256)
        if self._touch(target):
            return target
        with self._flock(f"model-{model_sha256}"):
            if self._touch(target):  # another thread or process built it meanwhile
                return target
            self._count(hit=False)
            self._build(target, files)
        self.evict(keep={model_sha256})
        return target

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.blobs.iterdir() if _SHA.match(p.name))

    def evict(self, keep: set[str] | None = None) -> int:
        """Free space down to the budget: orphan blobs first, then least recently used models."""
        keep = keep or set()
        freed = 0
        with self._flock("evict"):
            freed += self._drop_orphan_blobs()
            for model in self._models_lru():
                if self.usage_bytes() <= self.budget_bytes:
                    break
                if model.name not in keep and self._drop_model(model):
                    freed += self._drop_orphan_blobs()
        return freed

    # --- building ----------------------------------------------------------------------------

    def _build(self, target: Path, files: list[CachedFile]) -> None:
        tmp = self.models / f".tmp-{target.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in files:
                dest = tmp / _check_path(f.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._flock(f"blob-{_check_sha(f.sha256)}"):
                    # Linked under the blob lock, so eviction cannot remove it in between.
                    os.link(self._fetch(f), dest)
            os.rename(tmp, target)
            _fsync_dir(self.models)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fetch(self, f: CachedFile) -> Path:
        """The blob for `f`, copied and verified if absent. Caller holds the blob lock."""
        blob = self.blobs / f.sha256
        if blob.exists():
            return blob
        tmp = self.blobs / f".tmp-{f.sha256}-{uuid.uuid4().hex}"
        try:
            digest, size = copy_hashing(f.open, tmp)
            if size != f.size or digest != f.sha256:
                raise CacheIntegrityError(
                    f"{f.path}: expected {f.size} bytes sha256 {f.sha256[:12]}…,"
                    f" got {size} bytes sha256 {digest[:12]}…"
                )
            os.chmod(tmp, 0o444)  # shared by every model that links it: nobody may edit it
            os.rename(tmp, blob)
            _fsync_dir(self.blobs)
        finally:
            tmp.unlink(missing_ok=True)
        return blob

    def _touch(self, model_dir: Path) -> bool:
        """Mark a model used now (its dir mtime is the LRU clock); False if absent."""
        try:
            os.utime(model_dir)
        except FileNotFoundError:
            return False
        self._count(hit=True)
        return True

    def _count(self, *, hit: bool) -> None:
        with self._counter_lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    # --- eviction -------------------------------------------------------------------------

    def _models_lru(self) -> list[Path]:
        models = [p for p in self.models.iterdir() if _SHA.match(p.name)]
        return sorted(models, key=lambda p: p.stat().st_mtime_ns)

    def _drop_model(self, model: Path) -> bool:
        with (
            self._try_flock(f"lease-{model.name}") as unused,
            self._try_flock(f"model-{model.name}") as unbuilt,
        ):
            if not (unused and unbuilt):
                return False
            trash = self.models / f".tmp-trash-{model.name}-{uuid.uuid4().hex}"
            os.rename(model, trash)  # disappears atomically, then is deleted at leisure
            shutil.rmtree(trash, ignore_errors=True)
            return True

    def _drop_orphan_blobs(self) -> int:
        freed = 0
        for blob in self.blobs.iterdir():
            if not _SHA.match(blob.name):
                continue
            with self._try_flock(f"blob-{blob.name}") as got:
                st = blob.stat()
                if got and st.st_nlink == 1:  # no model links it any more
                    blob.unlink()
                    freed += st.st_size
        return freed

    def _clear_debris(self) -> None:
        # Only old debris: a fresh .tmp-* may be another process's build in progress.
        cutoff = time.time() - DEBRIS_AGE_S
        for d in (self.blobs, self.models):
            for p in d.glob(".tmp-*"):
                if p.stat().st_mtime > cutoff:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # --- locks ------------------------------------------------------------------------------

    @contextmanager
    def _flock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def _try_flock(self, name: str) -> Iterator[bool]:
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def copy_hashing(opener: Callable[[], BinaryIO], dest: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with opener() as src, open(dest, "xb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_sha(value: str) -> str:
    if not _SHA.match(value):
        raise ValueError(f"not a lowercase hex SHA-256: {value!r}")
    return value


def _check_path(value: str) -> PurePosixPath:
    path = PurePosixPath(value)
    if path.is_absolute() or not path.parts or ".." in path.parts or "\\" in value:
        raise ValueError(f"unsafe bundle path: {value!r}")
    return path

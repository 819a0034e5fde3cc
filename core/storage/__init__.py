"""Object storage: pick the backend named by `STORAGE_URL` (`file://…` or `s3://bucket/prefix`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from core.settings import Settings
from core.storage.base import ObjectStorage

__all__ = ["ObjectStorage", "get_storage", "storage_from_url"]

_CACHE_SIZE = 8
_cache: OrderedDict[int, tuple[Settings, ObjectStorage]] = OrderedDict()
_lock = threading.Lock()


def storage_from_url(url: str, settings: Settings) -> ObjectStorage:
    """A new backend for `url`; imports each backend only when it is used."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        from core.storage.local import LocalStorage

        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r} names a remote host; use file:///path")
        return LocalStorage(Path(url2pathname(parts.path)).resolve(), settings)
    if parts.scheme == "s3":
        from core.storage.s3 import S3Storage

        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} has no bucket; use s3://bucket/prefix")
        return S3Storage(settings, parts.netloc, unquote(parts.path))
    raise ValueError(f"storage URL {url!r} must start with file:// or s3://")


def get_storage(settings: Settings) -> ObjectStorage:
    """The backend for these settings, built once per settings object (clients are costly)."""
    with _lock:
        # Keyed by identity; holding the settings object keeps its id from being reused.
        hit = _cache.get(id(settings))
        if hit is not None and hit[0] is settings:
            _cache.move_to_end(id(settings))
            return hit[1]
        storage = storage_from_url(settings.effective_storage_url, settings)
        _cache[id(settings)] = (settings, storage)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return storage

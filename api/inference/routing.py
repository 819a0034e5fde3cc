"""Warm-aware routing: send a job to a worker that has its model warm and a free slot."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from core.events import read_heartbeats
from core.queue import INFER_QUEUE

REFRESH_S = 1.0
# The event loop's path serves a read up to this old while a thread re-reads it; past it (the
# re-reads keep failing) the caller takes the blocking path, which reports the outage.
STALE_S = 3.0
FRESH_S = 4.0  # a heartbeat older than this may be a dead worker: do not route to it


class WorkerDirectory:
    """The live workers' heartbeats, re-read at most once a second per API process."""

    def __init__(self, client: redis.Redis) -> None:  # type: ignore[type-arg]
        self._client = client
        self._lock = threading.Lock()
        self._beats: list[dict[str, Any]] = []
        self._read_at = 0.0
        self._rereading = False

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._read_at > REFRESH_S:
                self._beats = read_heartbeats(self._client)
                self._read_at = time.monotonic()
            return self._beats

    def live(self) -> list[dict[str, Any]]:
        """Heartbeats recent enough to be live workers (none when Redis cannot be read)."""
        try:
            beats = self.workers()
        except redis.RedisError:
            return []
        return _alive(beats)

    def held(self) -> list[dict[str, Any]] | None:
        """The live workers as last read, without I/O (an event loop must not wait on Redis).

        A read older than `REFRESH_S` is still served while a thread re-reads it, so no
        request pays for the re-read (one a second had taken the blocking path: ~2 ms more
        at the API). None when nothing read within `STALE_S` is held: the caller takes the
        blocking path. Liveness is judged now, whatever the read's age (`_alive`).
        """
        with self._lock:
            age = time.monotonic() - self._read_at
            if age > REFRESH_S and not self._rereading:
                self._rereading = True
                threading.Thread(target=self._reread, name="heartbeats", daemon=True).start()
            if age > STALE_S:
                return None
            return _alive(self._beats)

    def _reread(self) -> None:
        beats = None
        try:
            beats = read_heartbeats(self._client)
        except redis.RedisError:  # the read is kept; the blocking path reports the outage
            pass
        finally:
            with self._lock:
                if beats is not None:
                    self._beats, self._read_at = beats, time.monotonic()
                self._rereading = False

    def all_support(self, feature: str, live: list[dict[str, Any]] | None = None) -> bool:
        """Whether every live worker lists `feature` (False when none is seen: the safe side)."""
        live = self.live() if live is None else live
        return bool(live) and all(feature in b.get("features", ()) for b in live)

    def queue_for(self, model_key: str, live: list[dict[str, Any]] | None = None) -> str:
        """A warm worker's own queue, else the shared one (any worker, cold start if needed)."""
        live = self.live() if live is None else live
        fresh = [b for b in live if b.get("free_slots", 0) > 0]
        idle = [b for b in fresh if model_key in b.get("idle_models", [])]
        warm = idle or [b for b in fresh if model_key in b.get("warm_models", [])]
        if not warm:
            return INFER_QUEUE
        best = max(warm, key=lambda b: (b.get("free_slots", 0), -b.get("busy", 0)))
        return str(best["queue"])


def _alive(beats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = time.time()
    return [b for b in beats if now - b.get("at", 0) < FRESH_S]

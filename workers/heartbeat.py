"""Worker heartbeats on Redis: host, warm models, free slots and hardware, for routing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

import redis

from core.cpus import usable_cpus
from core.queue import CARRIED_JOBS, HEARTBEAT_INDEX, HEARTBEAT_PREFIX, direct_queue
from workers.gpu import GpuMemory, read_gpu_memory
from workers.pool import RunnerPool
from workers.weight_cache import WeightCache

log = logging.getLogger("inferatech.heartbeat")
INTERVAL_S = 2.0
TTL_S = 6


def hardware() -> dict[str, Any]:
    """What this host offers; GPUs through nvidia-smi so the worker needs no torch import."""
    gpus: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5)  # noqa: S603
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    return {"cpus": usable_cpus(), "gpus": gpus}


# What this worker understands beyond the oldest task format; the API uses a feature only once
# every live worker lists it (a rolling upgrade keeps working with old workers still up).
FEATURES = (CARRIED_JOBS,)


def snapshot(
    nodename: str,
    pool: RunnerPool,
    hw: dict[str, Any],
    cache: WeightCache | None = None,
    gpu: GpuMemory | None = None,
) -> dict[str, Any]:
    """Routing state, and the counters `/metrics` shows per worker."""
    stats = pool.stats()
    memory = None if gpu is None else {"total_bytes": gpu.total_bytes, "used_bytes": gpu.used_bytes}
    return {
        "name": nodename,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "queue": direct_queue(nodename),
        "warm_models": stats.warm_models,
        "idle_models": stats.idle_models,
        "runners": stats.runners,
        "busy": stats.busy,
        "inflight": stats.inflight,
        "free_slots": max(pool.config.max_runners - stats.busy, 0),
        "cold_starts": stats.cold_starts,
        "hits": stats.hits,
        "cache_hits": cache.hits if cache is not None else 0,
        "cache_misses": cache.misses if cache is not None else 0,
        "hardware": hw,
        "gpu_memory": memory,  # the visible GPUs now, every process counted; None: no GPU
        "features": list(FEATURES),
        "at": time.time(),
    }


def publish(client: redis.Redis, beat: dict[str, Any]) -> None:  # type: ignore[type-arg]
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(HEARTBEAT_PREFIX + beat["name"], json.dumps(beat), ex=TTL_S)
    pipe.zadd(HEARTBEAT_INDEX, {beat["name"]: now})
    pipe.zremrangebyscore(HEARTBEAT_INDEX, "-inf", now - 3600)
    pipe.execute()


class Heartbeat:
    """A daemon thread publishing this worker's snapshot every INTERVAL_S."""

    def __init__(
        self,
        nodename: str,
        pool: RunnerPool,
        client: redis.Redis,  # type: ignore[type-arg]
        cache: WeightCache | None = None,
    ) -> None:
        self.nodename, self.pool, self.client, self.cache = nodename, pool, client, cache
        self._stop = threading.Event()
        self._hw = hardware()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.client.delete(HEARTBEAT_PREFIX + self.nodename)
            self.client.zrem(HEARTBEAT_INDEX, self.nodename)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while True:
            try:
                gpu = read_gpu_memory() if self._hw["gpus"] else None
                beat = snapshot(self.nodename, self.pool, self._hw, self.cache, gpu)
                publish(self.client, beat)
            except redis.RedisError as exc:  # keep beating once Redis is back
                log.warning("heartbeat failed: %s", type(exc).__name__)
            if self._stop.wait(INTERVAL_S):
                return

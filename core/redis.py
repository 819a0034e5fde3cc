"""Redis clients from settings."""

from __future__ import annotations

from functools import lru_cache

import redis
import redis.asyncio as aioredis

from core.settings import Settings, get_settings


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis[bytes]:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def get_redis(settings: Settings | None = None) -> redis.Redis[bytes]:
    return _client((settings or get_settings()).effective_redis_url)


def make_async_redis(settings: Settings) -> aioredis.Redis:  # type: ignore[type-arg]
    """An asyncio client; bound to the event loop that first uses it, so one per app."""
    return aioredis.Redis.from_url(
        settings.effective_redis_url, socket_connect_timeout=2, max_connections=1024
    )

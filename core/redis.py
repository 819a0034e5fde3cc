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


# Deletes a lock only if it still holds its owner's token (an expired lock may be someone else's).
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def release_lock(client: redis.Redis[bytes], key: str, token: str) -> None:
    client.register_script(RELEASE_LUA)(keys=[key], args=[token])


def make_async_redis(settings: Settings) -> aioredis.Redis:  # type: ignore[type-arg]
    """An asyncio client; bound to the event loop that first uses it, so one per app."""
    return aioredis.Redis.from_url(
        settings.effective_redis_url, socket_connect_timeout=2, max_connections=1024
    )

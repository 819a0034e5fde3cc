"""A bounded, short-lived cache of API-key grants, so `/v1/infer` skips the key lookups.

Only grants that passed every check are cached (live key, ready model of the key's account,
billing active); a refusal is always decided by the database. The secret is still verified
on every request against the cached HMAC digest. Changes made through this process
(revocation, model deletion, billing webhooks) invalidate at once; changes made elsewhere
(another API replica, a beat task) take effect within `auth_cache_ttl_s`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from core.tables import ApiKey, Model


@dataclass(frozen=True)
class Grant:
    """What a live key may do: call one ready model, billed to its account."""

    key_id: str
    account_id: str
    model_id: str
    secret_hash: str = field(repr=False)  # a digest, but kept out of logs all the same
    model_sha256: str | None
    model_name: str = ""  # `/openai/v1` callers may name the model instead of giving its id
    # The key's limits as minted (None: the server default); fixed for the key's life.
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    rate_limit_concurrency: int | None = None
    monthly_token_budget: int | None = None

    @classmethod
    def of(cls, key: ApiKey, model: Model) -> Grant:
        return cls(
            key.id,
            key.account_id,
            model.id,
            key.secret_hash,
            model.sha256,
            model.name,
            key.rate_limit_rpm,
            key.rate_limit_tpm,
            key.rate_limit_concurrency,
            key.monthly_token_budget,
        )


class AuthCache:
    """Key id → grant, least recently used first out, each entry dropped after `ttl_s`."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Grant]] = OrderedDict()
        # Bumped by every invalidation: a lookup that started before one must not cache
        # what it read, or a revocation racing with it would be undone for a whole TTL.
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return self._ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self) -> int:
        """Taken before reading the database; hand it back to `put`."""
        return self._generation

    def get(self, key_id: str) -> Grant | None:
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key_id]
                return None
            self._entries.move_to_end(key_id)
            return entry[1]

    def put(self, grant: Grant, generation: int) -> None:
        """Cache a grant read at `generation`, unless something was invalidated since."""
        if not self.enabled:
            return
        with self._lock:
            if generation != self._generation:
                return
            self._entries[grant.key_id] = (self._clock() + self._ttl_s, grant)
            self._entries.move_to_end(grant.key_id)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def forget_key(self, key_id: str) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(key_id, None)

    def forget_model(self, model_id: str) -> None:
        with self._lock:
            self._generation += 1
            for key_id in [k for k, (_, g) in self._entries.items() if g.model_id == model_id]:
                del self._entries[key_id]

    def clear(self) -> None:
        """Billing changed: which customer a key bills is not worth tracking here."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

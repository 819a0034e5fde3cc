"""`AuthCache`: expiry, the size bound, invalidation and the revocation race."""

from __future__ import annotations

from api.inference.auth_cache import AuthCache, Grant


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def grant(key_id: str, model_id: str = "mdl_a") -> Grant:
    return Grant(key_id, "acct_a", model_id, "0" * 64, None)


def test_grant_expires_after_the_ttl() -> None:
    clock = Clock()
    cache = AuthCache(ttl_s=10, max_entries=8, clock=clock)
    cache.put(grant("k1"), cache.generation())
    clock.now += 9.9
    assert cache.get("k1") == grant("k1")
    clock.now += 0.1
    assert cache.get("k1") is None and len(cache) == 0


def test_cache_holds_at_most_max_entries_dropping_the_least_recently_used() -> None:
    cache = AuthCache(ttl_s=10, max_entries=3, clock=Clock())
    for k in ("k1", "k2", "k3"):
        cache.put(grant(k), cache.generation())
    assert cache.get("k1") is not None  # k1 is now the most recently used
    cache.put(grant("k4"), cache.generation())
    assert len(cache) == 3
    assert cache.get("k2") is None
    assert all(cache.get(k) is not None for k in ("k1", "k3", "k4"))


def test_ttl_zero_caches_nothing() -> None:
    cache = AuthCache(ttl_s=0, max_entries=8, clock=Clock())
    cache.put(grant("k1"), cache.generation())
    assert not cache.enabled and cache.get("k1") is None


def test_forget_key_and_forget_model_drop_only_their_grants() -> None:
    cache = AuthCache(ttl_s=10, max_entries=8, clock=Clock())
    for k, m in (("k1", "mdl_a"), ("k2", "mdl_a"), ("k3", "mdl_b")):
        cache.put(grant(k, m), cache.generation())
    cache.forget_key("k3")
    assert cache.get("k3") is None and cache.get("k1") is not None
    cache.forget_model("mdl_a")
    assert len(cache) == 0


def test_grant_read_before_an_invalidation_is_not_cached() -> None:
    cache = AuthCache(ttl_s=10, max_entries=8, clock=Clock())
    before = cache.generation()  # a request starts reading the key from the database…
    cache.forget_key("k1")  # …while the key is revoked through this process
    cache.put(grant("k1"), before)
    assert cache.get("k1") is None
    cache.put(grant("k1"), cache.generation())
    assert cache.get("k1") is not None
    cache.clear()
    assert cache.get("k1") is None


def test_grant_repr_leaves_out_the_digest() -> None:
    assert "0" * 64 not in repr(grant("k1"))

"""Prefixed random identifiers (`acct_…`, `mdl_…`)."""

from __future__ import annotations

import secrets
import string

BASE62 = string.digits + string.ascii_letters


def random_base62(length: int) -> str:
    """Uniform over every string of `length` base62 characters: one draw, its digits (a
    choice per character cost ~20 µs an id, and every request makes two)."""
    n = secrets.randbelow(62**length)
    chars = []
    for _ in range(length):
        n, digit = divmod(n, 62)
        chars.append(BASE62[digit])
    return "".join(chars)


def new_id(prefix: str, length: int = 16) -> str:
    """A new identifier such as `mdl_3kTq9…` (16 base62 chars ≈ 95 bits)."""
    return f"{prefix}_{random_base62(length)}"

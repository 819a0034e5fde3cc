"""Prefixed random identifiers (`acct_…`, `mdl_…`)."""

from __future__ import annotations

import secrets
import string

BASE62 = string.digits + string.ascii_letters


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_id(prefix: str, length: int = 16) -> str:
    """A new identifier such as `mdl_3kTq9…` (16 base62 chars ≈ 95 bits)."""
    return f"{prefix}_{random_base62(length)}"

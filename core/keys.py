"""API keys and account tokens: `ik_<key id>_<secret><checksum>`, hashed at rest.

Like GitHub tokens, the last six characters are a base62 CRC32 of the rest, so junk or
mistyped keys are refused without a database query. Only an HMAC-SHA256 of the secret
(keyed by a server pepper) is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import zlib
from dataclasses import dataclass

from core.ids import BASE62, random_base62

API_KEY_PREFIX = "ik"
ACCOUNT_TOKEN_PREFIX = "iat"  # noqa: S105 - a prefix, not a secret
KEY_ID_LEN = 12
SECRET_LEN = 24  # 62**24 ≈ 2**142.9 bits of randomness
CHECKSUM_LEN = 6  # 62**6 > 2**32
DISPLAY_SECRET_CHARS = 4

_PATTERN = re.compile(
    rf"^(?P<prefix>[a-z]+)_(?P<key_id>[0-9A-Za-z]{{{KEY_ID_LEN}}})_"
    rf"(?P<secret>[0-9A-Za-z]{{{SECRET_LEN}}})(?P<checksum>[0-9A-Za-z]{{{CHECKSUM_LEN}}})$"
)


@dataclass(frozen=True)
class MintedKey:
    """A freshly minted key: `plaintext` must be shown once and then forgotten."""

    key_id: str
    plaintext: str
    secret_hash: str
    display_prefix: str


@dataclass(frozen=True)
class ParsedKey:
    prefix: str
    key_id: str
    secret: str


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(BASE62[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LEN)


def hash_secret(secret: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def compose(prefix: str, key_id: str, secret: str) -> str:
    """The plaintext form of a key: its parts and their checksum."""
    body = f"{prefix}_{key_id}_{secret}"
    return body + _checksum(body)


def mint(prefix: str, pepper: str) -> MintedKey:
    """A new random key of the given prefix (`ik` for API keys, `iat` for account tokens)."""
    key_id = random_base62(KEY_ID_LEN)
    secret = random_base62(SECRET_LEN)
    plaintext = compose(prefix, key_id, secret)
    return MintedKey(
        key_id=key_id,
        plaintext=plaintext,
        secret_hash=hash_secret(secret, pepper),
        display_prefix=f"{prefix}_{key_id}_{secret[:DISPLAY_SECRET_CHARS]}…",
    )


def parse(token: str, expected_prefix: str) -> ParsedKey | None:
    """The key's parts, or None when the token is malformed or its checksum is wrong."""
    if len(token) > 128:
        return None
    m = _PATTERN.match(token)
    if m is None or m["prefix"] != expected_prefix:
        return None
    body = token[:-CHECKSUM_LEN]
    if not hmac.compare_digest(_checksum(body), m["checksum"]):
        return None
    return ParsedKey(prefix=m["prefix"], key_id=m["key_id"], secret=m["secret"])


def verify(parsed: ParsedKey, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_secret(parsed.secret, pepper), stored_hash)

"""Signed upload tokens for the local-disk backend, which has no presigned URLs of its own."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from core.storage.base import UploadRejected

# A fixed label so the upload-token key never equals a key derived for another purpose.
_KEY_LABEL = b"inferatech/upload-token/v1"


@dataclass(frozen=True)
class UploadGrant:
    """What a token allows: `size` bytes to `key` (or to one part of upload `upload_id`)."""

    key: str
    size: int
    part_number: int  # 0 for a single PUT
    upload_id: str  # "" for a single PUT
    expires_at: int  # unix seconds


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UploadTokenSigner:
    """HMAC-SHA256 tokens of the form `<payload>.<signature>`, both URL-safe base64."""

    def __init__(self, secret: str, *, now: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._now = now

    def _signature(self, payload: str) -> str:
        return _b64encode(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def sign(self, grant: UploadGrant) -> str:
        body = json.dumps(asdict(grant), separators=(",", ":"), sort_keys=True)
        payload = _b64encode(body.encode())
        return f"{payload}.{self._signature(payload)}"

    def verify(self, token: str) -> UploadGrant:
        """The grant inside a genuine, unexpired token; `UploadRejected` otherwise."""
        payload, dot, signature = token.partition(".")
        # Compare the encoded signature text so that any altered character fails, even one
        # in the padding bits that decoding would silently drop.
        if not dot or not hmac.compare_digest(
            self._signature(payload).encode(), signature.encode("utf-8", "replace")
        ):
            raise UploadRejected("UPLOAD_TOKEN_INVALID", "the upload URL is not genuine")
        try:
            grant = UploadGrant(**json.loads(_b64decode(payload)))
        except (ValueError, TypeError, binascii.Error) as exc:
            # Only reachable with a leaked signing key or a format change; still refuse cleanly.
            raise UploadRejected("UPLOAD_TOKEN_INVALID", "the upload URL is malformed") from exc
        if self._now() >= grant.expires_at:
            raise UploadRejected(
                "UPLOAD_URL_EXPIRED", "the upload URL has expired; request a new one"
            )
        return grant

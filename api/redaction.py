"""Keep capability tokens out of access logs."""

from __future__ import annotations

import logging
import re

_UPLOAD_TOKEN = re.compile(r"(/v1/uploads/)[^/?\s]+")


def redact(text: str) -> str:
    """`/v1/uploads/<token>` → `/v1/uploads/<redacted>`: a signed upload URL is a credential."""
    return _UPLOAD_TOKEN.sub(r"\1<redacted>", text)


class RedactUploadTokens(logging.Filter):
    """A filter for `uvicorn.access`, whose records carry the request path in `args`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        record.msg = redact(str(record.msg))
        return True


def install() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactUploadTokens) for f in access.filters):
        access.addFilter(RedactUploadTokens())

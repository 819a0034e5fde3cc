"""Reading Server-Sent Events from a streaming response."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def sse_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON payload of every `data:` line, in order."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(json.loads(line[len("data: ") :]))
    return out

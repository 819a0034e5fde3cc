"""Incremental stop-string matching shared by every engine, so stops behave identically."""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Feed decoded pieces; get back text that is safe to emit.

    Text that could still be the start of a stop string is held back until the next piece
    decides it; at the first full match everything from the match on is dropped.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add a piece; return the text that can no longer be part of a stop string."""
        if not self._stops:
            return text
        if self.stopped:
            return ""
        buffer = self._buffer + text
        cut = self._first_match(buffer)
        pending = self._earliest_pending(buffer, cut if cut >= 0 else len(buffer))
        if cut >= 0 and pending is None:
            self.stopped = True
            self._buffer = ""
            return buffer[:cut]
        # A longer stop string starting earlier may still complete: hold from its start.
        start = len(buffer) if pending is None else pending
        self._buffer = buffer[start:]
        return buffer[:start]

    def flush(self) -> str:
        """The held-back text once the stream has ended, cut at a match if it holds one."""
        text, self._buffer = self._buffer, ""
        if self.stopped:
            return ""
        cut = self._first_match(text)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _first_match(self, buffer: str) -> int:
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        return min(hits, default=-1)

    def _earliest_pending(self, buffer: str, limit: int) -> int | None:
        # Earliest start before `limit` whose rest is a proper prefix of some stop string.
        for start in range(max(0, len(buffer) - self._hold), limit):
            tail = buffer[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return start
        return None

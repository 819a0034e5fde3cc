"""The worker ↔ runner protocol: tiny typed events, JSON lines over the child's stdio.

JSON, never pickle: the runner executes an untrusted model and must not be able to make its
parent deserialise objects. Every request (Generate, Embed) carries a `tag`; exactly one
`Done` answers it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setup:  # from parent, first line: what to load
    bundle_dir: str
    format: str
    device: str = "cpu"
    threads: int = 1
    # Requests decoded together (continuous batching) where the engine can; else one.
    parallel: int = 1


@dataclass(frozen=True)
class Generate:  # from parent
    tag: str
    prompt: str
    raw: bool = False
    max_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 40
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # 0: write each token at once (someone streams). Otherwise tokens are written together at
    # most every `coalesce_ms`, which spares the worker a wake-up per token.
    coalesce_ms: float = 0.0
    # A chat ({role, content} dicts) for the model's template; `prompt` is then unused.
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Embed:  # from parent: one Embedding per input, in order, then one Done
    tag: str
    inputs: list[str]


@dataclass(frozen=True)
class Cancel:  # from parent
    tag: str


@dataclass(frozen=True)
class Shutdown:  # from parent
    pass


@dataclass(frozen=True)
class Ready:  # from child, once, after a successful load
    load_ms: float
    context_length: int
    has_chat_template: bool
    device: str
    parallel: int = 1  # requests the runner takes at once


@dataclass(frozen=True)
class SetupFailed:  # from child, instead of Ready; the child then exits
    detail: str


@dataclass(frozen=True)
class Token:  # from child
    tag: str
    text: str
    index: int


@dataclass(frozen=True)
class Tokens:  # from child: a run of tokens from `index` on, written together (coalesced)
    tag: str
    index: int
    texts: list[str]


@dataclass(frozen=True)
class Embedding:  # from child, one per input of an Embed (one per line keeps lines short)
    tag: str
    index: int
    vector: list[float]


@dataclass(frozen=True)
class Done:  # from child, exactly one per Generate or Embed
    tag: str
    error: bool = False
    code: str | None = None
    detail: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_ms: float = 0.0


@dataclass(frozen=True)
class Convert:  # from parent, to a converter child: one pickle-based weights file
    tag: str
    source: str  # a copy of the validated upload, inside the child's temp dir
    target: str  # where the child writes the safetensors, inside its temp dir


@dataclass(frozen=True)
class Converted:  # from converter child, exactly one per Convert
    tag: str
    error: bool = False
    detail: str = ""
    tensors: int = 0


Event = (
    Setup
    | Generate
    | Embed
    | Cancel
    | Shutdown
    | Ready
    | SetupFailed
    | Token
    | Tokens
    | Embedding
    | Done
    | Convert
    | Converted
)
Request = Generate | Embed
_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Setup,
        Generate,
        Embed,
        Cancel,
        Shutdown,
        Ready,
        SetupFailed,
        Token,
        Tokens,
        Embedding,
        Done,
        Convert,
        Converted,
    )
}
MAX_LINE = 1 << 20


class ProtocolError(Exception):
    """A line that is not a well-formed event: treat the child as dead."""


class Lines:
    """Events one line each, read straight from a pipe's file descriptor, no thread between.

    `next_line` waits for a line: for ever (`timeout` None), or at most `timeout` seconds
    (0: only a line already there), so a thread can look for one between two pieces of
    work. None: nothing came in time, or the pipe ended (`eof`). A line longer than
    `MAX_LINE` raises ProtocolError. Iterating yields lines until the pipe ends.
    """

    def __init__(self, fd: int, wake_fd: int | None = None) -> None:
        self.fd = fd
        # Readable when another thread wants a timed `next_line` to return early (None)
        self.wake_fd = wake_fd
        self._waited = [fd] if wake_fd is None else [fd, wake_fd]
        self._buffer = bytearray()
        self.eof = False

    def buffered(self) -> int:
        """Complete lines read from the pipe and not yet taken."""
        return self._buffer.count(b"\n")

    def __iter__(self) -> Iterator[bytes]:
        while (line := self.next_line()) is not None:
            yield line

    def next_line(self, timeout: float | None = None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("event line too long")
            if self.eof:
                return None
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                ready = select.select(self._waited, [], [], left)[0]
                if self.wake_fd in ready:
                    with contextlib.suppress(BlockingIOError):  # another reader took them
                        os.read(self.wake_fd, 1 << 10)  # every wake-up so far, at once
                if self.fd not in ready:
                    return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.eof = True
                return None
            self._buffer += chunk


def encode(event: Event) -> bytes:
    # The fields as they are (`vars`, not `asdict`, which deep-copies): a token is encoded
    # on the runner's generation thread, so its cost is paid per token.
    return json.dumps({"type": type(event).__name__, **vars(event)}).encode() + b"\n"


def decode(line: bytes) -> Event:
    if len(line) > MAX_LINE:
        raise ProtocolError("event line too long")
    try:
        data = json.loads(line)
        cls = _TYPES[data.pop("type")]
        event: Event = cls(**data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed event: {line[:200]!r}") from exc
    if not _well_typed(event):
        raise ProtocolError(f"malformed event: {line[:200]!r}")
    return event


def _well_typed(event: Event) -> bool:
    """Text events from the untrusted child carry exactly what their fields say."""
    if isinstance(event, Token):
        return type(event.text) is str and type(event.index) is int
    if isinstance(event, Tokens):
        texts = event.texts
        return (
            type(texts) is list
            and all(type(t) is str for t in texts)
            and (type(event.index) is int)
        )
    return True

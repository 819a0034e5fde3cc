"""The runner child's sequential server and the line reader both ends of the pipe use.

The server reads its stdin on the thread that generates: idle it waits for a line, and
between two tokens it takes whatever the parent sent meanwhile. These tests drive it over
a real pipe, in this process, with a scripted engine.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator

import pytest

from workers.engines.base import GenerateRequest, GenerationResult
from workers.runner.child import Server
from workers.runner.protocol import (
    MAX_LINE,
    Cancel,
    Done,
    Event,
    Generate,
    Lines,
    ProtocolError,
    Shutdown,
    Token,
    encode,
)


class Steps:
    """An engine that yields `pieces` tokens (at most max_tokens), `gap_s` apart, until
    cancelled."""

    context_length = 64
    has_chat_template = False
    device = "cpu"

    def __init__(self, pieces: int = 1000, gap_s: float = 0.005) -> None:
        self.pieces, self.gap_s = pieces, gap_s
        self.started = threading.Event()

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        return 1

    def generate(
        self, request: GenerateRequest, cancelled: Callable[[], bool]
    ) -> Generator[str, None, GenerationResult]:
        self.started.set()
        count = min(self.pieces, request.params.max_tokens)
        for n in range(count):
            if cancelled():
                return GenerationResult("cancelled", 1, n)
            time.sleep(self.gap_s)
            yield f"{request.prompt}{n} "
        return GenerationResult("length", 1, count)


class Captured:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)

    def done(self) -> dict[str, Done]:
        return {e.tag: e for e in self.events if isinstance(e, Done)}


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        with contextlib.suppress(OSError):
            os.close(fd)


def serving(engine: Steps, read_fd: int) -> tuple[Server, Captured, threading.Thread]:
    out = Captured()
    server = Server(engine, out, Lines(read_fd))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, out, thread


def generate(tag: str, prompt: str = "p", max_tokens: int = 1000) -> bytes:
    return encode(Generate(tag=tag, prompt=prompt, raw=True, max_tokens=max_tokens))


def test_a_cancel_sent_mid_generation_stops_it_and_the_server_takes_the_next(
    pipe: tuple[int, int],
) -> None:
    engine = Steps()
    _, out, thread = serving(engine, pipe[0])
    os.write(pipe[1], generate("a"))
    assert engine.started.wait(5)
    time.sleep(0.05)
    os.write(pipe[1], encode(Cancel("a")))
    os.write(pipe[1], generate("b", max_tokens=3))
    deadline = time.monotonic() + 5
    while "b" not in out.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    done = out.done()
    assert done["a"].finish_reason == "cancelled" and 0 < done["a"].completion_tokens < 1000
    assert not done["b"].error
    tokens_a = [e for e in out.events if isinstance(e, Token) and e.tag == "a"]
    assert len(tokens_a) == done["a"].completion_tokens
    os.close(pipe[1])
    thread.join(5)
    assert not thread.is_alive()


def test_a_request_sent_during_another_waits_its_turn(pipe: tuple[int, int]) -> None:
    """The parent sends one at a time, but a second one is queued, not lost or run beside."""
    engine = Steps(pieces=20)
    _, out, thread = serving(engine, pipe[0])
    os.write(pipe[1], generate("a") + generate("b", prompt="q"))
    deadline = time.monotonic() + 5
    while len(out.done()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    order = [(e.tag, type(e).__name__) for e in out.events]
    assert order.index(("a", "Done")) < order.index(("b", "Token"))
    assert all(not d.error and d.completion_tokens == 20 for d in out.done().values())
    os.close(pipe[1])
    thread.join(5)


@pytest.mark.parametrize("end", ["eof", "shutdown"])
def test_the_end_of_stdin_or_shutdown_mid_generation_stops_the_server(
    pipe: tuple[int, int], end: str
) -> None:
    """The parent gone (EOF) or done (Shutdown): the generation stops, serve() returns."""
    engine = Steps()
    server, out, thread = serving(engine, pipe[0])
    os.write(pipe[1], generate("a"))
    assert engine.started.wait(5)
    if end == "eof":
        os.close(pipe[1])
    else:
        os.write(pipe[1], encode(Shutdown()))
    thread.join(5)
    assert not thread.is_alive() and server.stopping.is_set()
    assert out.done()["a"].finish_reason == "cancelled"


def test_garbage_on_stdin_stops_the_server(pipe: tuple[int, int]) -> None:
    engine = Steps()
    _, out, thread = serving(engine, pipe[0])
    os.write(pipe[1], b"not an event\n")
    thread.join(5)
    assert not thread.is_alive() and out.events == []


def test_lines_reassembles_split_lines_and_waits_no_longer_than_asked(
    pipe: tuple[int, int],
) -> None:
    lines = Lines(pipe[0])
    began = time.monotonic()
    assert lines.next_line(timeout=0) is None
    assert lines.next_line(timeout=0.1) is None and not lines.eof
    assert 0.09 <= time.monotonic() - began < 2
    os.write(pipe[1], b'{"a": 1}\n{"b"')
    assert lines.next_line(timeout=0) == b'{"a": 1}\n'
    assert lines.next_line(timeout=0) is None  # half a line is not a line
    threading.Timer(0.05, os.write, (pipe[1], b": 2}\nrest")).start()
    assert lines.next_line() == b'{"b": 2}\n'
    os.close(pipe[1])
    assert lines.next_line() is None and lines.eof  # a last line without its newline is lost
    assert list(lines) == []


def test_lines_refuses_a_line_longer_than_the_protocol_allows(pipe: tuple[int, int]) -> None:
    """A writer that never ends its line costs at most MAX_LINE of memory, not all of it."""
    lines = Lines(pipe[0])
    writer = threading.Thread(
        target=lambda: os.write(pipe[1], b"x" * (MAX_LINE + 70_000)), daemon=True
    )
    writer.start()
    with pytest.raises(ProtocolError, match="too long"):
        lines.next_line(timeout=5)

"""The parent's end of one child's stdio (events, stderr ring) and one request in flight."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Generic, TypeVar

from workers.engines.base import GenerateRequest
from workers.runner.protocol import (
    Done,
    Embedding,
    Event,
    Generate,
    Lines,
    ProtocolError,
    Token,
    Tokens,
    decode,
    encode,
)

Output = TypeVar("Output", Token | Tokens, Embedding)

STDERR_LINES = 200


class PipeClosed(Exception):
    """The child is gone (EOF), wrote a malformed event, or stopped reading its stdin."""


class _Eof:
    """Marks the end of the child's stdout in the event queue."""


class _Wake:
    """Put in a route's queue: its waiting reader returns at once, to look at its cancel."""


_WAKE = _Wake()


class WakingEvent(threading.Event):
    """A cancel: an Event that also tells its listeners when it is set.

    The thread waiting for a runner's next event subscribes, so a cancel wakes it at once
    (a prefill or a coalesced batch can keep the runner silent for a while), rather than
    being seen at its next timed wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[Callable[[], None]] = []
        self._listeners_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` when set (now, if it already is); returns the unsubscribe."""
        with self._listeners_lock:
            self._listeners.append(listener)
        if self.is_set():
            listener()

        def unsubscribe() -> None:
            with self._listeners_lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe


class ChildPipes:
    """The child's events, and its stderr kept in a ring buffer by a reader thread.

    A runner that takes one request at a time has its events read by the thread that waits
    for them (`next_event`), straight from the pipe: no thread hop between the child's
    write and the request's consumer. After `route_by_tag` (a runner that takes several
    requests at once) a reader thread takes over: each request's events go to its own
    queue, opened with `open_route`, and the reader hands every event straight to the
    request that waits for it. An event for no open request, and the end of the stream,
    reach every open request.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        self._proc = proc
        self._wake_r, self._wake_w = os.pipe()  # `wake` for a thread reading `_lines`
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()  # `close` shuts the wake pipe under it
        self._lines = Lines(proc.stdout.fileno(), self._wake_r)
        self._read_lock = threading.Lock()  # one reader of `_lines` at a time
        self._closed = False
        self._events: queue.Queue[Event | _Eof | _Wake | ProtocolError] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._write_lock = threading.Lock()
        self._routes: dict[str, queue.Queue[Event | _Eof | _Wake | ProtocolError]] | None = None
        self._route_lock = threading.Lock()
        self._ended: _Eof | ProtocolError | None = None  # what every later reader gets at once
        self._readers = [
            threading.Thread(
                target=self._read_stderr, args=(proc.stderr,), daemon=True, name="runner-io"
            )
        ]
        self._readers[0].start()

    def send(self, event: Event) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            with self._write_lock:
                stdin.write(encode(event))
                stdin.flush()
        except (OSError, ValueError) as exc:  # ValueError: the pipe was closed by stop()
            raise PipeClosed(f"runner stdin closed: {exc}") from exc

    def route_by_tag(self) -> None:
        """From now on a reader thread reads the events; those carrying a tag go to that
        tag's route."""
        with self._route_lock:
            self._routes = {}
        reader = threading.Thread(target=self._read_events, daemon=True, name="runner-io")
        self._readers.append(reader)
        reader.start()

    def open_route(self, tag: str) -> None:
        with self._route_lock:
            assert self._routes is not None and tag not in self._routes
            route = self._routes[tag] = queue.Queue()
            if self._ended is not None:
                route.put(self._ended)

    def close_route(self, tag: str) -> None:
        with self._route_lock:
            if self._routes is not None:
                self._routes.pop(tag, None)

    def wake(self, tag: str | None = None) -> None:
        """Make a waiting `next_event` (of `tag`'s route, if routed) return None now."""
        with self._route_lock:
            routes = self._routes
            route = routes.get(tag) if routes is not None and tag is not None else None
        if route is not None:
            route.put(_WAKE)
        elif routes is None:
            with self._wake_lock:
                if self._wake_w >= 0:
                    with contextlib.suppress(BlockingIOError):  # already full of wake-ups
                        os.write(self._wake_w, b"w")

    def next_event(self, timeout: float, tag: str | None = None) -> Event | None:
        """The next event (of `tag`'s route, if given), or None if none came within
        `timeout`; PipeClosed at EOF."""
        if self._routes is None:
            return self._read_event(timeout)
        events = self._events if tag is None else self._routes[tag]
        try:
            item = events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, _Wake):
            return None
        if isinstance(item, _Eof):
            events.put(item)  # stays visible to any later reader
            raise PipeClosed("runner closed its stdout")
        if isinstance(item, ProtocolError):
            raise PipeClosed(str(item))
        return item

    def _read_event(self, timeout: float) -> Event | None:
        """The next event, read from the pipe by this thread (no reader thread yet)."""
        with self._read_lock:
            if self._ended is None and not self._closed:
                try:
                    line = self._lines.next_line(max(0.0, timeout))
                    if line is not None:
                        return decode(line)
                    if not self._lines.eof:
                        return None
                except ProtocolError as exc:
                    self._ended = exc
                except (OSError, ValueError):
                    pass
            ended = self._ended = self._ended or _Eof()
        if isinstance(ended, ProtocolError):
            raise PipeClosed(str(ended))
        raise PipeClosed("runner closed its stdout")

    def pending(self) -> int:
        """Events the child wrote that nobody has taken yet (read or not from the pipe)."""
        with self._read_lock:
            waiting = 0 if self._closed else len(select.select([self._lines.fd], [], [], 0)[0])
            return self._events.qsize() + self._lines.buffered() + waiting

    def tail(self, lines: int = 20) -> str:
        # A dead child's last words may still be in flight: let the reader drain them first.
        if self._proc.poll() is not None:
            self._readers[0].join(timeout=0.5)
        return "\n".join(list(self._stderr)[-lines:])

    def close(self) -> None:
        """Call after the child is dead: the readers then reach EOF and finish."""
        streams: list[IO[bytes] | None] = [self._proc.stdin]
        for t in self._readers:
            t.join(timeout=2)
        # A reader still blocked (a grandchild holds the pipe) owns the stream: closing it
        # under the reader would hang or hand its descriptor to the next file opened, so
        # that stream is left to the daemon thread.
        if not self._readers[0].is_alive():
            streams.append(self._proc.stderr)
        if self._read_lock.acquire(timeout=2):
            try:
                if len(self._readers) == 1 or not self._readers[1].is_alive():
                    self._closed = True
                    streams.append(self._proc.stdout)
            finally:
                self._read_lock.release()
        for stream in streams:
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        if self._closed:  # no reader selects on the wake pipe any more
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_r = self._wake_w = -1

    def _read_events(self) -> None:
        """A reader thread's loop (routed runners): every event to its request's route."""
        try:
            for line in self._lines:
                try:
                    event = decode(line)
                except ProtocolError as exc:
                    self._end(exc)
                    return
                self._put(event)
        except ProtocolError as exc:  # a line too long
            self._end(exc)
        except (OSError, ValueError):
            pass
        finally:
            self._end(_Eof())

    def _put(self, event: Event) -> None:
        if self._routes is None:
            self._events.put(event)
            return
        tag = getattr(event, "tag", None)
        with self._route_lock:
            route = self._routes.get(tag) if isinstance(tag, str) else None
        if route is not None:
            route.put(event)
        elif isinstance(tag, str):  # for no request in flight: the child is confused
            self._end(ProtocolError(f"event for no request in flight: {event!r}"[:300]))
        else:
            self._events.put(event)

    def _end(self, item: _Eof | ProtocolError) -> None:
        with self._route_lock:
            if self._ended is None:
                self._ended = item
            routes = list(self._routes.values()) if self._routes is not None else []
        for route in routes:
            route.put(item)
        self._events.put(item)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self._stderr.append(line.decode(errors="replace").rstrip())


class Exchange(Generic[Output]):
    """Bookkeeping for one request in flight: its deadline, its cancel, its consumer.

    `kind` is the output event the request produces (Token or Tokens, or Embedding);
    `on_output` gets each one.
    """

    def __init__(
        self,
        tag: str,
        kind: type[Embedding] | tuple[type[Token], type[Tokens]],
        on_output: Callable[[Output], None],
        timeout: float | None,
        cancel_event: threading.Event | None,
    ) -> None:
        self.tag = tag
        self.kind: type[Embedding] | tuple[type[Token], type[Tokens]] = kind
        self.on_output: Callable[[Output], None] = on_output
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancel_event = cancel_event
        self.cancel_sent_at: float | None = None
        self.grace_from: float | None = None  # the current grace window's start
        self.child_cpu_s: float | None = None  # the child's CPU time at that start
        self.outputs_after_cancel = 0
        self.timed_out = False
        self.callback_error: Exception | None = None

    def should_cancel(self) -> bool:
        if self.cancel_sent_at is not None:
            return False
        self.timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        asked = self.cancel_event is not None and self.cancel_event.is_set()
        return self.timed_out or asked or self.callback_error is not None

    def cancel_sent(self, child_cpu_s: float | None) -> None:
        self.cancel_sent_at = self.grace_from = time.monotonic()
        self.child_cpu_s = child_cpu_s

    def cancel_ignored(self, grace_s: float) -> bool:
        since = self.grace_from
        return since is not None and time.monotonic() - since > grace_s

    def still_computing(self, child_cpu_s: float | None, grace_s: float, most_s: float) -> bool:
        """Whether a child past its grace is working, not stuck: it sent nothing since the
        Cancel (between two outputs it would have seen it) and its CPU time moved by a fifth
        of the window or more (one engine call, a prefill chunk, still running), for at most
        `most_s` in all. If so, a new grace window starts now."""
        now = time.monotonic()
        sent, before = self.cancel_sent_at, self.child_cpu_s
        if sent is None or self.outputs_after_cancel or now - sent > most_s:
            return False
        if child_cpu_s is None or before is None or child_cpu_s - before < 0.2 * grace_s:
            return False
        self.grace_from, self.child_cpu_s = now, child_cpu_s
        return True

    def takes(self, event: Event) -> bool:
        return isinstance(event, self.kind) and event.tag == self.tag

    def deliver(self, output: Output) -> None:
        if self.cancel_sent_at is not None:
            self.outputs_after_cancel += 1
        if self.callback_error is not None:
            return
        try:
            self.on_output(output)
        except Exception as exc:  # the consumer is gone (client hung up): cancel, stay warm
            self.callback_error = exc

    def finish(self, done: Done) -> Done:
        if not self.timed_out:
            return done
        detail = f"execution timeout after {self.timeout}s"
        return dataclasses.replace(done, error=True, code="TIMEOUT", detail=detail)


def generate_event(tag: str, request: GenerateRequest, coalesce_ms: float = 0.0) -> Generate:
    p = request.params
    return Generate(
        coalesce_ms=coalesce_ms,
        tag=tag,
        prompt=request.prompt,
        raw=request.raw,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        seed=p.seed,
        messages=None if request.messages is None else request.conversation(),
    )

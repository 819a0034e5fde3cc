"""The runner process: `python -m workers.runner.child`, started by `Runner` in a sandbox.

stdin carries `Setup`, then `Generate`/`Cancel`/`Shutdown`; stdout carries only events. The
model is untrusted: whatever it raises becomes `SetupFailed` or `Done(error=True)`; whatever
kills the process (a GGML_ASSERT abort) is seen by the parent as a dead child.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from workers.engines.base import (
    ChatMessage,
    Engine,
    EngineError,
    GenerateRequest,
    SamplingParams,
)
from workers.runner.protocol import (
    Cancel,
    Done,
    Embed,
    Embedding,
    Event,
    Generate,
    Lines,
    ProtocolError,
    Ready,
    Request,
    Setup,
    SetupFailed,
    Shutdown,
    Token,
    Tokens,
    decode,
    encode,
)

MAX_DETAIL = 2000
# How often a running generation looks at stdin for a Cancel (at its next token after this).
STDIN_POLL_S = 0.002


class EventWriter:
    """Writes events on a private duplicate of the original stdout, unbuffered."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        self.write(encode(event))

    def write(self, raw: bytes) -> None:
        data = memoryview(raw)
        with self._lock:
            while data:
                data = data[os.write(self._fd, data) :]


class TokenSink:
    """A request's tokens: each written at once as a `Token`, or held and written as one
    `Tokens` event every `coalesce_ms` (and at the end)."""

    def __init__(self, out: EventWriter, tag: str, coalesce_ms: float) -> None:
        self._out, self._tag = out, tag
        self._every_s = coalesce_ms / 1000
        self._held: list[str] = []
        self.count = 0  # tokens written so far: the index of the next one
        self._sent_at = time.monotonic()

    def add(self, text: str) -> None:
        if not self._every_s:
            self._out.send(Token(tag=self._tag, text=text, index=self.count))
            self.count += 1
            return
        self._held.append(text)  # no event and no JSON per token: the generation thread's time
        if time.monotonic() - self._sent_at >= self._every_s:
            self.flush()

    def flush(self) -> None:
        if self._held:
            self._out.send(Tokens(tag=self._tag, index=self.count, texts=self._held))
            self.count += len(self._held)
            self._held = []
        self._sent_at = time.monotonic()


def reserve_stdout() -> EventWriter:
    """Keep fd 1 for events only: llama.cpp and torch print from C, so move fd 1 to stderr."""
    sys.stdout.flush()
    event_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return EventWriter(event_fd)


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


SPARE_NAME, RUNNER_NAME = b"ift-spare", b"ift-runner"
PR_SET_NAME = 15


def set_process_name(name: bytes) -> None:
    """What `ps -o comm` shows: a spare waiting for a model, or a runner that has one."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def preload_while_waiting(stdin: int) -> None:
    """A spare runner (spawned before any request) imports its engines while it waits.

    A runner started for a request finds its Setup already on stdin and skips this; a spare
    is idle, so llama.cpp's import (a few hundred ms) leaves a later cold start's path.
    """
    if select.select([stdin], [], [], 0)[0]:
        return
    set_process_name(SPARE_NAME)
    try:
        import llama_cpp  # noqa: F401

        import workers.engines.loader  # noqa: F401
    except Exception:  # an engine this host lacks: its Setup will say so
        traceback.print_exc(file=sys.stderr)


def forbid_unpickling() -> None:
    """A serving runner never unpickles: from here on `torch.load` raises, whoever calls it.

    Pickle-based uploads were converted to safetensors at validation and the loader refuses
    any pickle in a bundle; this tripwire also covers a library that would reach for one.
    """
    import torch
    import torch.serialization

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError("torch.load is disabled in serving runners (safetensors only)")

    torch.load = refuse
    torch.serialization.load = refuse


def load(setup: Setup) -> Engine:
    from workers.engines.loader import load_engine  # heavy imports happen after the fd swap

    if setup.format in ("transformers", "pytorch"):
        forbid_unpickling()
    return load_engine(
        Path(setup.bundle_dir), setup.format, device=setup.device, threads=setup.threads
    )


class Server:
    """Serves one request at a time, read from stdin by the same thread.

    Idle, it waits on stdin; while a request runs, the engine's cancel check (between two
    tokens) takes whatever the parent sent meanwhile: a Cancel, Shutdown, or the end of
    stdin. No reader thread stands between a Generate and its run.
    """

    parallel = 1

    def __init__(self, engine: Engine, out: EventWriter, stdin: Lines) -> None:
        self.engine = engine
        self.out = out
        self.stdin = stdin
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.stopping = threading.Event()
        self._next_poll = 0.0

    def take(self, line: bytes) -> Request | None:
        """One line from the parent: a request is returned, a Cancel or Shutdown noted."""
        event = decode(line)
        if isinstance(event, Generate | Embed):
            return event
        if isinstance(event, Cancel):
            self.cancelled.add(event.tag)  # set.add is atomic under the GIL
        elif isinstance(event, Shutdown):
            self.stopping.set()
        return None

    def read_loop(self) -> None:
        """A reader thread's loop (`BatchServer`): requests are queued for the serving loop."""
        try:
            for line in self.stdin:
                if (request := self.take(line)) is not None:
                    self.requests.put(request)
                elif self.stopping.is_set():
                    break
        except (ProtocolError, OSError) as exc:
            print(f"runner: bad input, stopping: {exc}", file=sys.stderr)
        # EOF counts as Shutdown: the parent is gone or done with us.
        self.stopping.set()
        self.requests.put(None)

    def serve(self) -> None:
        while (request := self._next_request()) is not None:
            done = self.embed(request) if isinstance(request, Embed) else self.run(request)
            self.out.send(done)
            self.cancelled.discard(request.tag)

    def _next_request(self) -> Request | None:
        """The next request (one sent during the last is queued), or None at Shutdown/EOF."""
        with contextlib.suppress(queue.Empty):
            return self.requests.get_nowait()
        while not self.stopping.is_set():
            try:
                line = self.stdin.next_line()
                if line is None:
                    break
                if (request := self.take(line)) is not None:
                    return request
            except (ProtocolError, OSError) as exc:
                print(f"runner: bad input, stopping: {exc}", file=sys.stderr)
                break
        self.stopping.set()  # EOF counts as Shutdown: the parent is gone or done with us
        return None

    def _poll_stdin(self) -> None:
        """Take what the parent sent while a request runs, without waiting for more (on the
        serving thread: the engine checks for a cancel between its own tokens)."""
        try:
            while (line := self.stdin.next_line(timeout=0)) is not None:
                if (request := self.take(line)) is not None:
                    self.requests.put(request)  # the parent sends one at a time; kept anyway
            if self.stdin.eof:
                self.stopping.set()
        except (ProtocolError, OSError) as exc:
            print(f"runner: bad input, stopping: {exc}", file=sys.stderr)
            self.stopping.set()

    def embed(self, e: Embed) -> Done:
        """Every vector, then Done with the input tokens (nothing is sent on failure)."""
        started = time.perf_counter()
        try:
            result = self.engine.embed(e.inputs, self.cancel_check(e.tag))
        except Exception as exc:
            return _failed(e.tag, exc, started)
        for index, vector in enumerate(result.vectors):
            self.out.send(Embedding(tag=e.tag, index=index, vector=vector))
        return Done(
            tag=e.tag,
            finish_reason="stop",
            prompt_tokens=result.prompt_tokens,
            engine_ms=(time.perf_counter() - started) * 1000,
        )

    def run(self, g: Generate) -> Done:
        started = time.perf_counter()
        sink = TokenSink(self.out, g.tag, g.coalesce_ms)
        try:
            request = generate_request(g)
            stream = self.engine.generate(request, self.cancel_check(g.tag))
            while True:
                try:
                    piece = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    break
                sink.add(piece)
        except Exception as exc:
            sink.flush()
            return _failed(g.tag, exc, started)
        sink.flush()
        return Done(
            tag=g.tag,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            engine_ms=(time.perf_counter() - started) * 1000,
        )

    def cancel_check(self, tag: str) -> Callable[[], bool]:
        """What an engine call looks at for this request's cancel (this thread reads stdin)."""
        return functools.partial(self._cancel_sent, tag)

    def _cancel_sent(self, tag: str) -> bool:
        now = time.monotonic()
        if now >= self._next_poll:  # a select() per token costs the engine ~10 us each
            self._next_poll = now + STDIN_POLL_S
            self._poll_stdin()
        return self._is_cancelled(tag)

    def _is_cancelled(self, tag: str) -> bool:
        return tag in self.cancelled or self.stopping.is_set()


def _failed(tag: str, exc: Exception, started: float) -> Done:
    if isinstance(exc, EngineError):
        code = exc.code or "INFERENCE_FAILED"
    else:  # an engine bug, not a model-level refusal: keep the trace for the operator
        code = "INFERENCE_FAILED"
        traceback.print_exc(file=sys.stderr)
    engine_ms = (time.perf_counter() - started) * 1000
    return Done(tag=tag, error=True, code=code, detail=short(exc), engine_ms=engine_ms)


def generate_request(g: Generate) -> GenerateRequest:
    """The engine's request for a Generate event (raises EngineError on bad messages)."""
    params = SamplingParams(
        max_tokens=g.max_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        stop=tuple(g.stop),
        seed=g.seed,
    )
    return GenerateRequest(
        prompt=g.prompt, raw=g.raw, params=params, messages=_messages(g.messages)
    )


def _messages(raw: list[dict[str, str]] | None) -> tuple[ChatMessage, ...] | None:
    if raw is None:
        return None
    roles = ("system", "user", "assistant")
    if not all(m.get("role") in roles and isinstance(m.get("content"), str) for m in raw):
        raise EngineError("each message needs a role (system, user, assistant) and content")
    return tuple(ChatMessage(m["role"], m["content"]) for m in raw)  # type: ignore[arg-type]


def main() -> int:
    out = reserve_stdout()
    stdin = Lines(sys.stdin.fileno())
    preload_while_waiting(sys.stdin.fileno())
    try:
        if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            # torch.load would ignore weights_only=True: never load a model like that
            raise RuntimeError("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; refusing to load")
        setup = decode(stdin.next_line() or b"")
        set_process_name(RUNNER_NAME)
        if not isinstance(setup, Setup):
            raise ProtocolError(f"expected Setup, got {type(setup).__name__}")
        started = time.perf_counter()
        engine = load(setup)
        server = serving(engine, setup.parallel, out, stdin)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        out.send(SetupFailed(detail=short(exc)))
        return 1
    load_ms = (time.perf_counter() - started) * 1000
    device = str(getattr(engine, "device", setup.device))
    out.send(
        Ready(
            load_ms=load_ms,
            context_length=engine.context_length,
            has_chat_template=engine.has_chat_template,
            device=device,
            parallel=server.parallel,
        )
    )
    server.serve()
    return 0


def serving(engine: Engine, parallel: int, out: EventWriter, stdin: Lines) -> Server:
    """A batching server where the engine batches and more than one request was asked for."""
    make_batcher = getattr(engine, "batcher", None)
    if parallel <= 1 or make_batcher is None:
        return Server(engine, out, stdin)
    from workers.runner.batch_server import BatchServer

    return BatchServer(make_batcher(parallel), engine, out, stdin)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter teardown: engine destructors (llama.cpp, torch threads) can take
    # seconds and the parent is waiting to reuse the slot.
    os._exit(code)

"""`Runner`: owns one sandboxed child process and the event pipe to it.

Two tiers of failure, as in cog: a model error arrives as `Done(error=True)` and the runner
stays READY; a dead, silent or babbling child raises `RunnerFatal` and the runner is DEFUNCT
for good (the pool drops it, it is never handed out or reported idle again).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from workers.engines.base import GenerateRequest
from workers.runner.pipes import ChildPipes, Exchange, PipeClosed, WakingEvent, generate_event
from workers.runner.protocol import (
    Cancel,
    Done,
    Embed,
    Embedding,
    Event,
    Ready,
    Setup,
    SetupFailed,
    Shutdown,
    Token,
    Tokens,
)
from workers.runner.sandbox import Sandbox, SandboxConfig, runner_argv

log = logging.getLogger("inferatech.runner")
# A child that ignores a Cancel this long is killed, unless it is still computing (its CPU
# time moves and it sends nothing: one long engine call, such as a big model's prefill chunk
# on a slow CPU), which it may do for CANCEL_BUSY_MAX_S in all: within the 30 s a job's run
# lock outlives its execution timeout (`run_job`), so no redelivered copy can start meanwhile.
CANCEL_GRACE_S = 5.0
CANCEL_BUSY_MAX_S = 20.0
STOP_GRACE_S = 3.0
_POLL_S = 0.05  # how often a waiting generate() looks at its deadline (and a plain cancel Event)


class RunnerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEFUNCT = "defunct"


class RunnerError(Exception):
    pass


class RunnerSetupFailed(RunnerError):
    """The model did not load; `detail` holds the reason and the tail of the child's stderr."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RunnerFatal(RunnerError):
    """The child died or stopped answering mid-request; the runner is DEFUNCT."""


class RunnerTimeout(RunnerFatal):
    """The request ran out of time and the child ignored Cancel, so it was killed."""


class InvalidState(RunnerError):
    pass


class Runner:
    """One child process that owns one loaded model.

    It takes `capacity` requests at once: one, or the sequences its engine decodes together
    (`parallel`, where the engine batches). It is BUSY while it has no room for another.
    """

    def __init__(
        self,
        bundle_dir: Path,
        fmt: str,
        *,
        sandbox: SandboxConfig | None = None,
        device: str = "auto",
        argv: Sequence[str] | None = None,
        parallel: int = 1,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.fmt = fmt
        self.device = device
        self._sandbox_config = sandbox or SandboxConfig()
        if device == "cpu" and not self._sandbox_config.hide_gpus:
            self._sandbox_config = dataclasses.replace(self._sandbox_config, hide_gpus=True)
        self._argv = list(argv) if argv else runner_argv()
        self.parallel = parallel  # asked for; `capacity` is what the child took
        self.capacity = 1
        self.inflight = 0
        self.state = RunnerState.NEW
        self.ready: Ready | None = None
        self.load_ms = 0.0  # the engine's own load time, reported by the child
        self.startup_ms = 0.0  # spawn → Ready, as the caller sees it
        self.last_used = time.monotonic()
        self.sandbox: Sandbox | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipes: ChildPipes | None = None
        self._lock = threading.Lock()  # guards state transitions

    # --- lifecycle ---------------------------------------------------------------------

    def _assert_state(self, *allowed: RunnerState) -> None:
        if self.state not in allowed:
            raise InvalidState(f"runner is {self.state.value}, needs {[s.value for s in allowed]}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def tmpdir(self) -> Path | None:
        return self.sandbox.tmpdir if self.sandbox else None

    @property
    def network_isolated(self) -> bool:
        return bool(self.sandbox and self.sandbox.network_isolated)

    def start(self, timeout: float = 120.0) -> Ready:
        """Spawn the child and load the model; raises RunnerSetupFailed if it does not load."""
        with self._lock:
            self._assert_state(RunnerState.NEW)
            self.state = RunnerState.STARTING
        began = time.perf_counter()
        try:
            if self._proc is None:
                self._spawn()
            threads = self._sandbox_config.threads
            setup = Setup(self.bundle_dir.as_posix(), self.fmt, self.device, threads, self.parallel)
            self._send(setup)
            event = self._next_event(timeout) or self._fatal("runner did not load in time")
        except RunnerFatal as exc:  # died while loading: the message already has the tail
            self._kill_and_clean()
            raise RunnerSetupFailed(str(exc)) from exc
        except (OSError, subprocess.SubprocessError) as exc:
            self._kill_and_clean()
            raise RunnerSetupFailed(f"runner did not start: {exc}") from exc
        if not isinstance(event, Ready):
            self._kill_and_clean()
            reason = event.detail if isinstance(event, SetupFailed) else f"unexpected {event!r}"
            raise RunnerSetupFailed(self._with_tail(reason))
        self.ready, self.load_ms = event, event.load_ms
        self.capacity = max(1, min(int(event.parallel), self.parallel))
        if self.capacity > 1:
            assert self._pipes is not None
            self._pipes.route_by_tag()
        self.startup_ms = (time.perf_counter() - began) * 1000
        self.last_used = time.monotonic()
        with self._lock:
            self._assert_state(RunnerState.STARTING)  # stop() may have raced us
            self.state = RunnerState.READY
        return event

    def spawn(self) -> None:
        """Start the child without a model (a spare); `start` later loads one into it."""
        with self._lock:
            self._assert_state(RunnerState.NEW)
        try:
            self._spawn()
        except (OSError, subprocess.SubprocessError) as exc:
            self._kill_and_clean()
            raise RunnerSetupFailed(f"runner did not start: {exc}") from exc

    def assign(self, bundle_dir: Path, fmt: str) -> None:
        """The model a spare will load at `start`."""
        self._assert_state(RunnerState.NEW)
        self.bundle_dir, self.fmt = Path(bundle_dir), fmt

    def _spawn(self) -> None:
        self.sandbox = Sandbox(self._sandbox_config)
        self._proc = self.sandbox.popen(self._argv)
        self._pipes = ChildPipes(self._proc)

    def stop(self) -> None:
        """Shutdown politely, then SIGKILL; remove the temp dir. Safe to call in any state."""
        with self._lock:
            was, self.state = self.state, RunnerState.DEFUNCT
        if self._proc and self._proc.poll() is None and was is RunnerState.READY:
            try:
                self._send(Shutdown())
                self._proc.wait(STOP_GRACE_S)
            except (RunnerFatal, subprocess.TimeoutExpired):
                pass
        self._kill_and_clean()

    def _kill_and_clean(self) -> None:
        with self._lock:
            self.state = RunnerState.DEFUNCT
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self._pipes is not None:
            self._pipes.close()
        if self.sandbox is not None:
            self.sandbox.cleanup()

    # --- requests ------------------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest,
        tag: str,
        on_token: Callable[[Token], None],
        *,
        timeout: float | None = None,
        cancel_event: threading.Event | None = None,
        coalesce_ms: float = 0.0,
    ) -> Done:
        """Run one request; returns its one Done. Raises RunnerFatal if the child dies.

        On `timeout` the request is cancelled and its Done comes back with code TIMEOUT (the
        token counts stay, for usage); if the child ignores Cancel it is killed. If `on_token`
        raises, the request is cancelled, the runner stays warm, and the error is re-raised.
        `coalesce_ms` > 0 lets the child deliver tokens in batches (nobody streams them).
        """

        def deliver(event: Token | Tokens) -> None:
            if isinstance(event, Token):
                on_token(event)
                return
            for offset, text in enumerate(event.texts):  # a coalesced run, token by token
                on_token(Token(tag=tag, text=text, index=event.index + offset))

        exchange: Exchange[Token | Tokens] = Exchange(
            tag, (Token, Tokens), deliver, timeout, cancel_event
        )
        return self._request(exchange, generate_event(tag, request, coalesce_ms))

    def embed(
        self,
        inputs: list[str],
        tag: str,
        *,
        timeout: float | None = None,
        cancel_event: threading.Event | None = None,
    ) -> tuple[list[list[float]], Done]:
        """One vector per input (in order) and the request's Done; failures as in generate."""
        vectors: dict[int, list[float]] = {}

        def keep(event: Embedding) -> None:
            # The child is untrusted: anything but a list of numbers ends the request.
            if not isinstance(event.index, int) or not isinstance(event.vector, list):
                raise TypeError("an Embedding needs an int index and a list vector")
            vectors[event.index] = [float(x) for x in event.vector]

        exchange = Exchange(tag, Embedding, keep, timeout, cancel_event)
        try:
            done = self._request(exchange, Embed(tag=tag, inputs=list(inputs)))
        except (TypeError, ValueError) as exc:
            self._kill_and_clean()
            raise RunnerFatal(f"runner sent a malformed vector: {exc}") from exc
        if not done.error and sorted(vectors) != list(range(len(inputs))):
            self._kill_and_clean()
            raise RunnerFatal(f"runner sent {len(vectors)} vectors for {len(inputs)} inputs")
        return [vectors[i] for i in sorted(vectors)], done

    def _request(self, exchange: Exchange[Any], event: Event) -> Done:
        with self._lock:
            self._assert_state(RunnerState.READY)
            self.inflight += 1
            if self.inflight >= self.capacity:
                self.state = RunnerState.BUSY
            routed = self.capacity > 1
        unsubscribe: Callable[[], None] | None = None
        try:
            pipes = self._pipes
            if routed:
                assert pipes is not None
                pipes.open_route(exchange.tag)
            route = exchange.tag if routed else None
            if isinstance(exchange.cancel_event, WakingEvent) and pipes is not None:
                unsubscribe = exchange.cancel_event.subscribe(partial(pipes.wake, route))
            self._send(event)
            done = self._serve(exchange, route)
        except BaseException:
            # Fatal, or we stopped listening mid-request: the child's state is unknown.
            self._kill_and_clean()
            raise
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self.last_used = time.monotonic()
            if routed and self._pipes is not None:
                self._pipes.close_route(exchange.tag)
            with self._lock:  # a fatal end left it DEFUNCT; otherwise it has room again
                self.inflight -= 1
                if self.state is RunnerState.BUSY:
                    self.state = RunnerState.READY
        if exchange.callback_error is not None:
            raise exchange.callback_error
        return done

    def _serve(self, ex: Exchange[Any], route: str | None) -> Done:
        while True:
            if ex.should_cancel():
                self._send(Cancel(ex.tag))
                ex.cancel_sent(self._child_cpu_s())
            elif ex.cancel_ignored(CANCEL_GRACE_S) and not ex.still_computing(
                self._child_cpu_s(), CANCEL_GRACE_S, CANCEL_BUSY_MAX_S
            ):
                kind = RunnerTimeout if ex.timed_out else RunnerFatal
                waited = time.monotonic() - (ex.cancel_sent_at or 0.0)
                raise kind(f"runner ignored Cancel for {waited:.0f}s; killed")
            event = self._next_event(_POLL_S, route)
            if event is not None and ex.takes(event):
                ex.deliver(event)
            elif isinstance(event, Done) and event.tag == ex.tag:
                return ex.finish(event)
            elif event is not None:
                self._fatal(f"unexpected event {event!r}")

    # --- plumbing --------------------------------------------------------------------------

    def _child_cpu_s(self) -> float | None:
        """The child's CPU time so far (all its threads), None where /proc cannot say."""
        if self._proc is None:
            return None
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _send(self, event: Event) -> None:
        if self._pipes is None:
            raise RunnerFatal("runner has no process")
        try:
            self._pipes.send(event)
        except PipeClosed as exc:
            self._fatal(str(exc))

    def _next_event(self, timeout: float, route: str | None = None) -> Event | None:
        assert self._pipes is not None
        try:
            return self._pipes.next_event(timeout, route)
        except PipeClosed as exc:
            self._fatal(self._exit_reason(str(exc)))

    def _fatal(self, reason: str) -> NoReturn:
        raise RunnerFatal(self._with_tail(reason))

    def _exit_reason(self, fallback: str) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return fallback
        if code < 0:
            return f"runner killed by {signal.Signals(-code).name}"
        return f"runner exited with code {code}"

    def _with_tail(self, reason: str) -> str:
        tail = self.stderr_tail()
        return f"{reason}\n--- runner stderr (tail) ---\n{tail}" if tail else reason

    def stderr_tail(self, lines: int = 20) -> str:
        return self._pipes.tail(lines) if self._pipes else ""

    def is_alive(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        # poll() answers None while another thread blocks in wait(): read the kernel's view.
        try:
            with open(f"/proc/{self._proc.pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")

    def rss_bytes(self) -> int:
        """Resident memory of the child (0 once it is gone)."""
        if self._proc is None or self._proc.poll() is not None:
            return 0
        try:
            with open(f"/proc/{self._proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

"""The runner and its child process: lifecycle, streaming, and both tiers of failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.workers.conftest import gone
from workers.engines.base import GenerateRequest, SamplingParams
from workers.runner import process
from workers.runner.pipes import ChildPipes, WakingEvent
from workers.runner.process import (
    InvalidState,
    Runner,
    RunnerFatal,
    RunnerSetupFailed,
    RunnerState,
    RunnerTimeout,
)
from workers.runner.protocol import Token

MakeRunner = Callable[..., Runner]


def greedy(prompt: str, n: int = 16, raw: bool = True) -> GenerateRequest:
    return GenerateRequest(prompt, raw=raw, params=SamplingParams(max_tokens=n, temperature=0.0))


def collect(runner: Runner, request: GenerateRequest, tag: str = "t", **kw: object):
    tokens: list[Token] = []
    done = runner.generate(request, tag, tokens.append, **kw)  # type: ignore[arg-type]
    return done, tokens


def test_generate_gguf_streams_tokens_in_order_with_one_done(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    from workers.engines.loader import load_engine

    runner = make_runner(gguf_dir)
    ready = runner.start()
    assert runner.state is RunnerState.READY and ready.context_length == 256
    done, tokens = collect(runner, greedy("The quick brown fox", 12), "req-1")
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert {t.tag for t in tokens} == {"req-1"} and done.tag == "req-1"
    assert not done.error and done.finish_reason == "length" and done.completion_tokens == 12
    assert done.engine_ms > 0
    assert runner._pipes is not None and runner._pipes.pending() == 0  # nothing after Done
    # Same text as the engine loaded in this process: the pipe loses and reorders nothing.
    engine = load_engine(gguf_dir, "gguf")
    stream = engine.generate(greedy("The quick brown fox", 12), lambda: False)
    assert "".join(t.text for t in tokens) == "".join(stream)
    again, _ = collect(runner, greedy("Hello", 4), "req-2")
    assert again.tag == "req-2" and not again.error and runner.state is RunnerState.READY


@pytest.mark.parametrize(
    ("fmt", "fixture"),
    [
        ("transformers", "transformers_bundle"),
        ("transformers", "transformers_bin_served_bundle"),
        ("pytorch", "pytorch_served_bundle"),
        ("onnx", "onnx_bundle"),
    ],
)
def test_generate_torch_and_onnx_bundles(
    make_runner: MakeRunner, request: pytest.FixtureRequest, fmt: str, fixture: str
) -> None:
    bundle = request.getfixturevalue(fixture)
    runner = make_runner(bundle, fmt)
    runner.start()
    done, tokens = collect(runner, greedy("Hello, world", 8))
    assert not done.error and done.completion_tokens == 8 and len(tokens) >= 1


def test_context_length_exceeded_is_done_error_and_runner_stays_ready(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir)
    runner.start()
    pid = runner.pid
    done, tokens = collect(runner, greedy("hello " * 400))
    assert done.error and done.code == "CONTEXT_LENGTH_EXCEEDED" and not tokens
    assert runner.state is RunnerState.READY
    done, _ = collect(runner, greedy("hello", 4))
    assert not done.error and runner.pid == pid


def test_exception_in_generate_is_inference_failed(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, mode="raise_in_generate")
    runner.start()
    done, _ = collect(runner, greedy("hello"))
    assert done.error and done.code == "INFERENCE_FAILED" and "boom" in done.detail
    assert runner.state is RunnerState.READY


def test_setup_fails_on_truncated_gguf_with_reason(
    make_runner: MakeRunner, gguf_truncated: Path
) -> None:
    runner = make_runner(gguf_truncated)
    with pytest.raises(RunnerSetupFailed) as info:
        runner.start()
    assert "could not load" in info.value.detail
    assert "Traceback" in info.value.detail  # the tail of the child's stderr
    assert runner.state is RunnerState.DEFUNCT and gone(runner.pid or 0)
    assert runner.tmpdir is not None and not runner.tmpdir.exists()


def test_setup_fails_when_llama_cpp_aborts_and_parent_survives(
    make_runner: MakeRunner, gguf_block_count_zero: Path
) -> None:
    runner = make_runner(gguf_block_count_zero)
    with pytest.raises(RunnerSetupFailed, match="SIGABRT"):
        runner.start()
    assert runner.state is RunnerState.DEFUNCT
    with pytest.raises(InvalidState):
        runner.generate(greedy("x"), "t", lambda t: None)


def test_stray_stdout_in_setup_goes_to_stderr(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, mode="print_in_setup")
    runner.start()
    done, _ = collect(runner, greedy("hi", 3))
    assert not done.error
    tail = runner.stderr_tail()
    assert "junk from python print" in tail and "junk from C puts" in tail


def test_sigkill_mid_generation_is_fatal_and_defunct(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir, mode="slow")
    runner.start()
    pid = runner.pid
    assert pid is not None

    def kill_on_first(token: Token) -> None:
        if token.index == 0:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(RunnerFatal, match="SIGKILL"):
        runner.generate(greedy("hi", 50), "t", kill_on_first)
    assert runner.state is RunnerState.DEFUNCT and gone(pid)
    assert runner.tmpdir is not None and not runner.tmpdir.exists()
    with pytest.raises(InvalidState):
        runner.generate(greedy("hi"), "t2", lambda t: None)


def test_os_exit_mid_generation_is_fatal(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, mode="exit_in_generate")
    runner.start()
    tokens: list[Token] = []
    with pytest.raises(RunnerFatal, match="exited with code 3"):
        runner.generate(greedy("hi", 20), "t", tokens.append)
    assert len(tokens) == 2 and runner.state is RunnerState.DEFUNCT


def test_a_child_whose_event_line_never_ends_is_fatal_at_once(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    """The parent stops reading a line at the protocol's limit: it neither waits for the
    newline nor keeps buffering what the child writes."""
    runner = make_runner(gguf_dir, mode="babble")
    runner.start()
    began = time.monotonic()
    with pytest.raises(RunnerFatal, match="too long"):
        runner.generate(greedy("hi", 5), "t", lambda t: None, timeout=30)
    assert time.monotonic() - began < 10
    assert runner.state is RunnerState.DEFUNCT and gone(runner.pid or 0)


def test_cancel_mid_generation_returns_cancelled_promptly(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir, mode="slow")  # 50 ms a token: 200 take 10 s
    runner.start()
    cancel = threading.Event()
    tokens: list[Token] = []
    at_cancel: list[int] = []

    def cancel_now() -> None:
        at_cancel.append(len(tokens))
        cancel.set()

    threading.Timer(0.2, cancel_now).start()
    done = runner.generate(greedy("hi", 200), "t", tokens.append, cancel_event=cancel)
    assert done.finish_reason == "cancelled" and not done.error
    # Promptly: counted in the child's own tokens, not in this host's wall time
    assert at_cancel and len(tokens) - at_cancel[0] <= 20
    assert 0 < len(tokens) < 200 and done.completion_tokens == len(tokens)
    assert runner.state is RunnerState.READY
    done, _ = collect(runner, greedy("hi", 2))
    assert done.finish_reason == "length"


def test_a_waking_cancel_reaches_a_silent_runner_without_waiting_for_the_poll(
    make_runner: MakeRunner, gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiting thread would look at a plain Event only every 30 s here
    monkeypatch.setattr(process, "_POLL_S", 30.0)
    runner = make_runner(gguf_dir, mode="silent_until_cancelled")
    runner.start()
    cancel = WakingEvent()
    threading.Timer(0.3, cancel.set).start()
    began = time.monotonic()
    done, tokens = collect(runner, greedy("hi", 50), cancel_event=cancel)
    assert done.finish_reason == "cancelled" and not done.error and tokens == []
    assert time.monotonic() - began < 20  # woken, not polled
    assert runner.state is RunnerState.READY and runner.inflight == 0
    assert cancel._listeners == []  # the ended request no longer listens


@pytest.mark.parametrize("routed", [False, True])
def test_child_pipes_wake_returns_a_waiting_reader_at_once(routed: bool) -> None:
    code = "import time; time.sleep(60)"  # a child that says nothing
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    pipes = ChildPipes(proc)
    tag = "a" if routed else None
    if routed:
        pipes.route_by_tag()
        pipes.open_route("a")
    try:
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(pipes.next_event(30, tag)))
        began = time.monotonic()
        reader.start()
        time.sleep(0.2)
        pipes.wake(tag)
        reader.join(20)
        assert not reader.is_alive() and got == [None]  # woken: no event, no error
        assert time.monotonic() - began < 20
        assert pipes.next_event(0.05, tag) is None  # the wake-up was used up: a plain wait
    finally:
        proc.kill()
        proc.wait()
        pipes.close()
    pipes.wake(tag)  # after close: nothing to wake, no error


def test_waking_event_tells_its_listeners_until_they_leave() -> None:
    event = WakingEvent()
    heard: list[str] = []
    leave = event.subscribe(lambda: heard.append("a"))
    event.set()
    assert heard == ["a"] and event.is_set()
    leave()
    event.set()
    assert heard == ["a"]
    event.subscribe(lambda: heard.append("late"))  # already set: told at once
    assert heard == ["a", "late"]


def test_timeout_cancels_and_reports_timeout(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, mode="slow")
    runner.start()
    done, tokens = collect(runner, greedy("hi", 200), timeout=0.3)
    assert done.error and done.code == "TIMEOUT" and done.finish_reason == "cancelled"
    assert done.completion_tokens == len(tokens) > 0  # still billable
    assert runner.state is RunnerState.READY


def test_a_child_computing_past_the_grace_is_waited_for_and_stays_warm(
    make_runner: MakeRunner, gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One engine call outlasts the grace (a big model's prefill chunk on a slow CPU): its CPU
    # time moves and it sends nothing, so it is working, not stuck.
    monkeypatch.setattr(process, "CANCEL_GRACE_S", 0.3)
    runner = make_runner(gguf_dir, mode="busy_one_call")
    runner.start()
    done, tokens = collect(runner, greedy("hi", 10), timeout=0.2)
    assert (done.error, done.code, done.finish_reason, tokens) == (True, "TIMEOUT", "cancelled", [])
    assert runner.state is RunnerState.READY


@pytest.mark.parametrize(
    ("mode", "busy_max_s"),
    [
        ("ignore_cancel", 120.0),  # goes on sending tokens: it saw the Cancel and ignored it
        ("stuck_one_call", 120.0),  # waits without computing
        ("busy_one_call", 0.6),  # computes past the cap
    ],
)
def test_a_child_ignoring_idle_or_busy_past_the_cap_is_killed(
    make_runner: MakeRunner,
    gguf_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    busy_max_s: float,
) -> None:
    monkeypatch.setattr(process, "CANCEL_GRACE_S", 0.3)
    monkeypatch.setattr(process, "CANCEL_BUSY_MAX_S", busy_max_s)
    runner = make_runner(gguf_dir, mode=mode)
    runner.start()
    with pytest.raises(RunnerTimeout):
        collect(runner, greedy("hi", 10_000), timeout=0.2)
    assert runner.state is RunnerState.DEFUNCT and gone(runner.pid or 0)


def test_a_busy_child_is_waited_for_less_than_a_job_lock_outlives_its_timeout() -> None:
    from workers.inference import LOCK_MARGIN_S

    assert process.CANCEL_BUSY_MAX_S < LOCK_MARGIN_S


def test_failing_token_callback_cancels_and_keeps_runner(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir, mode="slow")
    runner.start()

    def hang_up(token: Token) -> None:
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        runner.generate(greedy("hi", 200), "t", hang_up)
    assert runner.state is RunnerState.READY
    done, _ = collect(runner, greedy("hi", 2))
    assert not done.error


def test_lifecycle_guards(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir)
    with pytest.raises(InvalidState):
        runner.generate(greedy("x"), "t", lambda t: None)
    runner.start()
    with pytest.raises(InvalidState):
        runner.start()
    runner.stop()
    assert runner.state is RunnerState.DEFUNCT and gone(runner.pid or 0)
    runner.stop()  # idempotent


def test_stop_removes_temp_dir_and_process(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir)
    runner.start()
    tmp, pid = runner.tmpdir, runner.pid
    assert tmp is not None and tmp.is_dir() and runner.rss_bytes() > 0
    runner.stop()
    assert not tmp.exists() and gone(pid or 0) and runner.rss_bytes() == 0


class RunnerLifecycle(RuleBasedStateMachine):
    """Any sequence of requests, model errors, cancels and kills keeps the two tiers apart."""

    bundle: Path

    def __init__(self) -> None:
        super().__init__()
        self.runner = Runner(self.bundle, "gguf")
        self.runner.start()

    @precondition(lambda self: self.runner.state is RunnerState.READY)
    @rule(n=st.integers(1, 6))
    def generate(self, n: int) -> None:
        done, tokens = collect(self.runner, greedy("hello", n))
        assert not done.error and done.completion_tokens == n == len(tokens)

    @precondition(lambda self: self.runner.state is RunnerState.READY)
    @rule()
    def model_error(self) -> None:
        done, _ = collect(self.runner, greedy("hello " * 400))
        assert done.code == "CONTEXT_LENGTH_EXCEEDED"

    @precondition(lambda self: self.runner.state is RunnerState.READY)
    @rule()
    def cancel_before_first_token(self) -> None:
        cancel = threading.Event()
        cancel.set()
        done, _ = collect(self.runner, greedy("hello", 100), cancel_event=cancel)
        assert done.finish_reason in ("cancelled", "length")

    @precondition(lambda self: self.runner.state is RunnerState.READY)
    @rule()
    def kill(self) -> None:
        os.kill(self.runner.pid or 0, signal.SIGKILL)
        with pytest.raises(RunnerFatal):
            collect(self.runner, greedy("hello", 4))

    @precondition(lambda self: self.runner.state is RunnerState.DEFUNCT)
    @rule()
    def replace(self) -> None:
        self.runner.stop()
        self.runner = Runner(self.bundle, "gguf")
        self.runner.start()

    @invariant()
    def state_matches_process(self) -> None:
        assert self.runner.state in (RunnerState.READY, RunnerState.DEFUNCT)
        assert self.runner.is_alive() == (self.runner.state is RunnerState.READY)

    def teardown(self) -> None:
        self.runner.stop()


def test_runner_lifecycle_state_machine(gguf_dir: Path) -> None:
    RunnerLifecycle.bundle = gguf_dir
    run_state_machine_as_test(
        RunnerLifecycle,
        settings=settings(max_examples=3, stateful_step_count=8, deadline=None),
    )


def test_token_sink_holds_tokens_until_its_window_or_the_end() -> None:
    """Coalesced tokens reach the pipe as one `Tokens` event; uncoalesced ones one by one."""
    from workers.runner.child import EventWriter, TokenSink
    from workers.runner.protocol import Tokens, decode

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        held = TokenSink(EventWriter(write_fd), "t", coalesce_ms=60_000)
        for i in range(5):
            held.add(f"w{i}")
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 65536)  # nothing written yet
        held.flush()
        held.add("w5")
        held.flush()
        lines = os.read(read_fd, 65536).splitlines(keepends=True)
        assert [decode(line) for line in lines] == [
            Tokens(tag="t", index=0, texts=[f"w{i}" for i in range(5)]),
            Tokens(tag="t", index=5, texts=["w5"]),  # numbered on from the first run
        ]
        held.flush()  # nothing held: nothing written
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 65536)
        at_once = TokenSink(EventWriter(write_fd), "t", coalesce_ms=0)
        at_once.add("x")
        assert decode(os.read(read_fd, 65536)) == Token(tag="t", text="x", index=0)
        at_once.add("y")
        assert decode(os.read(read_fd, 65536)) == Token(tag="t", text="y", index=1)
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize(
    "line",
    [
        b'{"type": "Token", "tag": "t", "text": 7, "index": 0}\n',
        b'{"type": "Token", "tag": "t", "text": "a", "index": "0"}\n',
        b'{"type": "Tokens", "tag": "t", "index": 0, "texts": "abc"}\n',
        b'{"type": "Tokens", "tag": "t", "index": 0, "texts": ["a", {"b": 1}]}\n',
        b'{"type": "Tokens", "tag": "t", "index": null, "texts": ["a"]}\n',
        b'["Token", "t", "a", 0]\n',  # JSON, but not an object
        b'{"type": "Tokens", "tag": "t", "index": 0}\n',
    ],
)
def test_decode_refuses_ill_typed_token_events(line: bytes) -> None:
    """The child is untrusted: a token event whose fields are not what they say is fatal."""
    from workers.runner.protocol import ProtocolError, decode

    with pytest.raises(ProtocolError, match="malformed event"):
        decode(line)


@pytest.mark.parametrize("coalesce_ms", [0.0, 60_000.0])
def test_child_sending_non_text_tokens_is_fatal(
    make_runner: MakeRunner, gguf_dir: Path, coalesce_ms: float
) -> None:
    runner = make_runner(gguf_dir, mode="non_text_token")
    runner.start()
    with pytest.raises(RunnerFatal, match="malformed event"):
        collect(runner, greedy("The quick brown fox", 4), "bad", coalesce_ms=coalesce_ms)
    assert runner.state is RunnerState.DEFUNCT


def test_coalesced_generation_delivers_the_same_tokens(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir)
    runner.start()
    live_done, live = collect(runner, greedy("The quick brown fox", 24), "live")
    done, batched = collect(runner, greedy("The quick brown fox", 24), "batch", coalesce_ms=60_000)
    assert not done.error and done.completion_tokens == live_done.completion_tokens == 24
    assert [(t.index, t.text) for t in batched] == [(t.index, t.text) for t in live]
    assert runner.state is RunnerState.READY


@pytest.mark.parametrize(
    ("fmt", "fixture", "absent"),
    [("gguf", "gguf_dir", "libtorch"), ("transformers", "transformers_bundle", "libllama")],
)
def test_runner_maps_only_its_own_engine_library(
    make_runner: MakeRunner, request: pytest.FixtureRequest, fmt: str, fixture: str, absent: str
) -> None:
    """torch's CUDA libraries and a CUDA build of llama.cpp crash in one process (seen on an
    H100: a segfault, or `free(): invalid pointer`): a runner loads one engine, never both."""
    runner = make_runner(request.getfixturevalue(fixture), fmt)
    runner.start()
    maps = Path(f"/proc/{runner.pid}/maps").read_text()
    assert absent not in maps
    assert ("libllama" if fmt == "gguf" else "libtorch") in maps  # the check can see a library
    done, _ = collect(runner, greedy("hi", 2))
    assert not done.error
    assert absent not in Path(f"/proc/{runner.pid}/maps").read_text()  # nor after generating

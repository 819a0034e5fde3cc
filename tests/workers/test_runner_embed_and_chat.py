"""Embed and chat requests over the runner's pipe: vectors in order, one Done, runner warm."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.engines.base import ChatMessage, GenerateRequest, SamplingParams
from workers.runner.process import Runner, RunnerFatal, RunnerState
from workers.runner.protocol import Token

MakeRunner = Callable[..., Runner]
CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello"))


def test_embed_returns_one_unit_vector_per_input_and_stays_warm(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir)
    runner.start()
    vectors, done = runner.embed(["one", "two words", "one"], "e-1")
    assert not done.error and done.tag == "e-1" and done.prompt_tokens >= 3
    assert len(vectors) == 3
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)  # batched: float noise only
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert runner.state is RunnerState.READY
    # The same runner still generates after its embedding model was loaded.
    tokens: list[Token] = []
    request = GenerateRequest("Hello", raw=True, params=SamplingParams(max_tokens=3))
    assert not runner.generate(request, "g-1", tokens.append).error


def test_embed_on_onnx_is_a_model_error_not_a_dead_runner(
    make_runner: MakeRunner, onnx_bundle: Path
) -> None:
    runner = make_runner(onnx_bundle, "onnx")
    runner.start()
    vectors, done = runner.embed(["hello"], "e-2")
    assert done.error and done.code == "UNSUPPORTED_FOR_MODEL" and vectors == []
    assert runner.state is RunnerState.READY


def test_messages_cross_the_pipe_and_render_with_the_template(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir)
    runner.start()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    chat = runner.generate(GenerateRequest(messages=CHAT, params=params), "c", lambda _: None)
    one = runner.generate(GenerateRequest("Hello", params=params), "p", lambda _: None)
    assert not chat.error and not one.error
    assert chat.prompt_tokens > one.prompt_tokens  # the system turn went through


@pytest.mark.parametrize("mode", ["bad_vector", "short_vectors"])
def test_embed_from_a_lying_child_is_fatal(
    make_runner: MakeRunner, gguf_dir: Path, mode: str
) -> None:
    runner = make_runner(gguf_dir, mode=mode)
    runner.start()
    with pytest.raises(RunnerFatal):
        runner.embed(["one", "two"], "e-3")
    assert runner.state is RunnerState.DEFUNCT


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
@pytest.mark.parametrize(("fmt", "parallel"), [("transformers", 1), ("gguf", 2)])
def test_a_stopped_embedding_ends_between_engine_calls_and_the_runner_stays_warm(
    make_runner: MakeRunner, request: pytest.FixtureRequest, fmt: str, parallel: int, stop: str
) -> None:
    """A Cancel (asked for, or at the timeout) is looked for between texts (transformers) or
    llama.cpp's batches (GGUF, here with the batch server, whose reader thread takes it)."""
    bundle = request.getfixturevalue("gguf_dir" if fmt == "gguf" else "transformers_bundle")
    runner = make_runner(bundle, fmt, parallel=parallel)
    runner.start()
    texts = [f"Text {i}: " + "the quick brown fox jumps over the lazy dog " * 7 for i in range(300)]
    asked = threading.Event()
    if stop == "cancel":
        asked.set()  # the Cancel goes right after the Embed
    timeout = 0.1 if stop == "timeout" else None
    vectors, done = runner.embed(texts, "e-4", timeout=timeout, cancel_event=asked)
    code = "JOB_CANCELLED" if stop == "cancel" else "TIMEOUT"
    assert (done.error, done.code, vectors) == (True, code, [])
    assert runner.state is RunnerState.READY
    vectors, done = runner.embed(["still warm"], "e-5")
    assert not done.error and len(vectors) == 1

"""Continuous batching: one GGUF runner decodes several requests together.

The batcher in-process (same text as the engine decoding each request alone, stops, limits,
cancel, prefix reuse), then a batching runner (concurrent requests over one child, each
routed to its own caller, faults reaching every request in flight) and the pool (requests
for one model share its batching runner).
"""

from __future__ import annotations

import io
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.workers.conftest import gone
from workers.engines.base import (
    ContextLengthExceeded,
    GenerateRequest,
    GenerationResult,
    SamplingParams,
)
from workers.engines.llama import LlamaEngine
from workers.engines.llama_batch import BatchFull, LlamaBatcher
from workers.engines.loop import CPU_PREFILL_CHUNK
from workers.pool import RunnerPool
from workers.runner.batch_server import BatchServer
from workers.runner.child import EventWriter
from workers.runner.process import InvalidState, Runner, RunnerFatal, RunnerState
from workers.runner.protocol import Done, Generate, Token

MakeRunner = Callable[..., Runner]
MakePool = Callable[..., RunnerPool]
PROMPTS = ["Tell me a story about the sea.", "Hello there", "What is the capital of", "abc def"]
KEY = "k" * 64


def request(prompt: str, n: int = 20, **params: Any) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=n, temperature=params.pop("temperature", 0.0), **params)
    return GenerateRequest(prompt, raw=True, params=sampling)


def alone(engine: LlamaEngine, req: GenerateRequest) -> tuple[str, GenerationResult]:
    stream = engine.generate(req, lambda: False)
    pieces: list[str] = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            return "".join(pieces), stop.value


def drain(batcher: LlamaBatcher, texts: dict[Any, list[str]]) -> None:
    while batcher.active:
        for seq in batcher.step():
            texts.setdefault(seq.owner, []).extend(seq.pieces)
            seq.pieces.clear()


@pytest.fixture(scope="module")
def engine(gguf_dir: Path) -> Iterator[LlamaEngine]:
    from workers.engines.loader import load_engine

    loaded = load_engine(gguf_dir, "gguf", device="cpu", threads=1)
    assert isinstance(loaded, LlamaEngine)
    yield loaded
    loaded.close()


@pytest.fixture()
def batcher(engine: LlamaEngine) -> Iterator[LlamaBatcher]:
    made = engine.batcher(4)
    yield made
    made.close()


# --- the batcher, in this process ---------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"temperature": 0.9, "seed": 7},
        {"temperature": 0.7, "top_k": 5, "top_p": 0.8, "seed": 3},
    ],
)
def test_batched_requests_decode_as_each_would_alone(
    engine: LlamaEngine, batcher: LlamaBatcher, params: dict[str, Any]
) -> None:
    reqs = [request(p, **params) for p in PROMPTS]
    expected = [alone(engine, r) for r in reqs]
    seqs = [batcher.admit(r, lambda: False, i) for i, r in enumerate(reqs)]
    assert batcher.full
    texts: dict[Any, list[str]] = {}
    drain(batcher, texts)
    got = [("".join(texts.get(i, [])), s.stream.result) for i, s in enumerate(seqs)]
    assert got == expected
    assert all(r.completion_tokens == 20 and r.finish_reason == "length" for _, r in expected)


def test_a_request_admitted_mid_batch_and_prefix_reuse(
    engine: LlamaEngine, batcher: LlamaBatcher
) -> None:
    long, short = request(PROMPTS[0], 30), request(PROMPTS[1], 6)
    texts: dict[Any, list[str]] = {}
    first = batcher.admit(long, lambda: False, "long")
    for _ in range(5):
        batcher.step()
    texts["long"] = first.pieces[:]
    first.pieces.clear()
    batcher.admit(short, lambda: False, "short")  # joins a sequence already decoding
    drain(batcher, texts)
    assert "".join(texts["long"]) == alone(engine, long)[0]
    assert "".join(texts["short"]) == alone(engine, short)[0]
    # The slot kept the long prompt's tokens: the same prompt again decodes only its tail.
    again = batcher.admit(long, lambda: False, "again")
    assert again.pos == len(engine._encode(long)) - 1 and len(again.pending) == 1
    drain(batcher, texts)
    assert "".join(texts["again"]) == "".join(texts["long"])


def test_a_long_prompt_goes_in_cpu_chunks_beside_a_decoding_sequence(
    engine: LlamaEngine, batcher: LlamaBatcher
) -> None:
    """On a CPU one batched step takes at most 128 tokens: a decoding sequence gets a token
    at every step of a long prompt's prefill, and neither output changes."""
    short, long = request(PROMPTS[1], 12), request("The quick brown fox jumps. " * 25, 4)
    n_long = len(engine._encode(long))
    assert CPU_PREFILL_CHUNK < n_long < engine.context_length - 4
    texts: dict[Any, list[str]] = {}
    decoding = batcher.admit(short, lambda: False, "short")
    batcher.step()  # its prompt, and its first token
    texts["short"] = decoding.pieces[:]
    decoding.pieces.clear()
    prompt = batcher.admit(long, lambda: False, "long")
    sizes, positions = [], []
    while not prompt.prefilled:
        for seq in batcher.step():
            texts.setdefault(seq.owner, []).extend(seq.pieces)
            seq.pieces.clear()
        sizes.append(batcher._batch.n_tokens)
        positions.append(decoding.pos)
    # One token of the decoding sequence and the rest of the chunk of the prompt a step.
    room = CPU_PREFILL_CHUNK - 1
    assert sizes == [CPU_PREFILL_CHUNK] * (len(sizes) - 1) + [1 + (n_long - 1) % room + 1]
    assert positions == list(range(positions[0], positions[0] + len(sizes)))
    drain(batcher, texts)
    assert "".join(texts["long"]) == alone(engine, long)[0]
    assert "".join(texts["short"]) == alone(engine, short)[0]


def test_stops_limits_and_cancel_end_only_their_own_sequence(
    engine: LlamaEngine, batcher: LlamaBatcher
) -> None:
    text, _ = alone(engine, request(PROMPTS[0], 20))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cancel = threading.Event()
    owners = {
        "stop": batcher.admit(request(PROMPTS[0], 20, stop=(stop,)), lambda: False, "stop"),
        "short": batcher.admit(request(PROMPTS[1], 3), lambda: False, "short"),
        "cancel": batcher.admit(request(PROMPTS[2], 200), cancel.is_set, "cancel"),
        "full": batcher.admit(request(PROMPTS[3], 20), lambda: False, "full"),
    }
    texts: dict[Any, list[str]] = {}
    for _ in range(8):
        for seq in batcher.step():
            texts.setdefault(seq.owner, []).extend(seq.pieces)
            seq.pieces.clear()
    cancel.set()
    drain(batcher, texts)
    results = {k: s.stream.result for k, s in owners.items()}
    assert results["stop"] is not None and results["stop"].finish_reason == "stop"
    assert "".join(texts["stop"]) == text[: text.index(stop)]
    assert results["short"] == GenerationResult("length", results["short"].prompt_tokens, 3)
    assert results["cancel"] is not None and results["cancel"].finish_reason == "cancelled"
    assert 8 <= results["cancel"].completion_tokens < 200
    assert "".join(texts["full"]) == alone(engine, request(PROMPTS[3], 20))[0]


def test_admission_refuses_what_cannot_run_and_keeps_the_slot(
    engine: LlamaEngine, batcher: LlamaBatcher
) -> None:
    with pytest.raises(ContextLengthExceeded):
        batcher.admit(request("word " * 400), lambda: False, "long")
    for i in range(4):
        batcher.admit(request(PROMPTS[i]), lambda: False, i)
    with pytest.raises(BatchFull):
        batcher.admit(request(PROMPTS[0]), lambda: False, "fifth")
    drain(batcher, {})
    assert not batcher.full and not batcher.active
    zero = batcher.admit(request(PROMPTS[0], 0), lambda: False, "zero")
    assert zero.stream.result is not None and zero.stream.result.completion_tokens == 0
    assert not batcher.active


@pytest.fixture(scope="module")
def q8_bench_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's 28 M shape in Q8_0 (8 layers, 8 KV heads of 64, context 256)."""
    from tests.utils.model_files import BENCH_SHAPE, make_gguf

    folder = tmp_path_factory.mktemp("q8")
    return make_gguf(folder / "model.gguf", quant="q8_0", shape=BENCH_SHAPE)


@pytest.fixture(scope="module")
def q8_engine(q8_bench_gguf: Path) -> Iterator[LlamaEngine]:
    from workers.engines.loader import load_engine

    # The tiny shape hid the unified cache's drift; this one shows it.
    loaded = load_engine(q8_bench_gguf.parent, "gguf", device="cpu", threads=1)
    assert isinstance(loaded, LlamaEngine)
    yield loaded
    loaded.close()


class _Captured(EventWriter):
    """The child's event writer, keeping events in a list instead of writing to a pipe."""

    def __init__(self) -> None:
        super().__init__(-1)
        self.events: list[Any] = []

    def send(self, event: Any) -> None:
        self.events.append(event)


@pytest.mark.parametrize("solo_seeded", [True, False])
def test_a_seeded_request_decodes_alone_where_batching_is_not_exact(
    engine: LlamaEngine, batcher: LlamaBatcher, solo_seeded: bool
) -> None:
    """On CUDA (`solo_seeded`) a seeded request waits for the batch to drain, decodes with
    nothing beside it, and nothing overtakes it; elsewhere it joins like any other."""
    batcher.solo_seeded = solo_seeded
    out = _Captured()
    server = BatchServer(batcher, engine, out, io.BytesIO())
    tags = ["a", "b", "seeded", "c", "d"]
    for tag, prompt in zip(tags, [*PROMPTS, PROMPTS[0]], strict=True):
        seed = 7 if tag == "seeded" else None
        server._accept(Generate(tag=tag, prompt=prompt, raw=True, max_tokens=8 + len(tag),
                                temperature=0.0 if seed is None else 0.9, seed=seed))  # fmt: skip
    batches: list[set[str]] = []
    while server.backlog or batcher.active:
        server._admit_backlog()
        batches.append({seq.owner.request.tag for seq in batcher.active})
        server._step()
    done = [e.tag for e in out.events if isinstance(e, Done)]
    assert sorted(done) == sorted(tags) and not any(
        e.error for e in out.events if isinstance(e, Done)
    )
    texts = {
        t: "".join(e.text for e in out.events if isinstance(e, Token) and e.tag == t) for t in tags
    }
    seeded = request(PROMPTS[2], 8 + len("seeded"), temperature=0.9, seed=7)
    assert texts["seeded"] == alone(engine, seeded)[0]
    with_seeded = [b for b in batches if "seeded" in b]
    if solo_seeded:
        assert all(b == {"seeded"} for b in with_seeded)
        first = batches.index(with_seeded[0])
        assert {"a", "b"} <= set().union(*batches[:first])  # ahead of it: ran before it
        assert not {"c", "d"} & set().union(*batches[: first + len(with_seeded)])  # never overtook
    else:
        assert any(len(b) > 1 for b in with_seeded)
        assert batches[0] == {"a", "b", "seeded", "c"}  # four slots, filled at once


def test_identical_requests_decoded_together_answer_alike_on_a_quantized_model(
    q8_engine: LlamaEngine,
) -> None:
    """Each slot has its own KV stream: a shared (unified) cache moved the logits of every
    sequence but the first on a Q8_0 model, and identical greedy requests then differed."""
    req = request(PROMPTS[0], 64)
    expected = alone(q8_engine, req)
    batcher = q8_engine.batcher(4)
    try:
        seqs = [batcher.admit(req, lambda: False, i) for i in range(4)]
        texts: dict[Any, list[str]] = {}
        drain(batcher, texts)
        assert [("".join(texts[i]), s.stream.result) for i, s in enumerate(seqs)] == [expected] * 4
    finally:
        batcher.close()


# --- a batching runner --------------------------------------------------------------------


def collect(runner: Runner, req: GenerateRequest, tag: str) -> tuple[str, Any, set[str]]:
    tokens: list[Token] = []
    done = runner.generate(req, tag, tokens.append)
    return "".join(t.text for t in tokens), done, {t.tag for t in tokens}


def test_a_batching_runner_serves_concurrent_requests_uncrossed(
    make_runner: MakeRunner, gguf_dir: Path, engine: LlamaEngine
) -> None:
    runner = make_runner(gguf_dir, parallel=4)
    ready = runner.start()
    assert ready.parallel == 4 and runner.capacity == 4
    reqs = [request(p, 24) for p in PROMPTS] * 3  # 12 requests, 4 at a time
    expected = [alone(engine, r)[0] for r in reqs]
    gate = threading.Barrier(4)

    def one(i: int) -> tuple[str, Any, set[str]]:
        if i < 4:
            gate.wait(10)
        return collect(runner, reqs[i], f"r{i}")

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, range(len(reqs))))
    assert [g[0] for g in got] == expected
    assert all(g[2] == {f"r{i}"} and not g[1].error for i, g in enumerate(got))
    assert runner.state is RunnerState.READY and runner.inflight == 0


def test_a_full_batching_runner_refuses_one_more(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, parallel=2, mode="batch_slow")
    runner.start()
    cancel = threading.Event()
    started = threading.Barrier(3)

    def endless(tag: str) -> Any:
        started.wait(10)
        return runner.generate(request("Hello", 100_000), tag, lambda t: None, cancel_event=cancel)

    with ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(endless, t) for t in ("a", "b")]
        started.wait(10)
        deadline = time.monotonic() + 5
        while runner.inflight < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.state is RunnerState.BUSY
        with pytest.raises(InvalidState):
            runner.generate(request("Hello"), "c", lambda t: None)
        cancel.set()
        dones = [f.result(30) for f in futures]
    assert [d.finish_reason for d in dones] == ["cancelled", "cancelled"]
    assert runner.state is RunnerState.READY


def test_a_child_dying_mid_batch_fails_every_request_in_flight(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir, parallel=4, mode="batch_exit")
    runner.start()
    pid = runner.pid
    gate = threading.Barrier(3)

    def one(tag: str) -> BaseException | None:
        gate.wait(10)
        try:
            runner.generate(request("Hello there", 50), tag, lambda t: None)
        except RunnerFatal as exc:
            return exc
        return None

    with ThreadPoolExecutor(3) as ex:
        errors = list(ex.map(one, ["a", "b", "c"]))
    assert all(isinstance(e, RunnerFatal) for e in errors), errors
    assert runner.state is RunnerState.DEFUNCT and gone(pid or 0)


def test_an_event_for_no_request_in_flight_is_fatal(
    make_runner: MakeRunner, gguf_dir: Path
) -> None:
    runner = make_runner(gguf_dir, parallel=2, mode="batch_stray_tag")
    runner.start()
    with pytest.raises(RunnerFatal, match="no request in flight"):
        runner.generate(request("Hello there", 50), "mine", lambda t: None)
    assert runner.state is RunnerState.DEFUNCT


def test_formats_that_do_not_batch_take_one_request(
    make_runner: MakeRunner, transformers_bundle: Path
) -> None:
    runner = make_runner(transformers_bundle, "transformers", parallel=4)
    assert runner.start().parallel == 1 and runner.capacity == 1
    text, done, _ = collect(runner, request("Hello", 4), "t")
    assert not done.error and done.completion_tokens == 4 and text


def test_embeddings_between_batched_steps(make_runner: MakeRunner, gguf_dir: Path) -> None:
    runner = make_runner(gguf_dir, parallel=2)
    runner.start()
    with ThreadPoolExecutor(2) as ex:
        text = ex.submit(collect, runner, request(PROMPTS[0], 40), "gen")
        vectors, done = runner.embed(["one", "two"], "emb")
        assert not done.error and len(vectors) == 2
        assert not text.result(30)[1].error


# --- the pool -----------------------------------------------------------------------------


def test_requests_for_one_model_share_its_batching_runner(
    make_pool: MakePool, gguf_dir: Path, engine: LlamaEngine
) -> None:
    pool = make_pool(batch=4, max_runners=4)
    expected = {p: alone(engine, request(p))[0] for p in PROMPTS}
    gate = threading.Barrier(4)
    runners: list[Runner] = []

    def one(prompt: str) -> str:
        gate.wait(10)
        with pool.acquire(KEY, gguf_dir, "gguf") as (runner, _, _):
            runners.append(runner)
            text, done, _ = collect(runner, request(prompt), f"t-{prompt}")
        assert not done.error
        return text

    with pool.acquire(KEY, gguf_dir, "gguf"):  # warm it: the four then find room in it
        stats = pool.stats()
        assert (stats.inflight, stats.busy) == (1, 0)  # one request in, room for three more
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, PROMPTS))
    assert got == [expected[p] for p in PROMPTS]
    stats = pool.stats()
    assert stats.runners == 1 and stats.cold_starts == 1 and len({id(r) for r in runners}) == 1
    assert stats.busy == 0 and stats.idle_models == [KEY]


CONTEXT_KV = 256 * 8 * 8 * (64 + 64) * 2  # one context of the Q8_0 bench shape, f16 K and V


def test_kv_cache_bytes_follow_the_gguf_shape(q8_bench_gguf: Path, tmp_path: Path) -> None:
    from workers.engines.llama import kv_cache_bytes

    assert kv_cache_bytes(q8_bench_gguf, 1, 8192) == CONTEXT_KV
    assert kv_cache_bytes(q8_bench_gguf, 5, 8192) == 5 * CONTEXT_KV
    assert kv_cache_bytes(q8_bench_gguf, 1, 128) == CONTEXT_KV // 2  # the engine's context cap
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 20)
    assert kv_cache_bytes(junk, 1, 8192) == 0  # a file that does not say: no estimate
    # A hostile header (a key 2**62 bytes long) is refused by validation's bounded parser,
    # not read: this runs in the worker, outside the sandbox.
    junk.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 1, 1, 1 << 62) + b"x" * 64)
    assert kv_cache_bytes(junk, 1, 8192) == 0


@pytest.mark.parametrize(("batch", "contexts"), [(1, 1), (4, 5)])
def test_the_pool_budgets_a_ggufs_kv_cache_with_its_weights(
    make_pool: MakePool, q8_bench_gguf: Path, batch: int, contexts: int
) -> None:
    """The engine's own context, plus one per sequence when the runner batches: llama.cpp
    allocates them whole at load, so a budget that counted only weights would overcommit."""
    pool = make_pool(batch=batch)
    with pool.acquire(KEY, q8_bench_gguf.parent, "gguf") as (runner, _, _):
        assert runner.capacity == batch
    size = q8_bench_gguf.stat().st_size
    assert pool._sizes[KEY] == size + contexts * CONTEXT_KV

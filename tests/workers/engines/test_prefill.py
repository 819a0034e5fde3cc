"""A long prompt is evaluated in chunks with a cancel check between them, and the chunks
change nothing in what the model generates."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.workers.engines.conftest import cancel_at, get_engine, record_sizes, run
from workers.engines.base import Engine, GenerateRequest
from workers.engines.llama import LlamaEngine, _common_prefix, sampler_options
from workers.engines.loop import CPU_PREFILL_CHUNK, prefill, prefill_chunk

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 4
N_BATCH = 16


@pytest.mark.parametrize(
    ("start", "end", "fed"),
    [
        (0, 65, [(0, 32), (32, 64)]),  # the last token alone is left for the first step
        (0, 64, [(0, 32)]),
        (0, 32, []),  # one chunk: nothing fed ahead
        (0, 1, []),
        (5, 70, [(5, 37), (37, 69)]),  # chunks start where the cached prefix ends
    ],
)
def test_prefill_feeds_every_chunk_but_the_last(
    start: int, end: int, fed: list[tuple[int, int]]
) -> None:
    calls: list[tuple[int, int]] = []
    assert prefill(lambda lo, hi: calls.append((lo, hi)), start, end, 32, lambda: False)
    assert calls == fed


def test_prefill_looks_for_a_cancel_before_each_chunk() -> None:
    calls: list[tuple[int, int]] = []
    assert not prefill(lambda lo, hi: calls.append((lo, hi)), 0, 200, 32, cancel_at(3))
    assert calls == [(0, 32), (32, 64)]


def test_engines_on_a_cpu_take_a_prompt_128_tokens_at_a_time(engine: Engine) -> None:
    chunk = engine.llm.n_batch if isinstance(engine, LlamaEngine) else engine.prefill_chunk  # type: ignore[attr-defined]
    assert chunk == CPU_PREFILL_CHUNK == 128
    assert prefill_chunk("cuda") == 512


# GGUF: llama.cpp's own batches ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "ids", "common"),
    [
        ([1, 2, 3], [1, 2, 3, 4], 3),
        ([1, 2, 3, 4], [1, 2], 2),
        ([1, 5, 3], [1, 2, 3], 1),
        ([7], [1, 2], 0),
        ([], [1], 0),
    ],
)
def test_common_prefix_of_the_cache_and_a_prompt(
    cached: list[int], ids: list[int], common: int
) -> None:
    assert _common_prefix(np.asarray(cached, dtype=np.intc), ids) == common


def _llama(path: Path) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=N_BATCH, n_threads=1, verbose=False
    )


@pytest.fixture
def small_batches(gguf_model: Path) -> Iterator[tuple[LlamaEngine, Any]]:
    """The engine with 16-token batches, and a plain llama-cpp-python model beside it."""
    engine = LlamaEngine(_llama(gguf_model), "cpu", 256)
    reference = _llama(gguf_model)
    yield engine, reference
    engine.close()
    reference.close()


def _reference_text(engine: LlamaEngine, reference: Any, prompt: str, n: int) -> str:
    """What llama-cpp-python's own generate makes of the same tokens, greedy."""
    ids = engine._encode(GenerateRequest(prompt, raw=True))
    options = sampler_options(GenerateRequest(prompt).params) | {"temp": 0.0}
    tokens = []
    for token in islice(reference.generate(ids, **options), n):
        if engine._is_eog(token):
            break
        tokens.append(token)
    return str(reference.detokenize(tokens).decode("utf-8", "replace"))


def test_gguf_long_prompt_goes_in_batches_and_generates_what_llama_cpp_does(
    small_batches: tuple[LlamaEngine, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, reference = small_batches
    sizes = record_sizes(engine.llm, "eval", monkeypatch)
    prompt_tokens = engine.count_prompt_tokens(GenerateRequest(LONG, raw=True))
    assert prompt_tokens > 3 * N_BATCH

    text, result, _ = run(engine, LONG, max_tokens=12, temperature=0.0)

    ahead = (prompt_tokens - 1) // N_BATCH
    assert sizes[:ahead] == [N_BATCH] * ahead
    assert sizes[ahead] == prompt_tokens - ahead * N_BATCH  # generate's own last batch
    assert result.prompt_tokens == prompt_tokens
    assert text == _reference_text(engine, reference, LONG, 12)
    # A longer prompt on top: the batches start after the cached prefix, as generate's do.
    longer = LONG + "Then the dog wakes up and the fox runs away into the woods. " * 2
    del sizes[:]
    text, result, _ = run(engine, longer, max_tokens=12, temperature=0.0)
    assert text == _reference_text(engine, reference, longer, 12)
    new_tokens = result.prompt_tokens - prompt_tokens
    assert new_tokens > N_BATCH
    # Each sampled token but the last is evaluated alone; the rest is the prompt's new part
    # (and the old last token, where the join tokenizes differently).
    assert sum(sizes) - (result.completion_tokens - 1) in (new_tokens, new_tokens + 1)
    assert sizes[0] == N_BATCH


def test_gguf_cancel_between_batches_stops_the_prefill(
    small_batches: tuple[LlamaEngine, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, reference = small_batches
    sizes = record_sizes(engine.llm, "eval", monkeypatch)

    text, result, pieces = run(engine, LONG, max_tokens=12, temperature=0.0, cancelled=cancel_at(3))

    prompt_tokens = engine.count_prompt_tokens(GenerateRequest(LONG, raw=True))
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "cancelled",
        prompt_tokens,
        0,
    )
    assert (text, pieces, sizes) == ("", [], [N_BATCH, N_BATCH])
    assert engine.llm.n_tokens == 2 * N_BATCH
    # What was fed stays usable: the next generation reuses it and is still right.
    assert run(engine, LONG, max_tokens=12, temperature=0.0)[0] == _reference_text(
        engine, reference, LONG, 12
    )


# Transformers and ONNX: the hand-written loops ------------------------------------------


def _count_forwards(
    engine: Any, engine_id: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> list[int]:
    """Prompt tokens each forward pass took."""
    sizes: list[int] = []
    if engine_id == "onnx":
        session = engine.session

        class Counting:
            def run(self, names: Any, feeds: dict[str, Any]) -> Any:
                sizes.append(int(feeds["input_ids"].shape[1]))
                return session.run(names, feeds)

        monkeypatch.setattr(engine, "session", Counting())
    else:
        hook = engine.model.register_forward_pre_hook(
            lambda _m, _a, kw: sizes.append(int(kw["input_ids"].shape[1])), with_kwargs=True
        )
        request.addfinalizer(hook.remove)
    return sizes


@pytest.fixture(params=["safetensors", "onnx"])
def looped(request: pytest.FixtureRequest) -> tuple[Any, str]:
    return get_engine(request, request.param), request.param


def test_long_prompt_in_chunks_generates_what_one_pass_does(
    looped: tuple[Any, str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    engine, engine_id = looped
    whole, whole_result, _ = run(engine, LONG, max_tokens=10, temperature=0.0)
    monkeypatch.setattr(engine, "prefill_chunk", 8)
    sizes = _count_forwards(engine, engine_id, monkeypatch, request)

    chunked, result, _ = run(engine, LONG, max_tokens=10, temperature=0.0)

    ahead = (result.prompt_tokens - 1) // 8
    assert sizes[:ahead] == [8] * ahead
    assert sizes[ahead] == result.prompt_tokens - 8 * ahead
    assert (chunked, result) == (whole, whole_result)


def test_cancel_between_chunks_stops_the_prefill(
    looped: tuple[Any, str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    engine, engine_id = looped
    monkeypatch.setattr(engine, "prefill_chunk", 8)
    sizes = _count_forwards(engine, engine_id, monkeypatch, request)

    text, result, _ = run(engine, LONG, max_tokens=10, temperature=0.0, cancelled=cancel_at(3))

    assert (text, result.finish_reason, result.completion_tokens) == ("", "cancelled", 0)
    assert result.prompt_tokens > 3 * 8
    assert sizes == [8, 8]

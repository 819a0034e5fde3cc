"""Embeddings go in the engine's own batches with a cancel check between them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.workers.engines.conftest import cancel_at, get_engine, record_sizes
from workers.engines.base import Cancelled
from workers.engines.llama import LlamaEngine, embedding_batches

# About 100 tokens each: two fill most of the tiny model's 256-token embedding batch.
LONG_TEXTS = [f"Text {i}: " + "the quick brown fox jumps over the lazy dog " * 7 for i in range(3)]


@pytest.mark.parametrize(
    ("counts", "n_batch", "n_seq_max", "batches"),
    [
        ([100, 100, 100], 256, 64, [(0, 2), (2, 3)]),  # the third would overflow the tokens
        ([100, 100, 100], 256, 1, [(0, 1), (1, 2), (2, 3)]),  # one sequence a batch
        ([10] * 5, 256, 2, [(0, 2), (2, 4), (4, 5)]),
        ([256, 1], 256, 64, [(0, 1), (1, 2)]),
        ([5], 256, 64, [(0, 1)]),
        ([], 256, 64, []),
    ],
)
def test_embedding_batches_close_as_llama_cpp_closes_them(
    counts: list[int], n_batch: int, n_seq_max: int, batches: list[tuple[int, int]]
) -> None:
    assert embedding_batches(counts, n_batch, n_seq_max) == batches


@pytest.fixture
def gguf_calls(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[LlamaEngine, Any, list[int]]:
    """The GGUF engine, its embedding model's own `embed`, and the texts each call took."""
    engine = get_engine(request, "gguf")
    assert isinstance(engine, LlamaEngine)
    embedder = engine._embedding_model()
    original = embedder.embed
    calls = record_sizes(embedder, "embed", monkeypatch)
    return engine, original, calls


def test_gguf_embeds_batch_by_batch_the_vectors_one_call_gives(
    gguf_calls: tuple[LlamaEngine, Any, list[int]],
) -> None:
    engine, embed_alone, calls = gguf_calls
    whole = embed_alone(LONG_TEXTS, normalize=True, truncate=False)  # llama-cpp-python alone

    out = engine.embed(LONG_TEXTS)

    assert calls == [2, 1]
    assert out.vectors == [[float(x) for x in v] for v in whole]


def test_gguf_embedding_cancelled_between_batches(
    gguf_calls: tuple[LlamaEngine, Any, list[int]],
) -> None:
    engine, _, calls = gguf_calls

    with pytest.raises(Cancelled) as info:
        engine.embed(LONG_TEXTS, cancel_at(2))

    assert info.value.code == "JOB_CANCELLED"
    assert calls == [2]  # the first batch, then the cancel
    assert len(engine.embed(["still embeds"]).vectors) == 1


def test_transformers_embedding_cancelled_between_texts(request: pytest.FixtureRequest) -> None:
    engine: Any = get_engine(request, "safetensors")
    forwards: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append(1), with_kwargs=True
    )
    try:
        with pytest.raises(Cancelled):
            engine.embed(["one", "two", "three"], cancel_at(3))
    finally:
        hook.remove()
    assert len(forwards) == 2

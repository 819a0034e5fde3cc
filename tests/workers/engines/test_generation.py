"""Every engine on the same tiny model: greedy parity, seeds, limits, stops, context, cancel."""

from __future__ import annotations

from typing import Any

import pytest

from tests.workers.engines.conftest import BUNDLES, PROMPT, get_engine, run
from workers.engines.base import ContextLengthExceeded, Engine, GenerateRequest


def test_generate_greedy_matches_transformers_generate(
    engine: Engine, tokenizer: Any, reference_greedy: list[int]
) -> None:
    text, result, _ = run(engine, max_tokens=8, temperature=0.0)
    assert text == tokenizer.decode(reference_greedy, skip_special_tokens=True)
    assert result.completion_tokens == len(reference_greedy)


def test_generate_same_seed_repeats_output(engine: Engine) -> None:
    first = run(engine, max_tokens=12, temperature=0.8, top_k=0, seed=11)
    second = run(engine, max_tokens=12, temperature=0.8, top_k=0, seed=11)
    assert first[0] == second[0]


def test_generate_different_seeds_vary_output(engine: Engine) -> None:
    outputs = {run(engine, max_tokens=12, temperature=0.8, top_k=0, seed=s)[0] for s in range(4)}
    assert len(outputs) > 1


def test_generate_max_tokens_finishes_with_length(engine: Engine) -> None:
    _, result, _ = run(engine, max_tokens=5, temperature=0.0)
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)


def test_count_prompt_tokens_raw_uses_tokenizer(engine: Engine, tokenizer: Any) -> None:
    expected = len(tokenizer(PROMPT).input_ids)
    assert engine.count_prompt_tokens(GenerateRequest(PROMPT, raw=True)) == expected
    assert run(engine, max_tokens=1)[1].prompt_tokens == expected


def test_count_prompt_tokens_chat_renders_template(engine: Engine, tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    expected = len(tokenizer(rendered, add_special_tokens=False).input_ids)
    count = engine.count_prompt_tokens(GenerateRequest(PROMPT, raw=False))
    assert engine.has_chat_template
    assert count == expected != engine.count_prompt_tokens(GenerateRequest(PROMPT, raw=True))
    assert run(engine, raw=False, max_tokens=1)[1].prompt_tokens == expected


def test_generate_stop_string_ends_before_it(engine: Engine) -> None:
    full, _, _ = run(engine, max_tokens=16, temperature=0.0)
    start = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    text, result, _ = run(engine, max_tokens=16, temperature=0.0, stop=("never-there", stop))
    assert text == full[: full.find(stop)]
    assert result.finish_reason == "stop"


def test_generate_prompt_longer_than_context_raises_before_generating(engine: Engine) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.raises(ContextLengthExceeded) as info:
        engine.count_prompt_tokens(GenerateRequest(prompt, raw=True))
    assert info.value.context_length == engine.context_length == 256
    generation = engine.generate(GenerateRequest(prompt, raw=True), lambda: False)
    with pytest.raises(ContextLengthExceeded):
        next(generation)


@pytest.mark.parametrize("engine_id", list(BUNDLES))
def test_generate_past_context_end_stops_with_length(
    request: pytest.FixtureRequest, engine_id: str
) -> None:
    small = get_engine(request, engine_id, cap=24)
    _, result, _ = run(small, max_tokens=100, temperature=0.0)
    assert small.context_length == 24
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.completion_tokens == 24


def test_generate_cancelled_stops_within_one_token(engine: Engine) -> None:
    calls = 0

    def cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3  # checked once before each token

    _, result, _ = run(engine, max_tokens=50, temperature=0.0, cancelled=cancelled)
    assert (result.finish_reason, result.completion_tokens) == ("cancelled", 3)


def test_generate_cancel_after_first_piece_generates_no_more(engine: Engine) -> None:
    flag = {"cancel": False, "tokens": 0}

    def cancelled() -> bool:
        if not flag["cancel"]:
            flag["tokens"] += 1
        return bool(flag["cancel"])

    request = GenerateRequest(PROMPT, raw=True)
    gen = engine.generate(request, cancelled)
    next(gen)
    flag["cancel"] = True
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    assert stop.value.value.finish_reason == "cancelled"
    assert stop.value.value.completion_tokens == flag["tokens"]


def test_load_engine_reports_cpu_device(engine: Engine) -> None:
    assert engine.device == "cpu"


@pytest.mark.parametrize(
    ("device", "seed", "whole"), [("cuda", 7, True), ("cuda", None, False), ("cpu", 7, False)]
)
def test_gguf_seeded_request_on_cuda_evaluates_the_whole_prompt(
    gguf_model: Any, device: str, seed: int | None, whole: bool
) -> None:
    """On CUDA a reused prefix moves the logits (other kernels for the tail): seeded output
    drifted between identical requests on an H100. A seed there evaluates the prompt whole;
    without one, and on the CPU, the cached prefix is still reused."""
    from workers.engines.base import SamplingParams
    from workers.engines.loader import load_engine

    engine: Any = load_engine(gguf_model.parent, "gguf")
    try:
        engine.device = device  # the CPU engine taking the CUDA path: the decision under test
        batches: list[int] = []
        real_eval = engine.llm.eval
        engine.llm.eval = lambda tokens: (batches.append(len(tokens)), real_eval(tokens))[1]
        params = SamplingParams(max_tokens=4, temperature=0.8, seed=seed)
        request = GenerateRequest(PROMPT, raw=True, params=params)
        first = "".join(engine.generate(request, lambda: False))
        prompt_len = batches[0]
        batches.clear()
        again = "".join(engine.generate(request, lambda: False))
        assert batches[0] == (prompt_len if whole else 1), batches
        if seed is not None:
            assert again == first
    finally:
        engine.close()

"""Multi-message chats through each engine's template, and embeddings where the format has them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.utils.model_files import CHAT_TEMPLATE, make_gguf
from tests.workers.engines.conftest import get_engine
from workers.engines.base import (
    ChatMessage,
    ContextLengthExceeded,
    EngineError,
    GenerateRequest,
    SamplingParams,
)
from workers.engines.chat import render_chat
from workers.engines.loader import load_engine

CHAT = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hello"),
    ChatMessage("assistant", "Hi"),
    ChatMessage("user", "What is the capital of France?"),
)
TEMPLATED = ["gguf", "safetensors", "onnx"]


def _chat_text(tokenizer: Any) -> str:
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


@pytest.mark.parametrize("engine_id", TEMPLATED)
def test_messages_render_the_whole_conversation_like_transformers(
    request: pytest.FixtureRequest, engine_id: str, tokenizer: Any
) -> None:
    engine = get_engine(request, engine_id)
    expected = len(tokenizer(_chat_text(tokenizer), add_special_tokens=False).input_ids)
    count = engine.count_prompt_tokens(GenerateRequest(messages=CHAT))
    assert count == expected
    one_turn = engine.count_prompt_tokens(GenerateRequest("What is the capital of France?"))
    assert one_turn < count


def test_prompt_is_still_one_user_turn() -> None:
    assert GenerateRequest("hi").conversation() == [{"role": "user", "content": "hi"}]
    assert render_chat(CHAT_TEMPLATE, "hi", {"bos_token": "<s>"}) == "<s>[INST] hi [/INST]"


def test_messages_on_model_without_template_fail_with_clear_code(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "no-template.gguf", chat_template="")
    engine: Any = load_engine(path, "gguf", device="cpu")
    try:
        assert not engine.has_chat_template
        with pytest.raises(EngineError) as info:
            engine.count_prompt_tokens(GenerateRequest(messages=CHAT))
        assert info.value.code == "CHAT_TEMPLATE_MISSING"
        # A prompt still goes in verbatim, as /v1/infer always did.
        assert engine.count_prompt_tokens(GenerateRequest("hello")) >= 1
    finally:
        engine.close()


def test_gguf_embeddings_are_unit_vectors_per_input(request: pytest.FixtureRequest) -> None:
    engine = get_engine(request, "gguf")
    texts = ["The quick brown fox", "Hello, world!", "The quick brown fox"]
    out = engine.embed(texts)
    assert len(out.vectors) == 3
    assert {len(v) for v in out.vectors} == {64}  # the tiny model's hidden size
    for v in out.vectors:
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4)
    assert out.vectors[0] == pytest.approx(out.vectors[2], abs=1e-5)
    assert out.vectors[0] != pytest.approx(out.vectors[1], abs=1e-3)
    # llama.cpp tokenises with bos, so a text costs its tokens plus one.
    single = engine.embed(["Hello, world!"])
    assert single.prompt_tokens >= 2
    assert out.prompt_tokens > single.prompt_tokens


def test_gguf_embeddings_still_generate_afterwards(request: pytest.FixtureRequest) -> None:
    engine = get_engine(request, "gguf")
    engine.embed(["warm the embedding model"])
    request_ = GenerateRequest("The quick", raw=True, params=SamplingParams(max_tokens=4))
    assert engine.count_prompt_tokens(request_) >= 1
    assert list(engine.generate(request_, lambda: False))


@pytest.mark.parametrize("engine_id", ["safetensors", "pytorch"])
def test_transformers_embeddings_are_mean_pooled_last_hidden_state(
    request: pytest.FixtureRequest, engine_id: str, tokenizer: Any
) -> None:
    import torch

    from tests.utils.model_files import tiny_llama

    engine = get_engine(request, engine_id)
    texts = ["Hello, world!", "Tokens are counted"]
    out = engine.embed(texts)
    model = tiny_llama()
    for text, vector in zip(texts, out.vectors, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        assert vector == pytest.approx(expected.tolist(), abs=1e-4)
    assert out.prompt_tokens == sum(len(tokenizer(t).input_ids) for t in texts)


def test_embedding_input_over_context_is_refused(request: pytest.FixtureRequest) -> None:
    for engine_id in ("gguf", "safetensors"):
        with pytest.raises(ContextLengthExceeded):
            get_engine(request, engine_id).embed(["the capital of norway " * 400])


def test_onnx_embeddings_are_unsupported(request: pytest.FixtureRequest) -> None:
    with pytest.raises(EngineError) as info:
        get_engine(request, "onnx").embed(["hello"])
    assert info.value.code == "UNSUPPORTED_FOR_MODEL"

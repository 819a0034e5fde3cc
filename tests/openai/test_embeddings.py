"""`/openai/v1/embeddings`: GGUF through llama.cpp, transformers through mean pooling."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import openai
import pytest
from sqlmodel import select

from core.db import session_scope
from core.tables import UsageEvent
from tests.openai.conftest import async_client, sync_client
from tests.utils.stack import StackInfo

TEXTS = ["The quick brown fox", "Hello, world!", "The quick brown fox"]


def unit(vector: list[float]) -> bool:
    return math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)


def test_gguf_embeddings_base64_default_and_float_agree(
    stack: StackInfo, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    raw = client.embeddings.with_raw_response.create(model=gguf_ready["id"], input=TEXTS)
    reply = raw.parse()
    floats = client.embeddings.create(model=gguf_ready["id"], input=TEXTS, encoding_format="float")
    assert reply.object == "list" and reply.model == gguf_ready["id"]
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert all(d.object == "embedding" and len(d.embedding) == 64 for d in reply.data)
    assert all(unit(d.embedding) for d in reply.data)
    for a, b in zip(reply.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert reply.data[0].embedding == pytest.approx(reply.data[2].embedding, abs=1e-5)
    assert reply.data[0].embedding != pytest.approx(reply.data[1].embedding, abs=1e-3)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(TEXTS)
    with session_scope(stack.settings) as s:
        rows = list(s.exec(select(UsageEvent).where(UsageEvent.job_id == raw.headers["x-job-id"])))
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (reply.usage.prompt_tokens, 0)
    ]


def test_transformers_embeddings_match_mean_pooling_async(
    openai_url: str, hf_ready: dict[str, Any]
) -> None:
    import torch

    from tests.utils.model_files import load_tokenizer, tiny_llama

    async def embed() -> Any:
        client = async_client(openai_url, hf_ready["key"])
        reply = await client.embeddings.create(model="tiny-hf", input="Hello, world!")
        await client.close()
        return reply

    reply = asyncio.run(embed())
    ids = load_tokenizer()("Hello, world!", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny_llama()(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()
    assert len(reply.data) == 1
    assert reply.data[0].embedding == pytest.approx(expected, abs=1e-4)
    assert reply.usage.prompt_tokens == ids.shape[1]


def test_onnx_embeddings_are_unsupported_for_model(
    openai_url: str, onnx_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, onnx_ready["key"])
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=onnx_ready["id"], input="hello")
    assert info.value.code == "UNSUPPORTED_FOR_MODEL"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"


def test_embedding_input_over_context_is_400(openai_url: str, gguf_ready: dict[str, Any]) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=gguf_ready["id"], input=["ok", "norway " * 400])
    assert info.value.code == "CONTEXT_LENGTH_EXCEEDED"

"""`/openai/v1/completions` (legacy): the prompt goes to the model verbatim, as `/v1/infer` raw."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.testclient import TestClient

from tests.openai.conftest import async_client, sync_client
from tests.utils.factories import auth

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 10, "seed": 1}


def test_completion_equals_raw_infer(
    client: TestClient, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    reply = sync_client(openai_url, gguf_ready["key"]).completions.create(
        model=gguf_ready["id"], prompt="The capital of", **GREEDY
    )
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-job_")
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    infer = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "The capital of", "raw": True, **GREEDY},
        headers=auth(gguf_ready["key"]),
    ).json()
    assert reply.choices[0].text == infer["completion"]
    assert reply.choices[0].finish_reason == infer["finish_reason"]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        infer["prompt_tokens"],
        infer["completion_tokens"],
    )


def test_completion_stream_sync_and_async_match_json(
    openai_url: str, hf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, hf_ready["key"])
    plain = client.completions.create(model=hf_ready["id"], prompt="Once upon a", **GREEDY)
    chunks = list(
        client.completions.create(
            model=hf_ready["id"],
            prompt="Once upon a",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage

    async def streamed() -> str:
        aclient = async_client(openai_url, hf_ready["key"])
        stream = await aclient.completions.create(
            model=hf_ready["id"], prompt="Once upon a", stream=True, **GREEDY
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        await aclient.close()
        return text

    assert asyncio.run(streamed()) == plain.choices[0].text


def test_completion_default_max_tokens_is_openais_16(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    reply = sync_client(openai_url, gguf_ready["key"]).completions.create(
        model=gguf_ready["id"], prompt="Once upon a", temperature=0.0
    )
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 16

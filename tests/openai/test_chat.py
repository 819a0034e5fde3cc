"""`/openai/v1/chat/completions` with the official client: JSON and streams, sync and async."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from sqlmodel import select

from core.db import session_scope
from core.tables import Job, UsageEvent
from tests.openai.conftest import async_client, sync_client
from tests.utils.stack import StackInfo

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "seed": 1}
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "What is the capital of France?"},
]


def usage_rows(stack: StackInfo, job_id: str) -> list[UsageEvent]:
    with session_scope(stack.settings) as s:
        return list(s.exec(select(UsageEvent).where(UsageEvent.job_id == job_id)))


def test_chat_completion_has_openai_shape_and_records_usage(
    stack: StackInfo, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    raw = client.chat.completions.with_raw_response.create(
        model=gguf_ready["id"], messages=CHAT, **GREEDY
    )
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-job_")
    assert reply.model == gguf_ready["id"] and abs(reply.created - time.time()) < 600
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    job_id = raw.headers["x-job-id"]
    assert reply.id == f"chatcmpl-{job_id}"
    rows = usage_rows(stack, job_id)
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (usage.prompt_tokens, usage.completion_tokens)
    ]


def test_chat_renders_every_message_with_the_template(
    stack: StackInfo, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    whole = client.chat.completions.create(model=gguf_ready["id"], messages=CHAT, **GREEDY)
    last = client.chat.completions.create(model=gguf_ready["id"], messages=CHAT[-1:], **GREEDY)
    assert whole.usage is not None and last.usage is not None
    assert whole.usage.prompt_tokens > last.usage.prompt_tokens
    with session_scope(stack.settings) as s:
        job = s.get(Job, whole.id.removeprefix("chatcmpl-"))
        assert job is not None
        assert job.params["messages"] == CHAT


def test_chat_stream_with_usage_equals_the_json_answer(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    plain = client.chat.completions.create(model=gguf_ready["id"], messages=CHAT, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=gguf_ready["id"],
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [plain.choices[0].finish_reason]
    *body, last = chunks
    assert last.choices == [] and last.usage == plain.usage
    assert all(c.usage is None for c in body)


def test_chat_stream_without_usage_option_ends_with_done(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    with httpx.stream(
        "POST",
        f"{openai_url}/chat/completions",
        json={"model": gguf_ready["id"], "messages": CHAT[-1:], "stream": True, **GREEDY},
        headers={"Authorization": f"Bearer {gguf_ready['key']}"},
        timeout=120,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert '"usage"' not in "".join(lines)


def test_chat_by_model_name_and_max_completion_tokens(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    reply = client.chat.completions.create(
        model="tiny-gguf", messages=CHAT, temperature=0.0, max_completion_tokens=3
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 3
    if reply.usage.completion_tokens == 3:
        assert reply.choices[0].finish_reason == "length"
    # Again by name: now from the API's key cache, still this key's model.
    again = client.chat.completions.create(
        model="tiny-gguf", messages=CHAT, temperature=0.0, max_completion_tokens=3
    )
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_chat_async_client_on_a_transformers_model(
    openai_url: str, hf_ready: dict[str, Any]
) -> None:
    async def both() -> tuple[Any, list[Any]]:
        client = async_client(openai_url, hf_ready["key"])
        plain = await client.chat.completions.create(model=hf_ready["id"], messages=CHAT, **GREEDY)
        stream = await client.chat.completions.create(
            model=hf_ready["id"],
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = [c async for c in stream]
        await client.close()
        return plain, chunks

    plain, chunks = asyncio.run(both())
    assert plain.object == "chat.completion" and plain.usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage == plain.usage


def test_chat_stream_client_gone_still_records_usage(
    stack: StackInfo, openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    with client.chat.completions.with_streaming_response.create(
        model=gguf_ready["id"],
        messages=CHAT,
        stream=True,
        temperature=1.0,
        max_tokens=200,
        seed=3,
    ) as resp:
        job_id = resp.headers["x-job-id"]
        next(resp.iter_lines())  # one chunk, then hang up
    deadline = time.monotonic() + 60
    while not (rows := usage_rows(stack, job_id)):
        assert time.monotonic() < deadline, "no usage recorded after the client left"
        time.sleep(0.2)
    assert rows[0].prompt_tokens > 0 and rows[0].completion_tokens >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_chat_on_a_model_without_template_is_400(
    openai_url: str, untemplated_ready: dict[str, Any], stream: bool
) -> None:
    import openai

    client = sync_client(openai_url, untemplated_ready["key"])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=untemplated_ready["id"], messages=CHAT, stream=stream, **GREEDY
        )
    assert info.value.status_code == 400
    assert info.value.code == "CHAT_TEMPLATE_MISSING"
    assert "chat template" in info.value.message
    # The legacy endpoint needs no template: the prompt goes in verbatim.
    done = client.completions.create(model=untemplated_ready["id"], prompt="Hello", **GREEDY)
    assert done.usage is not None and done.usage.completion_tokens >= 1


def test_chat_content_parts_and_developer_role_read_as_text_and_system(
    openai_url: str, gguf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])

    def prompt_tokens(messages: list[dict[str, Any]]) -> int:
        reply = client.chat.completions.create(
            model=gguf_ready["id"],
            messages=messages,
            max_tokens=1,
            temperature=0.0,  # type: ignore[arg-type]
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    parts = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        },
    ]
    assert prompt_tokens(plain) == prompt_tokens(parts) > prompt_tokens(plain[1:])

"""`/openai/v1/models`: the models a key may call, and nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.openai.conftest import async_client, sync_client


def test_models_lists_the_keys_model(openai_url: str, gguf_ready: dict[str, Any]) -> None:
    page = sync_client(openai_url, gguf_ready["key"]).models.list()
    assert [(m.id, m.object) for m in page.data] == [(gguf_ready["id"], "model")]
    assert page.data[0].created > 0 and page.data[0].owned_by.startswith("acct_")


def test_models_retrieve_by_id_or_name_async(openai_url: str, hf_ready: dict[str, Any]) -> None:
    async def both() -> tuple[Any, Any]:
        client = async_client(openai_url, hf_ready["key"])
        by_id = await client.models.retrieve(hf_ready["id"])
        by_name = await client.models.retrieve("tiny-hf")
        await client.close()
        return by_id, by_name

    by_id, by_name = asyncio.run(both())
    assert by_id.id == by_name.id == hf_ready["id"]


def test_models_retrieve_another_model_is_not_found(
    openai_url: str, gguf_ready: dict[str, Any], hf_ready: dict[str, Any]
) -> None:
    client = sync_client(openai_url, gguf_ready["key"])
    for other in (hf_ready["id"], "tiny-hf", "mdl_nope"):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(other)
        assert info.value.code == "MODEL_NOT_FOUND"

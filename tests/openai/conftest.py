"""The real API on a socket, driven by the official `openai` client, over a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import get_settings
from tests.utils.factories import bundle_dir, create_account, upload_model
from tests.utils.live_server import live_api
from tests.utils.model_files import make_gguf
from tests.utils.stack import StackInfo


@pytest.fixture(scope="session")
def openai_url(stack: StackInfo) -> Iterator[str]:
    """`base_url` for the client: our API under uvicorn, so streams really stream."""
    with live_api(stack.settings) as url:
        yield f"{url}/openai/v1"


def sync_client(base_url: str, key: str) -> openai.OpenAI:
    # No retries: a test sees the first answer, not the third.
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def async_client(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def _ready(stack: StackInfo, owner: str, files: dict[str, Any], name: str) -> dict[str, Any]:
    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        token = create_account(c, owner)
        verdict = upload_model(c, token, files, name=name)
    assert verdict["status"] == "ready", verdict
    return {"token": token, "id": verdict["id"], "key": verdict["api_key"], "name": name}


@pytest.fixture(scope="session")
def hf_ready(stack: StackInfo, transformers_bundle: Path) -> dict[str, Any]:
    """A ready transformers (safetensors) model per stack."""
    return _ready(stack, "hf-owner", bundle_dir(transformers_bundle), "tiny-hf")


@pytest.fixture(scope="session")
def onnx_ready(stack: StackInfo, onnx_bundle: Path) -> dict[str, Any]:
    return _ready(stack, "onnx-owner", bundle_dir(onnx_bundle), "tiny-onnx")


@pytest.fixture(scope="session")
def untemplated_ready(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ready GGUF whose metadata carries no chat template."""
    path = make_gguf(tmp_path_factory.mktemp("plain") / "plain.gguf", chat_template="")
    return _ready(stack, "plain-owner", {"plain.gguf": path}, "plain-gguf")

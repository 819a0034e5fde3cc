"""Every engine loaded once per session on its tiny model, and transformers' own reference."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from workers.engines.base import Engine, GenerateRequest, GenerationResult, SamplingParams
from workers.engines.loader import load_engine

# engine id -> (bundle fixture, format)
BUNDLES = {
    "gguf": ("gguf_model", "gguf"),
    "safetensors": ("transformers_bundle", "transformers"),
    # Runners get pickle-based uploads as the safetensors converted at validation.
    "bin": ("transformers_bin_served_bundle", "transformers"),
    "pytorch": ("pytorch_served_bundle", "pytorch"),
    "onnx": ("onnx_bundle", "onnx"),
    "onnx_external": ("onnx_external_bundle", "onnx"),
}
PROMPT = "The quick brown fox"
_CACHE: dict[tuple[str, int | None], Engine] = {}


def bundle_path(request: pytest.FixtureRequest, engine_id: str) -> tuple[Path, str]:
    fixture, fmt = BUNDLES[engine_id]
    return Path(request.getfixturevalue(fixture)), fmt


def get_engine(request: pytest.FixtureRequest, engine_id: str, cap: int | None = None) -> Engine:
    key = (engine_id, cap)
    if key not in _CACHE:
        path, fmt = bundle_path(request, engine_id)
        kwargs: dict[str, Any] = {} if cap is None else {"context_cap": cap}
        _CACHE[key] = load_engine(path, fmt, device="cpu", **kwargs)
    return _CACHE[key]


@pytest.fixture(scope="session", autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    for loaded in _CACHE.values():
        close = getattr(loaded, "close", None)
        if close is not None:
            close()
    _CACHE.clear()


@pytest.fixture(params=list(BUNDLES))
def engine(request: pytest.FixtureRequest) -> Engine:
    return get_engine(request, request.param)


def run(
    engine: Engine,
    prompt: str = PROMPT,
    *,
    raw: bool = True,
    cancelled: Callable[[], bool] = lambda: False,
    **params: Any,
) -> tuple[str, GenerationResult, list[str]]:
    """Drain one generation: (text, result, pieces)."""
    request = GenerateRequest(prompt, raw=raw, params=SamplingParams(**params))
    gen: Generator[str, None, GenerationResult] = engine.generate(request, cancelled)
    pieces: list[str] = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return "".join(pieces), stop.value, pieces


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from tests.utils.model_files import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def reference_greedy(tokenizer: Any) -> list[int]:
    """transformers' own greedy continuation of PROMPT: 8 token ids."""
    import torch

    from tests.utils.model_files import tiny_llama

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny_llama().generate(ids, do_sample=False, max_new_tokens=8)
    return [int(t) for t in out[0, ids.shape[1] :]]


def cancel_at(check: int) -> Callable[[], bool]:
    """A cancel that turns true at its `check`-th look (1-based)."""
    looks = count(1)
    return lambda: next(looks) >= check


def record_sizes(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap `obj.name` so that each call's first argument's length is recorded (in order)."""
    sizes: list[int] = []
    original = getattr(obj, name)

    def recording(first: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(first))
        return original(first, *args, **kwargs)

    monkeypatch.setattr(obj, name, recording)
    return sizes

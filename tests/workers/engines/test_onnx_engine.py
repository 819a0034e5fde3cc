"""An ONNX export without past key values: the engine recomputes the sequence each step."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.utils.model_files import tiny_llama
from tests.workers.engines.conftest import run
from workers.engines.loader import load_engine


class _NoCache(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def onnx_no_cache_bundle(onnx_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx_no_cache")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(onnx_bundle / name, out / name)
    ids = torch.ones(1, 3, dtype=torch.long)
    axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "logits")}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _NoCache(),
            (ids, torch.ones_like(ids)),
            str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return out


def test_generate_onnx_without_past_matches_transformers(
    onnx_no_cache_bundle: Path, tokenizer: Any, reference_greedy: list[int]
) -> None:
    engine = load_engine(onnx_no_cache_bundle, "onnx", device="cpu")
    assert engine.graph.past_names == []  # type: ignore[attr-defined]
    text, result, _ = run(engine, max_tokens=8, temperature=0.0)
    assert text == tokenizer.decode(reference_greedy, skip_special_tokens=True)
    assert (result.finish_reason, result.completion_tokens) == ("length", 8)

"""One hostile upload of the adversarial corpus, and the honest bundles it is built from."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tests.utils.factories import Content, bundle_dir
from tests.utils.hostile_pickles import zip_members


@dataclass(frozen=True)
class Case:
    """A bundle that must be refused with exactly `code`; `canary` is what a payload creates."""

    name: str
    family: str  # pickle, zip, gguf, safetensors, onnx, transformers
    files: dict[str, Content]
    code: str
    canary: Path | None = None
    stage: str = "validation"  # or "declare": the API refuses the file list before any upload


@dataclass(frozen=True)
class Bases:
    """Honest bundles (session fixtures) that the corpus poisons one field at a time."""

    gguf: Path
    transformers: Path
    pytorch: Path
    onnx: Path
    canaries: Path  # a folder the worker could write to; every payload aims a file into it

    def canary(self, name: str) -> Path:
        return self.canaries / name

    def side_files(self, bundle: Path) -> dict[str, Content]:
        """config.json and the tokenizer files of a bundle, without its weights."""
        return {k: v for k, v in bundle_dir(bundle).items() if k.endswith(".json")}

    def hf(self, **replace: Content) -> dict[str, Content]:
        """The Transformers bundle with files replaced (a value of b"" drops nothing)."""
        return {**bundle_dir(self.transformers), **replace}

    def hf_config(self) -> dict[str, object]:
        config: dict[str, object] = json.loads((self.transformers / "config.json").read_text())
        return config

    def pytorch_with(self, weights: bytes, name: str = "model.pt") -> dict[str, Content]:
        return {**self.side_files(self.pytorch), name: weights}

    def onnx_with(self, model: bytes, **extra: Content) -> dict[str, Content]:
        return {**self.side_files(self.onnx), "model.onnx": model, **extra}


@functools.cache
def small_state_members() -> tuple[tuple[str, bytes], ...]:
    """The members of a tiny `torch.save(state_dict)` archive, in order."""
    import torch

    buf = io.BytesIO()
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    torch.save(state, buf)
    return tuple(zip_members(buf.getvalue()))

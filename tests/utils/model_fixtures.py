"""Session-scoped pytest fixtures: each tiny model is built once per test session.

Register with ``pytest_plugins = ["tests.utils.model_fixtures"]`` in the root conftest.
model_files (torch, transformers) is imported only when a fixture is first used, so
registering the plugin costs nothing and keeps tests like "import api pulls no torch" honest.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest


def _model_files() -> ModuleType:
    from tests.utils import model_files

    return model_files


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny F32 llama GGUF (tokenizer and chat template inside)."""
    return Path(_model_files().make_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"))


@pytest.fixture(scope="session")
def gguf_model_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny llama GGUF with F16 matrices."""
    path = tmp_path_factory.mktemp("gguf_f16") / "tiny-f16.gguf"
    return Path(_model_files().make_gguf(path, quant="f16"))


@pytest.fixture(scope="session")
def gguf_model_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny llama GGUF with Q8_0 matrices."""
    path = tmp_path_factory.mktemp("gguf_q8") / "tiny-q8_0.gguf"
    return Path(_model_files().make_gguf(path, quant="q8_0"))


@pytest.fixture(scope="session")
def transformers_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder with model.safetensors."""
    out = tmp_path_factory.mktemp("hf_safetensors")
    _model_files().make_transformers_bundle(out)
    return out


@pytest.fixture(scope="session")
def transformers_bin_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder with pytorch_model.bin instead of safetensors."""
    out = tmp_path_factory.mktemp("hf_bin")
    _model_files().make_transformers_bundle(out, weights="bin")
    return out


@pytest.fixture(scope="session")
def pytorch_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a model.pt state dict, config.json and tokenizer files."""
    out = tmp_path_factory.mktemp("pytorch")
    _model_files().make_pytorch_bundle(out)
    return out


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with model.onnx (weights inside), config.json and tokenizer files."""
    out = tmp_path_factory.mktemp("onnx")
    _model_files().make_onnx_bundle(out)
    return out


@pytest.fixture(scope="session")
def onnx_external_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like onnx_bundle, with the weights in model.onnx.data beside model.onnx."""
    out = tmp_path_factory.mktemp("onnx_external")
    _model_files().make_onnx_bundle(out, external_data=True)
    return out


def _served(src: Path, out: Path) -> Path:
    """`src` as runners get it: pickle-based weights converted to safetensors, as validation
    does (the converter child's own function, run here in-process on our own files)."""
    import shutil

    from workers.conversion import converted_path
    from workers.runner.convert_child import convert

    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.suffix in (".bin", ".pt", ".pth"):
            convert(path, out / converted_path(rel))
        elif path.is_file():
            shutil.copy(path, out / rel)
    return out


@pytest.fixture(scope="session")
def transformers_bin_served_bundle(
    transformers_bin_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """transformers_bin_bundle after conversion: model.safetensors in place of the .bin."""
    return _served(transformers_bin_bundle, tmp_path_factory.mktemp("hf_bin_served"))


@pytest.fixture(scope="session")
def pytorch_served_bundle(pytorch_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytorch_bundle after conversion: model.safetensors in place of model.pt."""
    return _served(pytorch_bundle, tmp_path_factory.mktemp("pytorch_served"))

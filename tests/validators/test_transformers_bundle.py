"""Bundle-level checks of Transformers and PyTorch folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from validators.base import Rejected
from validators.transformers_bundle import (
    BUILTIN_CAUSAL_LM,
    check_config,
    check_tokenizer_json,
    check_transformers_bundle,
    find_remote_code,
    tokenizer_kind,
)

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 256,
}
FILES = ["config.json", "tokenizer.json", "model.safetensors"]


def _code(paths: list[str], configs: dict[str, Any]) -> str:
    with pytest.raises(Rejected) as info:
        check_transformers_bundle(paths, configs)
    return info.value.code


def test_check_transformers_bundle_llama_returns_metadata() -> None:
    meta = check_transformers_bundle(FILES, {"config.json": LLAMA})
    assert meta == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "context_length": 256,
        "tokenizer": "tokenizer.json",
        "has_chat_template": False,
    }


def test_check_transformers_bundle_real_fixture_passes(transformers_bundle: Path) -> None:
    paths = [p.name for p in transformers_bundle.iterdir()]
    configs = {
        n: json.loads((transformers_bundle / n).read_text()) for n in paths if n.endswith(".json")
    }
    meta = check_transformers_bundle(paths, configs)
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["has_chat_template"] is True


def test_check_transformers_bundle_builtin_table_matches_transformers() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch, model_types in BUILTIN_CAUSAL_LM.items():
        for model_type in model_types:
            assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == arch


def test_check_transformers_bundle_auto_map_is_remote_code() -> None:
    config = {**LLAMA, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    with pytest.raises(Rejected, match="remove auto_map"):
        check_transformers_bundle(FILES, {"config.json": config})


def test_check_transformers_bundle_nested_trust_remote_code_is_remote_code() -> None:
    configs = {"config.json": LLAMA, "tokenizer_config.json": {"x": [{"trust_remote_code": True}]}}
    assert _code(FILES, configs) == "REMOTE_CODE"


def test_check_transformers_bundle_python_file_is_remote_code() -> None:
    assert _code([*FILES, "modeling_llama.py"], {"config.json": LLAMA}) == "REMOTE_CODE"


@pytest.mark.parametrize(
    "archs",
    [
        "LlamaForCausalLM",
        [],
        ["LlamaForCausalLM", "GPT2LMHeadModel"],
        ["EvilForCausalLM"],
        ["LlamaModel"],
    ],
)
def test_check_config_unsupported_architecture_is_rejected(archs: Any) -> None:
    with pytest.raises(Rejected) as info:
        check_config({**LLAMA, "architectures": archs})
    assert info.value.code == "UNSUPPORTED_ARCHITECTURE"


@pytest.mark.parametrize("model_type", [None, "gpt2", 3])
def test_check_config_inconsistent_model_type_is_rejected(model_type: Any) -> None:
    with pytest.raises(Rejected) as info:
        check_config({**LLAMA, "model_type": model_type})
    assert info.value.code == "CONFIG_INVALID"


def test_check_config_non_object_is_rejected() -> None:
    with pytest.raises(Rejected) as info:
        check_config(["LlamaForCausalLM"])
    assert info.value.code == "CONFIG_INVALID"


def test_check_config_without_architectures_uses_model_type() -> None:
    config = {"model_type": "qwen2", "max_position_embeddings": 32}
    assert check_config(config)["architecture"] == "Qwen2ForCausalLM"


@pytest.mark.parametrize("model_type", [None, "bert", ["llama"]])
def test_check_config_without_architectures_unknown_model_type_is_rejected(
    model_type: Any,
) -> None:
    with pytest.raises(Rejected) as info:
        check_config({"model_type": model_type})
    assert info.value.code == "UNSUPPORTED_ARCHITECTURE"


def test_check_config_gpt2_reads_n_positions() -> None:
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": 1024}
    assert check_config(config)["context_length"] == 1024


def test_check_transformers_bundle_missing_config_is_rejected() -> None:
    assert _code(FILES, {}) == "CONFIG_MISSING"


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["tokenizer.json"], "tokenizer.json"),
        (["tokenizer.model"], "sentencepiece"),
        (["vocab.json", "merges.txt"], "bpe"),
    ],
)
def test_tokenizer_kind_complete_sets_are_found(names: list[str], kind: str) -> None:
    assert tokenizer_kind(names) == kind


@pytest.mark.parametrize("names", [[], ["vocab.json"], ["merges.txt"], ["sub/tokenizer.json"]])
def test_tokenizer_kind_incomplete_sets_are_missing(names: list[str]) -> None:
    with pytest.raises(Rejected) as info:
        tokenizer_kind(names)
    assert info.value.code == "TOKENIZER_MISSING"


def test_check_transformers_bundle_tokenizer_in_subfolder_is_missing() -> None:
    paths = ["config.json", "tok/tokenizer.json", "model.safetensors"]
    assert _code(paths, {"config.json": LLAMA}) == "TOKENIZER_MISSING"


@pytest.mark.parametrize("value", [[], {"version": "1.0"}, {"model": "BPE"}])
def test_check_tokenizer_json_without_model_is_rejected(value: Any) -> None:
    with pytest.raises(Rejected) as info:
        check_tokenizer_json(value)
    assert info.value.code == "TOKENIZER_INVALID"


def test_check_transformers_bundle_shard_index_with_missing_shard_is_rejected() -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    paths = ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors"]
    configs = {"config.json": LLAMA, "model.safetensors.index.json": index}
    with pytest.raises(Rejected, match="not uploaded"):
        check_transformers_bundle(paths, configs)


def test_check_transformers_bundle_complete_shard_index_passes() -> None:
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors"}}
    paths = ["config.json", "tokenizer.json", "model-00001-of-00001.safetensors"]
    configs = {"config.json": LLAMA, "model.safetensors.index.json": index}
    assert check_transformers_bundle(paths, configs)["architecture"] == "LlamaForCausalLM"


def test_check_transformers_bundle_chat_template_file_is_detected() -> None:
    meta = check_transformers_bundle([*FILES, "chat_template.jinja"], {"config.json": LLAMA})
    assert meta["has_chat_template"] is True


def test_find_remote_code_deeply_nested_key_is_found() -> None:
    value: Any = {"auto_map": {}}
    for _ in range(5000):
        value = {"n": [value]}
    assert find_remote_code(value) == "auto_map"

"""Bundle-level checks of a Transformers (or PyTorch state-dict) model folder.

These run on small parsed JSON files only. The rule they enforce: only code that ships inside
transformers ever runs, so anything that asks for repository code is refused.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Mapping
from typing import Any

from validators.base import Rejected

# Built-in causal LM classes -> the model_type values transformers maps to them. A static
# copy (transformers is never imported here); extend it together with the engine tests.
BUILTIN_CAUSAL_LM: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": frozenset({"llama"}),
    "MistralForCausalLM": frozenset({"mistral"}),
    "MixtralForCausalLM": frozenset({"mixtral"}),
    "Qwen2ForCausalLM": frozenset({"qwen2"}),
    "Qwen2MoeForCausalLM": frozenset({"qwen2_moe"}),
    "Qwen3ForCausalLM": frozenset({"qwen3"}),
    "Qwen3MoeForCausalLM": frozenset({"qwen3_moe"}),
    "GPT2LMHeadModel": frozenset({"gpt2"}),
    "GPTNeoForCausalLM": frozenset({"gpt_neo"}),
    "GPTNeoXForCausalLM": frozenset({"gpt_neox"}),
    "GPTJForCausalLM": frozenset({"gptj"}),
    "GPTBigCodeForCausalLM": frozenset({"gpt_bigcode"}),
    "PhiForCausalLM": frozenset({"phi"}),
    "Phi3ForCausalLM": frozenset({"phi3"}),
    "GemmaForCausalLM": frozenset({"gemma"}),
    "Gemma2ForCausalLM": frozenset({"gemma2"}),
    "Gemma3ForCausalLM": frozenset({"gemma3_text"}),
    "FalconForCausalLM": frozenset({"falcon"}),
    "OPTForCausalLM": frozenset({"opt"}),
    "BloomForCausalLM": frozenset({"bloom"}),
    "StableLmForCausalLM": frozenset({"stablelm"}),
    "Starcoder2ForCausalLM": frozenset({"starcoder2"}),
    "OlmoForCausalLM": frozenset({"olmo"}),
    "Olmo2ForCausalLM": frozenset({"olmo2"}),
    "CohereForCausalLM": frozenset({"cohere"}),
    "GraniteForCausalLM": frozenset({"granite"}),
    "SmolLM3ForCausalLM": frozenset({"smollm3"}),
}
_ARCH_BY_MODEL_TYPE = {t: arch for arch, types in BUILTIN_CAUSAL_LM.items() for t in types}
_REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code"})
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# JSON files whose content these checks read; the pipeline keeps them parsed (they are small).
CONFIG_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    }
)
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_remote_code(value: Any) -> str | None:
    """The first key that asks for repository code (auto_map, trust_remote_code), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            hit = next((k for k in item if k in _REMOTE_CODE_KEYS), None)
            if hit is not None:
                return str(hit)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def check_no_remote_code(configs: Mapping[str, Any]) -> None:
    for path, value in sorted(configs.items()):
        key = find_remote_code(value)
        if key is not None:
            raise Rejected(
                "REMOTE_CODE",
                f"{path} contains {key!r}, which asks to run code from the repository; remove "
                "auto_map; only architectures built into transformers are served",
                path=path,
            )


def _architecture(archs: Any, model_type: Any) -> str:
    supported = ", ".join(sorted(BUILTIN_CAUSAL_LM))
    if archs is None:
        # A bare config (e.g. LlamaConfig().save_pretrained) names only its model_type.
        arch = _ARCH_BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            raise Rejected(
                "UNSUPPORTED_ARCHITECTURE",
                f"config.json has no architectures and model_type {model_type!r} is not one "
                f"of a supported architecture: {supported}",
                path="config.json",
            )
        return arch
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in BUILTIN_CAUSAL_LM:
        raise Rejected(
            "UNSUPPORTED_ARCHITECTURE",
            f"config.json architectures is {archs!r}; it must name exactly one of: {supported}",
            path="config.json",
        )
    return str(archs[0])


def check_config(config: Any) -> dict[str, Any]:
    """Architecture and model_type of a config.json; returns what the runner needs."""
    if not isinstance(config, dict):
        raise Rejected("CONFIG_INVALID", "config.json must be a JSON object", path="config.json")
    model_type = config.get("model_type")
    arch = _architecture(config.get("architectures"), model_type)
    if model_type not in BUILTIN_CAUSAL_LM[arch]:
        expected = " or ".join(sorted(BUILTIN_CAUSAL_LM[arch]))
        raise Rejected(
            "CONFIG_INVALID",
            f"config.json model_type is {model_type!r}, but {arch} needs {expected}",
            path="config.json",
        )
    context = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    return {"architecture": arch, "model_type": model_type, "context_length": context}


def check_tokenizer_json(value: Any, path: str = "tokenizer.json") -> None:
    """A tokenizer.json must at least be an object holding a tokenizer model."""
    if not isinstance(value, dict) or not isinstance(value.get("model"), dict):
        raise Rejected(
            "TOKENIZER_INVALID", f"{path} is not a tokenizers file (no 'model' object)", path=path
        )


def tokenizer_kind(names: Collection[str]) -> str:
    """Which tokenizer files the bundle carries; TOKENIZER_MISSING when none is complete."""
    if "tokenizer.json" in names:
        return "tokenizer.json"
    if "tokenizer.model" in names:
        return "sentencepiece"
    if {"vocab.json", "merges.txt"} <= set(names):
        return "bpe"
    raise Rejected(
        "TOKENIZER_MISSING",
        "no tokenizer: upload tokenizer.json, or tokenizer.model, or vocab.json with merges.txt",
    )


def _check_shard_index(path: str, index: Any, names: Collection[str]) -> None:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise Rejected("BUNDLE_INVALID", f"{path} has no weight_map object", path=path)
    missing = sorted({str(v) for v in weight_map.values()} - set(names))
    if missing:
        raise Rejected(
            "BUNDLE_INVALID",
            f"{path} refers to shards that were not uploaded: {missing[:5]}",
            path=path,
        )


def _has_chat_template(configs: Mapping[str, Any], names: Collection[str]) -> bool:
    tokenizer_config = configs.get("tokenizer_config.json")
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"):
        return True
    return "chat_template.jinja" in names or "chat_template.json" in names


def check_transformers_bundle(paths: Collection[str], configs: Mapping[str, Any]) -> dict[str, Any]:
    """Cross-file checks of a Transformers/PyTorch bundle; `configs` maps path -> parsed JSON."""
    code = sorted(p for p in paths if p.lower().endswith(".py"))
    if code:
        raise Rejected(
            "REMOTE_CODE",
            f"{code[0]}: Python files are never run; only architectures built "
            "into transformers are served",
            path=code[0],
        )
    check_no_remote_code(configs)
    names = {p for p in paths if posixpath.dirname(p) == ""}
    if "config.json" not in configs:
        raise Rejected("CONFIG_MISSING", "a Transformers or PyTorch bundle needs config.json")
    meta = check_config(configs["config.json"])
    meta["tokenizer"] = tokenizer_kind(names)
    for index_path in _INDEX_FILES:
        if index_path in configs:
            _check_shard_index(index_path, configs[index_path], names)
    meta["has_chat_template"] = _has_chat_template(configs, names)
    return meta

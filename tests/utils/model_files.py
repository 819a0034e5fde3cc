"""Tiny random-weight models in every supported format, for tests.

Every generator writes into a given directory, is deterministic for a seed and returns the
paths it wrote. All formats share one tokenizer and one tiny Llama, so engines can be
compared token for token.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
# Llama-2 style, built only from tokens the tiny vocabulary knows.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A model is a bundle of files that the platform validates before it serves it.",
    "Hello, world! How are you today? I am fine, thank you for asking.",
    "Every inference request becomes a queued task executed by a sandboxed runner.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Tokens are counted, metered and billed at the end of every month.",
    "Once upon a time there was a little language model that wanted to talk.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text as well as words.",
    "Please write a short poem about the ocean, the wind and the stars at night.",
    "The weather is sunny with a light breeze from the west this afternoon.",
    "What is the capital of France? The capital of France is Paris.",
]
LLAMA_KW: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
Weights = Literal["safetensors", "bin"]
GgufQuant = Literal["f32", "f16", "q8_0"]


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok.to_str()


def load_tokenizer() -> PreTrainedTokenizerFast:
    """Build the shared tokenizer in memory (no files)."""
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=LLAMA_KW["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    # Template inside tokenizer_config.json: the layout both transformers 4 and 5 read.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    special_map = out_dir / "special_tokens_map.json"
    if not special_map.exists():  # transformers 5 no longer writes it; older loaders want it
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special_map.write_text(json.dumps({n: getattr(tokenizer, n) for n in names}, indent=2))
    return tokenizer


# A bigger shape for benchmarks, where a token should cost the engine milliseconds, as in a
# real model, not the tiny one's tenth of a millisecond (~28 M parameters).
BENCH_SHAPE: tuple[tuple[str, int], ...] = (
    ("hidden_size", 512),
    ("intermediate_size", 1536),
    ("num_hidden_layers", 8),
    ("num_attention_heads", 8),
    ("num_key_value_heads", 8),
)


def llama_config(shape: tuple[tuple[str, int], ...] = ()) -> LlamaConfig:
    """The tiny Llama configuration shared by every format (`shape` overrides its sizes)."""
    tokenizer = load_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**LLAMA_KW, **dict(shape)},
    )


@functools.cache
def _state_dict(seed: int, shape: tuple[tuple[str, int], ...] = ()) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _build_model(seed, shape).state_dict().items()}


def _build_model(seed: int, shape: tuple[tuple[str, int], ...] = ()) -> LlamaForCausalLM:
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(shape))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny random Llama for a seed, in eval mode."""
    model = LlamaForCausalLM(llama_config())
    model.load_state_dict(_state_dict(seed))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _files(out_dir: Path) -> list[Path]:
    # Everything under out_dir: pass a fresh folder per bundle.
    return sorted(p for p in Path(out_dir).rglob("*") if p.is_file())


def make_transformers_bundle(
    out_dir: Path, *, weights: Weights = "safetensors", seed: int = 0
) -> list[Path]:
    """A Hugging Face folder: config.json, tokenizer files, safetensors or pytorch_model.bin."""
    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    model = tiny_llama(seed)
    model.save_pretrained(out_dir)
    if weights == "bin":
        # transformers 5 only writes safetensors, whatever safe_serialization says
        (out_dir / "model.safetensors").unlink()
        torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    return _files(out_dir)


def make_pytorch_bundle(out_dir: Path, seed: int = 0) -> list[Path]:
    """A raw state dict (model.pt) beside config.json and tokenizer files."""
    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    llama_config().save_pretrained(out_dir)
    torch.save(_state_dict(seed), out_dir / "model.pt")
    return _files(out_dir)


def bundle_files(paths: list[Path], root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) pairs, ready for an upload request."""
    root = Path(root).resolve()
    return [(p.resolve().relative_to(root).as_posix(), p.resolve()) for p in paths]


# --- GGUF -------------------------------------------------------------------------------


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores q/k in rotate-half order; llama.cpp expects interleaved pairs.
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensor(w: np.ndarray, quant: GgufQuant) -> tuple[np.ndarray, Any]:
    import gguf

    if w.ndim == 1 or quant == "f32":
        return w.astype(np.float32), None
    if quant == "f16":
        return w.astype(np.float16), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(w.astype(np.float32), q8), q8


def _gguf_metadata(writer: Any, config: LlamaConfig, quant: GgufQuant) -> None:
    import gguf

    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_name("inferatech-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType[file_types[quant]])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(LLAMA_KW["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)


def _gguf_tokenizer(writer: Any, chat_template: str) -> None:
    import gguf

    tokenizer = load_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tokenizer.all_special_ids)
    merges = json.loads(_tokenizer_json())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def make_gguf(
    path: Path,
    *,
    quant: GgufQuant = "f32",
    seed: int = 0,
    shape: tuple[tuple[str, int], ...] = (),
    chat_template: str | None = None,
) -> Path:
    """A llama-architecture GGUF of the tiny Llama, tokenizer and chat template inside."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    _gguf_metadata(writer, config, quant)
    _gguf_tokenizer(writer, CHAT_TEMPLATE if chat_template is None else chat_template)
    for hf_name, tensor in _state_dict(seed, shape).items():
        w = tensor.float().numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute_qk(w, config.num_attention_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data, raw_dtype = _gguf_tensor(w, quant)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- ONNX -------------------------------------------------------------------------------


class _OnnxLlama(torch.nn.Module):
    """Flat-tensor wrapper: the legacy exporter cannot trace a Cache object."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        params = inspect.signature(self.model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"  # renamed in 5.24
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{name: cache}
        )
        returned = getattr(out, "cache", None)
        returned = out.past_key_values if returned is None else returned
        present = [t for layer in returned.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def onnx_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph (Hugging Face / Optimum convention)."""
    kv = [f"{i}.{part}" for i in range(n_layers) for part in ("key", "value")]
    past = [f"past_key_values.{name}" for name in kv]
    present = [f"present.{name}" for name in kv]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def _export_onnx(model: LlamaForCausalLM, path: Path) -> None:
    config = model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_key_value_heads
    assert n_heads is not None  # llama_config sets it
    head_dim = config.hidden_size // config.num_attention_heads
    past_len, seq_len = 2, 3
    past = [torch.zeros(1, n_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    input_ids = torch.ones(1, seq_len, dtype=torch.long)
    mask = torch.ones(1, past_len + seq_len, dtype=torch.long)
    inputs, outputs = onnx_io_names(n_layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    axes["logits"] = {0: "batch", 1: "seq"}
    axes |= {n: {0: "batch", 2: "past"} for n in inputs[2:]}
    axes |= {n: {0: "batch", 2: "total"} for n in outputs[1:]}
    torch.onnx.export(
        _OnnxLlama(model),
        (input_ids, mask, *past),
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )


def make_onnx_bundle(out_dir: Path, *, external_data: bool = False, seed: int = 0) -> list[Path]:
    """model.onnx (with KV cache I/O) + config.json + tokenizer files.

    Inputs: input_ids [b, s] int64, attention_mask [b, past+s] int64,
    past_key_values.{i}.key/value [b, heads, past, head_dim] float32 (past may be 0).
    Outputs: logits [b, s, vocab], present.{i}.key/value [b, heads, past+s, head_dim].
    With external_data the weights live in model.onnx.data beside it.
    """
    import onnx

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    llama_config().save_pretrained(out_dir)
    onnx_path = out_dir / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes baked for this tiny model
        _export_onnx(tiny_llama(seed), onnx_path)
    if external_data:
        proto = onnx.load(str(onnx_path))
        onnx.save_model(
            proto,
            str(onnx_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=0,
        )
    return _files(out_dir)

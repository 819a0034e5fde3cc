"""The generated tiny models load and generate in their real engines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.utils import model_files

PROMPT = "The quick brown fox"
N_NEW = 8


def _hf_greedy(model: LlamaForCausalLM, ids: list[int], n: int = N_NEW) -> list[int]:
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


def _llama_cpp_greedy(path: Path, ids: list[int], n: int = N_NEW) -> list[int]:
    from llama_cpp import Llama

    from workers.engines.llama import avoid_extra_buffers, host_has_amx

    if host_has_amx():  # as the engine loads it: ggml's AMX buffers crash on Q8_0
        avoid_extra_buffers()

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    ids: list[int] = model_files.load_tokenizer()(PROMPT)["input_ids"]
    return ids


def test_make_tokenizer_writes_files_with_chat_template(tmp_path: Path) -> None:
    tokenizer = model_files.make_tokenizer(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert len(tokenizer) == model_files.VOCAB_SIZE
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == model_files.CHAT_TEMPLATE
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hello"}]
    text = reloaded.apply_chat_template(messages, tokenize=False)
    assert text == "<s>[INST] Hello [/INST]"
    assert reloaded(PROMPT)["input_ids"][0] == reloaded.bos_token_id


def test_tokenizer_training_is_deterministic() -> None:
    assert model_files._tokenizer_json.__wrapped__() == model_files._tokenizer_json()


def test_gguf_f32_greedy_ids_match_transformers(gguf_model: Path, prompt_ids: list[int]) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_model), n_ctx=128, verbose=False, vocab_only=True)
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == prompt_ids
    expected = _hf_greedy(model_files.tiny_llama(), prompt_ids)
    assert _llama_cpp_greedy(gguf_model, prompt_ids) == expected


@pytest.mark.parametrize("fixture", ["gguf_model_f16", "gguf_model_q8"])
def test_gguf_quantized_loads_and_generates(
    fixture: str, prompt_ids: list[int], request: pytest.FixtureRequest
) -> None:
    ids = _llama_cpp_greedy(request.getfixturevalue(fixture), prompt_ids)
    assert len(ids) == N_NEW
    assert all(0 <= i < model_files.VOCAB_SIZE for i in ids)


def test_gguf_carries_chat_template(gguf_model: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_model), n_ctx=128, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == model_files.CHAT_TEMPLATE
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0
    )
    assert isinstance(reply, dict) and reply["usage"]["prompt_tokens"] > 0


def test_gguf_q8_stores_q8_0_matrices(gguf_model_q8: Path) -> None:
    import gguf

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_model_q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_gguf_bytes_are_deterministic(tmp_path: Path) -> None:
    a = model_files.make_gguf(tmp_path / "a.gguf", quant="q8_0")
    b = model_files.make_gguf(tmp_path / "b.gguf", quant="q8_0")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    ("fixture", "weights"),
    [
        ("transformers_bundle", "model.safetensors"),
        ("transformers_bin_bundle", "pytorch_model.bin"),
    ],
)
def test_transformers_bundle_loads_and_generates(
    fixture: str, weights: str, prompt_ids: list[int], request: pytest.FixtureRequest
) -> None:
    bundle: Path = request.getfixturevalue(fixture)
    assert (bundle / weights).is_file()
    assert not (bundle / "model.safetensors").exists() or weights == "model.safetensors"
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    model = AutoModelForCausalLM.from_pretrained(bundle).eval()  # type: ignore[no-untyped-call]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == prompt_ids
    out = model.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    assert out[0, len(prompt_ids) :].tolist() == _hf_greedy(model_files.tiny_llama(), prompt_ids)


def test_pytorch_state_dict_loads_into_llama(pytorch_bundle: Path) -> None:
    state = torch.load(pytorch_bundle / "model.pt", weights_only=True)
    config = LlamaConfig.from_pretrained(pytorch_bundle)
    result = LlamaForCausalLM(config).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert (pytorch_bundle / "tokenizer.json").is_file()


def _ort_run(
    path: Path, ids: list[int], past: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = json.loads((path.parent / "config.json").read_text())
    shape = (
        1,
        config["num_key_value_heads"],
        0,
        config["hidden_size"] // config["num_attention_heads"],
    )
    inputs, outputs = model_files.onnx_io_names(config["num_hidden_layers"])
    feed = past or {n: np.zeros(shape, np.float32) for n in inputs[2:]}
    past_len = next(iter(feed.values())).shape[2]
    feed["input_ids"] = np.array([ids], np.int64)
    feed["attention_mask"] = np.ones((1, past_len + len(ids)), np.int64)
    return dict(zip(outputs, session.run(outputs, feed), strict=True))


@pytest.mark.parametrize("fixture", ["onnx_bundle", "onnx_external_bundle"])
def test_onnx_logits_match_transformers(
    fixture: str, prompt_ids: list[int], request: pytest.FixtureRequest
) -> None:
    bundle: Path = request.getfixturevalue(fixture)
    has_data = (bundle / "model.onnx.data").is_file()
    assert has_data == (fixture == "onnx_external_bundle")
    out = _ort_run(bundle / "model.onnx", prompt_ids, None)
    with torch.no_grad():
        expected = model_files.tiny_llama()(input_ids=torch.tensor([prompt_ids])).logits
    np.testing.assert_allclose(out["logits"], expected.numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_kv_cache_greedy_loop_matches_transformers(
    onnx_bundle: Path, prompt_ids: list[int]
) -> None:
    out = _ort_run(onnx_bundle / "model.onnx", prompt_ids, None)
    generated: list[int] = []
    for _ in range(N_NEW):
        generated.append(int(out["logits"][0, -1].argmax()))
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k != "logits"}
        out = _ort_run(onnx_bundle / "model.onnx", generated[-1:], past)
    assert generated == _hf_greedy(model_files.tiny_llama(), prompt_ids)


def test_bundle_files_gives_relative_paths(transformers_bundle: Path) -> None:
    paths = sorted(transformers_bundle.iterdir())
    pairs = model_files.bundle_files(paths, transformers_bundle)
    assert [rel for rel, _ in pairs] == [p.name for p in paths]
    assert all(abs_path.is_absolute() and abs_path.is_file() for _, abs_path in pairs)

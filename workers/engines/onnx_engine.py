"""ONNX engine (beta): onnxruntime with a generation loop, past key values when exported."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.engines.base import (
    Embeddings,
    EngineError,
    SamplingParams,
    UnsupportedForModel,
    never,
)
from workers.engines.loop import prefill_chunk
from workers.engines.sampling import Sampler
from workers.engines.tokens import HFTokens, TokenizerEngine

_PAST = "past_key_values."
_PRESENT = "present."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class _Graph:
    """What the exported graph takes: past key values or not, position ids or not."""

    def __init__(self, session: Any, config: dict[str, Any]) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(_PAST)]
        self.present_names = [_PRESENT + n[len(_PAST) :] for n in self.past_names]
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        self.outputs = ["logits", *self.present_names]
        heads = config.get("num_key_value_heads") or config.get("num_attention_heads", 1)
        head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(
            config.get("num_attention_heads", 1), 1
        )
        self.empty_past = {
            n: np.zeros((1, heads, 0, head_dim), dtype=_DTYPES.get(inputs[n].type, np.float32))
            for n in self.past_names
        }


class _Stepper:
    """One session run per call; feeds only the new token when the graph keeps a cache.

    With a cache, `feed` runs a chunk of the prompt into it first (a long prompt's prefill).
    """

    def __init__(self, engine: OnnxEngine, prompt_ids: list[int], sampler: Sampler) -> None:
        self._session = engine.session
        self._graph = engine.graph
        self._ids = list(prompt_ids)
        self._past: dict[str, np.ndarray] = dict(engine.graph.empty_past)
        self._done = 0  # tokens already inside the past key values
        self._sampler = sampler

    def feed(self, low: int, high: int) -> None:
        """Prompt positions `[low, high)` into the cache (`low` is where the last feed ended)."""
        presents = self._run(low, high, self._graph.present_names)
        self._past = dict(zip(self._graph.past_names, presents, strict=True))
        self._done = high

    def __call__(self) -> int:
        graph = self._graph
        start = self._done if graph.past_names else 0
        outputs = self._run(start, len(self._ids), graph.outputs)
        if graph.past_names:
            self._past = dict(zip(graph.past_names, outputs[1:], strict=True))
            self._done = len(self._ids)
        token = self._sampler(torch.from_numpy(np.asarray(outputs[0][0, -1])))
        self._ids.append(token)
        return token

    def _run(self, start: int, stop: int, names: list[str]) -> list[Any]:
        graph = self._graph
        new = np.asarray([self._ids[start:stop]], dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": new, **self._past}
        if graph.has_mask:
            feeds["attention_mask"] = np.ones((1, stop), dtype=np.int64)
        if graph.has_positions:
            feeds["position_ids"] = np.arange(start, stop, dtype=np.int64)[None]
        return list(self._session.run(names, feeds))


class OnnxEngine(TokenizerEngine):
    """A decoder-only ONNX export run by onnxruntime."""

    def __init__(self, session: Any, config: dict[str, Any], tokens: HFTokens, cap: int) -> None:
        self.session = session
        self.graph = _Graph(session, config)
        self.tokens = tokens
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.prefill_chunk = prefill_chunk(self.device)
        context = config.get("max_position_embeddings")
        if not isinstance(context, int) or context <= 0:
            raise EngineError("config.json does not give max_position_embeddings")
        self.context_length = min(context, cap)
        self.has_chat_template = tokens.chat is not None

    def _stepper(self, prompt_ids: list[int], params: SamplingParams) -> _Stepper:
        return _Stepper(self, prompt_ids, Sampler(params))

    def _feed_chunk(self) -> int:
        # Without a cache every step runs the whole sequence: there is no prefill to split.
        return self.prefill_chunk if self.graph.past_names else 0

    def embed(self, texts: Sequence[str], cancelled: Callable[[], bool] = never) -> Embeddings:
        # An exported decoder graph gives logits, not hidden states, to pool.
        raise UnsupportedForModel("embeddings are not available for ONNX models")


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise EngineError("device 'cuda' was asked for but onnxruntime has no CUDA provider")
    if device != "cpu" and cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(
    bundle_dir: Path, model_path: Path, device: str, threads: int, context_cap: int
) -> OnnxEngine:
    """Open the session (external data resolves beside the .onnx file) and the tokenizer."""
    import onnxruntime as ort

    try:
        config = json.loads((bundle_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"config.json is missing or unreadable: {exc}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=_providers(device))
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise EngineError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
    eos = [config.get("eos_token_id")]
    return OnnxEngine(session, config, HFTokens(bundle_dir, eos), context_cap)

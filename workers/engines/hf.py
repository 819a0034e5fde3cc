"""Transformers engine: Hugging Face folders and raw `.pt/.pth` state dicts with a config."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.engines.base import (
    Cancelled,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    SamplingParams,
    never,
)
from workers.engines.loop import prefill_chunk
from workers.engines.sampling import Sampler
from workers.engines.tokens import HFTokens, TokenizerEngine


class _Stepper:
    """One forward pass per call, reusing the KV cache; returns the sampled token.

    `feed` runs a chunk of the prompt into the cache first (a long prompt's prefill); the
    first call takes the rest of the prompt.
    """

    def __init__(self, engine: HFEngine, prompt_ids: list[int], sampler: Sampler) -> None:
        self._model = engine.model
        self._extra = engine.forward_extra
        self._cache_arg = engine.cache_arg
        self._device = engine.device
        self._prompt = prompt_ids
        self._fed = 0  # prompt tokens already in the cache
        self._pending: torch.Tensor | None = None
        self._past: Any = None
        self._sampler = sampler

    def feed(self, low: int, high: int) -> None:
        """Prompt positions `[low, high)` into the cache (`low` is where the last feed ended)."""
        with torch.inference_mode():
            out = self._forward(torch.tensor([self._prompt[low:high]], device=self._device))
        self._past = _cache_of(out)
        self._fed = high

    def __call__(self) -> int:
        if self._pending is None:
            self._pending = torch.tensor([self._prompt[self._fed :]], device=self._device)
        with torch.inference_mode():
            out = self._forward(self._pending)
            self._past = _cache_of(out)
            token = self._sampler(out.logits[0, -1])
        self._pending = torch.tensor([[token]], device=self._device)
        return token

    def _forward(self, input_ids: torch.Tensor) -> Any:
        cache = {self._cache_arg: self._past}
        return self._model(input_ids=input_ids, use_cache=True, **cache, **self._extra)


def _cache_of(out: Any) -> Any:
    """The KV cache a forward pass returned (`past_key_values` before transformers 5.24)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class HFEngine(TokenizerEngine):
    """A causal LM run by transformers with a hand-written token loop."""

    def __init__(self, model: Any, tokens: HFTokens, device: str, context_cap: int) -> None:
        self.model = model
        self.tokens = tokens
        self.device = device
        self.prefill_chunk = prefill_chunk(device)
        self.context_length = min(_model_context(model.config), context_cap)
        self.has_chat_template = tokens.chat is not None
        # Only the last position's logits are needed; skip the rest where the model allows.
        params = inspect.signature(model.forward).parameters
        self.forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5.24 renamed the cache argument (the old name warns until 5.40).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def _stepper(self, prompt_ids: list[int], params: SamplingParams) -> _Stepper:
        return _Stepper(self, prompt_ids, Sampler(params, self.device))

    def _feed_chunk(self) -> int:
        return self.prefill_chunk

    def embed(self, texts: Sequence[str], cancelled: Callable[[], bool] = never) -> Embeddings:
        """Mean of the last hidden state over each text's tokens, scaled to unit length."""
        vectors, total = [], 0
        for text in texts:
            ids = self.tokens.encode_text(text)
            if len(ids) > self.context_length:
                raise ContextLengthExceeded(len(ids), self.context_length)
            if cancelled():
                raise Cancelled()
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([ids], device=self.device),
                    output_hidden_states=True,
                    use_cache=False,
                    **self.forward_extra,
                )
                pooled = out.hidden_states[-1][0].float().mean(dim=0)
                vectors.append(torch.nn.functional.normalize(pooled, dim=0).tolist())
            total += len(ids)
        return Embeddings(vectors, total)


def _model_context(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EngineError("config.json does not say the model's context length")


def _config_eos(model: Any) -> list[Any]:
    generation = getattr(model, "generation_config", None)
    return [model.config.eos_token_id, getattr(generation, "eos_token_id", None)]


def load_transformers(bundle_dir: Path, device: str, context_cap: int) -> HFEngine:
    """A Hugging Face folder with safetensors weights (uploaded, or converted from `.bin`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(bundle_dir),
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=True,  # never the pickle fallback (.bin was converted)
            dtype=torch.float32 if device == "cpu" else "auto",
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise EngineError(f"transformers could not load the model: {exc}") from exc
    model.to(device).eval()
    return HFEngine(model, HFTokens(bundle_dir, _config_eos(model)), device, context_cap)


def load_pytorch(bundle_dir: Path, weights: list[Path], device: str, context_cap: int) -> HFEngine:
    """A `.pt/.pth` state dict beside config.json, as the safetensors converted at validation."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    state: dict[str, torch.Tensor] = {}
    try:
        for path in weights:
            state.update(load_file(path, device="cpu"))
        config = AutoConfig.from_pretrained(
            str(bundle_dir), trust_remote_code=False, local_files_only=True
        )
        with no_init_weights():  # the state dict overwrites every weight anyway
            model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, trust_remote_code=False
            )
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise EngineError(f"could not build the model from config.json: {exc}") from exc
    dtype = torch.float32 if device == "cpu" else _floating_dtype(state)
    model.to(device=device, dtype=dtype).eval()
    return HFEngine(model, HFTokens(bundle_dir, _config_eos(model)), device, context_cap)


def _floating_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)

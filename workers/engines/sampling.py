"""Token sampling from logits for the engines that own their loop (transformers, ONNX)."""

from __future__ import annotations

import torch

from workers.engines.base import SamplingParams, resolve_seed


class Sampler:
    """Pick the next token: greedy at temperature 0, else top-k → top-p → seeded draw."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.greedy = params.temperature <= 0.0 or params.top_k == 1
        self.temperature = max(params.temperature, 1e-5)
        self.top_k = params.top_k
        self.top_p = params.top_p
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(resolve_seed(params.seed))

    def __call__(self, logits: torch.Tensor) -> int:
        """The token id drawn from a 1-D logits vector."""
        if self.greedy:
            return int(torch.argmax(logits))
        values, ids = self._candidates(logits.float())
        probs = torch.softmax(values / self.temperature, dim=-1)
        if self.top_p < 1.0 and ids is not None:
            # Sorted descending: keep the smallest prefix whose mass reaches top_p.
            before = torch.cumsum(probs, dim=-1) - probs
            keep = max(1, int((before < self.top_p).sum()))
            probs, ids = probs[:keep], ids[:keep]
        choice = int(torch.multinomial(probs, 1, generator=self._generator))
        return choice if ids is None else int(ids[choice])

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if 0 < self.top_k < logits.shape[-1]:
            values, ids = torch.topk(logits, self.top_k)
            return values, ids
        if self.top_p < 1.0:
            values, ids = torch.sort(logits, descending=True)
            return values, ids
        return logits, None

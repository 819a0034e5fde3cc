"""Token sampling from logits."""

from __future__ import annotations

import torch

from workers.engines.base import SamplingParams
from workers.engines.sampling import Sampler


def logits() -> torch.Tensor:
    return torch.tensor([0.1, 3.0, 2.9, -1.0, 2.8, 0.0])


def draws(params: SamplingParams, n: int = 50) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits()) for _ in range(n)]


def test_sample_temperature_zero_is_argmax() -> None:
    assert set(draws(SamplingParams(temperature=0.0))) == {1}


def test_sample_top_k_one_is_argmax() -> None:
    assert set(draws(SamplingParams(temperature=1.5, top_k=1))) == {1}


def test_sample_same_seed_gives_same_draws() -> None:
    params = SamplingParams(temperature=1.0, top_k=0, seed=7)
    assert draws(params) == draws(params)


def test_sample_different_seeds_give_different_draws() -> None:
    outs = {tuple(draws(SamplingParams(temperature=1.0, top_k=0, seed=s))) for s in range(4)}
    assert len(outs) > 1


def test_sample_top_k_restricts_to_best_tokens() -> None:
    assert set(draws(SamplingParams(temperature=5.0, top_k=3, seed=1), 300)) == {1, 2, 4}


def test_sample_top_p_keeps_smallest_nucleus() -> None:
    # Very small top_p keeps only the most likely token.
    assert set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.01, seed=3))) == {1}
    wide = set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=3), 300))
    assert wide <= {1, 2, 4} and len(wide) > 1

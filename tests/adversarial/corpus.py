"""The adversarial corpus: every hostile upload, built at test time from honest fixtures."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.adversarial.case import Bases, Case
from tests.adversarial.corpus_formats import onnx_cases, safetensors_cases, transformers_cases
from tests.adversarial.corpus_gguf import gguf_cases, ssti_gguf
from tests.adversarial.corpus_pickle import pickle_cases
from tests.adversarial.corpus_zip import zip_cases


def build_corpus(bases: Bases, scratch: Path) -> list[Case]:
    """Every case, with unique names; `scratch` holds files too big to keep in memory twice."""
    cases = [
        *pickle_cases(bases),
        *zip_cases(bases),
        *gguf_cases(bases),
        ssti_gguf(bases, scratch / "ssti.gguf"),
        *safetensors_cases(bases),
        *onnx_cases(bases),
        *transformers_cases(bases),
    ]
    dup = [name for name, n in Counter(c.name for c in cases).items() if n > 1]
    assert not dup, f"duplicate corpus case names: {dup}"
    return cases


def sizes_by_family(cases: list[Case]) -> dict[str, int]:
    return dict(Counter(c.family for c in cases))

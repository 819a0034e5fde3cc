"""The engine alone, in a plain process: the baseline every inference benchmark compares with.

`python -m tests.bench.engine_alone SPEC` loads one model as the runner child does (same
loader, device and threads), generates greedily as the runner drives it, minus the pipe, and
prints one JSON line: a list of runs. Its own process, not the benchmark's: a benchmark that
has imported torch cannot also load a CUDA build of llama.cpp (the two crash together).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WARMUP = 3  # warm caches and llama.cpp's buffers first


@dataclass
class EngineRun:
    text: str
    tokens: int
    total_ms: float
    ttft_ms: float


def run_engine(engine: Any, prompt: str, max_tokens: int) -> EngineRun:
    """One generation as the runner child drives it, minus the pipe."""
    from workers.engines.base import GenerateRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_k=40, top_p=1.0, seed=7)
    pieces: list[str] = []
    t0 = time.perf_counter()
    ttft = 0.0
    stream = engine.generate(GenerateRequest(prompt=prompt, params=params), lambda: False)
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            result = stop.value
            break
        ttft = ttft or (time.perf_counter() - t0) * 1000
        pieces.append(piece)
    total = (time.perf_counter() - t0) * 1000
    return EngineRun("".join(pieces), result.completion_tokens, total, ttft)


def _prompts(spec: dict[str, Any]) -> Iterator[str]:
    """The spec's prompt each time; with `distinct`, numbered at its start, so that no run
    finds its prompt in the engine's cache (each pays the whole prefill)."""
    for i in itertools.count():
        yield numbered(spec["prompt"], i) if spec.get("distinct") else spec["prompt"]


def numbered(prompt: str, i: int) -> str:
    """A prompt that shares nothing cached with the same prompt numbered otherwise."""
    return f"Story number {i}. {prompt}"


def run_batched(engine: Any, spec: dict[str, Any]) -> list[EngineRun]:
    """`batch` generations kept decoding together (one ends, the next is admitted) for at
    least `min_seconds`: one run whose tokens and time are the totals, as the runner's
    batcher serves `batch` concurrent requests."""
    from workers.engines.base import GenerateRequest, SamplingParams

    params = SamplingParams(
        max_tokens=spec["max_tokens"], temperature=0.0, top_k=40, top_p=1.0, seed=7
    )
    request = GenerateRequest(prompt=spec["prompt"], params=params)
    batcher = engine.batcher(spec["batch"])
    try:
        tokens, t0 = 0, time.perf_counter()
        while True:
            more = time.perf_counter() - t0 < spec["min_seconds"]
            while more and not batcher.full:
                batcher.admit(request, lambda: False, None)
            if not batcher.active:
                break
            for seq in batcher.step():
                if seq.stream.result is not None:
                    tokens += seq.stream.result.completion_tokens
                seq.pieces.clear()
        total = (time.perf_counter() - t0) * 1000
        return [EngineRun("", tokens, total, 0.0)]
    finally:
        batcher.close()


def main(spec: dict[str, Any]) -> list[EngineRun]:
    """`runs` generations, then more until `min_seconds` have passed (`batch` > 1: together).

    `gap_ms`: idle this long before each timed generation, as a runner idles between two
    requests at concurrency 1 (the engine is slower after a pause: caches and clocks).
    """
    from workers.engines.loader import load_engine

    engine: Any = load_engine(
        Path(spec["path"]), spec["fmt"], device=spec["device"], threads=spec["threads"]
    )
    try:
        if spec.get("batch", 1) > 1:
            run_engine(engine, spec["prompt"], spec["max_tokens"])  # warm
            return run_batched(engine, spec)
        prompts = _prompts(spec)
        for _ in range(WARMUP):
            run_engine(engine, next(prompts), spec["max_tokens"])
        t0 = time.perf_counter()
        runs = []
        for _ in range(spec["runs"]):
            if spec.get("gap_ms"):  # the back-to-back baseline makes no call between runs
                time.sleep(spec["gap_ms"] / 1000)
            runs.append(run_engine(engine, next(prompts), spec["max_tokens"]))
        while time.perf_counter() - t0 < spec["min_seconds"]:
            runs.append(run_engine(engine, next(prompts), spec["max_tokens"]))
        return runs
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


if __name__ == "__main__":
    print(json.dumps([asdict(r) for r in main(json.loads(sys.argv[1]))]), flush=True)

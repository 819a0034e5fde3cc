"""A runner child with one injected fault, for the cog-style failure fixtures.

`python -m tests.workers.fault_child MODE` behaves like `workers.runner.child` but wraps the
engine the real loader returns: `slow` sleeps between tokens,
`slow_endless` also never stops on its own, `exit_in_generate` calls
os._exit after two tokens, `ignore_cancel` never stops, `raise_in_generate` raises a bare
RuntimeError, `print_in_setup` writes junk to stdout from Python and from C before loading,
`bad_vector` answers an Embed with strings for numbers, `short_vectors` with one vector less,
`slow_embed` embeds one text at a time, 50 ms each (a cancel is looked for before each),
`non_text_token` generates a number where a token's text belongs, `babble` writes an event
line that never ends, `silent_until_cancelled` sends no token until cancelled (a long
prefill), `busy_one_call` computes for 1.5 s without looking for a cancel (one long engine
call), `stuck_one_call` waits 30 s without computing or looking. The `batch_` modes keep
the engine's batcher: `batch_exit` calls os._exit at the third decode step, `batch_stray_tag`
writes a request's tokens under a tag no request has from the third step on, `batch_slow`
sleeps before every step.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from workers.engines.base import Embeddings, Engine, GenerateRequest, GenerationResult, never
from workers.runner import child
from workers.runner.protocol import MAX_LINE

MODE = sys.argv[1] if len(sys.argv) > 1 else "slow"


class Faulty:
    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.context_length = inner.context_length
        self.has_chat_template = inner.has_chat_template

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    def __getattr__(self, name: str) -> Any:
        if name == "batcher" and MODE.startswith("batch_"):
            return lambda parallel: FaultyBatcher(self.inner.batcher(parallel))  # type: ignore[attr-defined]
        raise AttributeError(name)

    def embed(self, texts: Sequence[str], cancelled: Callable[[], bool] = never) -> Embeddings:
        if MODE == "slow_embed":  # one text at a time, 50 ms each
            parts = []
            for text in texts:
                time.sleep(0.05)
                parts.append(self.inner.embed([text], cancelled))
            vectors = [v for part in parts for v in part.vectors]
            return Embeddings(vectors, sum(part.prompt_tokens for part in parts))
        real = self.inner.embed(texts, cancelled)
        if MODE == "bad_vector":
            return Embeddings([["x"] * len(v) for v in real.vectors], real.prompt_tokens)  # type: ignore[misc]
        if MODE == "short_vectors":
            return Embeddings(real.vectors[:-1], real.prompt_tokens)
        return real

    def generate(
        self, request: GenerateRequest, cancelled: Callable[[], bool]
    ) -> Generator[str, None, GenerationResult]:
        if MODE == "raise_in_generate":
            raise RuntimeError("boom in generate")
        if MODE == "babble":  # more than a line may hold, no newline, then silence
            WRITER[0].write(b"x" * (MAX_LINE + 100_000))
            time.sleep(600)
        if MODE == "silent_until_cancelled":  # a long prefill: no token, stops when cancelled
            deadline = time.monotonic() + 120
            while not cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            return GenerationResult("cancelled", 1, 0)
        if MODE in ("busy_one_call", "stuck_one_call"):  # one long engine call, deaf meanwhile
            end = time.monotonic() + (1.5 if MODE == "busy_one_call" else 30)
            while time.monotonic() < end:
                if MODE == "stuck_one_call":
                    time.sleep(0.05)  # waits on something: its CPU time stays put
            return GenerationResult("cancelled" if cancelled() else "length", 1, 0)
        n = 0
        check = (lambda: False) if MODE == "ignore_cancel" else cancelled
        while True:
            for piece in self.inner.generate(request, check):
                if MODE == "exit_in_generate" and n == 2:
                    os._exit(3)
                if MODE == "non_text_token" and n == 1:
                    piece = 7  # type: ignore[assignment]
                if MODE in ("slow", "slow_endless", "ignore_cancel"):
                    time.sleep(0.05)
                if check():
                    return GenerationResult("cancelled", 1, n)
                n += 1
                yield piece
            if MODE == "slow_endless":
                # A tiny random model may emit end-of-sequence after a few tokens: keep going
                # with filler, without re-entering the engine, until cancelled or timed out.
                while not check():
                    time.sleep(0.05)
                    n += 1
                    yield "."
                return GenerationResult("cancelled", 1, n)
            if MODE != "ignore_cancel":
                return GenerationResult("length", 1, n)


class FaultyBatcher:
    """The real batcher, with a fault at its third step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self) -> Any:
        self.steps += 1
        if MODE == "batch_slow":
            time.sleep(0.05)
        elif MODE == "batch_exit" and self.steps == 3:
            os._exit(3)
        elif MODE == "batch_stray_tag" and self.steps == 3:
            for seq in self.inner.active:
                seq.owner.sink._tag = "stray"
        return self.inner.step()


def _load(setup: Any) -> Engine:
    if MODE == "print_in_setup":
        print("junk from python print")
        libc = ctypes.CDLL(None)
        libc.puts(b"junk from C puts")
        libc.fflush(None)
    return Faulty(_real_load(setup))


def _reserve() -> child.EventWriter:
    WRITER.append(_real_reserve())
    return WRITER[0]


_real_load = child.load
child.load = _load
WRITER: list[child.EventWriter] = []
_real_reserve = child.reserve_stdout
child.reserve_stdout = _reserve

if __name__ == "__main__":
    code = child.main()
    sys.stderr.flush()
    os._exit(code)

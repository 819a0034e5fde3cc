"""The generation loop every engine shares: limits, cancel, stop strings, counting."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Protocol

from workers.engines.base import (
    ContextLengthExceeded,
    FinishReason,
    GenerationResult,
    SamplingParams,
)
from workers.engines.stops import StopMatcher


class TokenDecoder(Protocol):
    """Turns generated token ids into text, one id at a time."""

    def step(self, token: int) -> str:
        """Text completed by this token ("" while a character is still partial)."""
        ...

    def flush(self) -> str:
        """Whatever is still pending at the end of the stream."""
        ...


def check_context(prompt_tokens: int, context_length: int) -> int:
    """Room left for generated tokens; a prompt that leaves none is refused."""
    if prompt_tokens >= context_length:
        raise ContextLengthExceeded(prompt_tokens, context_length)
    return context_length - prompt_tokens


# Prompt tokens one forward pass takes before a cancel is looked at again: a long prompt is
# fed in chunks rather than in one call that a cancel cannot interrupt. On a CPU the chunk
# size barely moves prefill speed (a 28 M Q8_0 GGUF, 1,000 tokens on this 2-vCPU host:
# 1,107-1,228 tokens/s on one thread, 1,609-1,821 on two, for 64-512 tokens a batch), so it is
# small there; a GPU needs big batches to be busy.
CPU_PREFILL_CHUNK = 128
GPU_PREFILL_CHUNK = 512


def prefill_chunk(device: str) -> int:
    """Prompt tokens per forward pass on `device` ("cpu" or "cuda")."""
    return CPU_PREFILL_CHUNK if device == "cpu" else GPU_PREFILL_CHUNK


def prefill(
    feed: Callable[[int, int], None],
    start: int,
    end: int,
    chunk: int,
    cancelled: Callable[[], bool],
) -> bool:
    """Feed prompt positions `[start, end)` in chunks of `chunk`, all but the last one, which
    the first sampling step evaluates with its logits; look at `cancelled()` before each.

    A prompt that fits in one chunk feeds nothing here (it stays a single forward pass).
    Returns False once cancelled: what was fed stays fed (a cache may keep it).
    """
    for low in range(start, end - chunk, chunk):
        if cancelled():
            return False
        feed(low, low + chunk)
    return True


def stream_tokens(
    next_token: Callable[[], int],
    *,
    decoder: TokenDecoder,
    is_eos: Callable[[int], bool],
    params: SamplingParams,
    cancelled: Callable[[], bool],
    prompt_tokens: int,
    room: int,
) -> Generator[str, None, GenerationResult]:
    """Drive `next_token` until length, end of sequence, a stop string or cancel.

    Every sampled token counts as a completion token, including the end-of-sequence token
    and the tokens that complete a stop string: the model computed them.
    """
    stream = TokenStream(decoder, is_eos, params, prompt_tokens, room)
    while stream.result is None:
        piece = stream.finish("cancelled") if cancelled() else stream.push(next_token())
        if piece:
            yield piece
    return stream.result


class TokenStream:
    """The same loop, pushed one token at a time: for a scheduler that samples many
    sequences per step (`stream_tokens` pulls; both end the same way).

    `push` and `finish` return the text to send now; `result` is set once the stream ended.
    """

    def __init__(
        self,
        decoder: TokenDecoder,
        is_eos: Callable[[int], bool],
        params: SamplingParams,
        prompt_tokens: int,
        room: int,
    ) -> None:
        self._decoder, self._is_eos = decoder, is_eos
        self._stops = StopMatcher(params.stop)
        self._limit = min(params.max_tokens, room)
        self.prompt_tokens = prompt_tokens
        self.count = 0
        self.result: GenerationResult | None = None
        if self._limit <= 0:
            self.finish("length")

    def push(self, token: int) -> str:
        """One sampled token (the stream must not have ended)."""
        self.count += 1
        if self._is_eos(token):
            return self.finish("stop")
        piece = self._stops.push(self._decoder.step(token))
        if self._stops.stopped:
            self.result = GenerationResult("stop", self.prompt_tokens, self.count)
            return piece
        if self.count >= self._limit:
            return piece + self.finish("length")
        return piece

    def finish(self, reason: FinishReason) -> str:
        """End the stream: what the decoder and the stop matcher still held."""
        tail = self._stops.push(self._decoder.flush())
        tail += self._stops.flush()
        if self._stops.stopped:
            reason = "stop"
        self.result = GenerationResult(reason, self.prompt_tokens, self.count)
        return tail

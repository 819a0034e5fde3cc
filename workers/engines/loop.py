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
    stops = StopMatcher(params.stop)
    limit = min(params.max_tokens, room)
    count = 0
    reason: FinishReason = "length"
    while count < limit:
        if cancelled():
            reason = "cancelled"
            break
        token = next_token()
        count += 1
        if is_eos(token):
            reason = "stop"
            break
        piece = stops.push(decoder.step(token))
        if piece:
            yield piece
        if stops.stopped:
            return GenerationResult("stop", prompt_tokens, count)
    tail = stops.push(decoder.flush())
    tail += stops.flush()
    if tail:
        yield tail
    if stops.stopped:
        reason = "stop"
    return GenerationResult(reason, prompt_tokens, count)

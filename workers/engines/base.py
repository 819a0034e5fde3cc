"""What every engine adapter offers the runner: prepare a prompt, stream text pieces."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 40
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """One generation; `raw` sends the prompt verbatim, else as a chat-template user turn."""

    prompt: str
    raw: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when it gave none."""
    return seed if seed is not None else secrets.randbits(63)


class EngineError(Exception):
    """A model-level failure: the request fails, the runner stays usable."""

    code = "INFERENCE_FAILED"


class ContextLengthExceeded(EngineError):
    code = "CONTEXT_LENGTH_EXCEEDED"

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens; the model's context is {context_length} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class Engine(Protocol):
    """A loaded model. One request at a time; `generate` yields decoded text pieces."""

    context_length: int
    has_chat_template: bool
    device: str  # what the model actually runs on: "cpu" or "cuda"

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        """Tokens the prompt takes after templating (raises ContextLengthExceeded)."""
        ...

    def generate(
        self, request: GenerateRequest, cancelled: Callable[[], bool]
    ) -> Generator[str, None, GenerationResult]:
        """Yield text pieces as they are decoded; return the result when done.

        Stops at `max_tokens` ("length"), at end-of-sequence or a stop string ("stop"; the stop
        string itself is not yielded), or when `cancelled()` turns true ("cancelled").
        """
        ...

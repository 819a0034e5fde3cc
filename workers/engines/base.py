"""What every engine adapter offers the runner: prepare a prompt, stream text pieces."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Sequence
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


ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: `messages` rendered with the chat template, or a `prompt`.

    A prompt is one user turn of the template, or sent verbatim with `raw` (or when the model
    has no template). Messages need the model's template: without one the request fails.
    """

    prompt: str = ""
    raw: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] | None = None

    @property
    def templated(self) -> bool:
        """Whether the chat template renders this request (if the model has one)."""
        return self.messages is not None or not self.raw

    def conversation(self) -> list[dict[str, str]]:
        """What the chat template sees as `messages`."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class Embeddings:
    """One vector per input text, in order, and the tokens the texts took."""

    vectors: list[list[float]]
    prompt_tokens: int


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


class ChatTemplateMissing(EngineError):
    code = "CHAT_TEMPLATE_MISSING"

    def __init__(self) -> None:
        super().__init__("this model has no chat template; send a prompt instead of messages")


class Cancelled(EngineError):
    """The request was cancelled before the engine finished it; nothing is returned."""

    code = "JOB_CANCELLED"

    def __init__(self) -> None:
        super().__init__("cancelled while running")


def never() -> bool:
    """A cancel check for a request nobody can cancel."""
    return False


class UnsupportedForModel(EngineError):
    """The operation exists, but not for this model's format."""

    code = "UNSUPPORTED_FOR_MODEL"


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

    def embed(self, texts: Sequence[str], cancelled: Callable[[], bool] = never) -> Embeddings:
        """One unit-length vector per text (raises UnsupportedForModel where impossible).

        Looks at `cancelled()` between its engine calls and raises Cancelled once it is true.
        """
        ...

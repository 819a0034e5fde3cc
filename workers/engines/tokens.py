"""Tokenizer handling for bundles with Hugging Face tokenizer files (transformers, ONNX)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any, Protocol

from workers.engines.base import EngineError, GenerateRequest, GenerationResult, SamplingParams
from workers.engines.chat import ChatTemplate, prompt_text
from workers.engines.loop import check_context, prefill, stream_tokens

# Prompt tokens given to the stream decoder so the first piece gets its leading space right.
_DECODE_CONTEXT = 4


class StreamDecoder:
    """Incremental detokeniser on top of `tokenizers.decoders.DecodeStream`.

    Only the newest tokens are decoded at each step; bytes of a character split across
    tokens stay pending inside the stream until the character is complete.
    """

    def __init__(self, backend: Any, prompt_ids: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(ids=prompt_ids[-_DECODE_CONTEXT:], skip_special_tokens=True)
        self._pending: list[int] = []  # tokens the stream has not turned into text yet

    def step(self, token: int) -> str:
        text = self._stream.step(self._backend, token)
        if text is None:
            self._pending.append(token)
            return ""
        self._pending.clear()
        return str(text)

    def flush(self) -> str:
        # An unfinished character at the end decodes to U+FFFD, as a full decode would.
        pending, self._pending = self._pending, []
        return str(self._backend.decode(pending, skip_special_tokens=True)) if pending else ""


class HFTokens:
    """The bundle's tokenizer: prompt encoding (raw or chat), decoding, end-of-sequence ids."""

    def __init__(self, bundle_dir: Path, config_eos: Iterable[Any] = ()) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(
                str(bundle_dir), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"could not load the tokenizer: {exc}") from exc
        self.backend: Any = getattr(self.tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise EngineError("the bundle needs a fast tokenizer (tokenizer.json)")
        self.eos_ids = frozenset(_ids(self.tokenizer.eos_token_id, *config_eos))
        self.chat = _chat_template(self.tokenizer)

    def encode(self, request: GenerateRequest) -> list[int]:
        """Prompt token ids: verbatim with special tokens, or the rendered conversation."""
        text = prompt_text(self.chat, request)
        if text is None:
            return self.encode_text(request.prompt)
        # The template writes its own special tokens (bos) as text, like apply_chat_template.
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_text(self, text: str) -> list[int]:
        """A text's token ids as the model reads plain input (special tokens added)."""
        return list(self.backend.encode(text, add_special_tokens=True).ids)

    def decoder(self, prompt_ids: list[int]) -> StreamDecoder:
        return StreamDecoder(self.backend, prompt_ids)


class Stepper(Protocol):
    """One forward pass per call, returning the sampled token; `feed` runs prompt positions
    `[low, high)` into the cache ahead of the first call."""

    def __call__(self) -> int: ...

    def feed(self, low: int, high: int) -> None: ...


class TokenizerEngine:
    """An engine's prompt counting and generation loop over a bundle's tokenizer: what the
    transformers and ONNX engines share. They give `_stepper` and `_feed_chunk`."""

    tokens: HFTokens
    context_length: int

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        count = len(self.tokens.encode(request))
        check_context(count, self.context_length)
        return count

    def generate(
        self, request: GenerateRequest, cancelled: Callable[[], bool]
    ) -> Generator[str, None, GenerationResult]:
        ids = self.tokens.encode(request)
        room = check_context(len(ids), self.context_length)
        step = self._stepper(ids, request.params)
        chunk = self._feed_chunk()
        if chunk and not prefill(step.feed, 0, len(ids), chunk, cancelled):
            return GenerationResult("cancelled", len(ids), 0)
        return (
            yield from stream_tokens(
                step,
                decoder=self.tokens.decoder(ids),
                is_eos=self.tokens.eos_ids.__contains__,
                params=request.params,
                cancelled=cancelled,
                prompt_tokens=len(ids),
                room=room,
            )
        )

    def _stepper(self, prompt_ids: list[int], params: SamplingParams) -> Stepper:
        raise NotImplementedError

    def _feed_chunk(self) -> int:
        """Prompt tokens a forward pass feeds ahead of the first step (0: the whole prompt
        goes in the first step)."""
        raise NotImplementedError


def _ids(*values: Any) -> list[int]:
    out: list[int] = []
    for value in values:
        if isinstance(value, int):
            out.append(value)
        elif isinstance(value, list | tuple):
            out.extend(v for v in value if isinstance(v, int))
    return out


def _chat_template(tokenizer: Any) -> ChatTemplate | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # named templates: the default one is the chat template
        source = source.get("default")
    if not isinstance(source, str) or not source.strip():
        return None
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {n: str(getattr(tokenizer, n, None) or "") for n in names}
    return ChatTemplate(source, special)

"""Render a model's chat template in a sandbox: uploaded templates are untrusted code.

Used for GGUF templates (file metadata) and tokenizer templates alike, so no library ever
renders a user-provided template outside this sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers.engines.base import ChatTemplateMissing, EngineError, GenerateRequest

# A template that builds a bigger string or list than this by `*` is hostile, not chatty.
MAX_REPEAT_ITEMS = 1_000_000
MAX_POWER_EXPONENT = 256


class ChatTemplateError(EngineError):
    """The model's chat template is unsafe, invalid or raised an error while rendering."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template itself."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but touching an unsafe attribute fails at once."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is not allowed")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError("exponent too large")
            return left**right
        sizes = [len(v) for v in (left, right) if isinstance(v, str | list | tuple)]
        counts = [v for v in (left, right) if isinstance(v, int)]
        if sizes and counts and sizes[0] * max(counts[0], 0) > MAX_REPEAT_ITEMS:
            raise SecurityError("repetition too large")
        return left * right


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Same output as transformers' chat-template `tojson` filter.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled template; `render` turns a conversation into the model's prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._compiled: Any = None

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The text of the conversation, ready for the assistant's next turn."""
        context = {
            **self.special_tokens,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": True,
            "tools": None,
            "documents": None,
        }
        try:
            return str(self._template().render(**context))
        except ChatTemplateError:
            raise
        except SecurityError as exc:
            raise ChatTemplateError("CHAT_TEMPLATE_UNSAFE", str(exc)) from None
        except _TemplateRaised as exc:
            raise ChatTemplateError("CHAT_TEMPLATE_ERROR", str(exc)) from None
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise ChatTemplateError("CHAT_TEMPLATE_ERROR", f"{type(exc).__name__}: {exc}") from None
        except RecursionError:
            raise ChatTemplateError("CHAT_TEMPLATE_ERROR", "template recursion too deep") from None

    def _template(self) -> Any:
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.source)
            except SecurityError as exc:
                raise ChatTemplateError("CHAT_TEMPLATE_UNSAFE", str(exc)) from None
            except TemplateSyntaxError as exc:
                raise ChatTemplateError("CHAT_TEMPLATE_INVALID", str(exc)) from None
        return self._compiled


def render_chat(source: str, prompt: str, special_tokens: dict[str, str]) -> str:
    """Render `source` once for `prompt` as one user turn (engines keep a ChatTemplate)."""
    return ChatTemplate(source, special_tokens).render([{"role": "user", "content": prompt}])


def prompt_text(chat: ChatTemplate | None, request: GenerateRequest) -> str | None:
    """The rendered conversation, or None when the prompt goes to the model verbatim.

    A prompt falls back to verbatim on a model without a template (as `/v1/infer` always
    did); messages cannot, so they fail with CHAT_TEMPLATE_MISSING.
    """
    if not request.templated:
        return None
    if chat is None:
        if request.messages is not None:
            raise ChatTemplateMissing()
        return None
    return chat.render(request.conversation())

"""Chat templates render in a sandbox; hostile ones fail cleanly and run nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.model_files import CHAT_TEMPLATE
from workers.engines.base import EngineError
from workers.engines.chat import ChatTemplate, ChatTemplateError, render_chat

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def test_render_template_matches_transformers(tokenizer: object) -> None:
    expected = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert render_chat(CHAT_TEMPLATE, "Hi there", SPECIAL) == expected


def test_render_template_helpers_available() -> None:
    source = "{{ strftime_now('%Y') | length }}|{{ messages | tojson }}"
    assert render_chat(source, "é", {}) == '4|[{"role": "user", "content": "é"}]'


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ 'a' * 10**9 }}",
        "{{ 2 ** 100000 }}",
    ],
)
def test_render_template_unsafe_raises_clean_error(source: str) -> None:
    with pytest.raises(EngineError) as info:
        render_chat(source, "hi", SPECIAL)
    assert info.value.code == "CHAT_TEMPLATE_UNSAFE"


def test_render_template_escape_attempt_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{{ self.__init__.__globals__.__builtins__.open('" + str(marker) + "', 'w') }}"
    )
    with pytest.raises(ChatTemplateError):
        render_chat(source, "hi", SPECIAL)
    assert not marker.exists()


def test_render_template_raise_exception_becomes_engine_error() -> None:
    with pytest.raises(EngineError) as info:
        render_chat("{{ raise_exception('only system roles') }}", "hi", SPECIAL)
    assert info.value.code == "CHAT_TEMPLATE_ERROR"
    assert "only system roles" in str(info.value)


def test_render_template_syntax_error_is_invalid() -> None:
    template = ChatTemplate("{% for %}", SPECIAL)  # compiling is deferred to the first render
    with pytest.raises(EngineError) as info:
        template.render([{"role": "user", "content": "hi"}])
    assert info.value.code == "CHAT_TEMPLATE_INVALID"

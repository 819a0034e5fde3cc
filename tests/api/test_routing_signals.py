"""Routing signals: the byte-based token estimate and the dependency-free language detector."""
# ruff: noqa: RUF001 - text in other scripts is the point of these tests

from __future__ import annotations

import pytest

from api.prompt_routing.signals import LANGUAGES, detect_language, estimate_tokens


@pytest.mark.parametrize(
    ("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("é" * 4, 2), ("你好", 2)]
)
def test_estimate_tokens_is_utf8_bytes_over_four_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("The weather is nice and the cat is on the mat", "en"),
        ("Der Hund ist nicht auf dem Tisch und das ist gut", "de"),
        ("Le chat est sur la table et il est content", "fr"),
        ("El perro está en la casa y es muy bonito", "es"),
        ("Il gatto è sul tavolo e non è felice", "it"),
        ("O gato está em cima da mesa e não é feliz", "pt"),
        ("De kat is op de tafel en het is niet leuk", "nl"),
        ("Привет, как дела у тебя сегодня?", "ru"),
        ("Привіт, як справи? Це її книга", "uk"),
        ("Γεια σου κόσμε, τι κάνεις;", "el"),
        ("مرحبا بالعالم", "ar"),
        ("שלום עולם", "he"),
        ("नमस्ते दुनिया", "hi"),
        ("สวัสดีชาวโลก", "th"),
        ("안녕하세요 세계", "ko"),
        ("こんにちは世界、元気ですか", "ja"),
        ("你好世界，今天天气很好", "zh"),
        ("12345 !!! ???", "und"),
        ("", "und"),
    ],
)
def test_detect_language_names_the_iso_code(text: str, language: str) -> None:
    assert detect_language(text) == language
    assert language == "und" or language in LANGUAGES


def test_detect_language_reads_a_bounded_prefix() -> None:
    french = "Le chat est sur la table et il est content. " * 50  # past DETECT_CHARS
    assert detect_language(french + "the cat and the dog of the house " * 100_000) == "fr"

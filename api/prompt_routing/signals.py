"""What routing rules look at: an estimate of the prompt's tokens and its language.

The API loads no tokenizer (it must stay light, and tokenizers are user files), so prompt
tokens are estimated from UTF-8 bytes: ceil(bytes / 4). Byte-level BPE and SentencePiece
tokenizers with vocabularies of 32k+ average about 4 bytes per token on English prose, so
there the estimate is typically within ±25%. Hard bounds, for any tokenizer whose tokens each
cover at least one byte: true ≤ 4 x estimate (code, digits, rare scripts at ~1 byte/token);
and true ≥ estimate x 4 / L where L is the tokenizer's longest token in bytes. CJK text is
3 bytes a character and usually 1-2 characters a token: the estimate runs ~1.5x high there.
Write thresholds with that margin in mind; the served response reports the exact count.

The language detector is dependency-free: the dominant script decides scripts used by one
language here (el, ru/uk, ar, he, hi, th, ko, ja, zh); Latin text is scored against short
stopword lists (en, de, fr, es, it, pt, nl). It reads the first DETECT_CHARS characters and
answers "und" (undetermined) when nothing scores.
"""

from __future__ import annotations

import re

BYTES_PER_TOKEN = 4
DETECT_CHARS = 2000

LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "uk", "el", "ar", "he", "hi", "th",
             "ko", "ja", "zh")  # fmt: skip

_STOPWORDS = {
    "en": "the and of to is in that it for you with was on are this be have not but what",
    "de": "der die und das ist nicht ein eine ich zu den mit sich auf für von wie dem auch",
    "fr": "le la les et est des une un du que pas pour dans qui sur avec vous je ce il",
    "es": "el la los las que de y es en un una por con para no se del al lo como muy",
    "it": "il di che è la le non un una per con del della sono gli questo come ma si anche",
    "pt": "o a os as que de e é em um uma não para com do da no na se por mais você",
    "nl": "de het een en van is dat niet ik op te zijn met voor die er maar ook wat",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
_WORD = re.compile(r"[^\W\d_]+")

# (first, last code point, language) of scripts used by one language in our list.
_SCRIPTS = (
    (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "ru"),
    (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "ar"),
    (0x0900, 0x097F, "hi"),
    (0x0E00, 0x0E7F, "th"),
    (0x1100, 0x11FF, "ko"),
    (0x3040, 0x30FF, "ja"),
    (0x4E00, 0x9FFF, "zh"),
    (0xAC00, 0xD7AF, "ko"),
)
_UKRAINIAN = frozenset("іїєґІЇЄҐ")


def estimate_tokens(text: str) -> int:
    """ceil(UTF-8 bytes / 4): see the module docstring for its error bounds."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def detect_language(text: str) -> str:
    """An ISO 639-1 code from LANGUAGES, or "und"."""
    sample = text[:DETECT_CHARS]
    counts: dict[str, int] = {}
    latin = 0
    for ch in sample:
        if not ch.isalpha():
            continue
        code = ord(ch)
        if code < 0x0250:
            latin += 1
            continue
        for lo, hi, lang in _SCRIPTS:
            if lo <= code <= hi:
                counts[lang] = counts.get(lang, 0) + 1
                break
    if counts and max(counts.values()) > latin:
        lang = max(counts, key=lambda k: counts[k])
        if lang == "zh" and counts.get("ja"):
            return "ja"  # kana anywhere: Japanese mixes kanji with kana
        if lang == "ru" and any(ch in _UKRAINIAN for ch in sample):
            return "uk"
        return lang
    return _latin_language(sample)


def _latin_language(sample: str) -> str:
    words = [w.lower() for w in _WORD.findall(sample)]
    scores = {lang: sum(w in stop for w in words) for lang, stop in _WORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else "und"

"""Router regexes: same answers as `re` on the syntax we accept, linear time on hostile input."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from api.prompt_routing.safe_regex import (
    MAX_PATTERN_CHARS,
    SEARCH_CHARS,
    SafePattern,
    UnsafePattern,
)

CASES = [
    (r"hello", ["say hello world", "HELLO", ""]),
    (r"^hello", ["hello there", "say hello"]),
    (r"(?m)^hello", ["say\nhello", "say hello"]),
    (r"world$", ["hello world\n", "world peace"]),
    (r"(?m)world$", ["world\nnext", "worlds"]),
    (r"\Aabc\Z", ["abc", "abc\n", "xabc"]),
    (r"\bcat\b", ["concat cat", "concatenate", "cat"]),
    (r"\Bat", ["cat", "at"]),
    (r"(?i)HeLLo", ["hello", "HELLO", "help"]),
    (r"[^a]", ["A", "a", ""]),
    (r"(?i)[^a]", ["A", "Ab", "aaa"]),
    (r"(?i)[a-c]+z", ["ABCZ", "abz", "dz"]),
    (r"\d{3}-\d{4}", ["call 555-1234 now", "55-1234"]),
    (r"(?i)translate .* into (french|german)", ["Please TRANSLATE this into German", "into"]),
    (r"(x|xy)*z", ["xyxyxxz", "xyxy"]),
    (r"a{2,3}b", ["aab", "ab", "aaaab"]),
    (r"(?s)a.b", ["a\nb", "ab"]),
    (r"a.b", ["a\nb", "axb"]),
    (r"[\w.]+@[\w.]+", ["mail me@x.org", "@"]),
    (r"(?x) a b c  # comment", ["abc", "a b c"]),
    (r"\s+$", ["trailing  ", "none"]),
    (r"x*", ["", "y"]),
    (r"(a|ab)(c|bcd)(d*)", ["abcd", "acd", "abd"]),
    (r"[\d\s]+end", ["12 34 end", "end"]),
    (r"é+", ["café", "cafe"]),
]


@pytest.mark.parametrize(("pattern", "texts"), CASES)
def test_safe_pattern_answers_like_re(pattern: str, texts: list[str]) -> None:
    compiled = SafePattern(pattern)
    for text in texts:
        assert compiled.search(text) is (re.search(pattern, text) is not None), (pattern, text)


_ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "[^a]", r"\w", r"\s", r"\d", "x"])


@st.composite
def _patterns(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 5 if depth < 2 else 1))
        if kind <= 1:
            part = draw(_ATOMS)
        elif kind == 2:
            part = f"({draw(_patterns(depth + 1))}|{draw(_patterns(depth + 1))})"
        else:
            part = f"({draw(_patterns(depth + 1))})"
        parts.append(part + draw(st.sampled_from(["", "*", "+", "?", "{1,2}", "*?"])))
    anchor = draw(st.sampled_from(["", "^", r"\b"]))
    return anchor + "".join(parts) + draw(st.sampled_from(["", "$", r"\b"]))


@settings(max_examples=300, deadline=None)
@given(_patterns(), st.text(alphabet="abx 1\n", max_size=12))
def test_safe_pattern_agrees_with_re_on_generated_patterns(pattern: str, text: str) -> None:
    assume(len(pattern) <= MAX_PATTERN_CHARS)
    assert SafePattern(pattern).search(text) is (re.search(pattern, text) is not None)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "groupref"),
        (r"(?=a)b", "assert"),
        (r"(?<!a)b", "assert_not"),
        (r"(?(1)a|b)", "invalid regex"),
        (r"a++", "possessive"),
        (r"(?>a)", "atomic"),
        (r"(?i:a)b", "scoped flags"),
        (r"(?a)\w", "flags"),
        (r"a{101}", "capped at 100"),
        (r"(a{100}){10}", "states"),
        (r"(unclosed", "invalid regex"),
        ("a" * (MAX_PATTERN_CHARS + 1), "over"),
    ],
)
def test_safe_pattern_refuses_unsupported_or_oversized_patterns(pattern: str, why: str) -> None:
    with pytest.raises(UnsafePattern, match=re.escape(why)):
        SafePattern(pattern)


@pytest.mark.timeout(60)  # a guard: backtracking would outlast the test run
@pytest.mark.parametrize(
    ("pattern", "matching"),
    [(r"(a+)+$", "a" * 40), (r"(a|aa)*c", "a" * 40 + "c"), (r"(\w+\s?)*!", "a" * 40 + "!")],
)
def test_catastrophic_patterns_finish_on_long_hostile_text(pattern: str, matching: str) -> None:
    compiled = SafePattern(pattern)
    # Only the first SEARCH_CHARS characters are searched: the "!" lies beyond them.
    assert compiled.search("a" * (SEARCH_CHARS * 4) + "!") is False
    assert compiled.search(matching) is True


def test_end_anchor_does_not_match_where_the_search_was_cut() -> None:
    assert SafePattern(r"a$").search("a" * (SEARCH_CHARS + 10)) is False
    assert SafePattern(r"a\b").search("a" * (SEARCH_CHARS + 10)) is False

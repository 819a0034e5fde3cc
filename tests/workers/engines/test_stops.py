"""The shared stop-string matcher."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from workers.engines.stops import StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.push(p) for p in pieces)
    return out + matcher.flush()


def test_push_text_passes_through_without_stops() -> None:
    matcher = StopMatcher([])
    assert matcher.push("hello") == "hello"
    assert not matcher.stopped


def test_push_stop_cuts_before_match_in_one_piece() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abc END def") == "abc "
    assert matcher.stopped
    assert matcher.push("more") == ""
    assert matcher.flush() == ""


def test_push_stop_split_across_pieces_is_held_then_cut() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("line one\n") == "line one"
    assert matcher.push("\nline two") == ""
    assert matcher.stopped


def test_push_partial_stop_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == "go "
    assert matcher.push("OP") == ""
    assert matcher.stopped
    other = StopMatcher(["STOP"])
    assert other.push("go ST") == "go "
    assert other.push("AY") == "STAY"
    assert not other.stopped


def test_push_multiple_stops_cut_at_earliest() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert feed(matcher, ["hel", "lo wor", "ld"]) == "hel"
    assert matcher.stopped


def test_flush_held_text_when_stream_ends() -> None:
    matcher = StopMatcher(["abc"])
    assert matcher.push("xyzab") == "xyz"
    assert matcher.flush() == "ab"


def test_push_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", "x"])
    assert feed(matcher, ["ab", "cx"]) == "abc"


@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_push_any_split_gives_text_before_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    assert feed(StopMatcher(stops), pieces) == expected

"""Stream events: a deferred job's tokens travel as one entry and read back as tokens."""

from __future__ import annotations

from typing import Any

from core import events


def token(i: int, text: str) -> dict[str, Any]:
    return {"type": "token", "text": text, "index": i}


def test_batched_joins_runs_of_tokens_and_expand_gives_them_back() -> None:
    status = {"type": "status", "status": "running", "queue_ms": 1.5, "cold_start": False}
    stream = [status, token(0, "Hel"), token(1, "lo"), token(2, "")]
    batched = events.batched(stream)
    assert batched == [status, {"type": "tokens", "index": 0, "texts": ["Hel", "lo", ""]}]
    assert [one for e in batched for one in events.expand(e)] == stream


def test_batched_keeps_order_around_other_events_and_counts_from_the_first_index() -> None:
    stream = [token(5, "a"), {"type": "status"}, token(6, "b"), token(7, "c")]
    batched = events.batched(stream)
    assert [e["type"] for e in batched] == ["tokens", "status", "tokens"]
    assert events.expand(batched[2]) == [token(6, "b"), token(7, "c")]
    assert [one for e in batched for one in events.expand(e)] == stream


def test_batched_of_nothing_and_expand_of_other_events() -> None:
    assert events.batched([]) == []
    done = {"type": "done", "status": "succeeded"}
    assert events.expand(done) == [done]

"""Prefixed random identifiers: the alphabet, the length, every digit used at every position."""

from __future__ import annotations

from core.ids import BASE62, new_id, random_base62


def test_new_id_is_prefix_and_sixteen_base62_characters() -> None:
    ident = new_id("job")
    prefix, body = ident.split("_")
    assert prefix == "job" and len(body) == 16 and set(body) <= set(BASE62)
    assert len(random_base62(43)) == 43 and random_base62(0) == ""


def test_every_character_turns_up_at_every_position() -> None:
    """One draw split into digits: no position is stuck on a few characters (the leading
    digit of a short-ranged draw would be); 3,000 ids miss a character with odds ~1e-20."""
    ids = [random_base62(16) for _ in range(3000)]
    for position in range(16):
        assert {i[position] for i in ids} == set(BASE62), position
    assert len(set(ids)) == len(ids)

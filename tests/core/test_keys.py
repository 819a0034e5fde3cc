from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from core import keys


def test_mint_key_has_prefix_checksum_and_entropy() -> None:
    minted = keys.mint(keys.API_KEY_PREFIX, "pepper")
    assert minted.plaintext.startswith(f"ik_{minted.key_id}_")
    parsed = keys.parse(minted.plaintext, keys.API_KEY_PREFIX)
    assert parsed is not None
    assert len(parsed.secret) * 5.95 >= 128  # log2(62) ≈ 5.954 bits per char
    assert keys.verify(parsed, minted.secret_hash, "pepper")
    assert not keys.verify(parsed, minted.secret_hash, "other-pepper")
    assert minted.secret_hash != parsed.secret and parsed.secret not in minted.secret_hash


def test_parse_key_rejects_wrong_prefix() -> None:
    minted = keys.mint(keys.ACCOUNT_TOKEN_PREFIX, "pepper")
    assert keys.parse(minted.plaintext, keys.API_KEY_PREFIX) is None


@given(
    st.integers(min_value=3, max_value=40), st.sampled_from(string.digits + string.ascii_letters)
)
def test_parse_key_rejects_any_single_character_change(pos: int, ch: str) -> None:
    minted = keys.mint(keys.API_KEY_PREFIX, "pepper")
    pos = min(pos, len(minted.plaintext) - 1)
    if minted.plaintext[pos] == ch or minted.plaintext[pos] == "_":
        return
    mutated = minted.plaintext[:pos] + ch + minted.plaintext[pos + 1 :]
    assert keys.parse(mutated, keys.API_KEY_PREFIX) is None


@given(st.text(max_size=200))
def test_parse_key_never_accepts_random_text(text: str) -> None:
    assert keys.parse(text, keys.API_KEY_PREFIX) is None


def test_display_prefix_does_not_reveal_secret() -> None:
    minted = keys.mint(keys.API_KEY_PREFIX, "pepper")
    parsed = keys.parse(minted.plaintext, keys.API_KEY_PREFIX)
    assert parsed is not None
    assert parsed.secret not in minted.display_prefix

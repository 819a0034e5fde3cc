"""Hypothesis strategies that corrupt valid model files the way attackers and bad disks do."""

from __future__ import annotations

import contextlib
import signal
import struct
from collections.abc import Iterator, Sequence
from types import FrameType

from hypothesis import strategies as st

# Values that break length and count arithmetic: zero, sign bits, wrap-arounds, maxima.
INTERESTING = [
    0, 1, 2, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    2**62, 2**63 - 1, 2**63, 2**64 - 1,
]  # fmt: skip
OPS = ("flip", "truncate", "field", "insert", "delete", "byte")


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, hot: Sequence[int] = ()) -> bytes:
    """`seed` with 1-4 edits; `hot` offsets (length and count fields) are hit more often."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(OPS))
        anywhere = st.integers(0, len(data) - 1)
        fields = [h for h in hot if h < len(data)]
        pos = draw(st.sampled_from(fields) | anywhere if fields else anywhere)
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "field":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1))
            data[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        else:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def zip_hot_offsets(data: bytes) -> list[int]:
    """Size, length and offset fields of every zip header in `data`."""
    out: list[int] = []
    for sig, fields in (
        (b"PK\x03\x04", (14, 18, 22, 26, 28)),
        (b"PK\x01\x02", (16, 20, 24, 28, 30, 42)),
        (b"PK\x05\x06", (8, 10, 12, 16)),
    ):
        pos = data.find(sig)
        while pos != -1:
            out.extend(pos + f for f in fields)
            pos = data.find(sig, pos + 4)
    return out


def gguf_hot_offsets(data: bytes) -> list[int]:
    """Version and counts, then every u64 that looks like a string length in the header."""
    out = [4, 8, 16]
    for pos in range(24, min(len(data), 4096) - 8):
        (n,) = struct.unpack_from("<Q", data, pos)
        if 0 < n < 64 and data[pos + 8 : pos + 8 + n].isascii():
            out.append(pos)
    return out


class Hang(Exception):
    """A validator ran past its time bound."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise `Hang` if the block runs longer than `seconds` (a generous bound, not a timing)."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

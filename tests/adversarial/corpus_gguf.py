"""GGUF headers that llama.cpp's parser has overflowed on or aborted on, one field at a time."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from tests.adversarial.case import Bases, Case
from tests.utils.bad_files import (
    ARRAY,
    GgufSpec,
    GgufTensor,
    default_kv,
    gguf_str,
    kv_string,
    kv_u32,
)

INVALID = "GGUF_INVALID"
# Server-side template injection: the classic route from a template to `os`.
SSTI_TEMPLATE = (
    "{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__['os']"
    ".system('touch CANARY') }}"
)


def _kv_with(*extra: bytes) -> list[bytes]:
    return [*default_kv(), *extra]


def _specs() -> Iterator[tuple[str, GgufSpec, str]]:
    yield "bad-magic", GgufSpec(magic=b"GGUG"), "FORMAT_MISMATCH"
    for version in (0, 1, 4):
        yield (
            f"version-{version}",
            GgufSpec(version_bytes=struct.pack("<I", version)),
            ("GGUF_UNSUPPORTED_VERSION"),
        )
    yield (
        "version-byte-swapped",
        GgufSpec(version_bytes=struct.pack(">I", 3)),
        ("GGUF_UNSUPPORTED_VERSION"),
    )
    yield "n-tensors-2-63", GgufSpec(n_tensors=2**63 - 1), INVALID
    yield "n-kv-2-63", GgufSpec(n_kv=2**63 - 1), INVALID
    yield "key-length-huge", GgufSpec(kv=_kv_with(struct.pack("<Q", 2**62) + b"k")), INVALID
    past_eof = struct.pack("<Q", 200) + b"general.x"
    yield "key-length-past-eof", GgufSpec(kv=_kv_with(past_eof), tensors=[], n_tensors=1,
                                          data_size=0), "TRUNCATED"  # fmt: skip
    nested = gguf_str("general.nested") + struct.pack("<IIQ", ARRAY, ARRAY, 1)
    yield "array-of-arrays", GgufSpec(kv=_kv_with(nested + struct.pack("<IQ", 4, 0))), INVALID
    for tag in (13, 0xFFFFFFFF):
        bad = gguf_str("general.odd") + struct.pack("<I", tag)
        yield f"unknown-type-tag-{tag}", GgufSpec(kv=_kv_with(bad)), INVALID
    for align in (0, 3, 2**31):
        yield (
            f"alignment-{align}",
            GgufSpec(kv=_kv_with(kv_u32("general.alignment", align))),
            (INVALID),
        )
    yield "n-dims-8", GgufSpec(tensors=[GgufTensor("a", [1] * 8)]), INVALID
    wrap = GgufTensor("a", [2**32, 2**32, 2**32, 2**8])  # 2^104 elements: wraps a u64 size
    yield "dims-wrap-size", GgufSpec(tensors=[wrap], data_size=32), INVALID
    for ggml_type in (0xFFFFFFFF, 42):
        t = GgufTensor("a", [8], ggml_type=ggml_type)
        yield f"tensor-type-{ggml_type}", GgufSpec(tensors=[t], data_size=32), INVALID
    order = [GgufTensor("a", [8], offset=32), GgufTensor("b", [8], offset=0)]
    yield "offsets-out-of-order", GgufSpec(tensors=order, data_size=64), INVALID
    overlap = [GgufTensor("a", [16], offset=0), GgufTensor("b", [8], offset=32)]
    yield "offsets-overlap", GgufSpec(tensors=overlap, data_size=64), INVALID
    past = [GgufTensor("a", [8], offset=0), GgufTensor("b", [8], offset=1 << 40)]
    yield "offset-past-end", GgufSpec(tensors=past, data_size=64), INVALID
    dup = kv_string("general.architecture", "llama")
    yield "duplicate-keys", GgufSpec(kv=_kv_with(dup)), INVALID
    names = [GgufTensor("a", [8], offset=0), GgufTensor("a", [8], offset=32)]
    yield "duplicate-tensor-names", GgufSpec(tensors=names), INVALID
    kv = [k for k in default_kv() if b"block_count" not in k]
    yield "block-count-513", GgufSpec(kv=[*kv, kv_u32("llama.block_count", 513)]), INVALID
    yield "block-count-0", GgufSpec(kv=[*kv, kv_u32("llama.block_count", 0)]), INVALID


def gguf_cases(b: Bases) -> Iterator[Case]:
    for name, spec, code in _specs():
        yield Case(f"gguf-{name}", "gguf", {"model.gguf": spec.build()}, code)


def ssti_gguf(b: Bases, out: Path) -> Case:
    """A loadable GGUF whose chat template reaches for `os`: refused when rendered, in the runner."""
    from tests.utils.model_files import make_gguf

    canary = b.canary("gguf-chat-template-ssti")
    make_gguf(out, chat_template=SSTI_TEMPLATE.replace("CANARY", str(canary)))
    return Case("gguf-chat-template-ssti", "gguf", {"model.gguf": out}, "CHAT_TEMPLATE_UNSAFE",
                canary)  # fmt: skip

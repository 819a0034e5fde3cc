"""Property tests: mutated valid files of every format always get a verdict, cheaply.

A verdict is a result or `Rejected`; any other exception is a parser bug an attacker can aim
at. Memory is bounded by the file's size (never by a length field inside it) and time by a
generous hang bound. Example counts are bounded so the suite stays quick.
"""

from __future__ import annotations

import functools
import io
import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.mutations import gguf_hot_offsets, mutated, time_bound, zip_hot_offsets
from tests.utils.bad_files import GgufSpec, mem_file, reader_for, safetensors_bytes, st_entry
from tests.utils.hostile_pickles import zip_members
from validators.base import HashingReader, Rejected
from validators.gguf import validate_gguf
from validators.onnx import validate_onnx
from validators.pickle_scan import scan_pickle
from validators.pipeline import validate_bundle
from validators.safetensors import validate_safetensors
from validators.sniff import sniff
from validators.torch_zip import validate_legacy_pickle, validate_torch_zip

EXAMPLES = 150
HANG_BOUND_S = 20.0
# Peak memory may grow with the file (the pickle machine keeps one small object per opcode),
# never with a number read from it: 2^32 in a length field must not cost 4 GiB.
PER_BYTE = 256
BASE_BYTES = 2 << 20
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Validator = Callable[[HashingReader], Any]


@functools.cache
def _torch_seeds() -> tuple[bytes, bytes, bytes]:
    """A zip state dict, its data.pkl, and the same state dict in the legacy stream format."""
    import torch

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    pkl = next(c for n, c in zip_members(zipped.getvalue()) if n.endswith("data.pkl"))
    return zipped.getvalue(), pkl, legacy.getvalue()


@functools.cache
def _onnx_seed() -> bytes:
    from tests.utils.onnx_builders import if_model, weight

    return bytes(if_model(weight("C")).SerializeToString())


def _safetensors_seed() -> bytes:
    header = {
        "a": st_entry("F32", [2, 2], 0, 16),
        "b": st_entry("BF16", [3], 16, 22),
        "__metadata__": {"format": "pt"},
    }
    return safetensors_bytes(header, b"\x01" * 22)


@pytest.fixture(scope="module", autouse=True)
def _traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


def verdict(validate: Validator, data: bytes) -> None:
    """Run one validator on `data`: a result or Rejected, in bounded time and memory."""
    reader = reader_for(data, path="fuzzed")
    baseline = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    with time_bound(HANG_BOUND_S):
        try:
            validate(reader)
        except Rejected as exc:
            assert exc.code and exc.message
    peak = tracemalloc.get_traced_memory()[1] - baseline
    assert peak <= BASE_BYTES + PER_BYTE * len(data), f"peak {peak} for {len(data)} bytes"


def test_fuzz_seeds_are_valid() -> None:
    zipped, pkl, _ = _torch_seeds()
    validate_gguf(reader_for(GgufSpec().build()))
    validate_safetensors(reader_for(_safetensors_seed()))
    validate_torch_zip(reader_for(zipped))
    scan_pickle(pkl)
    validate_onnx(reader_for(_onnx_seed()))


@FUZZ
@given(st.data())
def test_fuzz_gguf_always_gets_a_verdict(data: st.DataObject) -> None:
    seed = GgufSpec().build()
    verdict(validate_gguf, data.draw(mutated(seed, gguf_hot_offsets(seed))))


@FUZZ
@given(mutated(_safetensors_seed(), hot=[0, 1, 4, 7]))
def test_fuzz_safetensors_always_gets_a_verdict(data: bytes) -> None:
    verdict(validate_safetensors, data)


@FUZZ
@given(st.data())
def test_fuzz_torch_zip_always_gets_a_verdict(data: st.DataObject) -> None:
    seed = _torch_seeds()[0]
    verdict(validate_torch_zip, data.draw(mutated(seed, zip_hot_offsets(seed))))


@FUZZ
@given(st.data())
def test_fuzz_pickle_scan_always_gets_a_verdict(data: st.DataObject) -> None:
    pkl = data.draw(mutated(_torch_seeds()[1]))
    verdict(lambda reader: scan_pickle(reader.read_exact(reader.size)), pkl)


@FUZZ
@given(st.data())
def test_fuzz_legacy_pickle_always_gets_a_verdict(data: st.DataObject) -> None:
    verdict(validate_legacy_pickle, data.draw(mutated(_torch_seeds()[2])))


@FUZZ
@given(st.data())
def test_fuzz_onnx_always_gets_a_verdict(data: st.DataObject) -> None:
    verdict(validate_onnx, data.draw(mutated(_onnx_seed())))


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_sniff_names_a_kind_for_any_head(head: bytes) -> None:
    assert sniff(head) is not None


CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}).encode()


@FUZZ
@given(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]), st.data())
def test_fuzz_bundle_never_reaches_the_crash_fallback(target: str, data: st.DataObject) -> None:
    files = {"config.json": CONFIG, "tokenizer.json": TOKENIZER}
    files["model.safetensors"] = _safetensors_seed()
    files[target] = data.draw(mutated(files[target]))
    with time_bound(HANG_BOUND_S):
        report = validate_bundle([mem_file(p, d) for p, d in files.items()])
    assert report.rejection is None or report.rejection.code != "VALIDATOR_ERROR", report.findings


def test_fuzz_harness_catches_allocation_driven_by_a_length_field() -> None:
    def greedy(reader: HashingReader) -> None:
        (n,) = reader.read_exact(1)
        bytearray(n << 20)  # what a parser trusting a length field does

    with pytest.raises(AssertionError, match="peak"):
        verdict(greedy, b"\x10")


def test_fuzz_harness_bounds_a_hang() -> None:
    from tests.adversarial.mutations import Hang

    with pytest.raises(Hang), time_bound(0.2):
        while True:
            pass

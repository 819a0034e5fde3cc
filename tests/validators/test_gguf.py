"""validate_gguf: a real GGUFWriter file passes; every malformed header is refused by code."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.utils.bad_files import (
    ARRAY,
    GGML_F32,
    GGML_Q8_0,
    STRING,
    U32,
    U64,
    GgufSpec,
    GgufTensor,
    default_kv,
    gguf_str,
    kv_string,
    kv_string_array,
    kv_u32,
    reader_for,
)
from validators.base import Rejected
from validators.gguf import validate_gguf


def _code(data: bytes) -> str:
    with pytest.raises(Rejected) as info:
        validate_gguf(reader_for(data))
    return info.value.code


def _writer_gguf(path: Path, *, q8: bool = False) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", "hi"])
    writer.add_token_merges(["h i"])
    writer.add_bos_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    weights = np.arange(64, dtype=np.float32).reshape(2, 32)
    if q8:
        q8_type = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor("w", gguf.quants.quantize(weights, q8_type), raw_dtype=q8_type)
    else:
        writer.add_tensor("w", weights)
    writer.add_tensor("norm", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_validate_gguf_writer_file_returns_metadata(tmp_path: Path) -> None:
    data = _writer_gguf(tmp_path / "m.gguf")
    reader = reader_for(data)
    meta = validate_gguf(reader)
    assert meta["architecture"] == "llama"
    assert meta["context_length"] == 64
    assert meta["block_count"] == 1
    assert meta["vocab_size"] == 3
    assert meta["n_tensors"] == 2
    assert meta["has_chat_template"] is True
    assert meta["chat_template"].startswith("{% for m")
    assert reader.finish() == hashlib.sha256(data).hexdigest()


def test_validate_gguf_quantized_writer_file_passes(tmp_path: Path) -> None:
    data = _writer_gguf(tmp_path / "q.gguf", q8=True)
    assert validate_gguf(reader_for(data))["tokenizer_model"] == "gpt2"


def test_validate_gguf_tiny_llama_fixture_passes(gguf_model_q8: Path) -> None:
    data = gguf_model_q8.read_bytes()
    meta = validate_gguf(reader_for(data))
    assert (meta["vocab_size"], meta["context_length"]) == (512, 256)


def test_validate_gguf_struct_built_file_passes() -> None:
    meta = validate_gguf(reader_for(GgufSpec().build()))
    assert meta["n_tensors"] == 2
    assert meta["has_chat_template"] is True


def test_validate_gguf_without_chat_template_reports_none() -> None:
    meta = validate_gguf(reader_for(GgufSpec(kv=default_kv()[:5]).build()))
    assert (meta["has_chat_template"], meta["chat_template"]) == (False, None)


def test_validate_gguf_bad_magic_is_rejected() -> None:
    assert _code(GgufSpec(magic=b"GGUG").build()) == "GGUF_BAD_MAGIC"


@pytest.mark.parametrize("version", [b"\0\0\0\0", b"\1\0\0\0", b"\4\0\0\0", b"\0\0\0\3"])
def test_validate_gguf_unsupported_version_is_rejected(version: bytes) -> None:
    assert _code(GgufSpec(version_bytes=version).build()) == "GGUF_UNSUPPORTED_VERSION"


def test_validate_gguf_byte_swapped_version_says_big_endian() -> None:
    with pytest.raises(Rejected, match="big-endian"):
        validate_gguf(reader_for(GgufSpec(version_bytes=b"\0\0\0\3").build()))


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_validate_gguf_huge_counts_are_rejected(field: str) -> None:
    huge = (1 << 63) - 1
    spec = GgufSpec(n_tensors=huge) if field == "n_tensors" else GgufSpec(n_kv=huge)
    assert _code(spec.build()) == "GGUF_INVALID"


def test_validate_gguf_zero_tensors_is_rejected() -> None:
    assert _code(GgufSpec(tensors=[]).build()) == "GGUF_INVALID"


def test_validate_gguf_huge_key_length_is_rejected() -> None:
    bad = struct.pack("<Q", 1 << 40) + b"key"
    assert _code(GgufSpec(kv=[bad, *default_kv()]).build()) == "GGUF_INVALID"


def test_validate_gguf_key_longer_than_file_is_truncated() -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 200) + b"general"
    assert _code(data) == "TRUNCATED"


def test_validate_gguf_huge_string_value_is_rejected() -> None:
    bad = gguf_str("general.name") + struct.pack("<IQ", STRING, 1 << 62)
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


def test_validate_gguf_array_of_arrays_is_rejected() -> None:
    bad = gguf_str("nested") + struct.pack("<IIQ", ARRAY, ARRAY, 1) + struct.pack("<IQ", U32, 0)
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


def test_validate_gguf_huge_array_is_rejected() -> None:
    bad = gguf_str("big") + struct.pack("<IIQ", ARRAY, U64, 1 << 60)
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


@pytest.mark.parametrize("tag", [13, 255, 1 << 31])
def test_validate_gguf_unknown_value_type_is_rejected(tag: int) -> None:
    bad = gguf_str("odd") + struct.pack("<I", tag) + b"\0" * 8
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


def test_validate_gguf_unknown_array_item_type_is_rejected() -> None:
    bad = gguf_str("odd") + struct.pack("<IIQ", ARRAY, 42, 1) + b"\0" * 8
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


@pytest.mark.parametrize("alignment", [0, 3, 1 << 31])
def test_validate_gguf_bad_alignment_is_rejected(alignment: int) -> None:
    spec = GgufSpec(kv=[*default_kv(), kv_u32("general.alignment", alignment)])
    assert _code(spec.build()) == "GGUF_INVALID"


def test_validate_gguf_alignment_of_wrong_type_is_rejected() -> None:
    bad = gguf_str("general.alignment") + struct.pack("<IQ", U64, 32)
    assert _code(GgufSpec(kv=[*default_kv(), bad]).build()) == "GGUF_INVALID"


def test_validate_gguf_custom_alignment_is_honoured() -> None:
    kv = [*default_kv(), kv_u32("general.alignment", 64)]
    tensors = [GgufTensor("a", [8]), GgufTensor("b", [4], offset=64)]
    meta = validate_gguf(reader_for(GgufSpec(kv=kv, tensors=tensors, alignment=64).build()))
    assert meta["alignment"] == 64


def test_validate_gguf_duplicate_keys_are_rejected() -> None:
    kv = [*default_kv(), kv_u32("llama.context_length", 64)]
    with pytest.raises(Rejected, match="duplicate metadata key"):
        validate_gguf(reader_for(GgufSpec(kv=kv).build()))


@pytest.mark.parametrize("blocks", [0, 513])
def test_validate_gguf_block_count_out_of_range_is_rejected(blocks: int) -> None:
    assert _code(GgufSpec(kv=default_kv(block_count=blocks)).build()) == "GGUF_INVALID"


def test_validate_gguf_missing_architecture_is_rejected() -> None:
    assert _code(GgufSpec(kv=default_kv()[1:]).build()) == "GGUF_INVALID"


def test_validate_gguf_tokenizer_without_vocabulary_is_rejected() -> None:
    kv = [k for k in default_kv() if b"tokenizer.ggml.tokens" not in k]
    assert _code(GgufSpec(kv=kv).build()) == "GGUF_INVALID"


@pytest.mark.parametrize("model", ["none", "no_vocab"])
def test_validate_gguf_vocabulary_free_tokenizer_is_rejected(model: str) -> None:
    kv = [*default_kv()[:3], kv_string("tokenizer.ggml.model", model), *default_kv()[4:]]
    with pytest.raises(Rejected, match="no usable tokenizer"):
        validate_gguf(reader_for(GgufSpec(kv=kv).build()))


def test_validate_gguf_missing_tokenizer_model_is_rejected() -> None:
    kv = [k for k in default_kv() if b"tokenizer.ggml.model" not in k]
    assert _code(GgufSpec(kv=kv).build()) == "GGUF_INVALID"


def test_validate_gguf_special_token_outside_vocabulary_is_rejected() -> None:
    kv = [*default_kv(), kv_u32("tokenizer.ggml.eos_token_id", 4)]
    assert _code(GgufSpec(kv=kv).build()) == "GGUF_INVALID"


def test_validate_gguf_scores_length_mismatch_is_rejected() -> None:
    scores = gguf_str("tokenizer.ggml.scores") + struct.pack("<IIQ", ARRAY, 6, 2) + b"\0" * 8
    assert _code(GgufSpec(kv=[*default_kv(), scores]).build()) == "GGUF_INVALID"


def test_validate_gguf_merges_of_numbers_are_rejected() -> None:
    merges = gguf_str("tokenizer.ggml.merges") + struct.pack("<IIQ", ARRAY, U32, 1) + b"\0" * 4
    assert _code(GgufSpec(kv=[*default_kv(), merges]).build()) == "GGUF_INVALID"


def test_validate_gguf_string_array_of_tokens_counts_vocab() -> None:
    kv = [*default_kv()[:4], kv_string_array("tokenizer.ggml.tokens", ["x"] * 1000)]
    assert validate_gguf(reader_for(GgufSpec(kv=kv).build()))["vocab_size"] == 1000


def test_validate_gguf_eight_dimensions_are_rejected() -> None:
    spec = GgufSpec(tensors=[GgufTensor("a", [1] * 8)])
    assert _code(spec.build()) == "GGUF_INVALID"


def test_validate_gguf_zero_dimension_is_rejected() -> None:
    assert _code(GgufSpec(tensors=[GgufTensor("a", [8, 0])]).build()) == "GGUF_INVALID"


def test_validate_gguf_shape_that_wraps_size_is_rejected() -> None:
    spec = GgufSpec(tensors=[GgufTensor("a", [1 << 32, 1 << 32])], data_size=0)
    with pytest.raises(Rejected, match="invalid shape"):
        validate_gguf(reader_for(spec.build()))


@pytest.mark.parametrize("ggml_type", [4, 5, 31, 42, 1000])
def test_validate_gguf_unknown_tensor_type_is_rejected(ggml_type: int) -> None:
    spec = GgufSpec(tensors=[GgufTensor("a", [32], ggml_type=ggml_type)], data_size=64)
    assert _code(spec.build()) == "GGUF_INVALID"


def test_validate_gguf_dimension_not_multiple_of_block_is_rejected() -> None:
    spec = GgufSpec(tensors=[GgufTensor("a", [16], ggml_type=GGML_Q8_0)], data_size=64)
    assert _code(spec.build()) == "GGUF_INVALID"


def test_validate_gguf_too_long_tensor_name_is_rejected() -> None:
    assert _code(GgufSpec(tensors=[GgufTensor("t" * 64, [8])]).build()) == "GGUF_INVALID"


def test_validate_gguf_duplicate_tensor_names_are_rejected() -> None:
    tensors = [GgufTensor("a", [8]), GgufTensor("a", [8], offset=32)]
    with pytest.raises(Rejected, match="duplicate tensor name"):
        validate_gguf(reader_for(GgufSpec(tensors=tensors).build()))


def test_validate_gguf_offsets_out_of_order_are_rejected() -> None:
    tensors = [GgufTensor("a", [8], offset=32), GgufTensor("b", [8], offset=0)]
    assert _code(GgufSpec(tensors=tensors).build()) == "GGUF_INVALID"


def test_validate_gguf_overlapping_tensors_are_rejected() -> None:
    tensors = [GgufTensor("a", [16]), GgufTensor("b", [8], offset=32)]
    with pytest.raises(Rejected, match="overlaps"):
        validate_gguf(reader_for(GgufSpec(tensors=tensors, data_size=128).build()))


def test_validate_gguf_unaligned_offset_is_rejected() -> None:
    tensors = [GgufTensor("a", [8]), GgufTensor("b", [4], offset=40)]
    assert _code(GgufSpec(tensors=tensors, data_size=64).build()) == "GGUF_INVALID"


def test_validate_gguf_offset_past_end_is_rejected() -> None:
    tensors = [GgufTensor("a", [8]), GgufTensor("b", [4], offset=1 << 40)]
    assert _code(GgufSpec(tensors=tensors, data_size=64).build()) == "GGUF_INVALID"


def test_validate_gguf_tensor_running_past_end_is_truncated() -> None:
    assert _code(GgufSpec(data_size=40).build()) == "TRUNCATED"


def test_validate_gguf_trailing_bytes_are_rejected() -> None:
    with pytest.raises(Rejected, match="after the last tensor"):
        validate_gguf(reader_for(GgufSpec(data_size=64 + 32).build()))


def test_validate_gguf_unpadded_last_tensor_passes() -> None:
    # the last tensor ends at 32 + 32 bytes; padding after it is optional
    tensors = [GgufTensor("a", [8]), GgufTensor("b", [2], offset=32)]
    meta = validate_gguf(reader_for(GgufSpec(tensors=tensors, data_size=40).build()))
    assert meta["n_tensors"] == 2


@pytest.mark.parametrize("cut", [2, 6, 20, 30, 100, 250, -100, -1])
def test_validate_gguf_truncated_file_is_rejected(cut: int) -> None:
    tensors = [GgufTensor("a", [64]), GgufTensor("b", [64], offset=256)]
    data = GgufSpec(tensors=tensors).build()
    assert _code(data[:cut]) == "TRUNCATED"


def test_validate_gguf_declared_size_beyond_stream_is_truncated() -> None:
    data = GgufSpec().build()
    with pytest.raises(Rejected) as info:
        validate_gguf(reader_for(data[:-8], size=len(data)))
    assert info.value.code == "TRUNCATED"


def test_validate_gguf_version_two_passes() -> None:
    data = GgufSpec(version_bytes=struct.pack("<I", 2)).build()
    assert validate_gguf(reader_for(data))["version"] == 2


def test_validate_gguf_f32_type_of_scalar_key_is_rejected_for_block_count() -> None:
    bad = gguf_str("llama.block_count") + struct.pack("<If", 6, 2.0)
    kv = [kv_string("general.architecture", "llama"), bad]
    assert _code(GgufSpec(kv=kv).build()) == "GGUF_INVALID"


def test_validate_gguf_skips_tensor_data_to_the_end() -> None:
    # 8 MiB of tensor data: the parser must skip it through the reader, not return it
    big = GgufTensor("big", [2 << 20], ggml_type=GGML_F32)
    reader = reader_for(GgufSpec(tensors=[big]).build())
    validate_gguf(reader)
    assert reader.remaining == 0

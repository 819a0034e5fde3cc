"""sniff, expected_kinds and the file-name policy."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.utils.bad_files import (
    GgufSpec,
    onnx_head,
    safetensors_bytes,
    sentencepiece_head,
    st_entry,
    tar_head,
    zip_head,
)
from validators.base import FileKind, Rejected
from validators.sniff import (
    check_kind,
    expected_kinds,
    is_allowed_path,
    is_external_data,
    path_rejection,
    sniff,
)


def _real_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    return buf.getvalue()


def _real_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("storages")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (GgufSpec().build()[:512], FileKind.GGUF),
        (safetensors_bytes({"a": st_entry("F32", [1], 0, 4)}, b"\0" * 4), FileKind.SAFETENSORS),
        (_real_zip()[:512], FileKind.TORCH_ZIP),
        (zip_head("weights/data.pkl"), FileKind.TORCH_ZIP),
        (zip_head("hello.txt"), FileKind.ZIP),
        (pickle.dumps({"a": 1}, protocol=2), FileKind.TORCH_LEGACY),
        (pickle.dumps([1, 2], protocol=5), FileKind.TORCH_LEGACY),
        (_real_tar()[:512], FileKind.TORCH_TAR),
        (tar_head(), FileKind.TORCH_TAR),
        (b'{"architectures": ["LlamaForCausalLM"]}', FileKind.JSON),
        (b"\xef\xbb\xbf  \n[1, 2]", FileKind.JSON),
        (onnx_head(), FileKind.ONNX),
        (sentencepiece_head(), FileKind.SENTENCEPIECE),
        (b"h e\nl l\n", FileKind.TEXT),
        ("# Modèle\n".encode(), FileKind.TEXT),
        (b"", FileKind.TEXT),
        (b"\x00\x01\x02\x03binary", FileKind.UNKNOWN),
        (b"\xff\xfe\xfd", FileKind.UNKNOWN),
    ],
)
def test_sniff_head_returns_kind(head: bytes, kind: FileKind) -> None:
    assert sniff(head[:512]) is kind


def test_sniff_junk_before_zip_is_unknown() -> None:
    assert sniff((b"junk" + _real_zip())[:512]) is FileKind.UNKNOWN


def test_sniff_indented_json_is_not_safetensors() -> None:
    assert sniff(b'        {"a": 1}') is FileKind.JSON


def test_sniff_utf8_cut_at_head_end_is_text() -> None:
    head = ("a" * 511 + "é").encode()[:512]
    assert sniff(head) is FileKind.TEXT


def test_sniff_newlines_are_not_sentencepiece() -> None:
    assert sniff(b"\n\n\n\nsome text after blank lines\n") is FileKind.TEXT


def test_sniff_onnx_with_huge_ir_version_is_unknown() -> None:
    assert sniff(b"\x08\xff\xff\xff\x7f\x12\x00") is FileKind.UNKNOWN


def test_sniff_real_onnx_file_is_onnx(onnx_bundle: Path) -> None:
    head = (onnx_bundle / "model.onnx").read_bytes()[:512]
    assert sniff(head) is FileKind.ONNX


def test_sniff_real_torch_save_is_torch_zip(pytorch_bundle: Path) -> None:
    head = (pytorch_bundle / "model.pt").read_bytes()[:512]
    assert sniff(head) is FileKind.TORCH_ZIP


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("m.gguf", FileKind.GGUF),
        ("model-00001-of-00002.safetensors", FileKind.SAFETENSORS),
        ("pytorch_model.bin", FileKind.TORCH_LEGACY),
        ("model.PTH", FileKind.TORCH_ZIP),
        ("model.pt", FileKind.TORCH_TAR),
        ("onnx/model.onnx", FileKind.ONNX),
        ("config.json", FileKind.JSON),
        ("merges.txt", FileKind.TEXT),
        ("chat_template.jinja", FileKind.TEXT),
        ("tokenizer.model", FileKind.SENTENCEPIECE),
        ("model.onnx.data", FileKind.UNKNOWN),
        ("model.onnx_data", FileKind.GGUF),
        ("weights.data", FileKind.TEXT),
    ],
)
def test_expected_kinds_by_extension_includes_kind(path: str, kind: FileKind) -> None:
    assert kind in expected_kinds(path)


def test_expected_kinds_unknown_extension_is_empty() -> None:
    assert expected_kinds("setup.py") == frozenset()


def test_expected_kinds_gguf_excludes_pickle() -> None:
    assert FileKind.TORCH_LEGACY not in expected_kinds("m.gguf")


@pytest.mark.parametrize("path", ["model.onnx.data", "x/y.onnx_data", "w.weight", "a.data"])
def test_is_external_data_data_names_are_true(path: str) -> None:
    assert is_external_data(path)


def test_is_external_data_onnx_model_is_false() -> None:
    assert not is_external_data("model.onnx")


@pytest.mark.parametrize("path", ["model.gguf", "a/b/config.json", "README.md", "m.onnx.data"])
def test_is_allowed_path_bundle_files_are_allowed(path: str) -> None:
    assert is_allowed_path(path)


@pytest.mark.parametrize(
    "path", ["modeling.py", "../config.json", "/etc/passwd", "a\\b.json", "x.exe", ".hidden.json"]
)
def test_is_allowed_path_other_files_are_refused(path: str) -> None:
    assert not is_allowed_path(path)


def test_path_rejection_python_file_is_remote_code() -> None:
    rejection = path_rejection("modeling_custom.py")
    assert rejection is not None and rejection.code == "REMOTE_CODE"


def test_path_rejection_traversal_is_unsupported_file() -> None:
    rejection = path_rejection("../../x.gguf")
    assert rejection is not None and rejection.code == "UNSUPPORTED_FILE"


def test_path_rejection_good_path_is_none() -> None:
    assert path_rejection("tokenizer.json") is None


def test_check_kind_pickle_named_gguf_is_format_mismatch() -> None:
    with pytest.raises(Rejected, match=r"x\.gguf is not a GGUF file: its bytes are a pickle") as e:
        check_kind("x.gguf", FileKind.TORCH_LEGACY, 100)
    assert e.value.code == "FORMAT_MISMATCH"


def test_check_kind_empty_file_says_empty() -> None:
    with pytest.raises(Rejected, match="it is empty"):
        check_kind("model.safetensors", FileKind.TEXT, 0)


def test_check_kind_zip_named_bin_is_accepted() -> None:
    check_kind("pytorch_model.bin", FileKind.TORCH_ZIP, 100)
    assert FileKind.ZIP in expected_kinds("pytorch_model.bin")


def test_sniff_big_endian_gguf_is_gguf() -> None:
    assert sniff(GgufSpec(version_bytes=struct.pack(">I", 3)).build()) is FileKind.GGUF

"""PyTorch archives: the one-pass zip parser, the torch layout and the legacy formats."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.utils.bad_files import reader_for
from tests.utils.hostile_pickles import (
    RawEntry,
    build_zip,
    call_payload,
    canary_pickle,
    torch_like_zip,
    zip_members,
)
from tests.utils.model_files import tiny_llama
from validators.base import Rejected
from validators.pickle_rules import ALLOWED_GLOBALS
from validators.torch_zip import validate_legacy_pickle, validate_torch_zip


def validate(data: bytes, **kwargs: Any) -> dict[str, Any]:
    reader = reader_for(data, path="model.pt")
    result = validate_torch_zip(reader, **kwargs)
    assert reader.finish() == hashlib.sha256(data).hexdigest()  # read once, to the end
    return result


def rejection(data: bytes, **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        validate(data, **kwargs)
    return info.value


def saved(obj: object, tmp_path: Path, name: str = "model.pt", **kwargs: Any) -> bytes:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path.read_bytes()


def small_state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}


def members(tmp_path: Path) -> list[tuple[str, bytes]]:
    return zip_members(saved(small_state(), tmp_path))


def replaced(items: list[tuple[str, bytes]], name: str, content: bytes) -> list[tuple[str, bytes]]:
    return [(n, content if n == name else c) for n, c in items]


@pytest.mark.parametrize("file_name", ["model.pt", "pytorch_model.bin"])
def test_validate_torch_zip_llama_state_dict_passes(tmp_path: Path, file_name: str) -> None:
    state = tiny_llama().state_dict()
    result = validate(saved(state, tmp_path, file_name))
    assert result["archive"] == Path(file_name).stem
    assert result["tensors"] == len(state)
    assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"} <= set(
        result["pickle_globals"]
    )
    assert {g.dotted for g in ALLOWED_GLOBALS} >= set(result["pickle_globals"])


def test_validate_torch_zip_rewritten_plain_zip_passes(tmp_path: Path) -> None:
    # Same members without data descriptors or alignment padding: still a valid archive
    assert validate(torch_like_zip(members(tmp_path)))["tensors"] == 2


def test_validate_torch_zip_zip64_headers_pass(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, content in members(tmp_path):
            with zf.open(name, "w", force_zip64=True) as out:
                out.write(content)
    assert validate(buf.getvalue())["tensors"] == 2


def test_validate_torch_zip_pickled_module_rejected(tmp_path: Path) -> None:
    err = rejection(saved(torch.nn.Linear(2, 2), tmp_path))
    assert err.code == "PICKLED_MODULE"
    assert "state_dict" in err.message


def test_validate_torch_zip_torchscript_rejected(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    err = rejection(path.read_bytes())
    assert err.code == "TORCHSCRIPT"
    assert "state_dict or safetensors" in err.message


def test_validate_torch_zip_canary_payload_never_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    items = replaced(members(tmp_path), "model/data.pkl", canary_pickle(canary))
    assert rejection(torch_like_zip(items)).code == "PICKLE_UNSAFE_GLOBAL"
    assert not canary.exists()


def test_validate_torch_zip_deflated_entry_rejected(tmp_path: Path) -> None:
    entries = [
        RawEntry(n, c, method=8 if n.endswith("data.pkl") else 0) for n, c in members(tmp_path)
    ]
    assert rejection(build_zip(entries)).code == "ZIP_COMPRESSED_ENTRY"


def test_validate_torch_zip_bad_crc_rejected(tmp_path: Path) -> None:
    entries = [
        RawEntry(n, c, crc=0x1234 if n.endswith("data/0") else None) for n, c in members(tmp_path)
    ]
    assert rejection(build_zip(entries)).code == "ZIP_BAD_CRC"


def test_validate_torch_zip_bad_crc_in_descriptor_entry_rejected(tmp_path: Path) -> None:
    data = bytearray(saved(small_state(), tmp_path))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("model/data/0")
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF  # payload changed, CRC not
    assert rejection(bytes(data)).code == "ZIP_BAD_CRC"


def test_validate_torch_zip_duplicate_data_pkl_rejected(tmp_path: Path) -> None:
    items = members(tmp_path)
    pkl = next(item for item in items if item[0].endswith("data.pkl"))
    assert rejection(torch_like_zip([*items, pkl])).code == "ZIP_DUPLICATE_ENTRY"


def test_validate_torch_zip_central_name_mismatch_rejected(tmp_path: Path) -> None:
    entries = [RawEntry(n, c) for n, c in members(tmp_path)]
    entries[-1].central_name = entries[-1].raw_name[:-1] + b"X"
    assert rejection(build_zip(entries)).code == "ZIP_INCONSISTENT"


def test_validate_torch_zip_end_record_count_mismatch_rejected(tmp_path: Path) -> None:
    data = bytearray(torch_like_zip(members(tmp_path)))
    data[-12] -= 1  # total entries of the end of central directory record
    data[-14] -= 1
    assert rejection(bytes(data)).code == "ZIP_INCONSISTENT"


@pytest.mark.parametrize(
    "name", ["model/../x", "../x", "/model/x", "model\\x", "model/a\x00", "C:/x", "model//x"]
)
def test_validate_torch_zip_unsafe_entry_name_rejected(tmp_path: Path, name: str) -> None:
    items = [*members(tmp_path), (name, b"x")]
    assert rejection(torch_like_zip(items)).code == "ZIP_UNSAFE_PATH"


def test_validate_torch_zip_non_utf8_name_rejected(tmp_path: Path) -> None:
    entries = [RawEntry(n, c) for n, c in members(tmp_path)] + [RawEntry(b"model/\xff", b"")]
    assert rejection(build_zip(entries)).code == "ZIP_UNSAFE_PATH"


@pytest.mark.parametrize("where", ["before", "after"])
def test_validate_torch_zip_junk_around_archive_rejected(tmp_path: Path, where: str) -> None:
    entries = [RawEntry(n, c) for n, c in members(tmp_path)]
    data = build_zip(entries, **{where: b"JUNKJUNK"})
    assert rejection(data).code == "ZIP_INVALID"


def test_validate_torch_zip_junk_between_entries_rejected(tmp_path: Path) -> None:
    items = members(tmp_path)
    data = torch_like_zip(items)
    second = data.index(b"PK\x03\x04", 4)
    assert rejection(data[:second] + b"\x00" * 8 + data[second:]).code == "ZIP_INVALID"


def test_validate_torch_zip_encrypted_entry_rejected(tmp_path: Path) -> None:
    entries = [RawEntry(n, c, flags=1) for n, c in members(tmp_path)]
    assert rejection(build_zip(entries)).code == "ZIP_ENCRYPTED"


def test_validate_torch_zip_big_endian_rejected(tmp_path: Path) -> None:
    items = replaced(members(tmp_path), "model/byteorder", b"big")
    assert rejection(torch_like_zip(items)).code == "TORCH_BIG_ENDIAN"


def test_validate_torch_zip_short_storage_rejected(tmp_path: Path) -> None:
    items = members(tmp_path)
    short = replaced(items, "model/data/0", b"\x00" * 8)
    err = rejection(torch_like_zip(short))
    assert err.code == "TORCH_STORAGE_MISMATCH"
    missing = [(n, c) for n, c in items if n != "model/data/1"]
    assert rejection(torch_like_zip(missing)).code == "TORCH_STORAGE_MISMATCH"


def test_validate_torch_zip_storage_longer_than_declared_rejected(tmp_path: Path) -> None:
    items = members(tmp_path)
    longer = [(n, c + b"\0" * 64 if n == "model/data/0" else c) for n, c in items]
    assert rejection(torch_like_zip(longer)).code == "TORCH_STORAGE_MISMATCH"


def test_validate_torch_zip_unreferenced_data_record_rejected(tmp_path: Path) -> None:
    items = [*members(tmp_path), ("model/data/77", b"\0" * 16)]
    err = rejection(torch_like_zip(items))
    assert err.code == "TORCH_STORAGE_MISMATCH" and "data/77" in err.message


def test_validate_torch_zip_large_pickle_rejected(tmp_path: Path) -> None:
    err = rejection(saved(small_state(), tmp_path), max_pickle_bytes=64)
    assert err.code == "PICKLE_TOO_LARGE"


@pytest.mark.parametrize(
    "items",
    [
        [("model/data.pkl", pickle.dumps({}, protocol=2)), ("model/notes.txt", b"hi")],
        [("model/data.pkl", pickle.dumps({}, protocol=2)), ("other/version", b"3\n")],
        [("model/version", b"3\n")],
    ],
)
def test_validate_torch_zip_foreign_layout_rejected(items: list[tuple[str, bytes]]) -> None:
    assert rejection(torch_like_zip(items)).code == "TORCH_INVALID"


def test_validate_torch_zip_legacy_tar_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            member = tarfile.TarInfo(name)
            member.size = 4
            tar.addfile(member, io.BytesIO(b"\x80\x02N."))
    for validator in (validate_torch_zip, validate_legacy_pickle):
        with pytest.raises(Rejected) as info:
            validator(reader_for(buf.getvalue()))
        assert info.value.code == "LEGACY_TAR_FORMAT"


def legacy_rejection(data: bytes, **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        validate_legacy_pickle(reader_for(data, path="old.pt"), **kwargs)
    return info.value


def test_validate_legacy_pickle_old_torch_save_rejected(tmp_path: Path) -> None:
    data = saved(small_state(), tmp_path, _use_new_zipfile_serialization=False)
    err = legacy_rejection(data)
    assert err.code == "LEGACY_PICKLE_FORMAT"
    assert "torch.save" in err.message and "safetensors" in err.message
    assert legacy_rejection(data, max_pickle_bytes=100).code == "LEGACY_PICKLE_FORMAT"


def test_validate_legacy_pickle_payload_reported_unsafe(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    assert legacy_rejection(canary_pickle(canary)).code == "PICKLE_UNSAFE_GLOBAL"
    assert not canary.exists()
    legacy = saved(small_state(), tmp_path, _use_new_zipfile_serialization=False)
    # a payload hidden in the data pickle of a legacy file, after three honest pickles
    head = legacy[: legacy.index(b"\x80\x02", 30)]
    hidden = head + call_payload("os", "system", "id", "proto2")
    assert legacy_rejection(hidden).code == "PICKLE_UNSAFE_GLOBAL"


def test_validate_legacy_pickle_whole_module_rejected(tmp_path: Path) -> None:
    data = saved(torch.nn.Linear(2, 2), tmp_path, _use_new_zipfile_serialization=False)
    assert legacy_rejection(data).code == "PICKLED_MODULE"


def test_validate_legacy_pickle_garbage_rejected_invalid() -> None:
    assert legacy_rejection(b"\x80\x02\xff\xff").code == "PICKLE_INVALID"
    assert legacy_rejection(b"\x80\x02N.trailing").code == "PICKLE_INVALID"

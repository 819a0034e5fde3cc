"""The streaming ONNX walker: real exports, external data escapes, hidden references."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from tests.utils.bad_files import reader_for
from tests.utils.onnx_builders import (
    custom_op_model,
    external_tensor,
    function_model,
    if_model,
    matmul_graph,
    model_of,
    nested_if_model,
    tiny_model,
    weight,
)
from validators.base import Rejected
from validators.onnx import validate_onnx

ESCAPES = ["../../etc/passwd", "/etc/passwd", "a/../../x", "*/_ORT_MEM_ADDR_/*", "C:\\x", "..\\x"]


def validate(data: bytes) -> dict[str, Any]:
    reader = reader_for(data, path="model.onnx")
    result = validate_onnx(reader)
    assert reader.finish() == hashlib.sha256(data).hexdigest()  # the whole file, once
    return result


def rejection(data: bytes | onnx.ModelProto) -> Rejected:
    raw = data.SerializeToString() if isinstance(data, onnx.ModelProto) else data
    with pytest.raises(Rejected) as info:
        validate(raw)
    return info.value


def test_validate_onnx_tiny_model_passes() -> None:
    model = tiny_model()
    onnx.checker.check_model(model)
    result = validate(model.SerializeToString())
    assert result["opsets"] == {"": 17}
    assert result["n_initializers"] == 1
    assert result["external_data"] == []
    assert result["ir_version"] == 8


def test_validate_onnx_saved_external_data_returns_names(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    model = model_of(matmul_graph(weight(rows=64, cols=32)))
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    result = validate(path.read_bytes())
    assert result["external_data"] == ["model.onnx.data"]
    (ref,) = result["external_refs"]
    assert ref["location"] == "model.onnx.data"
    assert ref["length"] == ref["nbytes"] == 64 * 32 * 4
    assert ref["offset"] >= 0


def test_validate_onnx_real_llama_export_passes(tmp_path: Path) -> None:
    from tests.utils.model_files import make_onnx_bundle

    make_onnx_bundle(tmp_path, external_data=True)
    result = validate((tmp_path / "model.onnx").read_bytes())
    assert result["external_data"] == ["model.onnx.data"]
    assert result["n_nodes"] > 10
    assert result["opsets"].get("", 0) >= 14


@pytest.mark.parametrize("location", ESCAPES)
def test_validate_onnx_escaping_location_rejected(location: str) -> None:
    err = rejection(model_of(matmul_graph(external_tensor(location))))
    assert err.code == "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"


@pytest.mark.parametrize("location", ESCAPES[:4])
def test_validate_onnx_escape_in_if_branch_rejected(location: str) -> None:
    err = rejection(if_model(external_tensor(location, name="C")))
    assert err.code == "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"


@pytest.mark.parametrize("location", ESCAPES[:4])
def test_validate_onnx_escape_in_local_function_rejected(location: str) -> None:
    err = rejection(function_model(external_tensor(location, name="C")))
    assert err.code == "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"


def test_validate_onnx_escape_in_basepath_rejected() -> None:
    tensor = external_tensor("w.bin", basepath="../..")
    assert rejection(model_of(matmul_graph(tensor))).code == "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"


@pytest.mark.parametrize(
    "extra",
    [{"owner": "root"}, {"offset": "-1"}, {"length": "0x10"}, {"length": "25"}, {"location": ""}],
)
def test_validate_onnx_bad_external_fields_rejected(extra: dict[str, str]) -> None:
    tensor = external_tensor("w.bin")
    keys = [e.key for e in tensor.external_data]
    for key, value in extra.items():
        if key in keys:
            tensor.external_data[keys.index(key)].value = value
        else:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    assert rejection(model_of(matmul_graph(tensor))).code == "ONNX_INVALID"


def test_validate_onnx_subfolder_location_passes() -> None:
    result = validate(model_of(matmul_graph(external_tensor("weights/w.bin"))).SerializeToString())
    assert result["external_data"] == ["weights/w.bin"]


def test_validate_onnx_short_raw_data_rejected() -> None:
    tensor = weight()
    tensor.raw_data = tensor.raw_data[:-4]
    assert rejection(model_of(matmul_graph(tensor))).code == "ONNX_INVALID"


def test_validate_onnx_short_raw_data_in_if_branch_rejected() -> None:
    tensor = weight("C")
    tensor.dims[0] = 1000
    assert rejection(if_model(tensor)).code == "ONNX_INVALID"


def test_validate_onnx_unknown_domain_rejected() -> None:
    err = rejection(custom_op_model("evil.ops"))
    assert err.code == "ONNX_UNKNOWN_DOMAIN"
    assert "evil.ops" in err.message


@pytest.mark.parametrize("domain", ["com.microsoft", "ai.onnx.ml"])
def test_validate_onnx_known_domain_passes(domain: str) -> None:
    assert domain in validate(custom_op_model(domain).SerializeToString())["domains"]


def test_validate_onnx_local_function_domain_passes() -> None:
    result = validate(function_model(weight("C")).SerializeToString())
    assert "local.fns" in result["domains"]


def test_validate_onnx_truncated_file_rejected() -> None:
    data = model_of(matmul_graph(weight(rows=16, cols=16))).SerializeToString()
    for cut in (1, 10, len(data) // 2, len(data) - 3):
        assert rejection(data[:cut]).code == "ONNX_INVALID"


@pytest.mark.parametrize(
    "data",
    [
        b"\x08\x08" + b"\xff" * 64,  # varint longer than 10 bytes
        b"\x08\x08\x3a\xff\xff\xff\xff\x0f",  # graph length past the file
        b"\x08\x08\x3b\x00",  # group wire type
        b"\x08\x08\x00\x01",  # field number 0
        bytes(range(256)) * 4,
    ],
)
def test_validate_onnx_garbage_rejected(data: bytes) -> None:
    assert rejection(data).code == "ONNX_INVALID"


def test_validate_onnx_missing_ir_version_rejected() -> None:
    model = tiny_model()
    model.ClearField("ir_version")
    assert rejection(model).code == "ONNX_INVALID"


def test_validate_onnx_missing_graph_rejected() -> None:
    model = tiny_model()
    model.ClearField("graph")
    assert rejection(model).code == "ONNX_INVALID"


def test_validate_onnx_deep_nesting_rejected() -> None:
    assert validate(nested_if_model(5).SerializeToString())["n_nodes"] > 5
    assert rejection(nested_if_model(25)).code == "ONNX_INVALID"  # 75 message levels


def test_validate_onnx_external_flag_with_raw_data_rejected() -> None:
    tensor = weight()
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    assert rejection(model_of(matmul_graph(tensor))).code == "ONNX_INVALID"


def test_validate_onnx_sparse_initializer_checked() -> None:
    values = external_tensor("../x", name="values")
    indices = helper.make_tensor("indices", TensorProto.INT64, [6], list(range(6)))
    sparse = helper.make_sparse_tensor(values, indices, [3, 2])
    graph = matmul_graph()
    graph.sparse_initializer.append(sparse)
    assert rejection(model_of(graph)).code == "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"

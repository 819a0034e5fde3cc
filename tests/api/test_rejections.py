"""Hostile and broken uploads, end to end: API → queue → real worker → verdict."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.utils.bad_files import safetensors_bytes, st_entry
from tests.utils.factories import Content, bundle_dir, create_account, upload_model
from tests.utils.hostile_pickles import canary_pickle, torch_like_zip, zip_members
from tests.utils.stack import StackInfo

Builder = Callable[[dict[str, Path], Path], dict[str, Content]]


def _tokenizer_and_config(bundle: Path) -> dict[str, Content]:
    return {k: v for k, v in bundle_dir(bundle).items() if k.endswith(".json") and "model" not in k}


def _text_as_gguf(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    return {"model.gguf": b"this is just text pretending to be a model\n" * 10}


def _truncated_gguf(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    data = fx["gguf"].read_bytes()
    return {"model.gguf": data[: len(data) // 2]}


def _absurd_gguf_counts(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    data = bytearray(fx["gguf"].read_bytes())
    data[8:16] = struct.pack("<Q", 2**63 - 1)  # n_tensors
    return {"model.gguf": bytes(data)}


def _truncated_safetensors(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    files = bundle_dir(fx["transformers"])
    data = Path(files["model.safetensors"]).read_bytes()  # type: ignore[arg-type]
    return {**files, "model.safetensors": data[: len(data) - 100]}


def _overlapping_safetensors(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    header = {"a": st_entry("F32", [4], 0, 16), "b": st_entry("F32", [4], 8, 24)}
    return {
        **bundle_dir(fx["transformers"]),
        "model.safetensors": safetensors_bytes(header, b"\0" * 24),
    }


def _duplicate_key_safetensors(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    return {
        **bundle_dir(fx["transformers"]),
        "model.safetensors": safetensors_bytes(raw, b"\0" * 4),
    }


def _os_system_pickle(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    members = zip_members(Path(bundle_dir(fx["pytorch"])["model.pt"]).read_bytes())  # type: ignore[arg-type]
    poisoned = [
        (n, canary_pickle(tmp / "canary") if n.endswith("data.pkl") else c) for n, c in members
    ]
    return {**_tokenizer_and_config(fx["pytorch"]), "model.pt": torch_like_zip(poisoned)}


def _pickled_module(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    import torch

    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    return {**_tokenizer_and_config(fx["pytorch"]), "model.pt": buf.getvalue()}


def _torchscript(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    import torch

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    return {**_tokenizer_and_config(fx["pytorch"]), "model.pt": buf.getvalue()}


def _onnx_escape(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    from tests.utils.onnx_builders import external_tensor, matmul_graph, model_of

    model = model_of(matmul_graph(external_tensor("../../etc/passwd")))
    return {**_tokenizer_and_config(fx["onnx"]), "model.onnx": model.SerializeToString()}


def _auto_map(fx: dict[str, Path], tmp: Path) -> dict[str, Content]:
    files = bundle_dir(fx["transformers"])
    config = json.loads(Path(files["config.json"]).read_text())  # type: ignore[arg-type]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    return {**files, "config.json": json.dumps(config).encode()}


CASES: dict[str, tuple[Builder, set[str]]] = {
    "text-named-gguf": (_text_as_gguf, {"FORMAT_MISMATCH"}),
    "truncated-gguf": (_truncated_gguf, {"TRUNCATED", "GGUF_INVALID"}),
    "absurd-gguf-counts": (_absurd_gguf_counts, {"GGUF_INVALID"}),
    "truncated-safetensors": (_truncated_safetensors, {"TRUNCATED", "SAFETENSORS_INVALID"}),
    "overlapping-safetensors": (_overlapping_safetensors, {"SAFETENSORS_INVALID"}),
    "duplicate-key-safetensors": (_duplicate_key_safetensors, {"SAFETENSORS_INVALID"}),
    "os-system-pickle": (_os_system_pickle, {"PICKLE_UNSAFE_GLOBAL"}),
    "pickled-module": (_pickled_module, {"PICKLED_MODULE"}),
    "torchscript": (_torchscript, {"TORCHSCRIPT"}),
    "onnx-external-escape": (_onnx_escape, {"ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"}),
    "config-auto-map": (_auto_map, {"REMOTE_CODE"}),
}


@pytest.fixture(scope="session")
def fixtures(
    gguf_model: Path, transformers_bundle: Path, pytorch_bundle: Path, onnx_bundle: Path
) -> dict[str, Path]:
    return {
        "gguf": gguf_model,
        "transformers": transformers_bundle,
        "pytorch": pytorch_bundle,
        "onnx": onnx_bundle,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_upload_hostile_bundle_is_rejected_with_code(
    client: TestClient, stack: StackInfo, fixtures: dict[str, Path], tmp_path: Path, case: str
) -> None:
    build, codes = CASES[case]
    token = create_account(client)
    verdict = upload_model(client, token, build(fixtures, tmp_path), name=case)
    assert verdict["status"] == "rejected", verdict
    assert verdict["rejection"]["code"] in codes, verdict["rejection"]
    assert verdict["rejection"]["message"]
    assert verdict["api_key"] is None
    assert not (tmp_path / "canary").exists()
    assert stack.worker.alive(), stack.worker.log()[-2000:]

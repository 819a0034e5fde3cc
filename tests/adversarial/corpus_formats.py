"""safetensors headers, ONNX external data and Transformers bundles that must be refused."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from tests.adversarial.case import Bases, Case
from tests.utils.bad_files import safetensors_bytes, st_entry
from tests.utils.hostile_pickles import canary_pickle

ST_INVALID = "SAFETENSORS_INVALID"
OUTSIDE = "ONNX_EXTERNAL_DATA_OUTSIDE_BUNDLE"
# A template that tries to walk from a string to `os`; the sandbox refuses it when rendered.
HF_SSTI = "{{ cycler.__init__.__globals__.os.system('touch CANARY') }}"


def _two(a: tuple[int, int], b: tuple[int, int]) -> dict[str, Any]:
    return {"a": st_entry("F32", [1], *a), "b": st_entry("F32", [1], *b)}


def _safetensors_files(b: Bases) -> Iterator[tuple[str, bytes, str]]:
    one = {"a": st_entry("F32", [1], 0, 4)}
    raw_one = json.dumps(one).encode()
    yield (
        "header-length-2-64",
        struct.pack("<Q", 2**64 - 1) + raw_one + b"\0" * 4,
        ("FORMAT_MISMATCH"),
    )
    yield "header-length-past-file", safetensors_bytes(one, b"\0" * 4, length=4096), "TRUNCATED"
    yield (
        "header-length-over-cap",
        safetensors_bytes(one, b"\0" * 4, length=200_000_000),
        (ST_INVALID),
    )
    yield "header-invalid-utf8", safetensors_bytes(b'{"a\xff\xfe": 1}'), ST_INVALID
    yield "header-not-brace", safetensors_bytes(b'  ["a"]  '), "FORMAT_MISMATCH"
    dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    yield "duplicate-names", safetensors_bytes(dup, b"\0" * 4), ST_INVALID
    yield "gap", safetensors_bytes(_two((0, 4), (8, 12)), b"\0" * 12), ST_INVALID
    yield "overlap", safetensors_bytes(_two((0, 4), (2, 6)), b"\0" * 8), ST_INVALID
    yield "reversed-offsets", safetensors_bytes({"a": st_entry("F32", [1], 4, 0)}), ST_INVALID
    yield "offsets-past-file", safetensors_bytes(_two((0, 4), (4, 8)), b"\0" * 4), "TRUNCATED"
    yield "trailing-bytes", safetensors_bytes(one, b"\0" * 12), ST_INVALID
    huge = {"a": st_entry("F32", [2**40, 2**40], 0, 4)}
    yield "shape-overflow", safetensors_bytes(huge, b"\0" * 4), ST_INVALID
    yield (
        "unknown-dtype",
        safetensors_bytes({"a": st_entry("F31", [1], 0, 4)}, b"\0" * 4),
        (ST_INVALID),
    )
    meta = {**one, "__metadata__": {"format": {"nested": "object"}}}
    yield "non-string-metadata", safetensors_bytes(meta, b"\0" * 4), ST_INVALID


def safetensors_cases(b: Bases) -> Iterator[Case]:
    for name, data, code in _safetensors_files(b):
        yield Case(f"safetensors-{name}", "safetensors", b.hf(**{"model.safetensors": data}), code)
    canary = b.canary("safetensors-renamed-pickle")
    files = b.hf(**{"model.safetensors": canary_pickle(canary)})
    yield Case("safetensors-renamed-pickle", "safetensors", files, "FORMAT_MISMATCH", canary)


def _onnx_models() -> Iterator[tuple[str, Any, dict[str, bytes], str]]:
    from onnx import TensorProto

    from tests.utils.onnx_builders import (
        custom_op_model,
        external_tensor,
        function_model,
        if_model,
        matmul_graph,
        model_of,
    )

    def ext(location: str, **extra: str) -> Any:
        return model_of(matmul_graph(external_tensor(location, **extra)))

    for label, location in [
        ("dotdot-etc-passwd", "../../etc/passwd"),
        ("absolute-etc-passwd", "/etc/passwd"),
        ("inner-dotdot", "a/../../x"),
        ("ort-mem-addr", "*/_ORT_MEM_ADDR_/*"),
        ("proc-self-root-symlink", "/proc/self/root/etc/passwd"),
        ("backslash", "..\\..\\x"),
    ]:
        yield label, ext(location), {}, OUTSIDE
    yield "basepath-escape", ext("w.data", basepath="../.."), {"w.data": b"\0" * 24}, OUTSIDE
    # The bundle is materialised from uploaded objects only: a name that is not one of them
    # (a link the attacker hopes exists on the host) is missing, whatever it points to.
    yield "link-not-in-bundle", ext("hardlink.data"), {}, "ONNX_EXTERNAL_DATA_MISSING"
    yield "unknown-key", ext("w.data", evil="1"), {"w.data": b"\0" * 24}, "ONNX_INVALID"
    yield (
        "length-past-data-file",
        ext("w.data"),
        {"w.data": b"\0" * 8},
        ("ONNX_EXTERNAL_DATA_OUT_OF_RANGE"),
    )
    yield (
        "offset-past-data-file",
        ext("w.data", offset="4096"),
        {"w.data": b"\0" * 24},
        ("ONNX_EXTERNAL_DATA_OUT_OF_RANGE"),
    )
    short = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 2], raw_data=b"\0" * 8)
    yield "raw-data-short", model_of(matmul_graph(short)), {}, "ONNX_INVALID"
    yield (
        "escape-in-if-branch",
        if_model(external_tensor("../../etc/passwd", name="C")),
        {},
        (OUTSIDE),
    )
    yield "escape-in-local-function", function_model(external_tensor("/etc/shadow")), {}, OUTSIDE
    yield "unknown-domain", custom_op_model("evil.ops"), {}, "ONNX_UNKNOWN_DOMAIN"


def onnx_cases(b: Bases) -> Iterator[Case]:
    for name, model, extra, code in _onnx_models():
        files = b.onnx_with(model.SerializeToString(), **extra)
        yield Case(f"onnx-{name}", "onnx", files, code)


def transformers_cases(b: Bases) -> Iterator[Case]:
    def with_config(**changes: Any) -> dict[str, Any]:
        return b.hf(**{"config.json": json.dumps({**b.hf_config(), **changes}).encode()})

    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    yield Case("hf-auto-map", "transformers", with_config(auto_map=auto_map), "REMOTE_CODE")
    yield Case("hf-trust-remote-code", "transformers", with_config(trust_remote_code=True),
               "REMOTE_CODE")  # fmt: skip
    tok_config = json.loads((b.transformers / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    files = b.hf(**{"tokenizer_config.json": json.dumps(tok_config).encode()})
    yield Case("hf-tokenizer-auto-map", "transformers", files, "REMOTE_CODE")
    canary = b.canary("hf-python-file")
    code = f"open({str(canary)!r}, 'w').close()\n".encode()
    files = b.hf(**{"modeling_evil.py": code})
    yield Case("hf-python-file", "transformers", files, "INVALID_REQUEST", canary, "declare")
    archs = with_config(architectures=["EvilForCausalLM"], model_type="evil")
    yield Case("hf-unknown-architecture", "transformers", archs, "UNSUPPORTED_ARCHITECTURE")
    files = b.hf(**{"tokenizer.json": b'{"model": {"type": "BPE", '})
    yield Case("hf-tokenizer-not-json", "transformers", files, "TOKENIZER_INVALID")
    canary = b.canary("hf-chat-template-ssti")
    tok_config = json.loads((b.transformers / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = HF_SSTI.replace("CANARY", str(canary))
    files = b.hf(**{"tokenizer_config.json": json.dumps(tok_config).encode()})
    yield Case("hf-chat-template-ssti", "transformers", files, "CHAT_TEMPLATE_UNSAFE", canary)

"""The static pickle scanner: every way of reaching a global, every opcode misuse."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from tests.utils.hostile_pickles import (
    PROTO2,
    PROTO4,
    STOP,
    STYLES,
    Style,
    call_payload,
    canary_pickle,
    global_op,
    stack_global,
    unicode,
    zip_members,
)
from validators.base import Rejected
from validators.pickle_rules import ALLOWED_GLOBALS
from validators.pickle_scan import PickleScan, scan_pickle

ORDERED_DICT = global_op("collections", "OrderedDict")
TENSOR_V2 = global_op("torch._utils", "_rebuild_tensor_v2")


def rejection(data: bytes) -> Rejected:
    with pytest.raises(Rejected) as info:
        scan_pickle(data)
    return info.value


def state_dict_pickle(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return next(data for name, data in zip_members(buf.getvalue()) if name.endswith("data.pkl"))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("module", "name"), [("os", "system"), ("posix", "system"), ("subprocess", "Popen")]
)
def test_scan_pickle_command_execution_rejected(module: str, name: str, style: Style) -> None:
    err = rejection(call_payload(module, name, "id", style))
    assert err.code == "PICKLE_UNSAFE_GLOBAL"
    assert f"{module}.{name}" in err.message


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "getattr"),
        ("builtins", "eval"),
        ("importlib", "import_module"),
        ("operator", "attrgetter"),
        ("builtins", "print.__class__"),
        ("collections", "OrderedDict.fromkeys"),
        ("torch._utils", "_rebuild_tensor_v2.__globals__"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_scan_pickle_gadget_global_rejected(module: str, name: str) -> None:
    for style in STYLES:
        err = rejection(call_payload(module, name, "x", style))
        assert err.code == "PICKLE_UNSAFE_GLOBAL"
        assert f"{module}.{name}" in err.message


def test_scan_pickle_canary_payload_never_runs(tmp_path: Path) -> None:
    proof, canary = tmp_path / "proof", tmp_path / "canary"
    pickle.loads(canary_pickle(proof))  # proves the payload is live
    assert proof.exists()
    for protocol in range(6):
        assert rejection(canary_pickle(canary, protocol)).code == "PICKLE_UNSAFE_GLOBAL"
    assert not canary.exists()


def test_scan_pickle_state_dict_passes_with_storages() -> None:
    state = {"w": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    state["u"] = torch.zeros(5, dtype=torch.uint16)  # written with _rebuild_tensor_v3
    state["p"] = torch.nn.Parameter(torch.ones(2))
    scan = scan_pickle(state_dict_pickle(state))
    assert set(scan.globals) <= ALLOWED_GLOBALS
    assert sorted(ref.nbytes for ref in scan.storages.values()) == [8, 8, 10, 24]


def test_scan_pickle_transformers_state_dict_passes() -> None:
    from tests.utils.model_files import tiny_llama

    scan = scan_pickle(state_dict_pickle(tiny_llama().state_dict()))
    assert isinstance(scan, PickleScan)
    assert "collections.OrderedDict" in scan.global_names
    assert len(scan.storages) > 10


def test_scan_pickle_whole_module_rejected_as_pickled_module() -> None:
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    data = next(d for n, d in zip_members(buf.getvalue()) if n.endswith("data.pkl"))
    err = rejection(data)
    assert err.code == "PICKLED_MODULE"
    assert "state_dict" in err.message


@pytest.mark.parametrize(("module", "name"), [("__main__", "Net"), ("transformers", "Llama")])
def test_scan_pickle_model_class_rejected_as_pickled_module(module: str, name: str) -> None:
    data = PROTO2 + global_op(module, name) + b")\x81}b" + STOP  # NEWOBJ then BUILD
    assert rejection(data).code == "PICKLED_MODULE"


def test_scan_pickle_module_with_payload_reports_unsafe_first() -> None:
    module = global_op("__main__", "Net") + b")\x81}b0"
    payload = global_op("os", "system") + unicode("id") + b"\x85R"
    assert rejection(PROTO2 + module + payload + STOP).code == "PICKLE_UNSAFE_GLOBAL"


def test_scan_pickle_truncated_after_reduce_reports_unsafe() -> None:
    data = call_payload("os", "system", "id", "proto2")
    assert rejection(data[:-1]).code == "PICKLE_UNSAFE_GLOBAL"


def test_scan_pickle_truncated_benign_rejected_invalid() -> None:
    data = PROTO2 + ORDERED_DICT + b")R"  # no STOP
    assert rejection(data).code == "PICKLE_INVALID"


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80\x02", b"\x80\x02}q\x00.garbage", b"\x80\x02}.\x00", b"\x80\x06}.", b"\xff."],
)
def test_scan_pickle_malformed_rejected_invalid(data: bytes) -> None:
    assert rejection(data).code == "PICKLE_INVALID"


def test_scan_pickle_unresolvable_stack_global_rejected() -> None:
    # the module name is the result of a call, which only a real unpickler could know
    name_from_call = ORDERED_DICT + b")R"
    data = PROTO4 + name_from_call + unicode("system") + b"\x93" + b")R" + STOP
    assert rejection(data).code == "PICKLE_UNSAFE_GLOBAL"


@pytest.mark.parametrize("opcode", [b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00"])
def test_scan_pickle_extension_registry_rejected(opcode: bytes) -> None:
    assert rejection(PROTO2 + opcode + b")R" + STOP).code == "PICKLE_UNSAFE_GLOBAL"


def test_scan_pickle_inst_and_obj_rejected() -> None:
    inst = b"(S'id'\nios\nsystem\n" + STOP
    obj = b"(" + global_op("os", "system") + b"S'id'\no" + STOP
    assert rejection(inst).code == "PICKLE_UNSAFE_GLOBAL"
    assert rejection(obj).code == "PICKLE_UNSAFE_GLOBAL"


def test_scan_pickle_reference_only_global_called_rejected() -> None:
    data = PROTO2 + global_op("torch", "FloatStorage") + b"K\x10\x85R" + STOP
    assert rejection(data).code == "PICKLE_UNSAFE_GLOBAL"


@pytest.mark.parametrize(
    "body",
    [
        b"}}b",  # BUILD on a plain dict
        TENSOR_V2 + b")R}b",  # BUILD on a rebuilt tensor
        b"]K\x01K\x02s",  # SETITEM on a list
        b"}K\x01a",  # APPEND on a dict
        ORDERED_DICT + b")RK\x01a",  # APPEND on an OrderedDict
        unicode("os") + b")R",  # calling a string
        b"\x97",  # NEXT_BUFFER
        b"P1\n",  # text persistent id
    ],
)
def test_scan_pickle_opcode_misuse_rejected(body: bytes) -> None:
    assert rejection(PROTO4 + body + STOP).code == "PICKLE_UNSAFE_OPCODE"


def storage_record(storage_type: bytes, key: str, *, fields: int = 5) -> bytes:
    """A BINPERSID storage record, cut down to `fields` fields."""
    parts = [unicode("storage"), storage_type, unicode(key), unicode("cpu"), b"K\x01"]
    return b"(" + b"".join(parts[:fields]) + b"tQ"


@pytest.mark.parametrize(
    ("record", "code"),
    [
        (storage_record(global_op("torch", "FloatStorage"), "0", fields=3), "PICKLE_INVALID"),
        (storage_record(global_op("torch", "FloatStorage"), "../0"), "PICKLE_INVALID"),
        (storage_record(global_op("torch", "float32"), "0"), "PICKLE_INVALID"),
        (storage_record(global_op("builtins", "list"), "0"), "PICKLE_UNSAFE_GLOBAL"),
    ],
)
def test_scan_pickle_malformed_storage_record_rejected(record: bytes, code: str) -> None:
    assert rejection(PROTO2 + record + STOP).code == code


def test_scan_pickle_storage_record_collected() -> None:
    record = storage_record(global_op("torch", "HalfStorage"), "7")
    scan = scan_pickle(PROTO2 + record + STOP)
    assert scan.storages["7"].nbytes == 2
    assert scan.storages["7"].storage_type == "torch.HalfStorage"


def test_scan_pickle_plain_set_rejected() -> None:
    err = rejection(pickle.dumps({1, 2}, protocol=2))
    assert err.code == "PICKLE_UNSAFE_GLOBAL"
    assert "__builtin__.set" in err.message


def test_scan_pickle_memoized_allowlisted_global_passes() -> None:
    od = stack_global("collections", "OrderedDict", memoized=True)
    data = PROTO4 + od + b")R" + unicode("k") + b"K\x01s" + STOP
    assert scan_pickle(data).global_names == ["collections.OrderedDict"]


def test_scan_pickle_opcode_flood_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("validators.pickle_scan._MAX_OPCODES", 100)
    assert rejection(PROTO2 + b"N0" * 60 + b"N" + STOP).code == "PICKLE_INVALID"

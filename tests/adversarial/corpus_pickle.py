"""Pickle payloads in every container torch.load accepts (zip, legacy stream, tar).

Each payload is a working exploit: unpickled, it would create its case's canary file. None is
ever unpickled here; the tests assert that the canary is still absent after validation.
"""

from __future__ import annotations

import io
import marshal
import pickle
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tests.adversarial.case import Bases, Case, small_state_members
from tests.utils.hostile_pickles import (
    STOP,
    STYLES,
    call,
    call_payload,
    canary_pickle,
    global_op,
    popen_payload,
    proto2,
    proto4,
    stack_global,
    str_list,
    text,
    torch_like_zip,
)

UNSAFE = "PICKLE_UNSAFE_GLOBAL"


def in_zip(data_pkl: bytes, **records: bytes) -> bytes:
    """The tiny state-dict archive with its data.pkl (and any named record) replaced."""
    out = []
    for name, content in small_state_members():
        record = name.split("/", 1)[1]
        if record == "data.pkl":
            content = data_pkl
        out.append((name, records.get(record, content)))
    return torch_like_zip(out)


def _g(dotted: str) -> bytes:
    module, _, name = dotted.rpartition(".")
    return global_op(module, name)


def _binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _gadgets(path: Path) -> dict[str, bytes]:
    """Routes to code execution that blocklist scanners have missed, as protocol-2 bodies."""
    touch, src = text(f"touch {path}"), f"open({str(path)!r}, 'w').close()"
    os_module = call(_g("builtins.__import__"), text("os"))
    system_of = lambda module: call(_g("builtins.getattr"), module, text("system"))  # noqa: E731
    code_obj = call(_g("builtins.compile"), text(src), text("x"), text("exec"))
    marshalled = _binbytes(marshal.dumps(compile(src, "x", "exec")))
    return {
        "importlib-import-module": call(
            system_of(call(_g("importlib.import_module"), text("os"))), touch
        ),
        "pkgutil-resolve-name": call(call(_g("pkgutil.resolve_name"), text("os:system")), touch),
        "operator-attrgetter": call(
            call(call(_g("operator.attrgetter"), text("system")), os_module), touch
        ),
        "builtins-getattr": call(system_of(os_module), touch),
        "marshal-loads": call(
            call(_g("types.FunctionType"), call(_g("marshal.loads"), marshalled), b"}")
        ),
        "types-function-type": call(call(_g("types.FunctionType"), code_obj, b"}")),
        "pip-main": call(_g("pip.main"), str_list("install", "--target", str(path), "canary")),
        "runpy-run-code": call(_g("runpy._run_code"), code_obj, b"}"),
        "timeit-timeit": call(
            _g("timeit.timeit"), text(src), text("pass"), _g("time.perf_counter"), b"K\x01"
        ),
        "cprofile-run": call(_g("cProfile.run"), text(src)),
        "logging-filehandler": call(_g("logging.FileHandler"), text(str(path))),
    }


GADGETS = (
    "importlib-import-module", "pkgutil-resolve-name", "operator-attrgetter", "builtins-getattr",
    "marshal-loads", "types-function-type", "pip-main", "runpy-run-code", "timeit-timeit",
    "cprofile-run", "logging-filehandler",
)  # fmt: skip


def _protocol_cases(b: Bases) -> Iterator[Case]:
    for target in ("os.system", "posix.system", "subprocess.Popen"):
        for style in STYLES:
            name = f"pickle-{target.replace('.', '-').lower()}-{style}"
            path = b.canary(name)
            if target == "subprocess.Popen":
                payload = popen_payload(("touch", str(path)), style)
            else:
                module, _, fn = target.partition(".")
                payload = call_payload(module, fn, f"touch {path}", style)
            yield Case(name, "pickle", b.pytorch_with(in_zip(payload)), UNSAFE, path)


def _gadget_cases(b: Bases) -> Iterator[Case]:
    for i, name in enumerate(GADGETS):
        path = b.canary(f"pickle-{name}")
        weights = in_zip(proto2(_gadgets(path)[name]))
        if i % 2:  # half of them as a Transformers pytorch_model.bin, half as a .pt state dict
            files = {**b.side_files(b.transformers), "pytorch_model.bin": weights}
        else:
            files = b.pytorch_with(weights)
        yield Case(f"pickle-{name}", "pickle", files, UNSAFE, path)


def _dotted_cases(b: Bases) -> Iterator[Case]:
    path = b.canary("pickle-dotted-exec")
    src = f"open({str(path)!r}, 'w').close()"
    exec_via_print = stack_global("builtins", "print.__self__.exec")
    yield Case(
        "pickle-dotted-exec",
        "pickle",
        b.pytorch_with(in_zip(proto4(exec_via_print + text(src) + b"\x85R"))),
        UNSAFE,
        path,
    )
    path = b.canary("pickle-code-interactive-interpreter")
    src = f"open({str(path)!r}, 'w').close()"
    runsource = stack_global("code", "InteractiveInterpreter.runsource")
    interp = stack_global("code", "InteractiveInterpreter") + b")R"
    body = runsource + interp + text(src) + b"\x86R"
    yield Case(
        "pickle-code-interactive-interpreter",
        "pickle",
        b.pytorch_with(in_zip(proto4(body))),
        UNSAFE,
        path,
    )
    path = b.canary("pickle-dotted-globals")
    # torch._utils is allowlisted; one of its functions' globals is not
    reach = stack_global("torch._utils", "_rebuild_tensor_v2.__globals__.get")
    yield Case("pickle-dotted-globals", "pickle",
               b.pytorch_with(in_zip(proto4(reach + text("os") + b"\x85R"))), UNSAFE, path)  # fmt: skip


def _structure_cases(b: Bases) -> Iterator[Case]:
    yield Case(
        "pickle-setitems-on-list",
        "pickle",
        b.pytorch_with(in_zip(proto2(b"](" + text("k") + text("v") + b"u"))),
        "PICKLE_UNSAFE_OPCODE",
    )
    path = b.canary("pickle-truncated-after-reduce")
    cut = call_payload("os", "system", f"touch {path}", "proto2").removesuffix(STOP)
    yield Case("pickle-truncated-after-reduce", "pickle", b.pytorch_with(in_zip(cut)), UNSAFE, path)
    members = dict(small_state_members())
    key = next(n.split("/", 1)[1] for n in members if "/data/" in n)
    yield Case(
        "pickle-storage-shorter-than-declared",
        "pickle",
        b.pytorch_with(in_zip(members["archive/data.pkl"], **{key: b"\0" * 4})),
        "TORCH_STORAGE_MISMATCH",
    )
    longer = members[f"archive/{key}"] + b"\0" * 64
    yield Case("pickle-storage-longer-than-declared", "pickle",
               b.pytorch_with(in_zip(members["archive/data.pkl"], **{key: longer})),
               "TORCH_STORAGE_MISMATCH")  # fmt: skip


def _container_cases(b: Bases) -> Iterator[Case]:
    import torch

    path = b.canary("pickle-legacy-stream")
    yield Case("pickle-legacy-stream", "pickle", b.pytorch_with(canary_pickle(path)), UNSAFE, path)
    path = b.canary("pickle-legacy-proto0-text")
    yield Case(
        "pickle-legacy-proto0-text",
        "pickle",
        b.pytorch_with(canary_pickle(path, protocol=0), "model.pth"),
        "FORMAT_MISMATCH",
        path,
    )
    path = b.canary("pickle-legacy-tar")
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        for member, content in [
            ("sys_info", pickle.dumps({}, 2)),
            ("pickle", canary_pickle(path)),
            ("storages", pickle.dumps([], 2)),
            ("tensors", pickle.dumps([], 2)),
        ]:
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    yield Case(
        "pickle-legacy-tar", "pickle", b.pytorch_with(tar_buf.getvalue()), "LEGACY_TAR_FORMAT", path
    )
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    yield Case("pickle-torchscript", "pickle", b.pytorch_with(buf.getvalue()), "TORCHSCRIPT")
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    yield Case(
        "pickle-whole-module-zip", "pickle", b.pytorch_with(buf.getvalue()), "PICKLED_MODULE"
    )
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf, _use_new_zipfile_serialization=False)
    yield Case("pickle-whole-module-legacy", "pickle", b.pytorch_with(buf.getvalue()),
               "PICKLED_MODULE")  # fmt: skip


def pickle_cases(b: Bases) -> list[Case]:
    return [
        *_protocol_cases(b),
        *_gadget_cases(b),
        *_dotted_cases(b),
        *_structure_cases(b),
        *_container_cases(b),
    ]

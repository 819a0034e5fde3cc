"""The converter process: `python -m workers.runner.convert_child`, started in a runner sandbox.

Pickle-based weights (`pytorch_model*.bin`, `.pt/.pth` state dicts) become safetensors here, at
validation, so that no serving runner ever unpickles user data. This child is confined exactly
like a serving runner (scrubbed environment, no network, writes only beneath its temp dir, no
new processes) and unpickles only with torch's weights-only unpickler, after our own
allowlist scan passed. What it writes is still untrusted: the worker re-validates every file.

stdin carries `Convert` events (then EOF or `Shutdown`); stdout carries one `Converted` each.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from workers.runner.child import reserve_stdout, set_process_name, short
from workers.runner.protocol import Convert, Converted, ProtocolError, Shutdown, decode

CONVERTER_NAME = b"ift-convert"
# Training scripts often save {"state_dict": ...} or {"model": ...} around the weights.
_WRAPPERS = ("state_dict", "model")


class NotAStateDict(ValueError):
    """The pickle holds something other than a flat mapping of names to dense tensors."""


def state_dict_of(obj: Any) -> dict[str, Any]:
    """The flat `{name: tensor}` mapping inside a loaded checkpoint."""
    import torch

    for key in _WRAPPERS:
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise NotAStateDict("expected a state dict: a mapping of names to tensors")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise NotAStateDict(f"state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise NotAStateDict(f"{name!r} is a {type(value).__name__}, not a tensor")
        if value.layout is not torch.strided or value.is_quantized:
            raise NotAStateDict(f"{name!r} is a sparse or quantized tensor; save dense weights")
    return obj


def storable(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors safetensors will write: each contiguous, on the CPU, owning its own storage.

    safetensors refuses tensors that share memory (tied embeddings, views of one buffer) and
    non-contiguous ones. A tensor whose storage another name already uses is copied, so every
    name keeps its own values and loading needs no knowledge of which weights were tied.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()  # a fresh storage of its own
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def convert(source: Path, target: Path) -> int:
    """Unpickle `source` weights-only and write its tensors to `target`; the tensor count."""
    import torch
    from safetensors.torch import save_file

    with source.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # mmap works on the zip format only
    loaded = torch.load(source, weights_only=True, map_location="cpu", mmap=is_zip)
    tensors = storable(state_dict_of(loaded))
    save_file(tensors, str(target))
    return len(tensors)


def answer(event: Convert) -> Converted:
    try:
        count = convert(Path(event.source), Path(event.target))
    except Exception as exc:  # hostile bytes: any failure is this file's verdict
        traceback.print_exc(file=sys.stderr)
        return Converted(tag=event.tag, error=True, detail=short(exc))
    return Converted(tag=event.tag, tensors=count)


def main() -> int:
    out = reserve_stdout()
    set_process_name(CONVERTER_NAME)
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        # torch.load would ignore weights_only=True: never unpickle like that
        print("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; refusing to convert", file=sys.stderr)
        return 1
    try:
        for line in sys.stdin.buffer:
            event = decode(line)
            if isinstance(event, Shutdown):
                break
            if not isinstance(event, Convert):
                raise ProtocolError(f"expected Convert, got {type(event).__name__}")
            out.send(answer(event))
    except (ProtocolError, OSError) as exc:
        print(f"converter: bad input, stopping: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)

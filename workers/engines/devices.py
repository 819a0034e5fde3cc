"""Which device an engine runs on: CUDA when present (or asked for), else CPU."""

from __future__ import annotations

from workers.engines.base import EngineError

DEVICES = ("auto", "cpu", "cuda")


def torch_device(device: str) -> str:
    """ "cuda" or "cpu" for torch; "cuda" asked for on a host without it is an error."""
    import torch

    if device.split(":")[0] not in DEVICES:
        raise EngineError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for but torch sees no CUDA device")
    return device

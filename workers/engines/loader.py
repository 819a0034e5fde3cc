"""Pick the engine for a bundle's format and load it on the best device available."""

from __future__ import annotations

from pathlib import Path

from validators.base import FileKind
from validators.sniff import HEAD_BYTES, sniff
from workers.engines.base import Engine, EngineError
from workers.engines.devices import DEVICES, torch_device

FORMATS = ("gguf", "transformers", "pytorch", "onnx")
# Longest context an engine is set up for: llama.cpp allocates its KV cache up front.
DEFAULT_CONTEXT_CAP = 8192
PICKLE_KINDS = frozenset(
    {FileKind.TORCH_ZIP, FileKind.TORCH_LEGACY, FileKind.TORCH_TAR, FileKind.ZIP}
)


def load_engine(
    bundle_dir: Path,
    fmt: str,
    *,
    device: str = "auto",
    threads: int = 1,
    context_cap: int = DEFAULT_CONTEXT_CAP,
) -> Engine:
    """Load the bundle with its engine; `device="auto"` uses CUDA when present, else CPU.

    The returned engine's `device` says what it actually runs on.
    """
    bundle_dir = Path(bundle_dir)
    refuse_pickles(bundle_dir)
    if device.split(":")[0] not in DEVICES:
        raise EngineError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if fmt == "gguf":
        from workers.engines.llama import load_gguf

        return load_gguf(_one_file(bundle_dir, {FileKind.GGUF}), device, threads, context_cap)
    if fmt == "onnx":
        from workers.engines.onnx_engine import load_onnx

        model = _one_file(bundle_dir, {FileKind.ONNX})
        return load_onnx(model.parent, model, device, threads, context_cap)
    if fmt in ("transformers", "pytorch"):
        return _load_torch(bundle_dir, fmt, device, threads, context_cap)
    raise EngineError(f"unknown model format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _load_torch(bundle_dir: Path, fmt: str, device: str, threads: int, cap: int) -> Engine:
    import torch

    from workers.engines.hf import load_pytorch, load_transformers

    torch.set_num_threads(threads)
    used = torch_device(device)
    if fmt == "transformers":
        return load_transformers(bundle_dir, used, cap)
    return load_pytorch(bundle_dir, _files_of_kind(bundle_dir, {FileKind.SAFETENSORS}), used, cap)


def refuse_pickles(bundle: Path) -> None:
    """Runners load only safetensors: pickle-based weights were converted at validation.

    A served bundle never holds a pickle; one that does (a bug, an old cache entry, a
    tampered directory) is refused before any loader could unpickle it.
    """
    candidates = [bundle] if bundle.is_file() else sorted(bundle.rglob("*"))
    for path in candidates:
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if sniff(f.read(HEAD_BYTES)) in PICKLE_KINDS:
                    raise EngineError(
                        f"{path.name} is pickle-based weights; runners load only the "
                        "safetensors converted from it at validation"
                    )


def _files_of_kind(bundle: Path, kinds: set[FileKind] | frozenset[FileKind]) -> list[Path]:
    """Bundle files whose bytes (never their names) say they are one of `kinds`."""
    candidates = [bundle] if bundle.is_file() else sorted(bundle.rglob("*"))
    found = []
    for path in candidates:
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if sniff(f.read(HEAD_BYTES)) in kinds:
                    found.append(path)
    if not found:
        names = ", ".join(sorted(k.value for k in kinds))
        raise EngineError(f"no {names} file in the bundle")
    return found


def _one_file(bundle: Path, kinds: set[FileKind]) -> Path:
    found = _files_of_kind(bundle, kinds)
    if len(found) > 1:
        raise EngineError(f"expected one model file, found {len(found)}")
    return found[0]

"""Pickle-based weights become safetensors at validation; runners only ever load safetensors.

A `.bin` or `.pt/.pth` upload that passed the pickle allowlist scan is unpickled once, inside a
sandboxed converter child (`workers.runner.convert_child`), and written out as safetensors.
The child handled hostile bytes, so the worker treats its output as one more upload: it copies
the file out of the sandbox, re-validates it with our own safetensors validator, hashes it and
stores it write-once under `<account>/<model>/converted/<sha256>`. The model's `ModelFile`
rows then hold the converted file with `converted_from` naming the upload it replaces, and
`served` hands runners the converted file instead of the pickle.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from core.settings import Settings
from core.storage.base import ObjectStorage
from core.tables import ModelFile
from validators.base import BundleReport, FileKind, FileReport, HashingReader, Rejected
from validators.pipeline import bundle_digest
from validators.safetensors import validate_safetensors
from workers.runner.converter import ConversionFailed, Converter
from workers.runner.sandbox import SandboxConfig

PICKLE_KINDS = frozenset({FileKind.TORCH_ZIP, FileKind.TORCH_LEGACY, FileKind.ZIP})
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The converter may write at most this much per input byte (shared tensors are copied apart,
# so tied embeddings legitimately grow the output), plus room for the header.
GROWTH = 2
HEADER_ROOM = 128 << 20
_COPY_CHUNK = 1 << 20


class ConversionRejected(Exception):
    """The model cannot be served: its weights did not convert to valid safetensors."""

    def __init__(self, code: str, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.path = path


@dataclass(frozen=True)
class ConvertedFile:
    path: str  # its path in the served bundle
    source: str  # the upload it replaces
    sha256: str
    size: int
    object_key: str
    kind: str = FileKind.SAFETENSORS.value


def converted_path(path: str) -> str:
    """The served name of a converted upload: `x.pt` → `x.safetensors`.

    `pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors`: the names
    transformers looks for.
    """
    folder, name = posixpath.split(path)
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]  # the names transformers looks for
    return posixpath.join(folder, f"{stem}.safetensors")


def served(rows: Sequence[ModelFile]) -> list[ModelFile]:
    """The files a runner gets: an upload that was converted gives way to its conversion."""
    replaced = {r.converted_from for r in rows if r.converted_from}
    return [r for r in rows if r.path not in replaced]


def served_sha256(rows: Sequence[ModelFile]) -> str:
    """The served bundle's digest (the weight-cache key); the upload digest when unconverted."""
    return bundle_digest([(r.path, r.sha256 or "") for r in rows])


def convert_bundle(
    settings: Settings,
    storage: ObjectStorage,
    prefix: str,
    report: BundleReport,
    keys: dict[str, str],
) -> list[ConvertedFile]:
    """Convert every pickle-based file of a validated bundle; `prefix` is the model's key prefix.

    Raises `ConversionRejected` when a file does not convert, the converter dies or times out,
    or what it wrote is not valid safetensors.
    """
    sources = [f for f in report.files if f.kind in PICKLE_KINDS]
    if not sources:
        return []
    taken = {f.path.lower() for f in report.files}
    if SAFETENSORS_INDEX in taken:
        # The worker writes this index for converted shards; an uploaded one would point
        # transformers at safetensors files the upload cannot contain.
        raise ConversionRejected(
            "BUNDLE_INVALID",
            f"{SAFETENSORS_INDEX} belongs to safetensors weights; remove it",
            path=SAFETENSORS_INDEX,
        )
    largest = max(f.size for f in sources)
    config = SandboxConfig(
        threads=settings.runner_threads, max_file_bytes=GROWTH * largest + HEADER_ROOM
    )
    private = Path(tempfile.mkdtemp(prefix="inferatech-convert-"))
    try:
        out: list[ConvertedFile] = []
        shards: dict[str, list[str]] = {}
        timeout = settings.validation_convert_timeout_s
        cap = config.max_file_bytes
        with Converter(timeout_s=timeout, sandbox=config) as converter:
            for source in sources:
                target = converted_path(source.path)
                if target.lower() in taken:
                    raise ConversionRejected(
                        "BUNDLE_INVALID", f"{target} would replace an uploaded file", path=target
                    )
                produced = _convert_one(converter, storage, keys[source.path], source)
                local = _copy_out(produced, private / f"{len(out)}", source.path, cap)
                produced.unlink()  # weights are big: one copy on disk at a time
                converted, names = _store(storage, prefix, source.path, target, local)
                out.append(converted)
                shards[target] = names
        if any(f.path == PICKLE_INDEX for f in report.files):
            out.append(_store_index(storage, prefix, private, shards))
        return out
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _convert_one(
    converter: Converter, storage: ObjectStorage, key: str, source: FileReport
) -> Path:
    try:
        staged = converter.stage(partial(storage.open_read, key), source.sha256, source.size)
        produced = converter.convert(staged)
        staged.unlink()
        return produced
    except ConversionFailed as exc:
        message = f"{source.path}: {exc.message}"
        raise ConversionRejected(exc.code, message, path=source.path) from exc


def _copy_out(produced: Path, dest: Path, source: str, cap: int) -> Path:
    """A private copy of the child's output: a regular file, not a link, fifo or moving target."""
    try:
        fd = os.open(produced, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        reason = f"the converted file cannot be opened ({exc.strerror})"
        raise _invalid(source, reason) from None
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _invalid(source, "the converter wrote something other than a file")
        copied = 0
        with dest.open("xb") as out:
            while block := src.read(_COPY_CHUNK):
                copied += len(block)
                if copied > cap:
                    raise _invalid(source, f"the converted file is over {cap} bytes")
                out.write(block)
    return dest


def _invalid(source: str, reason: str) -> ConversionRejected:
    return ConversionRejected("CONVERSION_INVALID", f"{source}: {reason}", path=source)


def _store(
    storage: ObjectStorage, prefix: str, source: str, target: str, local: Path
) -> tuple[ConvertedFile, list[str]]:
    """Re-validate the converted file as any upload, hash it, store it write-once."""
    size = local.stat().st_size
    with local.open("rb") as f:
        reader = HashingReader(f, size, path=target)
        try:
            summary = validate_safetensors(reader)
            digest = reader.finish()
        except Rejected as exc:
            reason = f"the converted file is not valid safetensors: {exc.message}"
            raise _invalid(source, reason) from None
    if summary["tensor_count"] == 0:
        raise _invalid(source, "the converted file holds no tensors")
    with local.open("rb") as f:
        names = _tensor_names(f)
    key = f"{prefix}converted/{digest}"
    storage.put_file(key, local)
    return ConvertedFile(target, source, digest, size, key), names


def _tensor_names(f: BinaryIO) -> list[str]:
    """The tensor names of a safetensors file that already passed the validator."""
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    return [name for name in header if name != "__metadata__"]


def _store_index(
    storage: ObjectStorage, prefix: str, private: Path, shards: dict[str, list[str]]
) -> ConvertedFile:
    """A `model.safetensors.index.json` for converted shards, written by the worker itself."""
    weight_map: dict[str, str] = {}
    for shard, names in shards.items():
        for name in names:
            if weight_map.setdefault(name, shard) != shard:
                raise _invalid(PICKLE_INDEX, f"tensor {name!r} is in two shards")
    index = private / "index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, sort_keys=True))
    size = index.stat().st_size
    with index.open("rb") as f:
        digest = HashingReader(f, size).finish()
    key = f"{prefix}converted/{digest}"
    storage.put_file(key, index)
    return ConvertedFile(
        SAFETENSORS_INDEX, PICKLE_INDEX, digest, size, key, kind=FileKind.JSON.value
    )

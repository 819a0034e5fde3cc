"""Validate a whole model bundle: every file by its bytes, then the bundle as a whole.

Each file is streamed once through a HashingReader; only headers, JSON and pickle bytes are
held in memory (each capped), so memory stays bounded whatever the weights weigh.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from validators.base import BundleReport, FileKind, FileReport, HashingReader, ModelFormat, Rejected
from validators.gguf import validate_gguf
from validators.safetensors import validate_safetensors
from validators.sniff import HEAD_BYTES, check_kind, is_external_data, path_rejection, sniff
from validators.transformers_bundle import (
    CONFIG_FILES,
    check_no_remote_code,
    check_tokenizer_json,
    check_transformers_bundle,
    tokenizer_kind,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_JSON_BYTES = 64 << 20  # tokenizer.json of large vocabularies is tens of MB
DEFAULT_MAX_PICKLE_BYTES = 64 << 20
MAX_FILES = 1000
VALID_BUNDLES = (
    "a valid bundle is one of: a single .gguf file (README/LICENSE allowed beside it); "
    "config.json + tokenizer files + *.safetensors or pytorch_model*.bin (Transformers); "
    "one .pt/.pth state dict + config.json + tokenizer files (PyTorch); "
    "one .onnx model + its external data files + tokenizer files (ONNX)"
)
_WEIGHT_SUFFIXES = {
    ".gguf": "gguf",
    ".safetensors": "safetensors",
    ".bin": "bin",
    ".pt": "pt",
    ".pth": "pt",
    ".onnx": "onnx",
}
_DOC_PREFIXES = ("readme", "license", "licence", "notice", "copying")


@dataclass
class BundleFile:
    """One uploaded object: its path in the bundle, declared size and a way to stream it."""

    path: str
    size: int
    open: Callable[[], BinaryIO]


@dataclass
class _Context:
    max_json_bytes: int
    max_pickle_bytes: int
    configs: dict[str, Any] = field(default_factory=dict)  # small root JSON files, parsed


def _invalid_bundle(problem: str) -> Rejected:
    return Rejected("BUNDLE_INVALID", f"{problem}; {VALID_BUNDLES}")


def _weight_role(path: str) -> str | None:
    lower = path.lower()
    return next((role for sfx, role in _WEIGHT_SUFFIXES.items() if lower.endswith(sfx)), None)


def _is_doc(path: str) -> bool:
    name = posixpath.basename(path).lower()
    return name.endswith(".md") or (name.endswith(".txt") and name.startswith(_DOC_PREFIXES))


def _check_paths(paths: Sequence[str]) -> None:
    if not paths:
        raise _invalid_bundle("the bundle is empty")
    if len(paths) > MAX_FILES:
        raise _invalid_bundle(f"the bundle has {len(paths)} files, more than {MAX_FILES}")
    seen: set[str] = set()
    for path in paths:
        rejection = path_rejection(path)
        if rejection is not None:
            raise rejection
        if path.lower() in seen:
            raise Rejected("BUNDLE_INVALID", f"{path} appears twice in the bundle", path=path)
        seen.add(path.lower())


def plan_format(paths: Sequence[str]) -> ModelFormat:
    """The bundle format its file names call for; bytes are checked against them later."""
    _check_paths(paths)
    weights: dict[str, list[str]] = {}
    for path in paths:
        role = _weight_role(path)
        if role is not None:
            weights.setdefault(role, []).append(path)
    roles = sorted(weights)
    if len(roles) > 1:
        raise _invalid_bundle(f"the bundle mixes weight formats ({', '.join(roles)})")
    if not roles:
        raise _invalid_bundle("the bundle has no weights file")
    role, found = roles[0], weights[roles[0]]
    if role != "onnx" and any(is_external_data(p) for p in paths):
        raise _invalid_bundle("external data files (.data, .onnx_data) belong to ONNX models")
    if role == "gguf":
        extra = [p for p in paths if p not in found and not _is_doc(p)]
        if len(found) > 1 or extra:
            raise _invalid_bundle(
                f"a GGUF bundle holds one .gguf and no other model files, "
                f"got {sorted(found + extra)[:5]}"
            )
        return ModelFormat.GGUF
    if role == "onnx":
        if len(found) > 1:
            raise _invalid_bundle(f"an ONNX bundle holds one .onnx file, got {sorted(found)}")
        return ModelFormat.ONNX
    return _plan_torch_format(role, found, paths)


def _plan_torch_format(role: str, found: list[str], paths: Sequence[str]) -> ModelFormat:
    if "config.json" not in paths:
        raise _invalid_bundle("config.json is missing")
    if role == "pt":
        if len(found) > 1:
            raise _invalid_bundle(f"a PyTorch bundle holds one .pt/.pth file, got {sorted(found)}")
        return ModelFormat.PYTORCH
    # Other .bin files (training_args.bin, optimizer.bin) are pickles nobody should load.
    stray = [p for p in found if not posixpath.basename(p).startswith("pytorch_model")]
    if role == "bin" and stray:
        raise _invalid_bundle(f"{stray[0]} is not model weights (pytorch_model*.bin); remove it")
    return ModelFormat.TRANSFORMERS


def _parse_json(reader: HashingReader, path: str, ctx: _Context) -> Any:
    is_tokenizer = posixpath.basename(path) == "tokenizer.json"
    code = "TOKENIZER_INVALID" if is_tokenizer else "JSON_INVALID"
    if reader.size > ctx.max_json_bytes:
        raise Rejected("FILE_TOO_LARGE", f"{path} is over {ctx.max_json_bytes} bytes", path=path)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise Rejected(code, f"{path} repeats a key in one object", path=path)
        return out

    try:
        text = codecs.decode(reader.read_exact(reader.size), "utf-8-sig")
        value = json.loads(text, object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected(code, f"{path} is not valid UTF-8 JSON: {exc}", path=path) from None
    if is_tokenizer:
        check_tokenizer_json(value, path)
    return value


def _dispatch(kind: FileKind, reader: HashingReader, path: str, ctx: _Context) -> dict[str, Any]:
    """Run the structure check for `kind`; returns the file's metadata."""
    if kind is FileKind.GGUF:
        return validate_gguf(reader)
    if kind is FileKind.SAFETENSORS:
        return validate_safetensors(reader)
    if kind in (FileKind.TORCH_ZIP, FileKind.ZIP):
        from validators.torch_zip import validate_torch_zip

        return validate_torch_zip(reader, max_pickle_bytes=ctx.max_pickle_bytes)
    if kind is FileKind.TORCH_LEGACY:
        from validators.torch_zip import validate_legacy_pickle

        return validate_legacy_pickle(reader, max_pickle_bytes=ctx.max_pickle_bytes)
    if kind is FileKind.TORCH_TAR:
        raise Rejected(
            "LEGACY_TAR_FORMAT",
            f"{path} is a tar-format checkpoint from PyTorch < 0.4; load it "
            "and re-save it with torch.save (zip format) or as safetensors",
            path=path,
        )
    if kind is FileKind.ONNX:
        from validators.onnx import validate_onnx

        return validate_onnx(reader)
    if kind is FileKind.JSON:
        value = _parse_json(reader, path, ctx)
        if path in CONFIG_FILES:
            ctx.configs[path] = value
        return {}
    return {}  # text, SentencePiece and external data are only hashed


def _validate_file(file: BundleFile, report: FileReport, ctx: _Context) -> None:
    with file.open() as stream:
        reader = HashingReader(stream, file.size, path=file.path)
        kind = FileKind.RAW if is_external_data(file.path) else sniff(reader.peek(HEAD_BYTES))
        if kind is FileKind.TEXT and file.path.lower().endswith(".json"):
            kind = FileKind.JSON  # let the JSON parser say precisely what is wrong
        report.kind = kind
        check_kind(file.path, kind, file.size)
        report.metadata = _dispatch(kind, reader, file.path, ctx)
        report.sha256 = reader.finish()


def _validate_files(files: Sequence[BundleFile], report: BundleReport, ctx: _Context) -> None:
    for file in files:
        file_report = FileReport(file.path, file.size, FileKind.UNKNOWN, sha256="")
        report.files.append(file_report)
        try:
            if file.size < 0:
                raise Rejected("SIZE_MISMATCH", f"{file.path} has a negative size")
            _validate_file(file, file_report, ctx)
        except Rejected as exc:
            exc.path = exc.path or file.path
            file_report.findings.append(exc.finding())
            raise
        except (OSError, ImportError):
            raise  # storage or deployment trouble is retried, never blamed on the upload
        except Exception as exc:
            # A validator bug on hostile bytes must still end in a verdict, not a crash loop.
            log.exception("validator failed on %s", file.path)
            rejected = Rejected(
                "VALIDATOR_ERROR",
                f"{file.path} could not be parsed ({type(exc).__name__})",
                path=file.path,
            )
            file_report.findings.append(rejected.finding())
            raise rejected from exc


def _onnx_checks(report: BundleReport, paths: set[str]) -> dict[str, Any]:
    onnx_file = next(f for f in report.files if f.kind is FileKind.ONNX)
    base = posixpath.dirname(onnx_file.path)
    sizes = {f.path: f.size for f in report.files}
    for name in onnx_file.metadata.get("external_data", []):
        target = posixpath.normpath(posixpath.join(base, name))
        if target not in paths:
            raise Rejected(
                "ONNX_EXTERNAL_DATA_MISSING",
                f"{onnx_file.path} needs external data {name!r}, "
                "which is not in the bundle; upload it beside the model",
                path=onnx_file.path,
            )
    for ref in onnx_file.metadata.get("external_refs", []):
        _check_external_range(ref, sizes[posixpath.normpath(posixpath.join(base, ref["location"]))])
    return {"tokenizer": tokenizer_kind({p for p in paths if "/" not in p})}


def _check_external_range(ref: dict[str, Any], size: int) -> None:
    """A tensor's external bytes must lie inside its data file (readers mmap the range)."""
    offset: int = ref["offset"]
    length = ref["length"] if ref["length"] is not None else ref["nbytes"]
    end = offset + (length or 0)
    if offset > size or end > size:
        raise Rejected(
            "ONNX_EXTERNAL_DATA_OUT_OF_RANGE",
            f"external data {ref['location']!r} is read at bytes {offset}..{end}, "
            f"but the file has {size} bytes",
            path=ref["location"],
        )


def _bundle_metadata(fmt: ModelFormat, report: BundleReport, ctx: _Context) -> dict[str, Any]:
    paths = {f.path for f in report.files}
    check_no_remote_code(ctx.configs)
    if fmt is ModelFormat.GGUF:
        gguf = next(f for f in report.files if f.kind is FileKind.GGUF)
        return {k: v for k, v in gguf.metadata.items() if k != "chat_template"}
    if fmt is ModelFormat.ONNX:
        return _onnx_checks(report, paths)
    return check_transformers_bundle(paths, ctx.configs)


def bundle_sha256(files: Sequence[FileReport]) -> str:
    """The file's digest for one file; else a digest over sorted `path\\tsha256` lines."""
    return bundle_digest([(f.path, f.sha256) for f in files])


def bundle_digest(files: Sequence[tuple[str, str]]) -> str:
    """`bundle_sha256` over `(path, sha256)` pairs (a served bundle, rows from the database)."""
    if len(files) == 1:
        return files[0][1]
    lines = sorted(f"{path}\t{sha256}\n" for path, sha256 in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def validate_bundle(
    files: Sequence[BundleFile],
    *,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
) -> BundleReport:
    """Check every file and the bundle; the first error found is `report.rejection`."""
    report = BundleReport(format=None, sha256=None)
    ctx = _Context(max_json_bytes, max_pickle_bytes)
    try:
        fmt = plan_format([f.path for f in files])
        report.format = fmt
        _validate_files(files, report, ctx)
        report.metadata = _bundle_metadata(fmt, report, ctx)
        report.sha256 = bundle_sha256(report.files)
    except Rejected as exc:
        report.findings.append(exc.finding())
    return report

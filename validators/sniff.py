"""Tell what a file is from its first bytes, and which kinds its file name allows."""

from __future__ import annotations

import codecs
import struct

from core.bundles import ALLOWED_SUFFIXES, path_problem
from validators.base import FileKind, Rejected

HEAD_BYTES = 512
ALLOWED_EXTENSIONS: tuple[str, ...] = ALLOWED_SUFFIXES

# A safetensors header length this large is not a real header; bigger values are far more
# likely to be text that happens to have `{` at offset 8 (e.g. an indented JSON file).
_SNIFF_MAX_SAFETENSORS_HEADER = 1 << 32
# Tags that may follow ModelProto.ir_version: fields 2-8 and 14, 20, 25, 26 of onnx.proto.
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2})
_MAX_ONNX_IR_VERSION = 64
# Control characters that real text files carry; any other one means binary.
_TEXT_CONTROLS = frozenset("\t\n\r\f\x1b")
_ANY_KIND = frozenset(FileKind)
_TORCH_KINDS = frozenset(
    {FileKind.TORCH_ZIP, FileKind.ZIP, FileKind.TORCH_LEGACY, FileKind.TORCH_TAR}
)
# Longest suffixes first so `.onnx.data` wins over `.data`.
_KINDS_BY_SUFFIX: tuple[tuple[str, frozenset[FileKind]], ...] = (
    (".onnx.data", _ANY_KIND),
    (".onnx_data", _ANY_KIND),
    (".safetensors", frozenset({FileKind.SAFETENSORS})),
    (".weight", _ANY_KIND),
    (".jinja", frozenset({FileKind.TEXT})),
    (".model", frozenset({FileKind.SENTENCEPIECE})),
    (".gguf", frozenset({FileKind.GGUF})),
    (".onnx", frozenset({FileKind.ONNX})),
    (".json", frozenset({FileKind.JSON})),
    (".data", _ANY_KIND),
    (".pth", _TORCH_KINDS),
    (".bin", _TORCH_KINDS),
    (".txt", frozenset({FileKind.TEXT})),
    (".pt", _TORCH_KINDS),
    (".md", frozenset({FileKind.TEXT})),
)
_DESCRIPTIONS = {
    FileKind.GGUF: "a GGUF file",
    FileKind.SAFETENSORS: "a safetensors file",
    FileKind.TORCH_ZIP: "a PyTorch zip archive",
    FileKind.TORCH_LEGACY: "a pickle stream",
    FileKind.TORCH_TAR: "a tar archive",
    FileKind.ZIP: "a zip archive",
    FileKind.ONNX: "an ONNX model",
    FileKind.JSON: "JSON",
    FileKind.TEXT: "text",
    FileKind.SENTENCEPIECE: "a SentencePiece model",
    FileKind.RAW: "raw bytes",
    FileKind.UNKNOWN: "of no recognised format",
}


def describe(kind: FileKind) -> str:
    """A human name for a kind, for rejection messages."""
    return _DESCRIPTIONS[kind]


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """Decode a protobuf varint at `pos`; None when it runs off `data` or is over 10 bytes."""
    value = 0
    for i in range(10):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    return None


def _is_onnx(head: bytes) -> bool:
    if not head.startswith(b"\x08"):
        return False
    decoded = _varint(head, 1)
    if decoded is None:
        return False
    ir_version, pos = decoded
    return (
        1 <= ir_version <= _MAX_ONNX_IR_VERSION
        and pos < len(head)
        and (head[pos] in _ONNX_NEXT_TAGS)
    )


def _is_sentencepiece(head: bytes) -> bool:
    # ModelProto field 1 (pieces) holds SentencePiece{piece=1: string, score=2: float, type=3}.
    if not head.startswith(b"\x0a"):
        return False
    outer = _varint(head, 1)
    if outer is None or outer[0] < 2 or outer[1] >= len(head) or head[outer[1]] != 0x0A:
        return False
    inner = _varint(head, outer[1] + 1)
    if inner is None or inner[0] >= outer[0]:
        return False
    after = inner[1] + inner[0]
    return after < len(head) and head[after] in (0x15, 0x18)


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack_from("<Q", head)
    return 2 <= length <= _SNIFF_MAX_SAFETENSORS_HEADER and head[8:9] == b"{"


def _is_text(head: bytes) -> bool:
    try:
        # final=False tolerates a multi-byte character cut at the end of the head.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return not any(ch < " " and ch not in _TEXT_CONTROLS for ch in text)


def _is_json(head: bytes) -> bool:
    stripped = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
    return stripped[:1] in (b"{", b"[") and _is_text(head.removeprefix(codecs.BOM_UTF8))


def _zip_kind(head: bytes) -> FileKind:
    # torch.save writes `<archive>/data.pkl` as the first member of its zip.
    if len(head) >= 30:
        (name_len,) = struct.unpack_from("<H", head, 26)
        name = head[30 : 30 + name_len]
        if name == b"data.pkl" or name.endswith(b"/data.pkl"):
            return FileKind.TORCH_ZIP
    return FileKind.ZIP


def sniff(head: bytes) -> FileKind:
    """What the bytes are, judged from the first ~512 bytes of a file."""
    if head.startswith(b"GGUF"):
        return FileKind.GGUF
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(head)
    if head[257:262] == b"ustar":
        return FileKind.TORCH_TAR
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return FileKind.TORCH_LEGACY
    if _is_safetensors(head):
        return FileKind.SAFETENSORS
    if _is_onnx(head):
        return FileKind.ONNX
    if _is_sentencepiece(head):
        return FileKind.SENTENCEPIECE
    if _is_json(head):
        return FileKind.JSON
    if _is_text(head):
        return FileKind.TEXT
    return FileKind.UNKNOWN


def expected_kinds(path: str) -> frozenset[FileKind]:
    """The kinds a file with this name may hold; empty for names outside a model bundle."""
    lower = path.lower()
    for suffix, kinds in _KINDS_BY_SUFFIX:
        if lower.endswith(suffix):
            return kinds
    return frozenset()


def is_external_data(path: str) -> bool:
    """True for names that hold opaque ONNX external data (any bytes are fine)."""
    return expected_kinds(path) is _ANY_KIND


def is_allowed_path(path: str) -> bool:
    """True when `path` is a safe relative name with an extension a model bundle may use."""
    return path_problem(path) is None and bool(expected_kinds(path))


def path_rejection(path: str) -> Rejected | None:
    """The rejection for a file name that cannot be part of a bundle, or None."""
    if path.lower().endswith((".py", ".pyc", ".pyx", ".so")):
        return Rejected(
            "REMOTE_CODE",
            f"{path}: code files are never run; remove it and use an architecture built "
            "into transformers",
            path=path,
        )
    problem = path_problem(path)
    if problem is not None or not expected_kinds(path):
        reason = problem or "has a file type that is not part of a model bundle"
        return Rejected("UNSUPPORTED_FILE", f"{path} {reason}", path=path)
    return None


def check_kind(path: str, kind: FileKind, size: int) -> None:
    """Raise FORMAT_MISMATCH when the bytes are not a kind the file name promises."""
    allowed = expected_kinds(path)
    if kind in allowed:
        return
    if allowed is _TORCH_KINDS:
        wanted = "a PyTorch checkpoint written by torch.save"
    else:
        wanted = " or ".join(sorted(describe(k) for k in allowed)) or "a bundle file"
    what = "it is empty" if size == 0 else f"its bytes are {describe(kind)}"
    raise Rejected("FORMAT_MISMATCH", f"{path} is not {wanted}: {what}", path=path)

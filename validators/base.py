"""Shared vocabulary of the validators: findings, rejections and the hashing stream reader."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

CHUNK = 1 << 20


class Severity(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class FileKind(enum.StrEnum):
    """What a file is by its bytes (never by its name)."""

    GGUF = "gguf"
    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch_zip"
    TORCH_LEGACY = "torch_legacy"  # a bare pickle stream (legacy torch.save)
    TORCH_TAR = "torch_tar"
    ZIP = "zip"
    ONNX = "onnx"
    JSON = "json"
    TEXT = "text"
    SENTENCEPIECE = "sentencepiece"
    RAW = "raw"  # opaque bytes, e.g. ONNX external data
    UNKNOWN = "unknown"


class ModelFormat(enum.StrEnum):
    GGUF = "gguf"
    TRANSFORMERS = "transformers"
    PYTORCH = "pytorch"
    ONNX = "onnx"


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    severity: Severity = Severity.ERROR
    path: str | None = None


class Rejected(Exception):
    """A file or bundle is refused; `code` is machine-readable, `message` tells what to do."""

    def __init__(self, code: str, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.path = path

    def finding(self) -> Finding:
        return Finding(self.code, self.message, Severity.ERROR, self.path)


@dataclass
class FileReport:
    path: str
    size: int
    kind: FileKind
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


@dataclass
class BundleReport:
    format: ModelFormat | None
    sha256: str | None
    files: list[FileReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rejection(self) -> Finding | None:
        return next((f for f in self.findings if f.severity is Severity.ERROR), None)

    @property
    def ok(self) -> bool:
        return self.rejection is None


class HashingReader:
    """Reads a stream exactly once, front to back, hashing every byte it passes.

    Validators parse headers with `read_exact`, jump over payloads with `skip`, and never
    hold more than one chunk of payload in memory. `size` is the size the object must have.
    """

    def __init__(self, raw: BinaryIO, size: int, *, path: str = "") -> None:
        self._raw = raw
        self.size = size
        self.path = path
        self._pos = 0
        self._head = b""  # bytes peeked but not yet consumed
        self._sha = hashlib.sha256()

    def tell(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self.size - self._pos

    def _pull(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._raw.read(n - len(out))
            return out
        return self._raw.read(n)

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes from the current position without consuming them."""
        if len(self._head) < n:
            self._head += self._raw.read(n - len(self._head))
        return self._head[:n]

    def read_exact(self, n: int) -> bytes:
        """Exactly `n` bytes, or `Rejected(TRUNCATED)`; refuses reads past the declared size."""
        if n < 0 or n > self.remaining:
            raise Rejected(
                "TRUNCATED",
                f"needs {n} more bytes at offset {self._pos}, file ends first",
                path=self.path,
            )
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._pull(min(n - got, CHUNK))
            if not chunk:
                raise Rejected(
                    "TRUNCATED", f"stream ended at offset {self._pos + got}", path=self.path
                )
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self._sha.update(data)
        self._pos += n
        return data

    def skip(self, n: int) -> None:
        """Consume `n` bytes (hashed, not kept)."""
        if n < 0 or n > self.remaining:
            raise Rejected(
                "TRUNCATED",
                f"needs {n} more bytes at offset {self._pos}, file ends first",
                path=self.path,
            )
        while n:
            chunk = self._pull(min(n, CHUNK))
            if not chunk:
                raise Rejected("TRUNCATED", f"stream ended at offset {self._pos}", path=self.path)
            self._sha.update(chunk)
            self._pos += len(chunk)
            n -= len(chunk)

    def seek_forward(self, offset: int) -> None:
        """Move to absolute `offset`, which must not be behind the current position."""
        if offset < self._pos:
            raise Rejected(
                "OUT_OF_ORDER", f"offset {offset} lies before {self._pos}", path=self.path
            )
        self.skip(offset - self._pos)

    def finish(self) -> str:
        """Read to the end, check the stream holds exactly `size` bytes, return the SHA-256."""
        self.skip(self.remaining)
        if self._head or self._raw.read(1):
            raise Rejected(
                "SIZE_MISMATCH",
                f"object is larger than its declared {self.size} bytes",
                path=self.path,
            )
        return self._sha.hexdigest()

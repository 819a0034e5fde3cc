"""What a model bundle may contain: file-name policy shared by the API and the validators."""

from __future__ import annotations

import re

# Weights, tokenizer and config files of the supported formats. Anything else (code,
# archives, executables) is refused before a single byte is uploaded.
ALLOWED_SUFFIXES = (
    ".gguf",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".onnx",
    ".onnx_data",
    ".onnx.data",
    ".data",
    ".weight",
    ".json",
    ".txt",
    ".model",
    ".jinja",
    ".md",
)
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
MAX_DEPTH = 4


def path_problem(path: str, *, max_length: int = 200) -> str | None:
    """Why `path` is not an acceptable bundle file name, or None when it is."""
    if len(path) > max_length:
        return f"longer than {max_length} characters"
    if "\\" in path or "\x00" in path:
        return "contains a backslash or NUL"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return "is absolute; use a path relative to the bundle"
    segments = path.split("/")
    if len(segments) > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} folders"
    for seg in segments:
        if seg in ("", ".", ".."):
            return "has an empty, '.' or '..' segment"
        if not _SEGMENT.match(seg):
            return f"segment {seg!r} has characters outside [A-Za-z0-9._+-] or starts with '.'"
    if not path.lower().endswith(ALLOWED_SUFFIXES):
        return (
            "has a file type that is not part of a model bundle ("
            + ", ".join(ALLOWED_SUFFIXES)
            + ")"
        )
    return None

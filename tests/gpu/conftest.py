"""GPU tests reuse the worker tests' model folders."""

from tests.workers.conftest import gguf_dir

__all__ = ["gguf_dir"]

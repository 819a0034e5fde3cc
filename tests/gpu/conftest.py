"""GPU tests reuse the worker tests' model folders and runner and pool factories."""

from tests.workers.conftest import gguf_dir, make_pool, make_runner

__all__ = ["gguf_dir", "make_pool", "make_runner"]

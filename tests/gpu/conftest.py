"""GPU tests reuse the worker tests' model folders and pool factory."""

from tests.workers.conftest import gguf_dir, make_pool

__all__ = ["gguf_dir", "make_pool"]

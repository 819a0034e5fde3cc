"""Fixtures for the runner, pool, sandbox and weight-cache tests: one per failure behaviour."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from workers.pool import RunnerPool
from workers.runner.process import Runner

RUNNER_MARKERS = (
    "workers.runner.child",
    "tests.workers.fault_child",
    "workers.runner.convert_child",
    "tests.workers.fault_convert",
)


def fault_argv(mode: str) -> list[str]:
    """A runner child whose engine misbehaves in one way (see fault_child.py)."""
    return [sys.executable, "-s", "-m", "tests.workers.fault_child", mode]


def fault_convert_argv(mode: str) -> list[str]:
    """A converter child that misbehaves in one way (see fault_convert.py)."""
    return [sys.executable, "-s", "-m", "tests.workers.fault_convert", mode]


def runner_processes() -> list[psutil.Process]:
    """Runner children of this test process that are still alive (zombies excluded)."""
    found = []
    # Direct children only: the test stack's Celery workers keep runners of their own.
    for p in psutil.Process().children(recursive=False):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(
                m in " ".join(p.cmdline()) for m in RUNNER_MARKERS
            ):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session")
def gguf_dir(gguf_model: Path) -> Path:
    """The bundle folder of the tiny GGUF (the fixture writes it alone in its own folder)."""
    return gguf_model.parent


def _patched_gguf(src: Path, out: Path, key: bytes, value: int) -> Path:
    data = src.read_bytes()
    at = data.index(key) + len(key)
    kind, _ = struct.unpack_from("<II", data, at)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.gguf").write_bytes(data[:at] + struct.pack("<II", kind, value) + data[at + 8 :])
    return out


@pytest.fixture(scope="session")
def gguf_block_count_zero(gguf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Well-formed GGUF with llama.block_count 0: llama.cpp aborts (SIGABRT) loading it."""
    out = tmp_path_factory.mktemp("gguf_bc0")
    return _patched_gguf(gguf_model, out, b"llama.block_count", 0)


@pytest.fixture(scope="session")
def gguf_truncated(gguf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF cut to a third: llama.cpp refuses it with a catchable error."""
    out = tmp_path_factory.mktemp("gguf_truncated")
    data = gguf_model.read_bytes()
    (out / "model.gguf").write_bytes(data[: len(data) // 3])
    return out


@pytest.fixture
def make_runner() -> Iterator[Callable[..., Runner]]:
    """Builds runners and guarantees none outlives the test."""
    made: list[Runner] = []

    def factory(
        bundle: Path,
        fmt: str = "gguf",
        *,
        mode: str | None = None,
        device: str = "auto",
        parallel: int = 1,
    ) -> Runner:
        argv = fault_argv(mode) if mode else None
        runner = Runner(bundle, fmt, device=device, argv=argv, parallel=parallel)
        made.append(runner)
        return runner

    yield factory
    for r in made:
        r.stop()
    assert not runner_processes()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., RunnerPool]]:
    pools: list[RunnerPool] = []

    def factory(**kwargs: object) -> RunnerPool:
        pool = RunnerPool(**kwargs)
        pools.append(pool)
        return pool

    yield factory
    for p in pools:
        p.close()
    assert not runner_processes()


@pytest.fixture(scope="session")
def transformers_bundle_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers bundle with other weights than the GGUF, so their outputs differ."""
    from tests.utils.model_files import make_transformers_bundle

    out = tmp_path_factory.mktemp("hf_seed1")
    make_transformers_bundle(out, seed=1)
    return out

"""A model that gets code execution inside a real runner still cannot get out.

Each test starts a real `Runner` (sandbox, child protocol) whose child is
`tests.adversarial.hostile_child`: the probe runs where model code would run and reports
back through SetupFailed. Landlock, seccomp and network namespaces are present on the test
hosts; `test_host_offers_the_confinement_these_tests_rely_on` fails loudly where they are not.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.engines.base import GenerateRequest
from workers.runner.confine import landlock_abi, seccomp_supported
from workers.runner.process import Runner, RunnerSetupFailed
from workers.runner.sandbox import SandboxConfig, network_namespace_flags

EACCES, EPERM = 13, 1


def probe(bundle: Path, name: str, arg: str = "", **config: Any) -> dict[str, Any]:
    """Run one probe in a real runner; its findings, parsed from the SetupFailed detail."""
    argv = [sys.executable, "-s", "-m", "tests.adversarial.hostile_child", name, arg]
    runner = Runner(bundle, "gguf", sandbox=SandboxConfig(**config), argv=argv)
    try:
        with pytest.raises(RunnerSetupFailed) as info:
            runner.start(timeout=60)
    finally:
        runner.stop()
    detail = str(info.value)
    assert "PROBE " in detail, detail
    found: dict[str, Any] = json.loads(detail.split("PROBE ", 1)[1].split("\n")[0])
    return found


@pytest.fixture(scope="module")
def gguf_dir(gguf_model: Path) -> Path:
    return gguf_model.parent


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_host_offers_the_confinement_these_tests_rely_on() -> None:
    assert network_namespace_flags() != 0
    assert landlock_abi() >= 4  # TCP rules
    assert seccomp_supported()


def test_runner_cannot_reach_the_host_or_resolve_names(gguf_dir: Path, listener: int) -> None:
    socket.create_connection(("127.0.0.1", listener), timeout=2).close()  # the worker can
    found = probe(gguf_dir, "network", str(listener))
    assert found["connect_host"]["ok"] is False, found
    assert found["dns"]["ok"] is False and found["udp_dns"]["ok"] is False, found


def test_runner_sees_no_secret_and_cannot_read_or_signal_the_worker(
    gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERATECH_KEY_PEPPER", "pepper-in-the-worker")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-in-the-worker")
    found = probe(gguf_dir, "secrets")
    assert not any("worker" in v for v in found["env"].values()), found["env"]
    assert not any(k.startswith(("INFERATECH_", "AWS_")) for k in found["env"])
    assert found["parent_environ"] == {"ok": False, "error": "PermissionError", "errno": EACCES}
    assert found["parent_mem"]["ok"] is False
    assert found["signal_parent"] == {"ok": False, "error": "PermissionError", "errno": EPERM}


def test_runner_writes_only_inside_its_temp_dir(gguf_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "planted.txt"
    found = probe(gguf_dir, "write", str(outside))
    assert found["own_tmp"]["ok"] is True and found["dev_null"]["ok"] is True, found
    assert found["outside"]["errno"] == EACCES and found["bundle"]["errno"] == EACCES, found
    # Its own threads' names stay writable (the CUDA driver fails to start without them);
    # the rest of /proc, its own process files and its parent's, does not.
    assert found["thread_name"] == {"ok": True, "value": "'probe-helper'"}, found
    assert found["parent_comm"]["errno"] == EACCES and found["own_proc"]["errno"] == EACCES, found
    assert not outside.exists() and not (gguf_dir / "planted.json").exists()


def test_fork_bomb_is_refused_and_the_worker_stays_healthy(gguf_dir: Path) -> None:
    found = probe(gguf_dir, "fork_bomb")
    assert found == {"forked": 0, "errno": EPERM}
    runner = Runner(gguf_dir, "gguf")  # the next runner on this worker works as before
    try:
        runner.start()
        assert not runner.generate(GenerateRequest("hi"), "t", lambda _: None).error
    finally:
        runner.stop()


def test_huge_write_stops_at_the_file_size_limit(gguf_dir: Path) -> None:
    argv = [sys.executable, "-s", "-m", "tests.adversarial.hostile_child", "big_write"]
    runner = Runner(gguf_dir, "gguf", sandbox=SandboxConfig(max_file_bytes=8 << 20), argv=argv)
    # Python ignores SIGXFSZ, so the write past RLIMIT_FSIZE fails with EFBIG instead of
    # killing the process; either way 100 GiB never reach the disk.
    with pytest.raises(RunnerSetupFailed, match=r"Errno 27\] File too large"):
        runner.start(timeout=120)
    assert runner.tmpdir is not None and not runner.tmpdir.exists()  # its debris is gone


def test_memory_limit_refuses_a_greedy_allocation(gguf_dir: Path) -> None:
    found = probe(gguf_dir, "memory", str(4 << 30), memory_bytes=1 << 30)
    assert found["alloc"] == {"ok": False, "error": "MemoryError", "errno": None}


def test_runner_has_no_core_dumps_and_no_capabilities(gguf_dir: Path) -> None:
    found = probe(gguf_dir, "limits")
    assert found["limits"]["RLIMIT_CORE"] == 0
    assert {found["caps"][k] for k in ("CapEff", "CapPrm", "CapBnd")} == {"0000000000000000"}


def test_runner_refuses_to_start_with_weights_only_load_disabled(
    gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    runner = Runner(gguf_dir, "gguf")
    with pytest.raises(RunnerSetupFailed, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        runner.start()
    assert runner._proc is None  # refused before any child existed

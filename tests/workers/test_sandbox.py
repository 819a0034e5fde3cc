"""The runner sandbox: no network, no secrets, own temp dir, limits, dies with its parent."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.conftest import gone
from workers.engines.base import GenerateRequest
from workers.runner.process import Runner
from workers.runner.sandbox import Sandbox, SandboxConfig, is_secret_name

CONNECT = """
import json, socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    print(json.dumps({"connected": True}))
except OSError as exc:
    print(json.dumps({"connected": False, "errno": exc.errno, "error": str(exc)}))
"""
PROBE = """
import json, os, resource
limits = {n: resource.getrlimit(getattr(resource, n))[0]
          for n in ("RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_AS")}
print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "sid": os.getsid(0),
                  "pid": os.getpid(), "limits": limits}))
"""


def run_in(sandbox: Sandbox, code: str, *args: str) -> dict[str, object]:
    proc = sandbox.popen([sys.executable, "-c", code, *args])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox(SandboxConfig(threads=2, memory_bytes=8 << 30))
    yield box
    box.cleanup()
    assert not box.tmpdir.exists()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port listening on the host's loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def test_runner_cannot_connect_to_host_port(sandbox: Sandbox, listener: int) -> None:
    if not sandbox.network_isolated:
        pytest.skip("this host allows no network namespace (documented fallback)")
    socket.create_connection(("127.0.0.1", listener), timeout=2).close()  # the parent can
    result = run_in(sandbox, CONNECT, str(listener))
    assert result["connected"] is False, result
    assert result["errno"] in (13, 101, 111, 113), result  # Landlock / unreachable / refused


def test_env_is_scrubbed_of_secrets(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "INFERATECH_KEY_PEPPER": "pepper",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "AWS_ACCESS_KEY_ID": "id",
        "STRIPE_API_KEY": "sk_live",
        "GITHUB_TOKEN": "ghp",
        "DB_PASSWORD": "pw",
        "HF_TOKEN": "hf",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    env = run_in(sandbox, PROBE)["env"]
    assert isinstance(env, dict)
    assert not set(secrets) & set(env)
    assert not any(v in secrets.values() for v in env.values())
    assert env["HOME"] == env["TMPDIR"] == str(sandbox.tmpdir)
    assert env["GGML_NO_BACKTRACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "2" and env["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("name", "secret"),
    [("INFERATECH_DATA_DIR", True), ("MY_API_KEY", True), ("PATH", False), ("LANG", False)],
)
def test_secret_name_rule(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_limits_session_and_cwd(sandbox: Sandbox) -> None:
    result = run_in(sandbox, PROBE)
    limits = result["limits"]
    assert isinstance(limits, dict)
    assert limits["RLIMIT_CORE"] == 0 and limits["RLIMIT_NOFILE"] == 1024
    assert limits["RLIMIT_FSIZE"] == 4 << 30 and limits["RLIMIT_AS"] == 8 << 30
    assert result["sid"] == result["pid"]  # its own session: no terminal signals
    assert result["cwd"] == str(sandbox.tmpdir)


def test_memory_limit_stops_a_greedy_child() -> None:
    box = Sandbox(SandboxConfig(memory_bytes=512 << 20))
    try:
        proc = box.popen([sys.executable, "-c", "b = bytearray(1 << 30)"])
        _, err = proc.communicate(timeout=30)
    finally:
        box.cleanup()
    assert proc.returncode != 0 and b"MemoryError" in err
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # parent intact


PARENT = """
import sys, time
from pathlib import Path
from workers.runner.process import Runner
from workers.runner.sandbox import SandboxConfig
runner = Runner(Path(sys.argv[1]), "gguf", sandbox=SandboxConfig(tmp_root=Path(sys.argv[2])))
runner.start()
print(runner.pid, flush=True)
time.sleep(60)
"""


def test_runner_dies_with_its_parent(gguf_dir: Path, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT), str(gguf_dir), str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert parent.stdout is not None
        runner_pid = int(parent.stdout.readline())
        assert not gone(runner_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while not gone(runner_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(runner_pid)
    # Its temp dir outlived both; the next sandbox on the host sweeps it.
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [str(parent.pid)]
    Sandbox(SandboxConfig(tmp_root=tmp_path)).cleanup()
    assert list(tmp_path.iterdir()) == []


def test_runner_outlives_the_thread_that_started_it(gguf_dir: Path) -> None:
    """PDEATHSIG fires when the forking *thread* exits; spawns go through one spawner thread."""
    runner = Runner(gguf_dir, "gguf")
    starter = threading.Thread(target=runner.start)
    starter.start()
    starter.join()
    try:
        assert runner.pid is not None and runner.is_alive()
        done = runner.generate(GenerateRequest("hi"), "t", lambda t: None)
        assert not done.error
    finally:
        runner.stop()


def test_orphaned_temp_dirs_of_dead_workers_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{dead.pid}-abc"
    orphan.mkdir()
    (orphan / "junk").write_bytes(b"x")
    mine = tmp_path / f"{os.getpid()}-live"
    mine.mkdir()
    box = Sandbox(SandboxConfig(tmp_root=tmp_path))
    try:
        assert not orphan.exists() and mine.exists() and box.tmpdir.parent == tmp_path
    finally:
        box.cleanup()


CONFINE_PROBE = """
import json, os, sys
from pathlib import Path
from workers.runner.confine import Confinement
confinement = Confinement(Path(sys.argv[1]))
if sys.argv[2] == "old-kernel":  # no seccomp(2) to call: the prctl path
    confinement._seccomp_nr = None
how = confinement.apply()
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
try:
    pid = os.fork()
except PermissionError:
    forked = "denied"
else:
    if pid == 0:
        os._exit(0)
    forked = "allowed"
print(json.dumps({"how": how, "forked": forked,
                  "seccomp": status["Seccomp"].strip(),
                  "ssb": status.get("Speculation_Store_Bypass", "").strip()}))
"""


@pytest.mark.parametrize(("kernel", "how"), [("this", "seccomp"), ("old-kernel", "prctl")])
def test_seccomp_filter_goes_in_with_spec_allow(tmp_path: Path, kernel: str, how: str) -> None:
    """seccomp(2) with SECCOMP_FILTER_FLAG_SPEC_ALLOW, so an older kernel does not force SSBD on
    every runner; prctl where there is no seccomp(2). The filter holds either way."""
    out = subprocess.run(
        [sys.executable, "-c", CONFINE_PROBE, str(tmp_path), kernel],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["how"] == how, found  # this kernel (>= 4.17) has the flag
    assert found["seccomp"] == "2" and found["forked"] == "denied", found
    if how == "seccomp":
        assert "force mitigated" not in found["ssb"], found


def test_confinement_without_proc_still_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with no /proc mounted: the own-threads rule is skipped, the rest still holds."""
    from workers.runner import confine

    monkeypatch.setattr(confine, "_OWN_THREADS", str(tmp_path / "no-proc" / "task").encode())
    box = tmp_path / "box"
    box.mkdir()
    rules = confine.Confinement(box)
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        Path(sys.argv[1], "mine.txt").write_text("x")
        try:
            Path(sys.argv[2]).write_text("x")
        except PermissionError:
            print("outside refused")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(box), str(tmp_path / "outside.txt")],
        preexec_fn=rules.apply,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "outside refused"
    assert (box / "mine.txt").exists() and not (tmp_path / "outside.txt").exists()

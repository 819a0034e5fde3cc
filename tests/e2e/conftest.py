"""`inferatech up` as a real subprocess, and the CLI run against it the way a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from tests.utils.services import free_port

INFERATECH = str(Path(sys.executable).with_name("inferatech"))
MiB = 1024 * 1024
# Small multipart parts so a few-MiB file exercises the multipart path end to end.
STACK_SETTINGS = {
    "INFERATECH_MULTIPART_THRESHOLD_BYTES": str(5 * MiB),
    "INFERATECH_MULTIPART_PART_SIZE": str(5 * MiB),
}
READY_TIMEOUT_S = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """The inherited environment minus every INFERATECH_* (a developer's own must not leak)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERATECH_")}
    env.update(extra)
    return env


def short_dir(prefix: str) -> Path:
    # Unix socket paths are capped near 100 bytes: keep data dirs short, directly under /tmp.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class UpProcess:
    """One `inferatech up` run; its output goes to a file so nothing blocks on a pipe."""

    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    startup_s: float = 0.0
    seen: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> UpProcess:
        while "Inferatech is up at" not in self.output():
            if self.proc.poll() is not None or time.monotonic() - self.started_at > timeout:
                self.stop(signal.SIGKILL)
                raise AssertionError(f"`inferatech up` did not start:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        self.startup_s = time.monotonic() - self.started_at
        assert httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        self.seen = self.tree()
        return self

    def pids(self) -> dict[str, int]:
        recorded: dict[str, int] = json.loads((self.data_dir / "up.pids.json").read_text())
        return recorded

    def tree(self) -> list[psutil.Process]:
        """`up`, its children and their children (pool processes included)."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Safety net so a failing test never leaves processes behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in self.seen:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.NoSuchProcess:
                pass


def start_up(
    data_dir: Path, *, port: int | None = None, settings: dict[str, str] | None = None
) -> UpProcess:
    port = port or free_port()
    log_path = data_dir.parent / f"{data_dir.name}-up-{port}.log"
    cmd = [INFERATECH, "up", "--port", str(port), "--data-dir", str(data_dir)]
    started_at = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=clean_env(**(settings or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
        )
    return UpProcess(data_dir, port, proc, log_path, started_at)


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INFERATECH, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def token_from(output: str) -> str:
    match = re.search(r"\b(iat_\S+) \(shown once\)", output)
    assert match, output
    return match.group(1)


@pytest.fixture(scope="session")
def stack_root() -> Iterator[Path]:
    root = short_dir("itk-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(stack_root: Path) -> Iterator[UpProcess]:
    """One embedded platform shared by the CLI tests."""
    up = start_up(stack_root / "data", settings=STACK_SETTINGS).wait_ready()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def cli_env(stack: UpProcess, stack_root: Path) -> dict[str, str]:
    """What a user's shell holds: the server URL, and a private credentials file."""
    return clean_env(
        INFERATECH_API_URL=stack.url, INFERATECH_CONFIG=str(stack_root / "credentials.json")
    )


@pytest.fixture(scope="session")
def account_token(cli_env: dict[str, str]) -> str:
    """`inferatech accounts create` once; the token is saved for the later commands."""
    result = run_cli("accounts", "create", "--name", "acme", env=cli_env)
    assert result.returncode == 0, result.stderr
    return token_from(result.stdout)


@pytest.fixture(scope="session")
def gguf_file(stack_root: Path) -> Path:
    from tests.utils.model_files import make_gguf

    return make_gguf(stack_root / "models" / "my-llama.gguf")

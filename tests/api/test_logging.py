"""Structured logs: JSON lines with the request id, carried into the worker; never payloads."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import logs
from core.settings import Settings
from tests.conftest import make_settings
from tests.utils.factories import auth
from tests.utils.sse import sse_events
from tests.utils.stack import StackInfo

CLIENT = ("httpx", "httpcore", "asyncio")  # the test's own HTTP client, not the API
BODY = {"raw": True, "temperature": 0.0, "max_tokens": 8, "seed": 3}


@pytest.fixture
def api_lines() -> Iterator[Callable[[], list[str]]]:
    """The lines the API process logged so far in the test (DEBUG and up), as in production."""
    buffer = io.StringIO()
    handler = logs.handler_for("json", buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lambda: buffer.getvalue().splitlines()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _worker_entries(stack: StackInfo) -> list[dict[str, Any]]:
    """The infer worker's log lines that came from logging (all of them JSON)."""
    return [json.loads(line) for line in stack.infer_worker.log().splitlines() if line.strip()]


def _wait_for_job_line(stack: StackInfo, job_id: str, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        about = [e for e in _worker_entries(stack) if e.get("job_id") == job_id]
        if any(e["message"] == "job ended" for e in about):
            return about
        assert time.monotonic() < deadline, f"no worker line about {job_id}"
        time.sleep(0.2)


def test_request_id_is_on_every_api_line_and_carried_to_the_worker(
    client: TestClient,
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    api_lines: Callable[[], list[str]],
) -> None:
    rid = f"obs-{uuid.uuid4().hex}"
    resp = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "Hello", **BODY},
        headers={**auth(gguf_ready["key"]), "X-Request-ID": rid},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == rid
    entries = [e for e in map(json.loads, api_lines()) if not e["logger"].startswith(CLIENT)]
    access = [e for e in entries if e["logger"] == "inferatech.access"]
    assert len(access) == 1
    assert access[0]["route"] == "/v1/infer" and access[0]["status"] == 200
    assert access[0]["model_id"] == gguf_ready["id"] and access[0]["duration_ms"] > 0
    for entry in entries:
        assert set(entry) >= {"ts", "level", "logger", "message", "request_id"}
        assert entry["request_id"] == rid, entry

    job_id = resp.json()["id"]
    about = _wait_for_job_line(stack, job_id)
    assert all(e["request_id"] == rid for e in about), about
    ended = next(e for e in about if e["message"] == "job ended")
    assert ended["status"] == "succeeded" and ended["model_id"] == gguf_ready["id"]
    assert ended["completion_tokens"] == resp.json()["completion_tokens"]
    assert ended["queue_ms"] >= 0 and ended["first_token_ms"] >= ended["queue_ms"]
    # Celery's own per-task lines are left out for inference tasks (`job ended` says more)...
    celery_lines = [e for e in _worker_entries(stack) if e["logger"].startswith("celery.")]
    assert not [e for e in celery_lines if job_id in e["message"]], celery_lines[-3:]


def test_celery_task_lines_are_kept_for_every_task_but_inference(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    # ...and kept for the others: the validate worker logged receiving and finishing the
    # validation of the model this test uploaded.
    entries = [json.loads(x) for x in stack.worker.log_path.read_text().splitlines() if x.strip()]
    received = [e for e in entries if e["logger"] == "celery.worker.strategy"]
    succeeded = [e for e in entries if e["logger"] == "celery.app.trace"]
    assert any(gguf_ready["id"] in e["message"] for e in received), received[-3:]
    assert any("succeeded" in e["message"] and gguf_ready["id"] in e["message"] for e in succeeded)


def test_worker_log_file_is_json_lines(stack: StackInfo, gguf_ready: dict[str, Any]) -> None:
    for path in (stack.worker.log_path, stack.infer_worker.log_path):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines, path
        for line in lines:
            entry = json.loads(line)  # a banner or a traceback outside JSON would fail here
            assert {"ts", "level", "logger", "message", "request_id"} <= set(entry), line
    assert any("ready." in e["message"] for e in _worker_entries(stack))


@pytest.mark.parametrize(
    "hostile",
    [
        "x" * 500,
        "<script>alert(1)</script>",
        '{"level":"CRITICAL"}',
        "id with spaces",
        "../../etc/passwd",
        "%s%s%n",
    ],
)
def test_malicious_request_id_is_replaced_not_echoed(
    client: TestClient, hostile: str, api_lines: Callable[[], list[str]]
) -> None:
    resp = client.get("/v1/jobs/job_nothing", headers={"X-Request-ID": hostile})
    assert resp.status_code in (403, 404)
    generated = resp.headers["x-request-id"]
    assert generated.startswith("req_") and hostile not in generated
    assert resp.json()["request_id"] == generated
    client.get("/healthz", headers={"X-Request-ID": hostile})
    logged = "\n".join(api_lines())
    assert hostile not in logged
    entries = [json.loads(line) for line in api_lines()]
    assert generated in {e["request_id"] for e in entries}


def test_no_prompt_or_completion_text_in_any_log(
    client: TestClient,
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    api_lines: Callable[[], list[str]],
) -> None:
    marker = f"SECRETPROMPT{uuid.uuid4().hex}"
    key = auth(gguf_ready["key"])
    body = {"model_id": gguf_ready["id"], "prompt": f"Tell me about {marker} now", **BODY}
    plain = client.post("/v1/infer", json=body, headers=key)
    assert plain.status_code == 200, plain.text
    with client.stream("POST", "/v1/infer", json={**body, "stream": True}, headers=key) as resp:
        streamed = sse_events(resp.iter_lines())
    assert streamed[-1].get("done") is True
    queued = client.post("/v1/jobs", json=body, headers=key)
    assert queued.status_code == 202
    job_ids = [plain.json()["id"], queued.json()["id"]]
    for job_id in job_ids:
        _wait_for_job_line(stack, job_id)
    completions = [plain.json()["completion"], "".join(e.get("token", "") for e in streamed)]

    worker_logs = stack.worker.log() + stack.infer_worker.log()
    for text in (worker_logs, "\n".join(api_lines())):
        assert marker not in text
        for completion in completions:
            if len(completion.strip()) >= 12:  # a short completion could occur by chance
                assert completion not in text


def test_log_format_is_json_outside_development_and_chosen_by_setting(tmp_path: Path) -> None:
    assert make_settings(tmp_path).effective_log_format == "json"
    assert make_settings(tmp_path, log_format="text").effective_log_format == "text"
    assert Settings(environment="development").effective_log_format == "text"
    with pytest.raises(ValueError):
        make_settings(tmp_path, log_format="xml")


def test_text_and_json_lines_carry_ids_and_extra_fields() -> None:
    record = logging.LogRecord(
        "inferatech.test", logging.ERROR, __file__, 1, "job %s", ("j1",), None
    )
    record.tokens = 7
    with logs.log_context(request_id="req_abc", job_id="job_1"):
        logs.ContextFilter().filter(record)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "job j1" and entry["level"] == "ERROR"
    assert entry["logger"] == "inferatech.test" and entry["tokens"] == 7
    assert entry["request_id"] == "req_abc" and entry["job_id"] == "job_1"
    assert "RuntimeError: boom" in entry["exc_info"] and entry["ts"].endswith("+00:00")
    text = logs.TextFormatter().format(record)
    assert "[req_abc] [job_1] job j1" in text
    assert logs.REQUEST_ID.get() is None and logs.JOB_ID.get() is None  # context restored


def test_a_key_minted_with_log_payloads_has_its_text_logged_by_the_worker(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    minted = client.post(
        f"/v1/models/{gguf_ready['id']}/keys",
        json={"name": "debugging", "log_payloads": True},
        headers=auth(gguf_ready["token"]),
    )
    assert minted.status_code == 201 and minted.json()["log_payloads"] is True
    marker = f"LOGGEDPROMPT{uuid.uuid4().hex}"
    body = {"model_id": gguf_ready["id"], "prompt": f"Say {marker}", **BODY}
    resp = client.post("/v1/infer", json=body, headers=auth(minted.json()["key"]))
    assert resp.status_code == 200, resp.text
    ended = [e for e in _wait_for_job_line(stack, resp.json()["id"]) if e["message"] == "job ended"]
    assert ended[0]["prompt"] == body["prompt"]
    assert ended[0]["completion"] == resp.json()["completion"]
    # The same model through a key without the flag: ids and counts only.
    plain = client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"]))
    line = [e for e in _wait_for_job_line(stack, plain.json()["id"]) if e["message"] == "job ended"]
    assert "prompt" not in line[0] and "completion" not in line[0]

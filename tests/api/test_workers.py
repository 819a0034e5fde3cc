"""Heartbeats, warm-aware routing and the operators' worker list, with the real infer worker."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from api.inference.routing import WorkerDirectory
from core.db import session_scope
from core.events import read_heartbeats
from core.queue import INFER_QUEUE
from core.redis import get_redis
from core.tables import Model
from tests.utils.factories import auth
from tests.utils.stack import StackInfo


def _operator(stack: StackInfo) -> dict[str, str]:
    assert stack.settings.operator_token is not None
    return auth(stack.settings.operator_token.get_secret_value())


def _warm_beat(stack: StackInfo, sha: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for beat in read_heartbeats(get_redis(stack.settings)):
            if sha in beat["warm_models"]:
                return beat
        time.sleep(0.2)
    raise AssertionError(f"no worker reported {sha} warm")


def _sha(stack: StackInfo, model_id: str) -> str:
    with session_scope(stack.settings) as s:
        model = s.get(Model, model_id)
        assert model is not None and model.sha256
        return model.sha256


def test_list_workers_needs_operator_token(client: TestClient, stack: StackInfo) -> None:
    assert client.get("/v1/workers").status_code == 403
    assert client.get("/v1/workers", headers=auth("wrong")).status_code == 403
    resp = client.get("/v1/workers", headers=_operator(stack))
    assert resp.status_code == 200
    beat = next(b for b in resp.json()["data"] if b["name"].startswith("test-infer"))
    assert beat["queue"] == f"{INFER_QUEUE}.{beat['name']}"
    assert beat["hardware"]["cpus"] >= 1
    assert beat["free_slots"] >= 1


def test_warm_model_is_routed_to_its_worker_queue(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    body = {
        "model_id": gguf_ready["id"],
        "prompt": "Hi",
        "raw": True,
        "temperature": 0.0,
        "max_tokens": 4,
    }
    assert client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"])).status_code == 200
    sha = _sha(stack, gguf_ready["id"])
    beat = _warm_beat(stack, sha)
    directory = WorkerDirectory(get_redis(stack.settings))
    assert directory.queue_for(sha) == beat["queue"]
    assert directory.queue_for("0" * 64) == INFER_QUEUE
    routed = client.post("/v1/infer", json=body, headers=auth(gguf_ready["key"]))
    assert routed.status_code == 200
    assert routed.headers["x-cold-start"] == "false"


def test_stale_heartbeat_is_never_routed_to(stack: StackInfo) -> None:
    import json

    client = get_redis(stack.settings)
    ghost = {"name": "ghost@nowhere", "queue": "infer.ghost@nowhere", "warm_models": ["f" * 64], "idle_models": ["f" * 64],
             "free_slots": 4, "busy": 0, "at": time.time() - 60}  # fmt: skip
    client.set("worker:ghost@nowhere", json.dumps(ghost), ex=30)
    client.zadd("workers", {"ghost@nowhere": time.time()})
    try:
        assert WorkerDirectory(client).queue_for("f" * 64) == INFER_QUEUE
    finally:
        client.delete("worker:ghost@nowhere")
        client.zrem("workers", "ghost@nowhere")

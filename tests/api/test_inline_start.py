"""`/v1/infer` starts a warm, cached call on the event loop (no thread), and falls back to the
threaded path for everything else: each case here checks which path ran and what it did."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from api.inference import router
from core import limits
from core.db import session_scope
from core.tables import Job, utcnow
from tests.utils.factories import auth, mint_key, spy_threads
from tests.utils.stack import StackInfo

BODY: dict[str, Any] = {"prompt": "Once upon a time", "raw": True, "temperature": 0.0,
                        "max_tokens": 8, "seed": 1}  # fmt: skip


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions `/v1/infer` handed to a thread."""
    return spy_threads(monkeypatch, router)


@pytest.fixture
def rds(stack: StackInfo) -> redis.Redis:  # type: ignore[type-arg]
    return redis.Redis.from_url(stack.settings.effective_redis_url)


def fresh_directory(client: TestClient) -> None:
    """Heartbeats read just now: the inline path needs them no older than a second."""
    client.app.state.workers.workers()  # type: ignore[attr-defined]


def infer(client: TestClient, key: str, **body: Any) -> Any:
    fresh_directory(client)
    return client.post("/v1/infer", json={**BODY, **body}, headers=auth(key))


def test_a_cached_warm_call_starts_without_a_thread_and_answers_the_same(
    client: TestClient, gguf_ready: dict[str, Any], threads: list[str]
) -> None:
    key = mint_key(client, gguf_ready, rate_limit_rpm=5)["key"]
    first = infer(client, key, model_id=gguf_ready["id"])
    assert first.status_code == 200, first.text
    assert threads == ["_start"]  # a new key: its grant is read from the database
    second = infer(client, key, model_id=gguf_ready["id"])
    assert second.status_code == 200, second.text
    assert threads == ["_start"]  # the cached grant: admitted and queued on the event loop
    assert second.json()["completion"] == first.json()["completion"]  # greedy
    assert second.headers["x-ratelimit-limit"] == "5"
    assert int(second.headers["x-ratelimit-remaining"]) < int(
        first.headers["x-ratelimit-remaining"]
    )
    job = client.get(f"/v1/jobs/{second.json()['id']}", headers=auth(key))
    assert job.status_code == 200 and job.json()["status"] == "succeeded"  # its worker wrote it
    streamed = client.post("/v1/infer", json={**BODY, "model_id": gguf_ready["id"],
                                               "stream": True}, headers=auth(key))  # fmt: skip
    assert streamed.status_code == 200 and '"done":true' in streamed.text.replace(" ", "")


def test_inline_refuses_a_wrong_secret_and_a_revoked_key(
    client: TestClient, gguf_ready: dict[str, Any], threads: list[str]
) -> None:
    minted = mint_key(client, gguf_ready)
    key = minted["key"]
    assert infer(client, key, model_id=gguf_ready["id"]).status_code == 200
    forged = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    resp = infer(client, forged, model_id=gguf_ready["id"])
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert threads == ["_start"]  # refused from the cached digest: no thread, no query
    revoked = client.delete(f"/v1/keys/{minted['id']}", headers=auth(gguf_ready["token"]))
    assert revoked.status_code == 204, revoked.text
    resp = infer(client, key, model_id=gguf_ready["id"])
    assert resp.status_code == 403 and "revoked" in resp.json()["error"]["message"]
    assert threads == ["_start", "_start"]  # the revocation emptied the cache: the database


def test_a_second_old_read_of_the_heartbeats_still_starts_inline(
    client: TestClient, gguf_ready: dict[str, Any], threads: list[str]
) -> None:
    """Past `REFRESH_S` the read is served while a thread re-reads it: no request takes the
    blocking path for it (one a second did, ~2 ms more)."""
    from api.inference.routing import REFRESH_S

    key = gguf_ready["key"]
    assert infer(client, key, model_id=gguf_ready["id"]).status_code == 200
    read_at = client.app.state.workers._read_at  # type: ignore[attr-defined]
    time.sleep(REFRESH_S + 0.2)
    body = {**BODY, "model_id": gguf_ready["id"]}
    resp = client.post("/v1/infer", json=body, headers=auth(key))  # no fresh_directory
    assert resp.status_code == 200, resp.text
    assert threads == ["_start"]  # the grant's first read only
    deadline = time.monotonic() + 5
    while client.app.state.workers._read_at == read_at:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the heartbeats were never re-read"
        time.sleep(0.05)


def test_inline_admission_error_after_the_slot_frees_it(
    client: TestClient, gguf_ready: dict[str, Any], threads: list[str]
) -> None:
    """`max_tokens` over the server's cap is refused after admission: the slot it took is
    given back, so a key allowed one request at a time can still call."""
    key = mint_key(client, gguf_ready, rate_limit_concurrency=1)["key"]
    assert infer(client, key, model_id=gguf_ready["id"]).status_code == 200
    over = infer(client, key, model_id=gguf_ready["id"], max_tokens=10**6)
    assert over.status_code == 400, over.text
    assert "max_tokens" in over.json()["error"]["message"]
    assert over.headers["x-ratelimit-remaining-concurrency"] == "0"  # admitted, as `start_job`
    again = infer(client, key, model_id=gguf_ready["id"])
    assert again.status_code == 200, again.text
    assert threads == ["_start"]


def test_inline_falls_back_to_the_ledger_when_the_budget_counter_is_gone(
    client: TestClient,
    gguf_ready: dict[str, Any],
    threads: list[str],
    rds: redis.Redis,  # type: ignore[type-arg]
) -> None:
    minted = mint_key(client, gguf_ready, monthly_token_budget=10**6)
    first = infer(client, minted["key"], model_id=gguf_ready["id"])
    assert first.status_code == 200, first.text
    counter = limits.budget_key(minted["id"], limits.month_of(utcnow()))
    assert int(rds.get(counter) or 0) == first.json()["tokens_used"]
    rds.delete(counter)  # Redis lost it: only the database knows what was spent
    threads.clear()
    second = infer(client, minted["key"], model_id=gguf_ready["id"])
    assert second.status_code == 200, second.text
    assert threads == ["_start"]  # the inline path admitted nothing and handed over
    spent = first.json()["tokens_used"] + second.json()["tokens_used"]
    assert int(rds.get(counter) or 0) == spent  # re-read from the ledger, then debited once


@pytest.fixture
def openai_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions the OpenAI routes handed to a thread."""
    from api.openai import router as openai_router

    return spy_threads(monkeypatch, openai_router)


def test_openai_routes_start_inline_by_model_id_or_name(
    client: TestClient, gguf_ready: dict[str, Any], openai_threads: list[str]
) -> None:
    key = mint_key(client, gguf_ready)["key"]
    name = client.get(f"/v1/models/{gguf_ready['id']}", headers=auth(gguf_ready["token"]))
    assert name.status_code == 200, name.text
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.0, "seed": 1}
    answers = []
    for model in (gguf_ready["id"], gguf_ready["id"], name.json()["name"], "no-such-model"):
        fresh_directory(client)
        answers.append(client.post("/openai/v1/completions", json={**body, "model": model},
                                   headers=auth(key)))  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200, 200, 404], answers[-1].text
    assert answers[1].json()["choices"] == answers[0].json()["choices"]
    assert answers[2].json()["choices"] == answers[0].json()["choices"]
    # New key: the database; then by id and by its name: the cache; an unknown name: the
    # database again (it may be another model of the account).
    assert openai_threads == ["_start", "_start"]
    embedded = client.post("/openai/v1/embeddings", json={"model": gguf_ready["id"], "input": "hi"},
                           headers=auth(key))  # fmt: skip
    assert embedded.status_code == 200 and embedded.json()["data"][0]["embedding"]
    assert openai_threads == ["_start", "_start"]


def test_inline_refusal_queues_nothing(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any], threads: list[str]
) -> None:
    """The admission script queues the task only when it admits: a 429 runs no job."""
    minted = mint_key(client, gguf_ready, rate_limit_rpm=1)
    assert infer(client, minted["key"], model_id=gguf_ready["id"]).status_code == 200
    refused = infer(client, minted["key"], model_id=gguf_ready["id"])
    assert refused.status_code == 429, refused.text
    assert threads == ["_start"]  # the refusal came from the inline path
    time.sleep(2)  # a wrongly queued job would have been claimed (its row written) by now

    with session_scope(stack.settings) as s:
        rows = s.exec(select(func.count()).where(col(Job.api_key_id) == minted["id"])).one()
    assert rows == 1

"""Retention: payload purge after the job TTL and deletion of idle models, on real databases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from core import lifecycle
from core.db import session_scope
from core.ids import new_id
from core.tables import Job, JobStatus, Model, utcnow
from tests.utils.stack import StackInfo


def _job(
    stack: StackInfo, ready: dict[str, Any], *, expired: bool, params: dict[str, Any] | None = None
) -> str:
    job_id = new_id("job")
    params = params or {"prompt": "secret plans", "max_tokens": 5}
    with session_scope(stack.settings) as s:
        model = s.get(Model, ready["id"])
        assert model is not None
        s.add(Job(id=job_id, account_id=model.account_id, model_id=model.id, status=JobStatus.SUCCEEDED,
                  params=params, result={"completion": "more secrets", "finish_reason": "stop"},
                  prompt_tokens=3, completion_tokens=2, finished_at=utcnow(),
                  expires_at=utcnow() + timedelta(hours=-1 if expired else 1)))  # fmt: skip
    return job_id


def test_purge_drops_payloads_of_expired_jobs_only(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    old, fresh = _job(stack, gguf_ready, expired=True), _job(stack, gguf_ready, expired=False)
    with session_scope(stack.settings) as s:
        assert lifecycle.purge_expired_payloads(s) >= 1
        assert lifecycle.purge_expired_payloads(s) == 0
    with session_scope(stack.settings) as s:
        purged, kept = s.get(Job, old), s.get(Job, fresh)
        assert purged is not None and kept is not None
        assert "prompt" not in purged.params and "completion" not in (purged.result or {})
        assert purged.prompt_tokens == 3 and purged.completion_tokens == 2 and purged.purged_at
        assert kept.params["prompt"] == "secret plans" and kept.purged_at is None


def test_purge_drops_chat_messages_and_embedding_inputs(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    chat = {"messages": [{"role": "user", "content": "secret"}], "max_tokens": 5}
    embed = {"op": "embed", "input": ["secret text"]}
    ids = [_job(stack, gguf_ready, expired=True, params=p) for p in (chat, embed)]
    with session_scope(stack.settings) as s:
        assert lifecycle.purge_expired_payloads(s) >= 2
    with session_scope(stack.settings) as s:
        jobs = [s.get(Job, i) for i in ids]
        assert [j.params for j in jobs if j] == [{"max_tokens": 5}, {"op": "embed"}]


def test_idle_models_are_those_not_invoked_for_the_window(
    stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    with session_scope(stack.settings) as s:
        model = s.get(Model, gguf_ready["id"])
        assert model is not None
        model.last_invoked_at = utcnow() - timedelta(days=8)
        s.add(model)
    try:
        with session_scope(stack.settings) as s:
            assert gguf_ready["id"] in {m.id for m in lifecycle.idle_models(s, 7)}
            assert gguf_ready["id"] not in {m.id for m in lifecycle.idle_models(s, 9)}
    finally:
        with session_scope(stack.settings) as s:
            model = s.get(Model, gguf_ready["id"])
            assert model is not None
            model.last_invoked_at = utcnow()
            s.add(model)

"""Tenant isolation and credential hygiene, through the real API and worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from core.db import get_engine
from core.ids import new_id
from tests.utils.factories import (
    account_of,
    auth,
    create_account,
    declare,
    put,
    ready_model_row,
    upload_files,
    wait_for_verdict,
)
from tests.utils.stack import StackInfo

JUNK_KEYS = ["ik_junk", "ik_" + "A" * 60, "x" * 5000, "ik_%00%ff;--", "Bearer", "ik_"]


def _error(resp: Any) -> tuple[int, str, str]:
    body = resp.json()["error"]
    return resp.status_code, body["code"], body["message"]


def test_foreign_model_and_key_answers_match_a_missing_one(
    client: TestClient, gguf_ready: dict[str, Any]
) -> None:
    intruder = create_account(client, "intruder")
    mid = gguf_ready["id"]
    for method, path in [
        ("GET", "/v1/models/{}"),
        ("DELETE", "/v1/models/{}"),
        ("POST", "/v1/models/{}/complete"),
        ("POST", "/v1/models/{}/keys"),
        ("POST", "/v1/models/{}/uploads"),
    ]:
        foreign = client.request(method, path.format(mid), headers=auth(intruder))
        missing = client.request(method, path.format("mdl_" + "0" * 24), headers=auth(intruder))
        assert foreign.status_code == 404, (method, path)
        got, want = _error(foreign), _error(missing)
        assert got[:2] == want[:2] and got[2].replace(mid, "") == want[2].replace(
            "mdl_" + "0" * 24, ""
        ), (got, want)
    keys = client.get("/v1/keys", headers=auth(gguf_ready["token"])).json()["data"]
    resp = client.delete(f"/v1/keys/{keys[0]['id']}", headers=auth(intruder))
    assert resp.status_code == 404
    assert client.get(f"/v1/models/{mid}", headers=auth(gguf_ready["token"])).status_code == 200


def _job_calls(client: TestClient, job_id: str, credential: str) -> list[tuple[int, str, str]]:
    """Read, stream and cancel one job as `credential`; the error of each, id blanked."""
    calls = [("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/stream"), ("POST", "/v1/jobs/{}/cancel")]
    answers = []
    for method, path in calls:
        resp = client.request(method, path.format(job_id), headers=auth(credential))
        status, code, message = _error(resp)
        answers.append((status, code, message.replace(job_id, "<id>")))
    return answers


def test_foreign_job_answers_match_a_missing_one(
    client: TestClient, stack: StackInfo, gguf_ready: dict[str, Any]
) -> None:
    body = {"model_id": gguf_ready["id"], "prompt": "hi", "max_tokens": 2}
    submitted = client.post("/v1/jobs", json=body, headers=auth(gguf_ready["key"]))
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    stranger = client.post("/v1/accounts", json={"name": "job-intruder"}).json()
    owner_id = account_of(stack.settings, gguf_ready["id"])
    others = {
        "another account's token": stranger["token"],
        "another account's key": ready_model_row(stack.settings, stranger["id"])["key"],
        "the owner's key for another model": ready_model_row(stack.settings, owner_id)["key"],
    }
    for who, credential in others.items():
        foreign = _job_calls(client, job_id, credential)
        missing = _job_calls(client, new_id("job"), credential)
        assert [a[0] for a in foreign] == [404] * 3, (who, foreign)
        assert {a[1] for a in foreign} == {"JOB_NOT_FOUND"}, (who, foreign)
        assert foreign == missing, who
    owner_view = client.get(f"/v1/jobs/{job_id}", headers=auth(gguf_ready["token"]))
    assert owner_view.status_code == 200
    assert owner_view.json()["status"] != "cancelled", "a stranger's cancel took effect"


def test_junk_keys_are_refused_before_any_database_query(
    client: TestClient, gguf_ready: dict[str, Any], statements: list[str]
) -> None:
    for junk in JUNK_KEYS:
        resp = client.post(
            "/v1/infer",
            json={"model_id": gguf_ready["id"], "prompt": "x"},
            headers={"Authorization": f"Bearer {junk}"},
        )
        assert resp.status_code == 403, junk
        assert resp.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert statements == []


def _database_text(stack: StackInfo) -> str:
    engine = get_engine(stack.settings)
    meta = sa.MetaData()
    meta.reflect(engine)
    parts = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            parts.extend(repr(tuple(row)) for row in conn.execute(sa.select(table)))
    return "\n".join(parts)


def test_no_plaintext_key_or_token_in_database_or_logs(
    client: TestClient,
    stack: StackInfo,
    gguf_ready: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    resp = client.post(
        "/v1/infer",
        json={"model_id": gguf_ready["id"], "prompt": "hi", "max_tokens": 2},
        headers=auth(gguf_ready["key"]),
    )
    assert resp.status_code == 200, resp.text
    minted = client.post(
        f"/v1/models/{gguf_ready['id']}/keys", json={"name": "t"}, headers=auth(gguf_ready["token"])
    ).json()["key"]
    secrets = {"api key": gguf_ready["key"], "token": gguf_ready["token"], "minted": minted}
    stored = _database_text(stack)
    logs = stack.worker.log() + stack.infer_worker.log() + caplog.text
    for what, value in secrets.items():
        secret_part = value.split("_", 1)[1]
        assert secret_part not in stored, f"{what} stored in plaintext"
        assert secret_part not in logs, f"{what} written to a log"


@pytest.mark.parametrize("stack", ["sqlite+file+system-redis"], indirect=True)
def test_upload_url_cannot_overwrite_a_validated_model(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    token = create_account(client, "uploader")
    files = {"tiny.gguf": gguf_model}
    created = declare(client, token, "m", files)
    upload_files(client, created, files)
    resp = client.post(f"/v1/models/{created['id']}/complete", json={}, headers=auth(token))
    assert resp.status_code == 202
    ready = wait_for_verdict(client, token, created["id"])
    assert ready["status"] == "ready", ready
    plan = created["uploads"][0]
    evil = b"GGUF" + b"\0" * (gguf_model.stat().st_size - 4)  # same size, other bytes
    replay = put(client, plan["url"], evil, plan["headers"])
    assert replay.status_code in (403, 409), replay.text
    after = client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()
    assert after["status"] == "ready" and after.get("sha256") == ready.get("sha256")

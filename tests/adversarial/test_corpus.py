"""Every hostile file of the corpus, uploaded through the real API to a real worker.

All uploads are submitted first and their verdicts collected once per stack configuration;
the worker validates them one after another, so the whole corpus costs seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import get_settings
from tests.adversarial.case import Bases, Case
from tests.adversarial.corpus import build_corpus, sizes_by_family
from tests.utils.factories import (
    _bytes,
    auth,
    create_account,
    declare,
    upload_files,
    upload_model,
    wait_for_verdict,
)
from tests.utils.stack import StackInfo

FAMILIES = {"pickle", "zip", "gguf", "safetensors", "onnx", "transformers"}


@pytest.fixture(scope="module")
def bases(
    gguf_model: Path,
    transformers_bundle: Path,
    pytorch_bundle: Path,
    onnx_bundle: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Bases:
    canaries = tmp_path_factory.mktemp("canaries")
    return Bases(gguf_model, transformers_bundle, pytorch_bundle, onnx_bundle, canaries)


@pytest.fixture(scope="module")
def corpus(bases: Bases, tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build_corpus(bases, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def stack_client(stack: StackInfo) -> Iterator[TestClient]:
    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        yield c


def _submit(client: TestClient, token: str, case: Case) -> dict[str, Any]:
    """Declare, upload and complete one case; a refused declaration is its own verdict."""
    if case.stage == "declare":
        decl = [{"path": p, "size_bytes": len(_bytes(c))} for p, c in case.files.items()]
        resp = client.post(
            "/v1/models", json={"name": case.name, "files": decl}, headers=auth(token)
        )
        return {"status": "refused", "http": resp.status_code, "body": resp.json()}
    created = declare(client, token, case.name, case.files)
    body = upload_files(client, created, case.files)
    resp = client.post(f"/v1/models/{created['id']}/complete", json=body, headers=auth(token))
    assert resp.status_code == 202, resp.text
    return {"id": created["id"]}


@pytest.fixture(scope="module")
def verdicts(stack_client: TestClient, corpus: list[Case]) -> dict[str, dict[str, Any]]:
    token = create_account(stack_client, "attacker")
    submitted = {case.name: _submit(stack_client, token, case) for case in corpus}
    out: dict[str, dict[str, Any]] = {}
    for name, sub in submitted.items():
        if "id" not in sub:
            out[name] = sub
            continue
        out[name] = wait_for_verdict(stack_client, token, sub["id"], timeout=300)
    return out


def _code(verdict: dict[str, Any]) -> str:
    if verdict["status"] == "refused":
        return f"{verdict['http']} {verdict['body']['error']['code']}"
    if verdict["status"] == "rejected":
        return str(verdict["rejection"]["code"])
    return str(verdict["status"]).upper()


def test_corpus_covers_every_format_with_at_least_60_files(corpus: list[Case]) -> None:
    sizes = sizes_by_family(corpus)
    assert set(sizes) == FAMILIES, sizes
    assert len(corpus) >= 60 and min(sizes.values()) >= 5, sizes


def test_corpus_every_hostile_upload_is_rejected_with_its_exact_code(
    corpus: list[Case], verdicts: dict[str, dict[str, Any]]
) -> None:
    wrong = {}
    for case in corpus:
        want = f"400 {case.code}" if case.stage == "declare" else case.code
        got = _code(verdicts[case.name])
        if got != want:
            wrong[case.name] = f"want {want}, got {got}: {verdicts[case.name]}"[:400]
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    for case in corpus:
        verdict = verdicts[case.name]
        if verdict["status"] == "rejected":
            assert verdict["rejection"]["message"] and verdict["api_key"] is None, verdict


def test_corpus_no_payload_ran(
    corpus: list[Case], bases: Bases, verdicts: dict[str, dict[str, Any]]
) -> None:
    aimed = [c.canary for c in corpus if c.canary is not None]
    assert len(aimed) >= 30  # the executable payloads, each aimed at its own file
    assert all(p.parent == bases.canaries for p in aimed)
    assert list(bases.canaries.iterdir()) == []


def test_corpus_leaves_the_worker_alive_and_working(
    stack: StackInfo,
    stack_client: TestClient,
    bases: Bases,
    verdicts: dict[str, dict[str, Any]],
) -> None:
    assert stack.worker.alive(), stack.worker.log()[-3000:]
    assert stack.infer_worker.alive(), stack.infer_worker.log()[-3000:]
    assert "validator failed on" not in stack.worker.log()  # no parser raised on hostile bytes
    token = create_account(stack_client, "honest")
    verdict = upload_model(stack_client, token, {"tiny.gguf": bases.gguf}, name="after-corpus")
    assert verdict["status"] == "ready", verdict

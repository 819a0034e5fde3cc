"""32 concurrent requests across two models and two formats: all complete, outputs uncrossed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.utils.factories import auth, bundle_dir, create_account, upload_model

GREEDY = {"raw": True, "temperature": 0.0, "max_tokens": 10}
PROMPTS = ["Once upon", "The capital of", "In the beginning", "Hello there"]


def test_concurrent_requests_on_two_models_are_not_crossed(
    client: TestClient, gguf_ready: dict[str, Any], transformers_bundle: Path
) -> None:
    token = create_account(client, "concurrent")
    hf = upload_model(client, token, bundle_dir(transformers_bundle), name="hf")
    assert hf["status"] == "ready"
    models = {"gguf": (gguf_ready["id"], gguf_ready["key"]), "hf": (hf["id"], hf["api_key"])}

    def call(name: str, prompt: str) -> str:
        model_id, key = models[name]
        resp = client.post(
            "/v1/infer", json={"model_id": model_id, "prompt": prompt, **GREEDY}, headers=auth(key)
        )
        assert resp.status_code == 200, resp.text
        text: str = resp.json()["completion"]
        return text

    reference = {(m, p): call(m, p) for m in models for p in PROMPTS}
    work = [(m, PROMPTS[i % len(PROMPTS)]) for i in range(16) for m in models]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda mp: call(*mp), work))
    assert len(results) == 32
    for (m, p), got in zip(work, results, strict=True):
        assert got == reference[(m, p)], (m, p)

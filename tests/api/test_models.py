from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.utils.factories import (
    auth,
    create_account,
    declare,
    upload_files,
    upload_model,
    wait_for_verdict,
)
from tests.utils.stack import StackInfo


def test_declare_model_returns_signed_upload_plan(client: TestClient) -> None:
    token = create_account(client)
    created = declare(client, token, "tiny", {"model.gguf": b"x" * 100})
    assert created["id"].startswith("mdl_")
    assert created["status"] == "awaiting_upload"
    (plan,) = created["uploads"]
    assert plan["method"] == "put"
    assert plan["url"].startswith("http")
    assert created["files"] == [
        {
            "path": "model.gguf",
            "size_bytes": 100,
            "uploaded": False,
            "sha256": None,
            "kind": None,
            "converted_from": None,
        }
    ]


@pytest.mark.parametrize(
    "path",
    ["../model.gguf", "/etc/passwd.json", "a\\b.json", "a/../b.json", ".hidden.json", "a//b.json",
     "run.py", "x.sh", "weights.exe", "model.gguf\x00.txt", "a/b/c/d/e.json", "x" * 300 + ".json", "./m.gguf"],
)  # fmt: skip
def test_declare_model_rejects_unsafe_or_unknown_paths(client: TestClient, path: str) -> None:
    token = create_account(client)
    resp = client.post(
        "/v1/models",
        json={"name": "m", "files": [{"path": path, "size_bytes": 10}]},
        headers=auth(token),
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "INVALID_REQUEST"
    assert "files.0.path" in (err["details"].get("field", "") + err["message"])


def test_declare_model_rejects_bundle_over_size_cap(client: TestClient) -> None:
    token = create_account(client)
    files = [{"path": "a.gguf", "size_bytes": 8 * 1024**3}, {"path": "b.json", "size_bytes": 1}]
    resp = client.post("/v1/models", json={"name": "big", "files": files}, headers=auth(token))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert client.get("/v1/models", headers=auth(token)).json()["count"] == 0


@pytest.mark.parametrize(
    "files",
    [
        [],
        [{"path": "a.json", "size_bytes": 0}],
        [{"path": "a.json", "size_bytes": -5}],
        [{"path": "a.json", "size_bytes": "10"}],
        [{"path": "a.json", "size_bytes": 10}, {"path": "A.json", "size_bytes": 10}],
        [{"path": f"f{i}.json", "size_bytes": 1} for i in range(65)],
        [{"path": "a.json"}],
    ],
)
def test_declare_model_rejects_malformed_file_lists(
    client: TestClient, files: list[object]
) -> None:
    token = create_account(client)
    resp = client.post("/v1/models", json={"name": "m", "files": files}, headers=auth(token))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "INVALID_REQUEST"


def test_declare_model_rejects_bad_names(client: TestClient) -> None:
    token = create_account(client)
    for name in ("", "-x", "a b", "x" * 101, "../etc", None):
        resp = client.post(
            "/v1/models",
            json={"name": name, "files": [{"path": "a.gguf", "size_bytes": 1}]},
            headers=auth(token),
        )
        assert resp.status_code == 400, name


def test_complete_model_before_upload_is_conflict_and_keeps_model(client: TestClient) -> None:
    token = create_account(client)
    created = declare(client, token, "m", {"model.gguf": b"GGUF"})
    resp = client.post(f"/v1/models/{created['id']}/complete", headers=auth(token))
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "UPLOAD_INCOMPLETE"
    assert resp.json()["error"]["details"]["missing"] == ["model.gguf"]
    assert (
        client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()["status"]
        == "awaiting_upload"
    )


def test_upload_gguf_becomes_ready_with_key_shown_once(
    client: TestClient, gguf_model: Path
) -> None:
    token = create_account(client)
    verdict = upload_model(client, token, {"tiny.gguf": gguf_model}, name="my-llama")
    assert verdict["status"] == "ready", verdict
    assert verdict["format"] == "gguf"
    assert len(verdict["sha256"]) == 64
    assert verdict["api_key"].startswith("ik_")
    again = client.get(f"/v1/models/{verdict['id']}", headers=auth(token)).json()
    assert again["api_key"] is None
    assert again["api_key_prefix"] == verdict["api_key_prefix"]
    assert verdict["api_key"].startswith(again["api_key_prefix"].rstrip("…"))
    keys = client.get("/v1/keys", headers=auth(token)).json()
    assert keys["count"] == 1
    assert verdict["api_key"] not in str(keys)


def test_complete_model_twice_starts_nothing_new(client: TestClient, gguf_model: Path) -> None:
    token = create_account(client)
    files = {"tiny.gguf": gguf_model}
    verdict = upload_model(client, token, files)
    again = client.post(f"/v1/models/{verdict['id']}/complete", headers=auth(token))
    assert again.status_code == 202
    assert again.json()["status"] == "ready"
    assert again.json()["validated_at"] == verdict["validated_at"]


def test_upload_transformers_bundles_become_ready(
    client: TestClient, transformers_bundle: Path, transformers_bin_bundle: Path
) -> None:
    from tests.utils.factories import bundle_dir

    token = create_account(client)
    for bundle in (transformers_bundle, transformers_bin_bundle):
        verdict = upload_model(client, token, bundle_dir(bundle))
        assert verdict["status"] == "ready", verdict
        assert verdict["format"] == "transformers"


def test_upload_pytorch_and_onnx_bundles_become_ready(
    client: TestClient, pytorch_bundle: Path, onnx_bundle: Path, onnx_external_bundle: Path
) -> None:
    from tests.utils.factories import bundle_dir

    token = create_account(client)
    expected = {pytorch_bundle: "pytorch", onnx_bundle: "onnx", onnx_external_bundle: "onnx"}
    for bundle, fmt in expected.items():
        verdict = upload_model(client, token, bundle_dir(bundle))
        assert verdict["status"] == "ready", verdict
        assert verdict["format"] == fmt


def test_other_account_cannot_see_or_touch_model(client: TestClient) -> None:
    owner = create_account(client, "owner")
    intruder = create_account(client, "intruder")
    created = declare(client, owner, "m", {"model.gguf": b"GGUF"})
    mid = created["id"]
    for method, url in (
        ("GET", f"/v1/models/{mid}"),
        ("DELETE", f"/v1/models/{mid}"),
        ("POST", f"/v1/models/{mid}/complete"),
        ("POST", f"/v1/models/{mid}/keys"),
        ("POST", f"/v1/models/{mid}/uploads"),
    ):
        resp = client.request(method, url, headers=auth(intruder))
        assert resp.status_code == 404, (method, url)
        assert resp.json()["error"]["code"] == "MODEL_NOT_FOUND"
    assert client.get("/v1/models", headers=auth(intruder)).json()["count"] == 0
    assert client.get(f"/v1/models/{mid}", headers=auth(owner)).status_code == 200


def test_delete_model_revokes_keys_and_removes_objects(
    client: TestClient, stack: StackInfo, gguf_model: Path
) -> None:
    from core.storage import get_storage

    signup = client.post("/v1/accounts", json={"name": "acme"}).json()
    token = signup["token"]
    verdict = upload_model(client, token, {"tiny.gguf": gguf_model})
    key = f"{signup['id']}/{verdict['id']}/tiny.gguf"
    storage = get_storage(stack.settings)
    assert storage.size_of(key) == gguf_model.stat().st_size
    resp = client.delete(f"/v1/models/{verdict['id']}", headers=auth(token))
    assert resp.status_code == 204
    assert client.get(f"/v1/models/{verdict['id']}", headers=auth(token)).status_code == 404
    (key_row,) = client.get("/v1/keys", headers=auth(token)).json()["data"]
    assert key_row["revoked_at"] is not None
    assert storage.size_of(key) is None
    assert client.delete(f"/v1/models/{verdict['id']}", headers=auth(token)).status_code == 404


def test_upload_larger_than_declared_is_refused_and_retry_succeeds(
    client: TestClient, gguf_model: Path
) -> None:
    token = create_account(client)
    data = gguf_model.read_bytes()
    created = declare(client, token, "m", {"tiny.gguf": data})
    (plan,) = created["uploads"]
    from tests.utils.factories import put

    resp = put(client, plan["url"], data + b"extra", plan["headers"])
    if resp.status_code == 200:  # S3 accepts the bytes; our complete must refuse them
        done = client.post(f"/v1/models/{created['id']}/complete", headers=auth(token))
        assert done.status_code == 400
        assert done.json()["error"]["details"]["code"] == "UPLOAD_SIZE_MISMATCH"
    else:
        assert resp.status_code == 413
    assert (
        client.get(f"/v1/models/{created['id']}", headers=auth(token)).json()["status"]
        == "awaiting_upload"
    )
    fresh = client.post(f"/v1/models/{created['id']}/uploads", headers=auth(token))
    assert fresh.status_code == 200
    body = upload_files(client, {"uploads": fresh.json()}, {"tiny.gguf": data})
    assert (
        client.post(
            f"/v1/models/{created['id']}/complete", json=body, headers=auth(token)
        ).status_code
        == 202
    )
    assert wait_for_verdict(client, token, created["id"])["status"] == "ready"

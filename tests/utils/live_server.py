"""The API behind a real uvicorn socket in a thread: for clients that must speak HTTP
(the CLI, or a client that hangs up mid-stream, which TestClient cannot do)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from core.settings import Settings, get_settings
from tests.utils.services import free_port


@contextmanager
def live_api(settings: Settings) -> Iterator[str]:
    """Serve `create_app(settings)` on 127.0.0.1; yields its base URL."""
    from api.main import create_app

    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)

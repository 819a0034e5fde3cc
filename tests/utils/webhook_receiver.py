"""A local webhook receiver (plugin: `hook_server`), failing its first delivery on purpose."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest


class Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if Hooks.fail_first > 0:
            Hooks.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        Hooks.received.append({"headers": dict(self.headers), "body": body})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass

    @staticmethod
    def wait_for(count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(Hooks.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return Hooks.received


@pytest.fixture
def hook_server() -> Iterator[str]:
    """The receiver's URL; the first delivery gets a 503, later ones are recorded."""
    Hooks.received, Hooks.fail_first = [], 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()

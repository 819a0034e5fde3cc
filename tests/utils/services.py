"""Real services for tests: an S3 endpoint over HTTP (moto_server), free ports."""

from __future__ import annotations

import os
import socket
from types import TracebackType

from moto.server import ThreadedMotoServer

# moto accepts any credentials; setting them keeps an operator's real ones from being sent.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


def free_port() -> int:
    """A TCP port nothing listens on right now (for "unreachable endpoint" tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's S3 as a real HTTP server in a thread; presigned URLs from boto3 work against it."""

    def __init__(self) -> None:
        # Port 0: the kernel picks a free port, so parallel sessions never collide.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._saved_env: dict[str, str | None] = {}
        self.endpoint_url = ""

    def start(self) -> MotoServer:
        for name, value in FAKE_AWS_ENV.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_moto_server() -> MotoServer:
    """A started server; use as `with start_moto_server() as s3:` or call `.stop()`."""
    return MotoServer().start()

"""The CLI's side of the REST API: where the server is, the saved token, the error envelope."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from core.settings import ClientEnv

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """Printed as `error: CODE: message` and turned into an exit code, never a traceback."""

    def __init__(self, code: str, message: str, exit_code: int = 2) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit_code = exit_code


def load_credentials(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def save_credentials(path: Path, url: str, token: str) -> None:
    """Write url+token with mode 0600 from the first byte (the token is a bearer secret)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url, "token": token}, out, indent=2)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None


def resolve_target(url: str | None, token: str | None) -> Target:
    """URL: flag, env, saved, default. Token: flag, env, or saved for that same URL."""
    env = ClientEnv()
    saved = load_credentials(env.credentials_path())
    resolved = (url or env.api_url or saved.get("url") or DEFAULT_URL).rstrip("/")
    if token or env.token:
        return Target(resolved, token or env.token)
    same_server = saved.get("url", "").rstrip("/") == resolved
    return Target(resolved, saved.get("token") if same_server else None)


def error_from(response: httpx.Response) -> CliError:
    """The server's envelope `{"error": {"code", "message"}}`, or a readable fallback."""
    try:
        err = response.json()["error"]
        return CliError(str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return CliError(f"HTTP_{response.status_code}", text)


class Api:
    """A thin JSON client that raises CliError for every failure."""

    def __init__(self, target: Target, *, need_token: bool = True, timeout: float = 30.0) -> None:
        if need_token and not target.token:
            raise CliError(
                "NO_TOKEN",
                "no account token: pass --token, set INFERATECH_TOKEN, "
                "or run `inferatech accounts create`",
            )
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self.url = target.url
        self.http = httpx.Client(base_url=target.url, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise CliError("CONNECTION_FAILED", f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise error_from(response)
        return response.json() if response.content else None

    def close(self) -> None:
        self.http.close()

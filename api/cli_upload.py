"""`inferatech models upload`: declare a bundle, stream its files, complete, await the verdict."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from api.cli_client import Api, CliError, error_from

CHUNK = 1024 * 1024
TRIES = 3
BACKOFF_S = 0.5
PART_WORKERS = 4
# 408/429 and 5xx are worth another try; any other 4xx will fail the same way again.
_RETRYABLE = {408, 429}


@dataclass(frozen=True)
class LocalFile:
    path: str  # the path inside the bundle, always with `/`
    source: Path
    size: int


def collect_files(paths: list[Path]) -> list[LocalFile]:
    """Files as given; a directory contributes its non-hidden files, relative to itself."""
    found: dict[str, LocalFile] = {}
    for given in paths:
        if given.is_dir():
            pairs = [
                (p.relative_to(given).as_posix(), p)
                for p in sorted(given.rglob("*"))
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(given).parts)
            ]
        elif given.is_file():
            pairs = [(given.name, given)]
        else:
            raise CliError("FILE_NOT_FOUND", f"{given} is not a file or directory")
        for rel, source in pairs:
            if rel in found:
                raise CliError("DUPLICATE_PATH", f"two files would be uploaded as {rel!r}")
            size = source.stat().st_size
            if size == 0:
                raise CliError("EMPTY_FILE", f"{source} is empty")
            found[rel] = LocalFile(rel, source, size)
    if not found:
        raise CliError("NO_FILES", "nothing to upload (hidden files are skipped)")
    return list(found.values())


class Uploader:
    """Streams files (or byte ranges of them) to signed URLs, retrying each request."""

    def __init__(self, progress: Progress, transport: httpx.BaseTransport | None = None) -> None:
        # No Authorization header: presigned URLs carry their own signature.
        timeout = httpx.Timeout(120.0, connect=10.0)
        self.http = httpx.Client(timeout=timeout, transport=transport)
        self.progress = progress

    def upload(self, plan: dict[str, Any], f: LocalFile, task: TaskID) -> list[dict[str, Any]]:
        """Upload one file; returns its parts' ETags (empty for a single PUT)."""
        self.progress.update(task, completed=0)
        if plan["method"] == "put":
            self.send(plan["url"], plan.get("headers") or {}, f, 0, f.size, task)
            return []
        part_size = int(plan["part_size"])
        parts = sorted(plan["parts"], key=lambda p: int(p["part_number"]))
        with ThreadPoolExecutor(PART_WORKERS) as pool:
            futures = {
                int(p["part_number"]): pool.submit(
                    self.send, p["url"], {}, f, (int(p["part_number"]) - 1) * part_size,
                    min(part_size, f.size - (int(p["part_number"]) - 1) * part_size), task,
                )
                for p in parts
            }  # fmt: skip
            try:
                return [{"part_number": n, "etag": fut.result()} for n, fut in futures.items()]
            except BaseException:
                for fut in futures.values():
                    fut.cancel()
                raise

    def send(
        self,
        url: str,
        headers: dict[str, str],
        f: LocalFile,
        offset: int,
        length: int,
        task: TaskID,
    ) -> str:
        """PUT `length` bytes from `offset`, up to TRIES times; returns the ETag without quotes."""
        error = CliError("UPLOAD_FAILED", f"uploading {f.path} failed")
        for attempt in range(TRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            sent = [0]
            try:
                response = self.http.put(
                    url,
                    content=self._read(f, offset, length, task, sent),
                    headers={**headers, "Content-Length": str(length)},
                )
            except httpx.TransportError as exc:
                error = CliError("UPLOAD_FAILED", f"uploading {f.path}: {exc}")
            else:
                if response.status_code < 300:
                    etag: str = response.headers.get("etag", "")
                    return etag.strip().strip('"')
                error = error_from(response)
                if response.status_code < 500 and response.status_code not in _RETRYABLE:
                    raise error
            self.progress.advance(task, -sent[0])
        raise error

    def _read(
        self, f: LocalFile, offset: int, length: int, task: TaskID, sent: list[int]
    ) -> Iterator[bytes]:
        # A generator, so a multi-GB file is never held in memory.
        with f.source.open("rb") as handle:
            handle.seek(offset)
            remaining = length
            while remaining:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    raise CliError("FILE_CHANGED", f"{f.source} shrank while uploading")
                remaining -= len(chunk)
                sent[0] += len(chunk)
                self.progress.advance(task, len(chunk))
                yield chunk

    def close(self) -> None:
        self.http.close()


def upload_all(
    api: Api, model: dict[str, Any], files: list[LocalFile], progress: Progress
) -> dict[str, list[dict[str, Any]]]:
    """Upload every file; a file that still fails gets one fresh plan (expired URL, lost part)."""
    plans = {p["path"]: p for p in model["uploads"]}
    tasks = {f.path: progress.add_task(f.path, total=f.size) for f in files}
    uploader = Uploader(progress)
    parts: dict[str, list[dict[str, Any]]] = {}
    pending = files
    try:
        for round_ in range(2):
            failed: list[tuple[LocalFile, CliError]] = []
            for f in pending:
                try:
                    if etags := uploader.upload(plans[f.path], f, tasks[f.path]):
                        parts[f.path] = etags
                except CliError as exc:
                    failed.append((f, exc))
            if not failed or round_:
                break
            fresh = api.call("POST", f"/v1/models/{model['id']}/uploads")
            plans = {p["path"]: p for p in fresh}
            pending = [f for f, _ in failed if f.path in plans]
    finally:
        uploader.close()
    if failed:
        raise failed[0][1]
    return parts


def wait_for_verdict(api: Api, model_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.3
    while True:
        model: dict[str, Any] = api.call("GET", f"/v1/models/{model_id}")
        if model["status"] in ("ready", "rejected"):
            return model
        if time.monotonic() > deadline:
            raise CliError(
                "TIMEOUT",
                f"still {model['status']} after {timeout:.0f} s; "
                f"check later with `inferatech models get {model_id}`",
                exit_code=3,
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 3.0)


def verdict_line(model: dict[str, Any]) -> str:
    name, model_id = model["name"], model["id"]
    if model["status"] == "rejected":
        rejection = model.get("rejection") or {}
        code = rejection.get("code", "REJECTED")
        return f"{name} rejected · {code}: {rejection.get('message', '')}"
    if model.get("api_key"):
        return f"{name} ready · id {model_id} · API key {model['api_key']} (shown once)"
    return (
        f"{name} ready · id {model_id} · API key {model.get('api_key_prefix')} was already "
        f"shown; mint another with `inferatech keys create {model_id}`"
    )


def upload_model(
    api: Api, paths: list[Path], name: str, *, wait: bool = True, timeout: float = 600.0
) -> int:
    """The whole upload command; returns the process exit code."""
    files = collect_files(paths)
    body = {"name": name, "files": [{"path": f.path, "size_bytes": f.size} for f in files]}
    model = api.call("POST", "/v1/models", body)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    rates = (TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, *rates, console=Console(stderr=True)) as progress:
        parts = upload_all(api, model, files, progress)
    api.call("POST", f"/v1/models/{model['id']}/complete", {"parts": parts})
    if not wait:
        print(f"{name} uploaded · id {model['id']} · validating", flush=True)
        return 0
    verdict = wait_for_verdict(api, model["id"], timeout)
    print(verdict_line(verdict), flush=True)
    return 1 if verdict["status"] == "rejected" else 0

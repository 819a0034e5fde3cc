"""Structured logs: one JSON object a line, each carrying the request and job it belongs to.

The request id lives in a context variable: the API's `RequestIdMiddleware` sets it for the
request, Celery carries it in a message header (`before_task_publish`) and the worker sets it
again around the task (`task_prerun`), so a worker's lines about a job name the request that
queued it. Nothing here logs payloads: callers pass ids, counts and timings, never text.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)
REQUEST_ID_HEADER = "inferatech_request_id"  # Celery message header

LogFormat = Literal["json", "text"]
# Attributes every LogRecord has (and `ids`, TextFormatter's); the rest came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_STANDARD |= {"message", "asctime", "ids"}
_HANDLER_NAME = "inferatech"
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Lines logged inside the block carry these ids (unset ones are left as they were)."""
    tokens = []
    if request_id is not None:
        tokens.append((REQUEST_ID, REQUEST_ID.set(request_id)))
    if job_id is not None:
        tokens.append((JOB_ID, JOB_ID.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Stamps each record with the ids of the context it was logged in."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = JOB_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", …extra fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for development, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [
            str(v) for v in (getattr(record, "request_id", None), getattr(record, "job_id", None))
        ]
        record.ids = "".join(f" [{v}]" for v in ids if v != "None")
        return super().format(record)


def handler_for(fmt: LogFormat, stream: Any) -> logging.Handler:
    """A handler writing `fmt` lines, stamped with the context's ids, to `stream`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure(level: str, fmt: LogFormat, stream: Any = None) -> logging.Handler:
    """Route every log line of the process through one handler in the chosen format.

    Other handlers on the root logger (pytest's capture, an operator's own) are left alone.
    In JSON mode uvicorn's loggers lose their own handlers and propagate to the root, so its
    lines are JSON too.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)  # a second call replaces the handler instead of adding one
    handler = handler_for(fmt, stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        for name in _UVICORN:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    logging.captureWarnings(True)
    return handler


def propagate_to_celery() -> None:
    """Tasks carry the request id that queued them; workers restore it around each task."""
    from celery.signals import before_task_publish, task_postrun, task_prerun

    before_task_publish.connect(_stamp_task, weak=False, dispatch_uid="inferatech-rid-publish")
    task_prerun.connect(_enter_task, weak=False, dispatch_uid="inferatech-rid-enter")
    task_postrun.connect(_leave_task, weak=False, dispatch_uid="inferatech-rid-leave")


def _stamp_task(headers: dict[str, Any] | None = None, **_: Any) -> None:
    rid = REQUEST_ID.get()
    if headers is not None and rid is not None:
        headers.setdefault(REQUEST_ID_HEADER, rid)


def _enter_task(task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    rid = getattr(request, REQUEST_ID_HEADER, None) or (
        getattr(request, "headers", None) or {}
    ).get(REQUEST_ID_HEADER)
    REQUEST_ID.set(str(rid)[:128] if rid else None)
    JOB_ID.set(None)


def _leave_task(**_: Any) -> None:
    REQUEST_ID.set(None)
    JOB_ID.set(None)

"""Signed job-completion webhooks (Standard Webhooks), delivered off the inference path."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from core import batches
from core.db import session_scope
from core.settings import Settings
from core.tables import Batch, Job

TIMEOUT_S = 10.0


class WebhookRefused(Exception):
    """The URL may not be called (scheme, or a private address without permission)."""


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>` per Standard Webhooks."""
    mac = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse non-HTTP schemes and, unless allowed, hosts that resolve to private addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook_url must be an http(s) URL with a host")
    if allow_private:
        return
    for info in socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP):
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved:
            raise WebhookRefused(f"webhook host {parts.hostname} resolves to a private address")


def payload(job: Job) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "model_id": job.model_id,
        "status": job.status.value,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "timings": job.timings,
    }
    if job.result:
        body["result"] = job.result
    if job.error_code:
        body["error"] = {"code": job.error_code, "message": job.error_message}
    return {"type": f"job.{job.status.value}", "timestamp": int(time.time()), "data": body}


def deliver(settings: Settings, job_id: str, attempt: int, *, allow_private: bool) -> int:
    """POST the job's signed event once; returns the HTTP status (raises on network errors)."""
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or not job.webhook_url:
            return 0
        url, event = job.webhook_url, payload(job)
    return post_signed(settings, url, f"msg_{job_id}", event, attempt, allow_private=allow_private)


def batch_payload(batch: Batch, p: batches.Progress) -> dict[str, Any]:
    status = batches.status_of(batch, p)
    body = {
        "id": batch.id,
        "model_id": batch.model_id,
        "status": status,
        "total": batch.total,
        "completed": p.succeeded,
        "failed": p.failed,
        "cancelled": p.cancelled,
    }
    return {"type": f"batch.{status}", "timestamp": int(time.time()), "data": body}


def deliver_batch(settings: Settings, batch_id: str, attempt: int, *, allow_private: bool) -> int:
    """POST the closed batch's signed event once, like `deliver`."""
    with session_scope(settings) as s:
        batch = s.get(Batch, batch_id)
        if batch is None or not batch.webhook_url:
            return 0
        url, event = batch.webhook_url, batch_payload(batch, batches.progress(s, batch))
    return post_signed(
        settings, url, f"msg_{batch_id}", event, attempt, allow_private=allow_private
    )


def post_signed(
    settings: Settings,
    url: str,
    msg_id: str,
    event: dict[str, Any],
    attempt: int,
    *,
    allow_private: bool,
) -> int:
    """One signed POST; `msg_id` is stable across retries so receivers can de-duplicate."""
    check_url(url, allow_private=allow_private)
    body = json.dumps(event, separators=(",", ":")).encode()
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(settings.webhook_secret.get_secret_value(), msg_id, ts, body),
        "user-agent": f"Inferatech-Webhooks/1 (attempt {attempt})",
    }
    reply = httpx.post(
        url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False
    )
    return reply.status_code

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

from core.db import session_scope
from core.settings import Settings
from core.tables import Job

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
    """POST the signed event once; returns the HTTP status (raises on network errors)."""
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or not job.webhook_url:
            return 0
        url, event = job.webhook_url, payload(job)
    check_url(url, allow_private=allow_private)
    body = json.dumps(event, separators=(",", ":")).encode()
    ts = int(time.time())
    msg_id = f"msg_{job_id}"  # stable across retries so receivers can de-duplicate
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

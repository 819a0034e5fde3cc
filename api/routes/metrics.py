"""Prometheus scrape endpoint: this process's HTTP metrics and the cluster's, in one page."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.deps import SettingsDep
from core.errors import AuthenticationFailed

router = APIRouter(tags=["operators"])


@router.get("/metrics", response_class=Response)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format; wants `Bearer <INFERATECH_METRICS_TOKEN>` when that is set."""
    if settings.metrics_token is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        expected = settings.metrics_token.get_secret_value()
        # Digests: the comparison takes the same time whatever the length of the guess.
        if not hmac.compare_digest(_digest(given), _digest(expected)):
            raise AuthenticationFailed("metrics token required")
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()

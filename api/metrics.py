"""Prometheus metrics of the API process and, read at scrape time, of the whole cluster.

Two kinds of series, kept apart on purpose:

* per process, the Prometheus norm: HTTP requests and their latency, counted by the replica
  that served them (scrape every replica; `sum without (instance)` adds them up);
* cluster-wide, read from Redis and the database on each scrape: job latencies and tokens
  (written by the workers, see `core.cluster_metrics`), queue depths, the workers' own
  counters (from their heartbeats) and billing push state. Every replica shows the same
  values for these; aggregate them with `max without (instance)`, never `sum`.

Label values stay bounded: routes are templates (`/v1/jobs/{job_id}`, or `unmatched`), models
are ids that authenticated (set by the route as `request.state.model_id`), never raw input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import timedelta

import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlmodel import Session, col, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.redaction import redact
from core import cluster_metrics
from core.db import get_engine
from core.events import read_heartbeats
from core.queue import BACKGROUND_QUEUE, INFER_QUEUE, VALIDATE_QUEUE, queue_depths
from core.redis import get_redis
from core.settings import Settings
from core.tables import PushState, UsageEvent, utcnow

log = logging.getLogger("inferatech.metrics")
access_log = logging.getLogger("inferatech.access")

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
UNMATCHED = "unmatched"
# A server accepts any token as a method; anything else is one `other` label, not a new series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SHARED_QUEUES = [INFER_QUEUE, VALIDATE_QUEUE, BACKGROUND_QUEUE]


class HttpMetrics:
    """This process's request counters, in the app's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "inferatech_http_requests",
            "HTTP requests served by this API process.",
            ["route", "method", "model", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "inferatech_http_request_duration_seconds",
            "End-to-end request time in this API process, streamed bodies included.",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )


class AccessMiddleware:
    """Counts and logs every HTTP request once it has been answered (or has failed).

    The log line names the route template and the redacted path, never the query or body.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes becomes the server's 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_of(scope)
            method = (
                scope["method"] if route != UNMATCHED and scope["method"] in METHODS else "other"
            )
            model = str(scope.get("state", {}).get("model_id") or "")
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, method, model, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            fields = {"method": scope["method"], "route": route, "path": redact(scope["path"]),
                      "status": status, "duration_ms": round(elapsed * 1000, 3),
                      "model_id": model or None}  # fmt: skip
            access_log.info("%s %s %d", scope["method"], route, status, extra=fields)


def route_of(scope: Scope) -> str:
    """The path template of the route that served the request; raw paths never become labels."""
    route = scope.get("route")  # set by the router on a match (also on a 405's partial match)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class ClusterCollector(Collector):
    """Reads the cluster's state on each scrape; a source that is down is reported, not fatal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "inferatech_metrics_source_up",
            "1 if this scrape could read the source (redis, database).",
            labels=["source"],
        )
        for source, read in (("redis", self._from_redis), ("database", self._from_database)):
            try:
                families = list(read())
            except (redis.RedisError, sa.exc.SQLAlchemyError, OSError) as exc:
                log.warning("metrics: %s unavailable: %s", source, type(exc).__name__)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _from_redis(self) -> Iterable[Metric]:
        client = get_redis(self.settings)
        snap = cluster_metrics.read(client)
        for name, hist in snap.histograms.items():
            family = HistogramMetricFamily(
                f"inferatech_{name}", cluster_metrics.HISTOGRAMS[name], labels=[]
            )
            family.add_metric([], hist.buckets, hist.sum)
            yield family
        jobs = CounterMetricFamily(
            "inferatech_jobs", "Jobs ended, by model and final status.", labels=["model", "status"]
        )
        for (model, status), n in sorted(snap.jobs.items()):
            jobs.add_metric([model, status], n)
        yield jobs
        tokens = CounterMetricFamily(
            "inferatech_tokens",
            "Tokens processed, by model; kind is prompt (in) or completion (out).",
            labels=["model", "kind"],
        )
        for (model, kind), n in sorted(snap.tokens.items()):
            tokens.add_metric([model, kind], n)
        yield tokens
        failures = CounterMetricFamily(
            "inferatech_billing_push_failures",
            "Usage events whose push to Stripe failed: retry (backing off) or permanent.",
            labels=["kind"],
        )
        for kind in ("retry", "permanent"):
            failures.add_metric([kind], snap.push_failures.get(kind, 0.0))
        yield failures
        beats = read_heartbeats(client)
        yield from _worker_families(beats)
        direct = sorted({str(b["queue"]) for b in beats if b.get("queue")})
        depth = GaugeMetricFamily(
            "inferatech_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue, n in queue_depths(client, SHARED_QUEUES + direct).items():
            depth.add_metric([queue], n)
        yield depth

    def _from_database(self) -> Iterable[Metric]:
        waiting = [PushState.PENDING, PushState.FAILED]
        stmt = (
            select(UsageEvent.push_state, func.count(), func.min(UsageEvent.occurred_at))
            .where(col(UsageEvent.push_state).in_(waiting))
            .group_by(UsageEvent.push_state)
        )
        with Session(get_engine(self.settings)) as session:
            rows = {PushState(r[0]): (r[1], r[2]) for r in session.exec(stmt)}
        events = GaugeMetricFamily(
            "inferatech_billing_events",
            "Usage events not yet in Stripe, by push state (pending, failed).",
            labels=["state"],
        )
        for state in waiting:
            events.add_metric([state.value], rows.get(state, (0, None))[0])
        yield events
        if self.settings.stripe_configured:  # without Stripe nothing is pushed: no lag to show
            oldest = rows.get(PushState.PENDING, (0, None))[1]
            lag = (utcnow() - oldest) if oldest is not None else timedelta(0)
            yield GaugeMetricFamily(
                "inferatech_billing_push_lag_seconds",
                "Age of the oldest usage event still waiting to be pushed to Stripe.",
                value=max(lag.total_seconds(), 0.0),
            )


def _worker_families(beats: list[dict[str, object]]) -> Iterable[Metric]:
    """Each live worker's own numbers, from its heartbeat (gone with the worker)."""
    spec = (  # name after `inferatech_worker_`, kind, heartbeat field, help
        ("runners", "gauge", "runners", "Warm runners (each holds a loaded model)."),
        ("busy_runners", "gauge", "busy", "Runners with room for no other request right now."),
        ("requests_in_flight", "gauge", "inflight", "Requests its runners are serving now."),
        ("free_slots", "gauge", "free_slots", "Runners this worker may still start."),
        ("cold_starts", "counter", "cold_starts", "Runner cold starts."),
        ("warm_hits", "counter", "hits", "Requests served by a warm runner."),
        ("weight_cache_hits", "counter", "cache_hits", "Bundles found in the weight cache."),
        ("weight_cache_misses", "counter", "cache_misses", "Bundles fetched from storage."),
    )
    workers = GaugeMetricFamily("inferatech_workers", "Live inference workers.", value=len(beats))
    yield workers
    for suffix, kind, field, doc in spec:
        name = f"inferatech_worker_{suffix}"
        family: Metric = (
            GaugeMetricFamily(name, doc, labels=["worker"])
            if kind == "gauge"
            else CounterMetricFamily(name, doc, labels=["worker"])
        )
        for beat in beats:
            value = beat.get(field)
            if isinstance(value, int | float):
                family.add_metric([str(beat.get("name", ""))], float(value))  # type: ignore[attr-defined]
        yield family


def make_registry(settings: Settings) -> tuple[CollectorRegistry, HttpMetrics]:
    """One registry per app: two apps in one process (tests, Lambda) never share counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(settings))
    return registry, HttpMetrics(registry)

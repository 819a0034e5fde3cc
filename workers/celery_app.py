"""The worker-side Celery app: `celery -A workers.celery_app worker -Q validate`."""

from __future__ import annotations

from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from core.queue import INFER_QUEUE, direct_queue, make_celery
from core.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _add_direct_queue(sender: str, instance: Any, **_: Any) -> None:
    """Inference workers also consume `infer.<nodename>`, where warm-aware routing sends work."""
    queues = instance.app.amqp.queues
    if INFER_QUEUE in queues.consume_from:
        queues.select_add(direct_queue(sender))


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_heartbeat(sender: Any, **_: Any) -> None:
    if INFER_QUEUE not in sender.app.amqp.queues.consume_from:
        return
    from workers.heartbeat import Heartbeat
    from workers.inference import executor_for

    ex = executor_for(get_settings())
    beat = Heartbeat(sender.hostname, ex.pool, ex.redis)
    beat.start()
    worker_shutdown.connect(lambda **_: beat.stop(), weak=False)

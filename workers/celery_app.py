"""The worker-side Celery app: `celery -A workers.celery_app worker -Q validate`."""

from __future__ import annotations

import logging
from typing import Any

from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS
from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    worker_ready,
    worker_shutdown,
)

from core import logs
from core.queue import INFER_QUEUE, INFER_TASK, direct_queue, make_celery
from core.settings import get_settings

log = logging.getLogger("inferatech.worker")
app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]
logs.propagate_to_celery()


class QuietInferTasks(logging.Filter):
    """Drops Celery's own `received` and `succeeded` lines for inference tasks.

    The worker's `job ended` line names the same job (the task id is the job id) with its
    status, tokens and timings; Celery's two lines per request cost an infer worker about 3 %
    of its CPU at one request at a time. Every other task keeps them, and an inference
    task's retries, failures and errors are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        return not (
            isinstance(context, dict)
            and context.get("name") == INFER_TASK
            and record.msg in (LOG_RECEIVED, LOG_SUCCESS)
        )


for _name in ("celery.app.trace", "celery.worker.strategy"):  # the two loggers that log them
    logging.getLogger(_name).addFilter(QuietInferTasks())


@setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    """Our format (JSON by default) instead of Celery's; a receiver here replaces Celery's setup."""
    settings = get_settings()
    logs.configure(settings.log_level, settings.effective_log_format)


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _worker_init(instance: Any, **_: Any) -> None:
    """Logging before Celery's first warning; in JSON mode its banner becomes a log line."""
    _setup_logging()
    if get_settings().effective_log_format == "json":
        instance.quiet = True  # every output line must be JSON


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _add_direct_queue(sender: str, instance: Any, **_: Any) -> None:
    """Inference workers also consume `infer.<nodename>`, where warm-aware routing sends work."""
    queues = instance.app.amqp.queues
    if INFER_QUEUE in queues.consume_from:
        queues.select_add(direct_queue(sender))
    log.info("worker %s consuming %s", sender, ", ".join(sorted(queues.consume_from)),
             extra={"worker": sender, "queues": sorted(queues.consume_from)})  # fmt: skip


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_heartbeat(sender: Any, **_: Any) -> None:
    if INFER_QUEUE not in sender.app.amqp.queues.consume_from:
        return
    from workers.heartbeat import Heartbeat
    from workers.inference import executor_for

    ex = executor_for(get_settings())
    beat = Heartbeat(sender.hostname, ex.pool, ex.redis, ex.cache)
    beat.start()
    worker_shutdown.connect(lambda **_: beat.stop(), weak=False)

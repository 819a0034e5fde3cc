"""The worker-side Celery app: `celery -A workers.celery_app worker -Q validate`."""

from __future__ import annotations

from core.queue import make_celery
from core.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]

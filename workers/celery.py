"""The Celery application object and its configuration (tasks arrive with the workers issue)."""

from __future__ import annotations

from celery import Celery

from workers.settings import broker_url

app = Celery("workers")
app.conf.update(
    broker_url=broker_url(),
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    # Above the longest task, so a task is redelivered only when its worker is gone.
    broker_transport_options={"visibility_timeout": 3600},
    timezone="UTC",
)

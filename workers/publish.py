"""Queueing hook deliveries on the broker: the one piece of the worker side the web imports.

It knows the task names, the queues and the broker's settings, and nothing of the
tasks themselves, so the web process and the command line publish without building
the worker application or its beat schedule.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import structlog
from celery import Celery
from kombu.entity import Queue

log = structlog.get_logger(__name__)

QUEUES = ("hooks", "settlement", "remediation")
DELIVER = "workers.hooks.deliver"
DELIVER_MANY = "workers.hooks.deliver_many"
BATCH = 500  # events per broker message
# The longest task is a settlement post or a hook delivery, each bounded by HTTP timeouts
# well under a minute; a message is redelivered only when its worker is truly gone.
VISIBILITY_TIMEOUT = 3600
FLUSH_EVERY = 0.05  # seconds an event may wait in the web process before it is queued


def broker_url(redis_url: str) -> str:
    """Celery's spelling of ``REDIS_URL`` (a unix socket is written differently)."""
    if redis_url.startswith("unix://"):
        path, _, query = redis_url[len("unix://") :].partition("?")
        db = dict(p.partition("=")[::2] for p in query.split("&") if p).get("db")
        return f"redis+socket://{path}" + (f"?virtual_host={db}" if db else "")
    return redis_url


def celery_config(redis_url: str) -> dict[str, Any]:
    """What every Celery app of the gateway is configured with, publisher or worker."""
    return {
        "broker_url": broker_url(redis_url),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
        },
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "remediation",
        "task_routes": {f"workers.{name}.*": {"queue": name} for name in ("hooks", "settlement")},
        "timezone": "UTC",
    }


def publisher(redis_url: str) -> Celery:
    """A Celery app that only sends tasks by name: no task modules, no beat."""
    app = Celery("workers")
    app.conf.update(celery_config(redis_url))
    return app


def publish(app: Celery, event_ids: Iterable[uuid.UUID]) -> int:
    """Queue deliveries for events, many to a message; the relay re-sends what this fails to."""
    ids = [str(i) for i in event_ids]
    sent = 0
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        try:
            if len(chunk) == 1:
                app.send_task(DELIVER, args=chunk)
            else:
                app.send_task(DELIVER_MANY, args=[chunk])
            sent += len(chunk)
        except Exception as exc:  # the broker is down: the outbox rows stay pending
            log.warning("publish_failed", events=len(chunk), error=str(exc))
    return sent


class Batcher:
    """Publishes from an event loop without blocking it, many events to a message.

    Events gather for FLUSH_EVERY and while a publish is in flight, and go out
    together, so under load one broker message carries many events. The broker client
    blocks, so it runs in a thread; if it fails, the events stay pending in the outbox
    and the relay sweep queues them later.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.outgoing: list[uuid.UUID] = []
        self.flusher: asyncio.Task[None] | None = None

    def __call__(self, event_ids: list[uuid.UUID]) -> None:
        self.outgoing.extend(event_ids)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self.outgoing:
            # A moment's wait lets a busy process put many events in one message.
            await asyncio.sleep(FLUSH_EVERY)
            batch, self.outgoing = self.outgoing, []
            await loop.run_in_executor(None, publish, self.app, batch)

    async def close(self) -> None:
        """Send what is gathered, then let go of the broker."""
        if self.flusher is not None:
            await asyncio.wait([self.flusher], timeout=5)
        self.app.close()

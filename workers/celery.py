"""The Celery application: broker, queues, routing, beat schedule and process hooks."""

from __future__ import annotations

import os
import sys
from typing import Any

import structlog
from celery import Celery, signals
from celery.schedules import crontab
from kombu.entity import Queue

from api.settings import SettingsError
from workers.settings import broker_url, schedule, settings

QUEUES = ("hooks", "settlement", "remediation")
TASK_MODULES = ("workers.hooks", "workers.remediation", "workers.settlement")

# The longest task is a settlement post or a hook delivery, each bounded by HTTP timeouts
# well under a minute; a message is redelivered only when its worker is truly gone.
VISIBILITY_TIMEOUT = 3600


def make_app(broker: str) -> Celery:
    """A Celery app on ``broker``; the web process uses one to publish after commit."""
    app = Celery("workers", broker=broker, include=list(TASK_MODULES))
    app.conf.update(
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="remediation",
        task_routes={f"workers.{name}.*": {"queue": name} for name in ("hooks", "settlement")},
        timezone="UTC",
    )
    return app


def beat_schedule(settlement_line: str) -> dict[str, dict[str, Any]]:
    every: dict[str, dict[str, Any]] = {
        "relay-outbox": {"task": "workers.remediation.relay_outbox", "schedule": 15.0},
        "sweep-stale-transfers": {
            "task": "workers.remediation.sweep_stale_transfers",
            "schedule": 60.0,
        },
        "reconcile-balances": {
            "task": "workers.remediation.reconcile_balances",
            "schedule": crontab(minute="*/15"),
        },
        "run-settlement": {
            "task": "workers.settlement.run_settlement",
            "schedule": schedule(settlement_line),
        },
    }
    return every


app = make_app(broker_url())
# Beat builds its scheduler before any signal fires, so the schedule is set here; a bad
# OES_SETTLEMENT_SCHEDULE stops beat in _checked_settings before its first tick.
try:
    app.conf.beat_schedule = beat_schedule(
        os.environ.get("OES_SETTLEMENT_SCHEDULE", "").strip() or "0 0 * * *"
    )
except SettingsError:
    app.conf.beat_schedule = {}


def _checked_settings() -> None:
    """Refuse to start on a bad setting, with one line naming it."""
    try:
        settings()
    except SettingsError as exc:
        print(f"oes-partner worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    from api.observability import configure_logging

    configure_logging()


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    _checked_settings()


@signals.beat_init.connect
def _beat_init(**_: Any) -> None:
    _checked_settings()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()

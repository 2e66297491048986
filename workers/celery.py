"""The worker application: its tasks, the beat schedule and the process hooks.

``celery -A workers worker|beat|call`` load this. The broker comes from ``REDIS_URL``
when the configuration is first needed, so a missing or bad setting stops the
command with one line naming it, and importing this module reads nothing. A worker
or beat also checks every worker setting before it starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from celery import Celery, signals
from celery.schedules import crontab

from config.logs import configure_logging
from config.settings import SettingsError
from models.errors import InvariantError
from workers.publish import QUEUES, celery_config
from workers.settings import BrokerSettings, schedule, settings

T = TypeVar("T")
log = structlog.get_logger(__name__)

TASK_MODULES = ("workers.hooks", "workers.remediation", "workers.settlement")

__all__ = ["QUEUES", "app", "beat_schedule"]


def beat_schedule(settlement_line: str) -> dict[str, dict[str, Any]]:
    return {
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


def checked(read: Callable[[], T]) -> T:
    """Settings from ``read``; on a bad one, one line naming it and exit code 2."""
    try:
        return read()
    except SettingsError as exc:
        print(f"oes-partner worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _configuration() -> dict[str, Any]:
    s = checked(BrokerSettings.from_env)
    return {**celery_config(s.redis_url), "beat_schedule": beat_schedule(s.settlement_schedule)}


app = Celery("workers", include=list(TASK_MODULES))
# A promise: evaluated when the configuration is first read, never at import.
app.add_defaults(_configuration)


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    configure_logging()


@signals.worker_init.connect
@signals.beat_init.connect
def _refuse_bad_settings(**_: Any) -> None:
    checked(settings)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.task_failure.connect
def _invariant_broken(exception: BaseException | None = None, **_: Any) -> None:
    """A broken invariant is a bug, not a failure to retry: say so at error level."""
    if isinstance(exception, InvariantError):
        log.error("invariant_broken", error=str(exception))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()

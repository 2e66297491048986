"""What a worker process holds: its engine, its transactions and its BitGo client.

Engines are made per process (prefork children must not share their parent's
connections), on first use.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from models import ledger, runs
from models.db import session_factory, sync_engine
from workers.bitgo import BitGoClient, BitGoConfig
from workers.settings import settings

log = structlog.get_logger(__name__)
DELIVER = "workers.hooks.deliver"
DELIVER_MANY = "workers.hooks.deliver_many"
BATCH = 500
_engines: dict[tuple[int, str], Engine] = {}


def engine() -> Engine:
    key = (os.getpid(), settings().database_url)
    if key not in _engines:
        _engines.clear()  # a parent's engine, inherited through fork: never use it
        _engines[key] = sync_engine(key[1], pool_size=2)
    return _engines[key]


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


@contextmanager
def transaction() -> Iterator[Session]:
    """One database transaction; its outbox events are published once it has committed."""
    from workers.celery import app

    with session_factory(engine())() as session:
        with session.begin():
            yield session
        events = ledger.written_events(session)
    publish(app, events)


def report(task: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Log a task's one-line summary and keep it in ``task_runs``."""
    name = str(task.name)
    log.info("task_summary", summary=summary, line=" ".join(f"{k}={v}" for k, v in summary.items()))
    with transaction() as session:
        runs.record(session, task=name, task_id=task.request.id, summary=summary)
    return summary


def bitgo() -> BitGoClient | None:
    """A client for BitGo's API, or None when BITGO_ACCESS_TOKEN / BITGO_ENTERPRISE_ID are unset."""
    s = settings()
    if s.bitgo_access_token is None or s.bitgo_enterprise_id is None:
        return None
    return BitGoClient(
        BitGoConfig(
            api_url=s.bitgo_api_url,
            access_token=s.bitgo_access_token.value,
            enterprise_id=s.bitgo_enterprise_id,
            express_url=s.bitgo_express_url,
            wallet_id=s.bitgo_wallet_id,
        )
    )

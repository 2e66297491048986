"""What a worker process holds: its engine, its transactions and its BitGo client.

Engines are made per process (prefork children must not share their parent's
connections), on first use.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from models import outbox, runs
from models.db import session_factory, sync_engine
from workers.bitgo_client import BitGoClient, BitGoConfig
from workers.publish import publish
from workers.settings import settings

log = structlog.get_logger(__name__)
NOT_CONFIGURED = {"skipped": "BITGO_ACCESS_TOKEN or BITGO_ENTERPRISE_ID not set"}
_engines: dict[tuple[int, str], Engine] = {}


def engine() -> Engine:
    key = (os.getpid(), settings().database_url)
    if key not in _engines:
        _engines.clear()  # a parent's engine, inherited through fork: never use it
        _engines[key] = sync_engine(key[1], pool_size=2)
    return _engines[key]


def _publish(event_ids: list[uuid.UUID]) -> None:
    from workers.celery import app  # the app imports the task modules, which import us

    publish(app, event_ids)


@contextmanager
def transaction() -> Iterator[Session]:
    """One database transaction; its outbox events are queued once it has committed."""
    with outbox.transaction(session_factory(engine()), _publish) as session:
        yield session


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

"""The outbox: every event is written here, published after commit, claimed, delivered, relayed.

An event is written in the same transaction as the change it reports (``emit``).
``transaction`` / ``run_in_transaction`` are the one way to run a transaction in any
process: they commit, then hand the ids of the events written (or revived, or found
due) in that transaction to the process's publisher; nothing publishes by hand.

A deliverer claims one event with ``FOR UPDATE SKIP LOCKED`` and keeps the row lock
while it posts, so two deliverers never post the same event at once and a deliverer
that dies simply drops its lock; the relay finds what is left pending.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from models.rows import as_record

P = ParamSpec("P")
T = TypeVar("T")

# Receives the ids of a committed transaction's events; queues their delivery.
Publish = Callable[[list[uuid.UUID]], object]


class EventStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DELIVERED_LOCALLY = "delivered_locally"
    DEAD = "dead"


@dataclass(frozen=True)
class Event:
    """An event to write, in the same transaction as the change it reports."""

    topic: str
    payload: dict[str, Any]
    id: uuid.UUID


@dataclass(frozen=True)
class OutboxEvent:
    """An event as stored."""

    id: uuid.UUID
    topic: str
    payload: dict[str, Any]
    status: EventStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def event(topic: str, payload: dict[str, Any]) -> Event:
    return Event(topic=topic, payload=payload, id=uuid.uuid4())


# --- writing, and publishing after commit -------------------------------------------

_TO_PUBLISH = "oes_outbox_to_publish"


def _to_publish(session: Session) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = session.info.setdefault(_TO_PUBLISH, [])
    return ids


def emit(session: Session, event: Event) -> None:
    """Write ``event``; it is published once the transaction commits."""
    session.execute(
        text(
            "INSERT INTO outbox (id, topic, payload) VALUES (:id, :topic, CAST(:payload AS jsonb))"
        ),
        {"id": event.id, "topic": event.topic, "payload": json.dumps(event.payload)},
    )
    _to_publish(session).append(event.id)


def _committed(session: Session) -> list[uuid.UUID]:
    """The ids to publish now that the transaction has committed (taking them clears them)."""
    return list(session.info.pop(_TO_PUBLISH, []))


@contextmanager
def transaction(sessions: sessionmaker[Session], publish: Publish) -> Iterator[Session]:
    """One database transaction; its events are published once it has committed."""
    with sessions() as session:
        with session.begin():
            yield session
        ids = _committed(session)
    if ids:
        publish(ids)


async def run_in_transaction(
    sessions: async_sessionmaker[AsyncSession],
    publish: Publish,
    action: Callable[Concatenate[Session, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run a domain action in one transaction; its events are published once it has committed."""
    async with sessions() as session:
        async with session.begin():
            result = await session.run_sync(action, *args, **kwargs)
        ids = _committed(session.sync_session)
    if ids:
        publish(ids)
    return result


# --- delivery ------------------------------------------------------------------------

_CLAIM = text("SELECT * FROM outbox WHERE id = :id AND status = 'pending' FOR UPDATE SKIP LOCKED")
_DELIVERED = text(
    """
    UPDATE outbox SET status = :status, attempts = attempts + :attempted,
                      delivered_at = now(), last_error = NULL
    WHERE id = :id AND status = 'pending'
    """
)
_FAILED = text(
    """
    UPDATE outbox SET attempts = attempts + 1, last_error = :error,
                      status = CASE WHEN :retry THEN 'pending' ELSE 'dead' END,
                      next_attempt_at = now() + make_interval(secs => :delay)
    WHERE id = :id AND status = 'pending'
    RETURNING status
    """
)
_DELIVERED_LOCALLY = text(
    """
    WITH claimed AS (
        SELECT id FROM outbox WHERE id = ANY(:ids) AND status = 'pending'
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox o SET status = 'delivered_locally', delivered_at = now()
    FROM claimed WHERE o.id = claimed.id
    RETURNING o.id
    """
)


def claim(session: Session, event_id: uuid.UUID) -> OutboxEvent | None:
    """Lock a pending event for delivery; None if it is done, dead or being delivered."""
    row = session.execute(_CLAIM, {"id": event_id}).one_or_none()
    return None if row is None else as_record(OutboxEvent, row)


def delivered(session: Session, event_id: uuid.UUID, *, locally: bool = False) -> None:
    """Mark a claimed event delivered (or only recorded, when no webhook is configured)."""
    status = EventStatus.DELIVERED_LOCALLY if locally else EventStatus.DELIVERED
    session.execute(
        _DELIVERED, {"id": event_id, "status": status.value, "attempted": 0 if locally else 1}
    )


def delivered_locally(session: Session, event_ids: list[uuid.UUID]) -> int:
    """Mark pending events recorded (no webhook configured), skipping any being delivered."""
    return len(session.execute(_DELIVERED_LOCALLY, {"ids": event_ids}).all())


@dataclass(frozen=True)
class RetryPolicy:
    """How failed deliveries are retried: exponential backoff with equal jitter, then dead."""

    max_attempts: int
    base: float
    cap: float

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts."""
        delay = min(self.cap, self.base * 2.0 ** (failures - 1))
        return delay / 2 + random.uniform(0, delay / 2)


@dataclass(frozen=True)
class Failure:
    status: EventStatus
    attempt: int
    retry_in: float | None  # None: a dead letter


def failed(
    session: Session,
    claimed: OutboxEvent,
    *,
    error: str,
    retriable: bool,
    policy: RetryPolicy,
) -> Failure:
    """Record a failed attempt on a claimed event: retry later, or dead-letter it.

    A failure that is not worth retrying, or the last attempt allowed, makes a dead letter.
    """
    attempt = claimed.attempts + 1
    permanent = not retriable or attempt >= policy.max_attempts
    retry_in = None if permanent else policy.delay(attempt)
    status = session.execute(
        _FAILED,
        {
            "id": claimed.id,
            "error": error[:1000],
            "retry": retry_in is not None,
            "delay": retry_in or 0.0,
        },
    ).scalar_one()
    return Failure(EventStatus(status), attempt, retry_in)


# --- relay and re-drive: their ids are published once the transaction commits ------

# Bounded batches, skipping rows a deliverer holds; the lease keeps the next sweep from
# publishing the same rows again before their deliveries have run.
_DUE = text(
    """
    WITH due AS (
        SELECT id FROM outbox
        WHERE status = 'pending' AND next_attempt_at <= now() - make_interval(secs => :grace)
        ORDER BY next_attempt_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox o SET next_attempt_at = now() + make_interval(secs => :lease)
    FROM due WHERE o.id = due.id
    RETURNING o.id
    """
)
_REDRIVE = text(
    """
    UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
    WHERE status = 'dead' AND (CAST(:ids AS uuid[]) IS NULL OR id = ANY(CAST(:ids AS uuid[])))
    RETURNING id
    """
)


def relay_due(session: Session, *, grace: float, lease: float, limit: int) -> int:
    """Queue again up to ``limit`` pending events whose time came ``grace`` seconds ago."""
    ids = [r.id for r in session.execute(_DUE, {"grace": grace, "lease": lease, "limit": limit})]
    _to_publish(session).extend(ids)
    return len(ids)


def redrive(session: Session, ids: list[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """Send dead letters (all, or those in ``ids``) back to pending with a fresh count."""
    revived = [r.id for r in session.execute(_REDRIVE, {"ids": ids})]
    _to_publish(session).extend(revived)
    return revived


def listing(
    session: Session, *, status: EventStatus | None = None, limit: int = 100
) -> list[OutboxEvent]:
    rows = session.execute(
        text(
            "SELECT * FROM outbox WHERE CAST(:status AS text) IS NULL OR status = :status "
            "ORDER BY created_at DESC, id LIMIT :limit"
        ),
        {"status": status.value if status else None, "limit": limit},
    )
    return [as_record(OutboxEvent, r) for r in rows]

"""The outbox: events written with each change, delivered to the platform after commit.

A deliverer claims one event with ``FOR UPDATE SKIP LOCKED`` and keeps the row lock
while it posts, so two deliverers never post the same event at once and a deliverer
that dies simply drops its lock; the relay finds what is left pending.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session


class EventStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DELIVERED_LOCALLY = "delivered_locally"
    DEAD = "dead"


@dataclass(frozen=True)
class OutboxEvent:
    id: uuid.UUID
    topic: str
    payload: dict[str, Any]
    status: EventStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> OutboxEvent:
        m = row._mapping
        return cls(
            id=m["id"],
            topic=m["topic"],
            payload=m["payload"],
            status=EventStatus(m["status"]),
            attempts=m["attempts"],
            next_attempt_at=m["next_attempt_at"],
            last_error=m["last_error"],
            created_at=m["created_at"],
            delivered_at=m["delivered_at"],
        )


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


def claim(session: Session, event_id: uuid.UUID) -> OutboxEvent | None:
    """Lock a pending event for delivery; None if it is done, dead or being delivered."""
    row = session.execute(_CLAIM, {"id": event_id}).one_or_none()
    return None if row is None else OutboxEvent.from_row(row)


def delivered(session: Session, event_id: uuid.UUID, *, locally: bool = False) -> None:
    """Mark a claimed event delivered (or only recorded, when no webhook is configured)."""
    status = EventStatus.DELIVERED_LOCALLY if locally else EventStatus.DELIVERED
    session.execute(
        _DELIVERED, {"id": event_id, "status": status.value, "attempted": 0 if locally else 1}
    )


def delivered_locally(session: Session, event_ids: list[uuid.UUID]) -> int:
    """Mark pending events recorded (no webhook configured), skipping any being delivered."""
    rows = session.execute(
        text(
            """
            WITH claimed AS (
                SELECT id FROM outbox WHERE id = ANY(:ids) AND status = 'pending'
                FOR UPDATE SKIP LOCKED
            )
            UPDATE outbox o SET status = 'delivered_locally', delivered_at = now()
            FROM claimed WHERE o.id = claimed.id
            RETURNING o.id
            """
        ),
        {"ids": event_ids},
    )
    return len(rows.all())


def failed(
    session: Session, event_id: uuid.UUID, *, error: str, retry_in: float | None
) -> EventStatus:
    """Record a failed attempt: retry after ``retry_in`` seconds, or dead-letter (None)."""
    status = session.execute(
        _FAILED,
        {
            "id": event_id,
            "error": error[:1000],
            "retry": retry_in is not None,
            "delay": retry_in or 0.0,
        },
    ).scalar_one()
    return EventStatus(status)


def due(session: Session, *, grace: float, lease: float, limit: int) -> list[uuid.UUID]:
    """Claim up to ``limit`` pending events whose time came ``grace`` seconds ago or more."""
    rows = session.execute(_DUE, {"grace": grace, "lease": lease, "limit": limit})
    return [r.id for r in rows]


def redrive(session: Session, ids: list[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """Send dead letters (all, or those in ``ids``) back to pending with a fresh count."""
    return [r.id for r in session.execute(_REDRIVE, {"ids": ids})]


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
    return [OutboxEvent.from_row(r) for r in rows]


def get(session: Session, event_id: uuid.UUID) -> OutboxEvent | None:
    row = session.execute(text("SELECT * FROM outbox WHERE id = :id"), {"id": event_id}).first()
    return None if row is None else OutboxEvent.from_row(row)

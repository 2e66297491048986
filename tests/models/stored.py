"""What the database holds, read back the way the tests assert on it."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.orm import Session

from models import connections
from models.connections import ConnectionRecord
from models.outbox import OutboxEvent
from models.rows import as_record


class Balances(NamedTuple):
    available: int
    pending_in: int
    held: int


def balances(db: Session, link: ConnectionRecord, currency: str = "btc") -> Balances:
    """The account's three balances in ``currency``; zeros when it has no row yet."""
    found = connections.account(db, link.partners_connection_id).balances.get(currency)
    if found is None:
        return Balances(0, 0, 0)
    return Balances(found.available, found.pending_in, found.held)


class Entry(NamedTuple):
    reason: str
    account: str
    amount: int


def entries(
    db: Session,
    *,
    transfer_id: uuid.UUID | None = None,
    trade_external_id: str | None = None,
) -> list[Entry]:
    """The ledger entries written for one transfer or one trade, in the order written."""
    rows = db.execute(
        text(
            "SELECT reason, account, amount FROM ledger_entries"
            " WHERE transfer_id = :transfer_id OR trade_external_id = :trade_external_id"
            " ORDER BY id"
        ),
        {"transfer_id": transfer_id, "trade_external_id": trade_external_id},
    )
    return [Entry(r.reason, r.account, int(r.amount)) for r in rows]


def postings_balance(db: Session, *, transfer_id: uuid.UUID) -> bool:
    """Whether every posting of the transfer is two entries summing to zero."""
    return bool(
        db.execute(
            text(
                "SELECT coalesce(bool_and(n = 2 AND total = 0), true) FROM ("
                " SELECT count(*) AS n, sum(amount) AS total FROM ledger_entries"
                " WHERE transfer_id = :id GROUP BY posting_id) AS p"
            ),
            {"id": transfer_id},
        ).scalar_one()
    )


class Written(NamedTuple):
    topic: str
    payload: dict[str, Any]


def events(db: Session, **about: str) -> list[Written]:
    """Outbox events whose payload has each given key equal to the given value, by topic."""
    rows = db.execute(
        text("SELECT topic, payload FROM outbox WHERE payload @> CAST(:about AS jsonb)"),
        {"about": json.dumps(about)},
    )
    return sorted((Written(r.topic, r.payload) for r in rows), key=lambda w: w.topic)


def topics(db: Session, **about: str) -> list[str]:
    """The topics of ``events(db, **about)``, sorted."""
    return [w.topic for w in events(db, **about)]


def outbox_row(db: Session, event_id: uuid.UUID) -> OutboxEvent:
    row = db.execute(text("SELECT * FROM outbox WHERE id = :id"), {"id": event_id}).one()
    return as_record(OutboxEvent, row)


def due_in(db: Session, event_id: uuid.UUID) -> timedelta:
    """How far after the transaction's ``now()`` the event's next attempt is due."""
    value: timedelta = db.execute(
        text("SELECT next_attempt_at - now() FROM outbox WHERE id = :id"), {"id": event_id}
    ).scalar_one()
    return value


def count(db: Session, table: str, where: str = "true", **params: Any) -> int:
    return int(db.execute(text(f"SELECT count(*) FROM {table} WHERE {where}"), params).scalar_one())

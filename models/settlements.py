"""Settlements: unsettled trades netted per connection and currency, settled with BitGo.

One settlement is in flight at a time (a unique partial index says so). It is
``preparing`` until its signed body is stored, ``pending`` while that exact body is
posted and re-posted, and ends ``completed`` (its trades are settled), ``rejected``
(its trades return to the pool) or ``conflict`` (BitGo knows the externalId with
another body; an operator must look).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from models import outbox
from models.errors import ConflictError, NotFoundError
from models.rows import as_record

# pg_advisory_xact_lock key: one settlement starts at a time.
_START_LOCK = 0x0E5_5E77
MAX_TRADES = 50_000


class SettlementStatus(StrEnum):
    PREPARING = "preparing"
    PENDING = "pending"
    COMPLETED = "completed"
    REJECTED = "rejected"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class SettlementRecord:
    id: uuid.UUID
    seq: int
    external_id: str
    status: SettlementStatus
    amounts: dict[str, dict[str, str]]
    body: dict[str, Any] | None
    attempts: int
    bitgo_id: str | None
    bitgo_status: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None

    def event(self) -> outbox.Event:
        return outbox.event(
            f"settlement.{self.status.value}",
            {
                "id": str(self.id),
                "externalId": self.external_id,
                "status": self.status.value,
                "settlementAmounts": self.amounts,
                "bitgoSettlementId": self.bitgo_id,
                "reason": self.reason,
            },
        )

    def unsigned(self) -> dict[str, Any]:
        """The body's fields other than payload and signature."""
        return {
            "externalId": self.external_id,
            "settlementAmounts": self.amounts,
            "nonce": str(self.id),
            "notes": f"oes-partner settlement {self.seq}",
        }

    def payload(self) -> str:
        """The string to sign: the unsigned fields as canonical JSON."""
        return json.dumps(self.unsigned(), sort_keys=True, separators=(",", ":"))

    def signed_body(self, payload: str, signature: str) -> dict[str, Any]:
        """The body BitGo receives: the fields, and Express's payload and signature of them."""
        return {**self.unsigned(), "payload": payload, "signature": signature}


def _record(row: Row[Any]) -> SettlementRecord:
    return as_record(SettlementRecord, row)


@dataclass(frozen=True)
class Verdict:
    """What BitGo's answer to a post means for the settlement."""

    status: SettlementStatus  # PENDING: not final yet, post the same body again later
    reason: str | None
    bitgo_id: str | None
    bitgo_status: str | None


def verdict(answer: dict[str, Any]) -> Verdict:
    """Read BitGo's settlement object: completed and rejected are final, anything else waits."""
    status = str(answer.get("status") or "")
    final = {"completed": SettlementStatus.COMPLETED, "rejected": SettlementStatus.REJECTED}
    reason = str(answer["reason"]) if answer.get("reason") is not None else None
    return Verdict(
        status=final.get(status, SettlementStatus.PENDING),
        reason=reason if status in final else reason or f"BitGo answered {status or 'no status'}",
        bitgo_id=str(answer["id"]) if answer.get("id") is not None else None,
        bitgo_status=status or None,
    )


_NET = text(
    """
    SELECT c.connection_id, d.key AS currency, sum(CAST(d.value AS numeric)) AS net
    FROM trades t
    JOIN connections c ON c.id = t.connection_pk
    CROSS JOIN LATERAL jsonb_each_text(t.deltas) AS d
    WHERE t.settlement_id = :id
    GROUP BY c.connection_id, d.key
    HAVING sum(CAST(d.value AS numeric)) <> 0
    ORDER BY c.connection_id, d.key
    """
)
_OPEN = text("SELECT * FROM settlements WHERE status IN ('preparing', 'pending')")
_GET = text("SELECT * FROM settlements WHERE id = :id")
_TRANSITION = text(
    """
    UPDATE settlements SET status = :to,
           reason = CASE WHEN :to = 'pending' THEN coalesce(:reason, reason) ELSE :reason END,
           bitgo_id = coalesce(:bitgo_id, bitgo_id),
           bitgo_status = coalesce(:bitgo_status, bitgo_status),
           attempts = attempts + 1, updated_at = now(),
           finalized_at = CASE WHEN :to IN ('completed', 'rejected', 'conflict') THEN now() END
    WHERE id = :id AND status = 'pending'
    RETURNING *
    """
)


def get(session: Session, settlement_id: uuid.UUID) -> SettlementRecord:
    row = session.execute(_GET, {"id": settlement_id}).one_or_none()
    if row is None:
        raise NotFoundError("Settlement not found")
    return _record(row)


# Which unsettled trades the next settlement takes. Trades of connections that never had
# a trade in a rejected settlement are netted together. Once none is left, one connection
# with a rejected trade is netted alone: the one rejected longest ago, so connections
# take turns and one that BitGo keeps refusing delays no one but itself.
_TAKE = text(
    """
    WITH unsettled AS (
        SELECT external_id, connection_pk, created_at,
               max(rejected_at) OVER (PARTITION BY connection_pk) AS rejected
        FROM trades WHERE settlement_id IS NULL
    ),
    alone AS (
        SELECT connection_pk FROM unsettled WHERE rejected IS NOT NULL
        ORDER BY rejected, created_at, connection_pk LIMIT 1
    )
    UPDATE trades t SET settlement_id = :id
    FROM (
        SELECT external_id FROM unsettled
        WHERE CASE WHEN EXISTS (SELECT 1 FROM unsettled WHERE rejected IS NULL)
                   THEN rejected IS NULL
                   ELSE connection_pk = (SELECT connection_pk FROM alone)
              END
        ORDER BY created_at LIMIT :limit
    ) AS chosen
    WHERE t.external_id = chosen.external_id AND t.settlement_id IS NULL
    RETURNING t.external_id
    """
)


def open_or_start(session: Session) -> SettlementRecord | None:
    """The settlement in flight, or a new one netting unsettled trades; None if none.

    See ``_TAKE`` for which trades: a connection whose trades were in a rejected
    settlement is settled on its own, after the others, taking turns.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _START_LOCK})
    row = session.execute(_OPEN).one_or_none()
    if row is not None:
        return _record(row)
    settlement_id = uuid.uuid4()
    seq = session.execute(
        text(
            "INSERT INTO settlements (id, external_id, status, amounts) "
            "VALUES (:id, :id, 'preparing', '{}') RETURNING seq"
        ),
        {"id": settlement_id},
    ).scalar_one()
    included = session.execute(_TAKE, {"id": settlement_id, "limit": MAX_TRADES}).scalars().all()
    if not included:
        session.execute(text("DELETE FROM settlements WHERE id = :id"), {"id": settlement_id})
        return None
    amounts: dict[str, dict[str, str]] = {}
    for connection_id, currency, net in session.execute(_NET, {"id": settlement_id}):
        amounts.setdefault(str(connection_id), {})[currency] = str(int(net))
    digest = hashlib.sha256("\n".join(sorted(included)).encode()).hexdigest()[:16]
    # Net zero everywhere: the trades cancel out and there is nothing to post.
    status = SettlementStatus.PREPARING if amounts else SettlementStatus.COMPLETED
    row = session.execute(
        text(
            "UPDATE settlements SET external_id = :external_id, amounts = CAST(:amounts AS jsonb),"
            " status = :status, reason = :reason,"
            " finalized_at = CASE WHEN :status = 'completed' THEN now() END"
            " WHERE id = :id RETURNING *"
        ),
        {
            "id": settlement_id,
            "external_id": f"oes-settlement-{seq}-{digest}",
            "amounts": json.dumps(amounts),
            "status": status.value,
            "reason": None if amounts else "trades net to zero; nothing to post",
        },
    ).one()
    record = _record(row)
    if status is SettlementStatus.COMPLETED:
        _settle_trades(session, record)
    return record


def store_body(
    session: Session, settlement_id: uuid.UUID, body: dict[str, Any]
) -> SettlementRecord:
    """Keep the signed body; if another worker stored one first, that one stands."""
    session.execute(
        text(
            "UPDATE settlements SET body = CAST(:body AS jsonb), status = 'pending',"
            " updated_at = now() WHERE id = :id AND status = 'preparing'"
        ),
        {"id": settlement_id, "body": json.dumps(body)},
    )
    return get(session, settlement_id)


def _settle_trades(session: Session, record: SettlementRecord) -> None:
    session.execute(
        text("UPDATE trades SET settled_at = now() WHERE settlement_id = :id"), {"id": record.id}
    )
    outbox.emit(session, record.event())


def _release_trades(session: Session, record: SettlementRecord) -> None:
    """Nothing moved at BitGo: the trades go back to be netted again, each connection alone."""
    session.execute(
        text(
            "UPDATE trades SET settlement_id = NULL, rejected_at = statement_timestamp()"
            " WHERE settlement_id = :id"
        ),
        {"id": record.id},
    )


def finish(
    session: Session,
    settlement_id: uuid.UUID,
    status: SettlementStatus,
    *,
    reason: str | None = None,
    bitgo_id: str | None = None,
    bitgo_status: str | None = None,
) -> SettlementRecord | None:
    """Move a pending settlement to its final state once; None if it already left pending."""
    row = session.execute(
        _TRANSITION,
        {
            "id": settlement_id,
            "to": status.value,
            "reason": reason,
            "bitgo_id": bitgo_id,
            "bitgo_status": bitgo_status,
        },
    ).one_or_none()
    if row is None:
        return None
    record = _record(row)
    if status is SettlementStatus.COMPLETED:
        _settle_trades(session, record)
    elif status is SettlementStatus.REJECTED:
        _release_trades(session, record)
        outbox.emit(session, record.event())
    elif status is SettlementStatus.CONFLICT:
        outbox.emit(session, record.event())
    return record


class Resolution(StrEnum):
    """What an operator found at BitGo about a settlement stopped by a conflict."""

    MARK_COMPLETED = "mark_completed"  # BitGo settled it: its trades are settled
    RELEASE_TRADES = "release_trades"  # BitGo did not: its trades go to the next one


_RESOLVE = text(
    """
    UPDATE settlements SET status = :to, reason = :reason, updated_at = now(),
           finalized_at = now()
    WHERE id = :id AND status = 'conflict'
    RETURNING *
    """
)


def resolve(
    session: Session, settlement_id: uuid.UUID, resolution: Resolution, *, note: str
) -> SettlementRecord:
    """End a settlement stopped by a 409 from BitGo, as an operator decided after checking.

    Announced as ``settlement.resolved``, with the resolution and the operator's note.
    """
    to = (
        SettlementStatus.COMPLETED
        if resolution is Resolution.MARK_COMPLETED
        else SettlementStatus.REJECTED
    )
    reason = f"resolved by an operator ({resolution.value}): {note}"
    row = session.execute(
        _RESOLVE, {"id": settlement_id, "to": to.value, "reason": reason}
    ).one_or_none()
    if row is None:
        current = get(session, settlement_id)
        raise ConflictError(f"Settlement is {current.status.value}; only a conflict is resolved")
    resolved = _record(row)
    if resolution is Resolution.MARK_COMPLETED:
        session.execute(
            text("UPDATE trades SET settled_at = now() WHERE settlement_id = :id"),
            {"id": resolved.id},
        )
    else:
        _release_trades(session, resolved)
    event = resolved.event()
    outbox.emit(
        session,
        outbox.event("settlement.resolved", {**event.payload, "resolution": resolution.value}),
    )
    return resolved


def attempted(
    session: Session, settlement_id: uuid.UUID, *, reason: str, bitgo_status: str | None = None
) -> SettlementRecord | None:
    """Record an attempt that settled nothing yet; the same body will be posted again."""
    return finish(
        session,
        settlement_id,
        SettlementStatus.PENDING,
        reason=reason,
        bitgo_status=bitgo_status,
    )


def listing(session: Session, *, limit: int = 50) -> list[SettlementRecord]:
    rows = session.execute(
        text("SELECT * FROM settlements ORDER BY seq DESC LIMIT :limit"), {"limit": limit}
    )
    return [_record(r) for r in rows]

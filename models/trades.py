"""Trading results the exchange reports: applied to ``available`` once per ``externalId``."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from models import ledger, outbox
from models.errors import ConflictError, NotFoundError, UnprocessableError
from models.rows import as_record
from models.transfers import ACCOUNT_LIMIT_EXCEEDED, INSUFFICIENT_FUNDS, Rules

_INSERT = text(
    """
    INSERT INTO trades (external_id, connection_pk, partners_connection_id, deltas)
    SELECT :external_id, c.id, c.partners_connection_id, CAST(:deltas AS jsonb)
    FROM connections c WHERE c.partners_connection_id = :partners_connection_id
    ON CONFLICT (external_id) DO NOTHING
    RETURNING trades.*, (SELECT connection_id FROM connections WHERE id = trades.connection_pk)
    """
)
_GET = text(
    """
    SELECT t.*, c.connection_id FROM trades t JOIN connections c ON c.id = t.connection_pk
    WHERE t.external_id = :external_id
    """
)
_CONNECTION_EXISTS = text("SELECT 1 FROM connections WHERE partners_connection_id = :id")


@dataclass(frozen=True)
class TradeRequest:
    external_id: str
    partners_connection_id: str
    deltas: dict[str, int]


@dataclass(frozen=True)
class TradeRecord:
    external_id: str
    partners_connection_id: str
    connection_id: uuid.UUID
    deltas: dict[str, int]
    settlement_id: uuid.UUID | None
    settled_at: datetime | None
    created_at: datetime

    def event(self) -> outbox.Event:
        return outbox.event(
            "trade.applied",
            {
                "externalId": self.external_id,
                "partnersConnectionId": self.partners_connection_id,
                "connectionId": str(self.connection_id),
                "deltas": {c: str(d) for c, d in sorted(self.deltas.items())},
            },
        )


def _record(row: Row[Any]) -> TradeRecord:
    trade = as_record(TradeRecord, row)
    # JSONB keeps the signed base-unit strings; amounts are int in the domain.
    return dataclasses.replace(trade, deltas={c: int(d) for c, d in trade.deltas.items()})


def _stored_deltas(deltas: dict[str, int]) -> str:
    return json.dumps({c: str(d) for c, d in sorted(deltas.items())})


def apply(session: Session, *, request: TradeRequest, rules: Rules) -> TradeRecord:
    """Apply a trading result once; a repeat answers with the stored one.

    All or nothing: if any delta would take ``available`` below zero, UnprocessableError
    is raised and the caller's rollback leaves no trace of the trade.
    """
    row = session.execute(
        _INSERT,
        {
            "external_id": request.external_id,
            "partners_connection_id": request.partners_connection_id,
            "deltas": _stored_deltas(request.deltas),
        },
    ).one_or_none()
    if row is None:
        return _existing(session, request)
    # Checked after the lookup so a repeat still answers 200 if the currency list shrank.
    unsupported = sorted(set(request.deltas) - rules.currencies)
    if unsupported:
        raise UnprocessableError(f"Unsupported currency: {', '.join(unsupported)}")
    applied_trade = _record(row)
    connection_pk: int = row.connection_pk
    # A fixed order of accounts keeps two trades on the same accounts from deadlocking.
    for currency, delta in sorted(request.deltas.items()):
        applied = ledger.post(
            session,
            connection_pk=connection_pk,
            currency=currency,
            posting=ledger.trade_posting(delta),
            reason="trade",
            trade_external_id=request.external_id,
        )
        if not applied:
            reason = INSUFFICIENT_FUNDS if delta < 0 else ACCOUNT_LIMIT_EXCEEDED
            raise UnprocessableError(f"{reason}: {currency}")
    outbox.emit(session, applied_trade.event())
    return applied_trade


def _existing(session: Session, request: TradeRequest) -> TradeRecord:
    row = session.execute(_GET, {"external_id": request.external_id}).one_or_none()
    if row is None:
        exists = session.execute(_CONNECTION_EXISTS, {"id": request.partners_connection_id}).first()
        if exists is None:
            raise NotFoundError("Account not found")
        # The insert found a conflict, so the row exists; it cannot vanish (no deletes).
        raise ConflictError("externalId is being applied; retry")
    stored = _record(row)
    if (stored.partners_connection_id, stored.deltas) != (
        request.partners_connection_id,
        request.deltas,
    ):
        raise ConflictError("externalId already used with different parameters")
    return stored

"""Allocations and deallocations: reserve, clear, release, look up.

Each action takes a ``Session``, touches only the database, never commits, and
returns a frozen ``TransferRecord``. Correctness rests on PostgreSQL alone: the
primary key on BitGo's id, compare-and-set status updates and the accounts'
CHECK constraints, so a lost Redis lock costs at most wasted work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, text, tuple_
from sqlalchemy.orm import Session

from models import ledger
from models.errors import Conflict, InvariantViolation, NotFound
from models.states import TARGET, Action, Kind, Outcome, Status, decide
from models.tables import transfers

UNSUPPORTED_CURRENCY = "Unsupported currency"
UNKNOWN_CONNECTION = "Unknown connection"
CONNECTION_MISMATCH = "Connection mismatch"
CONNECTION_INACTIVE = "Connection inactive"
INSUFFICIENT_FUNDS = "Insufficient funds"
ACCOUNT_LIMIT_EXCEEDED = "Account limit exceeded"

# A racer that commits between our read and our write sends us round again;
# each round sees strictly newer committed state, so a few always suffice.
_ROUNDS = 5


@dataclass(frozen=True)
class Rules:
    """The settings the business rules read."""

    currencies: frozenset[str]
    released_repost_conflicts: bool = False


@dataclass(frozen=True)
class ReserveRequest:
    kind: Kind
    transfer_id: uuid.UUID
    currency: str
    quantity: int
    client_id: uuid.UUID
    connection_id: uuid.UUID
    partners_client_id: str
    partners_connection_id: str


def fingerprint(transfer: ReserveRequest | TransferRecord) -> tuple[object, ...]:
    """What a repeated reserve must match to be the same request."""
    return (
        transfer.kind,
        transfer.currency,
        transfer.quantity,
        transfer.client_id,
        transfer.connection_id,
        transfer.partners_client_id,
        transfer.partners_connection_id,
    )


@dataclass(frozen=True)
class TransferRecord:
    kind: Kind
    transfer_id: uuid.UUID
    partners_transfer_id: uuid.UUID
    currency: str
    quantity: int
    client_id: uuid.UUID
    connection_id: uuid.UUID
    partners_client_id: str
    partners_connection_id: str
    status: Status
    rejection_reason: str | None
    created_at: datetime
    updated_at: datetime
    connection_pk: int | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> TransferRecord:
        m = row._mapping
        return cls(
            kind=Kind(m["kind"]),
            transfer_id=m["id"],
            partners_transfer_id=m["partners_transfer_id"],
            currency=m["currency"],
            quantity=int(m["quantity"]),
            client_id=m["client_id"],
            connection_id=m["connection_id"],
            partners_client_id=m["partners_client_id"],
            partners_connection_id=m["partners_connection_id"],
            status=Status(m["status"]),
            rejection_reason=m["rejection_reason"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            connection_pk=m["connection_pk"],
        )

    def event(self) -> ledger.Event:
        """The outbox event announcing this record's current state."""
        return ledger.Event(
            topic=f"{self.kind.value}.{self.status.value}",
            id=uuid.uuid4(),
            payload={
                "kind": self.kind.value,
                "id": str(self.transfer_id),
                "partnersId": str(self.partners_transfer_id),
                "status": self.status.value,
                "currency": self.currency,
                "quantity": str(self.quantity),
                "connectionId": str(self.connection_id),
                "partnersConnectionId": self.partners_connection_id,
                "partnersClientId": self.partners_client_id,
                "rejectionReason": self.rejection_reason,
            },
        )


_COLUMNS = ", ".join(c.name for c in transfers.columns)

# Transfer and link in one round trip; neither need exist.
_LOAD = text(
    f"""
    SELECT t.*, c.id AS link_pk, c.client_id AS link_client_id,
           c.partners_client_id AS link_partners_client_id,
           c.partners_connection_id AS link_partners_connection_id,
           c.active AS link_active
    FROM (VALUES (1)) AS one
    LEFT JOIN (SELECT {_COLUMNS} FROM transfers WHERE id = :transfer_id) AS t ON true
    LEFT JOIN connections c ON c.connection_id = :connection_id
    """
)
_INSERT = text(
    f"""
    INSERT INTO transfers ({_COLUMNS})
    VALUES (:id, :kind, :partners_transfer_id, :connection_pk, :currency, :quantity,
            :client_id, :connection_id, :partners_client_id, :partners_connection_id,
            :status, :rejection_reason, now(), now())
    ON CONFLICT (id) DO NOTHING
    RETURNING {_COLUMNS}
    """
)
_SET_STATUS = text(
    f"""
    UPDATE transfers SET status = :to, rejection_reason = :reason, updated_at = now()
    WHERE id = :id AND kind = :kind AND status = :from
    RETURNING {_COLUMNS}
    """
)
_GET = text(f"SELECT {_COLUMNS} FROM transfers WHERE id = :id")


def _rule_failure(request: ReserveRequest, link: Any, rules: Rules) -> str | None:
    """The first business rule ``request`` fails, funds aside; None when it passes."""
    if request.currency not in rules.currencies:
        return UNSUPPORTED_CURRENCY
    if link.link_pk is None:
        return UNKNOWN_CONNECTION
    if (
        request.client_id != link.link_client_id
        or request.partners_client_id != link.link_partners_client_id
        or request.partners_connection_id != link.link_partners_connection_id
    ):
        return CONNECTION_MISMATCH
    if request.kind is Kind.ALLOCATION and not link.link_active:
        return CONNECTION_INACTIVE
    return None


def _set_status(
    session: Session, record: TransferRecord, to: Status, *, reason: str | None = None
) -> TransferRecord | None:
    row = session.execute(
        _SET_STATUS,
        {
            "id": record.transfer_id,
            "kind": record.kind.value,
            "from": record.status.value,
            "to": to.value,
            "reason": reason,
        },
    ).one_or_none()
    return None if row is None else TransferRecord.from_row(row)


def _post(session: Session, record: TransferRecord) -> bool:
    """Move the money for ``record``'s new state, with its event; False if funds lack."""
    if record.connection_pk is None:  # the CHECK constraint forbids it
        raise InvariantViolation(f"transfer {record.transfer_id} has no account")
    return ledger.post(
        session,
        connection_pk=record.connection_pk,
        currency=record.currency,
        posting=ledger.transfer_posting(record.kind, record.status, record.quantity),
        reason=f"{record.kind.value} {record.status.value}",
        transfer_id=record.transfer_id,
        event=record.event(),
    )


def _hold_or_reject(session: Session, record: TransferRecord) -> TransferRecord:
    """Book a fresh reservation; one the account cannot take becomes a rejection."""
    if _post(session, record):
        return record
    # A deallocation fails for want of funds; an allocation only at the 78-digit limit.
    reason = INSUFFICIENT_FUNDS if record.kind is Kind.DEALLOCATION else ACCOUNT_LIMIT_EXCEEDED
    rejected = _set_status(session, record, Status.REJECTED, reason=reason)
    if rejected is None:  # we hold the row since our insert or update: cannot happen
        raise InvariantViolation(f"transfer {record.transfer_id} changed under its row lock")
    ledger.emit(session, rejected.event())
    return rejected


def _create(
    session: Session, request: ReserveRequest, link: Any, rules: Rules
) -> TransferRecord | None:
    reason = _rule_failure(request, link, rules)
    row = session.execute(
        _INSERT,
        {
            "id": request.transfer_id,
            "kind": request.kind.value,
            "partners_transfer_id": uuid.uuid4(),
            "connection_pk": link.link_pk,
            "currency": request.currency,
            "quantity": request.quantity,
            "client_id": request.client_id,
            "connection_id": request.connection_id,
            "partners_client_id": request.partners_client_id,
            "partners_connection_id": request.partners_connection_id,
            "status": (Status.REJECTED if reason else Status.RESERVED).value,
            "rejection_reason": reason,
        },
    ).one_or_none()
    if row is None:  # a racer inserted this id first; answer from its record
        return None
    record = TransferRecord.from_row(row)
    if reason:
        ledger.emit(session, record.event())
        return record
    return _hold_or_reject(session, record)


def _reserve_again(
    session: Session, stored: TransferRecord, request: ReserveRequest, link: Any, rules: Rules
) -> TransferRecord | None:
    reason = _rule_failure(request, link, rules)
    if reason:
        rejected = _set_status(session, stored, Status.REJECTED, reason=reason)
        if rejected is not None:
            ledger.emit(session, rejected.event())
        return rejected
    reserved = _set_status(session, stored, Status.RESERVED)
    return None if reserved is None else _hold_or_reject(session, reserved)


def reserve(session: Session, *, request: ReserveRequest, rules: Rules) -> TransferRecord:
    """Reserve funds for an allocation or deallocation, idempotently on BitGo's id."""
    for _ in range(_ROUNDS):
        link = session.execute(
            _LOAD, {"transfer_id": request.transfer_id, "connection_id": request.connection_id}
        ).one()
        if link.id is None:
            created = _create(session, request, link, rules)
            if created is not None:
                return created
            continue
        stored = TransferRecord.from_row(link)
        if fingerprint(stored) != fingerprint(request):
            raise Conflict(f"{request.kind.id_field} already used with different parameters")
        outcome = decide(
            stored.status,
            Action.RESERVE,
            released_repost_conflicts=rules.released_repost_conflicts,
        )
        if outcome is Outcome.CURRENT:
            return stored
        if outcome is Outcome.CONFLICT:
            raise Conflict(f"{stored.kind.label} is {stored.status.value}")
        again = _reserve_again(session, stored, request, link, rules)
        if again is not None:
            return again
    raise InvariantViolation(f"transfer {request.transfer_id} kept changing; gave up")


def get(session: Session, *, kind: Kind, transfer_id: uuid.UUID) -> TransferRecord:
    """The record of ``transfer_id`` if it is of ``kind``; NotFound otherwise."""
    row = session.execute(_GET, {"id": transfer_id}).one_or_none()
    if row is None or row.kind != kind.value:
        raise NotFound(f"{kind.label} not found")
    return TransferRecord.from_row(row)


def settle(
    session: Session, *, kind: Kind, transfer_id: uuid.UUID, action: Action
) -> TransferRecord:
    """Clear or release a reservation; a repeat of the same action changes nothing."""
    target = TARGET[action]
    for _ in range(_ROUNDS):
        row = session.execute(
            _SET_STATUS,
            {
                "id": transfer_id,
                "kind": kind.value,
                "from": Status.RESERVED.value,
                "to": target.value,
                "reason": None,
            },
        ).one_or_none()
        if row is not None:
            record = TransferRecord.from_row(row)
            if not _post(session, record):
                raise InvariantViolation(f"{kind.value} {transfer_id}: balances cannot cover it")
            return record
        stored = get(session, kind=kind, transfer_id=transfer_id)
        outcome = decide(stored.status, action, released_repost_conflicts=False)
        if outcome is Outcome.CURRENT:
            return stored
        if outcome is Outcome.CONFLICT:
            raise Conflict(f"{kind.label} is {stored.status.value}")
        if outcome is Outcome.NOT_FOUND:
            raise NotFound(f"{kind.label} not found")
        # APPLY: it was re-reserved after our update looked; go round again.
    raise InvariantViolation(f"transfer {transfer_id} kept changing; gave up")


def listing(
    session: Session,
    *,
    status: Status | None = None,
    kind: Kind | None = None,
    connection_id: uuid.UUID | None = None,
    limit: int = 100,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[TransferRecord]:
    """Records newest first, optionally filtered; ``after`` is the last (createdAt, id) seen."""
    query = select(transfers).order_by(transfers.c.created_at.desc(), transfers.c.id.desc())
    if status is not None:
        query = query.where(transfers.c.status == status.value)
    if kind is not None:
        query = query.where(transfers.c.kind == kind.value)
    if connection_id is not None:
        query = query.where(transfers.c.connection_id == connection_id)
    if after is not None:
        query = query.where(tuple_(transfers.c.created_at, transfers.c.id) < tuple_(*after))
    return [TransferRecord.from_row(r) for r in session.execute(query.limit(limit))]


def stale(
    session: Session,
    *,
    older_than: float,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[TransferRecord]:
    """Reserved transfers untouched for ``older_than`` seconds, oldest first.

    ``after`` is the last (updatedAt, id) seen, so a sweep pages past transfers that
    stay reserved instead of meeting the same ones again.
    """
    rows = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM transfers WHERE status = 'reserved'"
            " AND updated_at < now() - make_interval(secs => :older_than)"
            " AND (CAST(:after_at AS timestamptz) IS NULL"
            "      OR (updated_at, id) > (:after_at, :after_id))"
            " ORDER BY updated_at, id LIMIT :limit"
        ),
        {
            "older_than": older_than,
            "limit": limit,
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
        },
    )
    return [TransferRecord.from_row(r) for r in rows]

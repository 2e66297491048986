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
from typing import Any, NoReturn

from sqlalchemy import Row, bindparam, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from models import ledger, outbox
from models.errors import ConflictError, InvariantError, NotFoundError
from models.rows import as_record
from models.states import TARGET, Action, Kind, Outcome, Status, applies_from, decide
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

    def event(self) -> outbox.Event:
        """The outbox event announcing this record's current state."""
        return outbox.event(
            f"{self.kind.value}.{self.status.value}",
            {
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


def _record(row: Row[Any]) -> TransferRecord:
    return as_record(TransferRecord, row, transfer_id="id")


# Transfer and link in one round trip; neither need exist.
_LOAD = text(
    """
    SELECT t.*, c.id AS link_pk, c.client_id AS link_client_id,
           c.partners_client_id AS link_partners_client_id,
           c.partners_connection_id AS link_partners_connection_id,
           c.active AS link_active
    FROM (VALUES (1)) AS one
    LEFT JOIN transfers t ON t.id = :transfer_id
    LEFT JOIN connections c ON c.connection_id = :connection_id
    """
)
_INSERT = (
    pg_insert(transfers)
    .values(
        {
            c: bindparam(c)
            for c in (
                "id",
                "kind",
                "partners_transfer_id",
                "connection_pk",
                "currency",
                "quantity",
                "client_id",
                "connection_id",
                "partners_client_id",
                "partners_connection_id",
                "status",
                "rejection_reason",
            )
        }
    )
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(*transfers.c)
)
# Compare-and-set: the row moves only from one of the states given.
_SET_STATUS = text(
    """
    UPDATE transfers SET status = :to, rejection_reason = :reason, updated_at = now()
    WHERE id = :id AND kind = :kind AND status = ANY(:from)
    RETURNING *
    """
)
_GET = text("SELECT * FROM transfers WHERE id = :id")


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
    session: Session,
    kind: Kind,
    transfer_id: uuid.UUID,
    to: Status,
    *,
    from_states: tuple[Status, ...],
    reason: str | None = None,
) -> TransferRecord | None:
    """Move the transfer to ``to`` if it is in one of ``from_states``; None if it is not."""
    row = session.execute(
        _SET_STATUS,
        {
            "id": transfer_id,
            "kind": kind.value,
            "from": [s.value for s in from_states],
            "to": to.value,
            "reason": reason,
        },
    ).one_or_none()
    return None if row is None else _record(row)


def _post(session: Session, moved: TransferRecord) -> bool:
    """Move the money for ``moved``'s new state and announce it; False if funds lack."""
    if moved.connection_pk is None:  # the CHECK constraint forbids it
        raise InvariantError(f"transfer {moved.transfer_id} has no account")
    posted = ledger.post(
        session,
        connection_pk=moved.connection_pk,
        currency=moved.currency,
        posting=ledger.transfer_posting(moved.kind, moved.status, moved.quantity),
        reason=f"{moved.kind.value} {moved.status.value}",
        transfer_id=moved.transfer_id,
    )
    if posted:
        outbox.emit(session, moved.event())
    return posted


def _rejected(session: Session, stored: TransferRecord, reason: str) -> TransferRecord | None:
    """Reject ``stored`` from the state we read and announce it; None if a racer moved it."""
    rejected = _set_status(
        session,
        stored.kind,
        stored.transfer_id,
        Status.REJECTED,
        from_states=(stored.status,),
        reason=reason,
    )
    if rejected is not None:
        outbox.emit(session, rejected.event())
    return rejected


def _hold_or_reject(session: Session, reserved: TransferRecord) -> TransferRecord:
    """Book a fresh reservation; one the account cannot take becomes a rejection."""
    if _post(session, reserved):
        return reserved
    # A deallocation fails for want of funds; an allocation only at the 78-digit limit.
    reason = INSUFFICIENT_FUNDS if reserved.kind is Kind.DEALLOCATION else ACCOUNT_LIMIT_EXCEEDED
    rejected = _rejected(session, reserved, reason)
    if rejected is None:  # we hold the row since our insert or update: cannot happen
        raise InvariantError(f"transfer {reserved.transfer_id} changed under its row lock")
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
    created = _record(row)
    if reason:
        outbox.emit(session, created.event())
        return created
    return _hold_or_reject(session, created)


def _reserve_again(
    session: Session, stored: TransferRecord, request: ReserveRequest, link: Any, rules: Rules
) -> TransferRecord | None:
    reason = _rule_failure(request, link, rules)
    if reason:
        return _rejected(session, stored, reason)
    reserved = _set_status(
        session, stored.kind, stored.transfer_id, Status.RESERVED, from_states=(stored.status,)
    )
    return None if reserved is None else _hold_or_reject(session, reserved)


def reserve(session: Session, *, request: ReserveRequest, rules: Rules) -> TransferRecord:
    """Reserve funds for an allocation or deallocation, idempotently on BitGo's id.

    The state table decides; a racer committing between our read and our write
    sends us round again, to decide on what it left.
    """
    for _ in range(_ROUNDS):
        loaded = session.execute(
            _LOAD, {"transfer_id": request.transfer_id, "connection_id": request.connection_id}
        ).one()
        stored = None if loaded.id is None else _record(loaded)
        outcome = decide(
            None if stored is None else stored.status,
            Action.RESERVE,
            same_request=stored is None or fingerprint(stored) == fingerprint(request),
            released_repost_conflicts=rules.released_repost_conflicts,
        )
        result: TransferRecord | None
        if outcome is Outcome.CREATE:
            result = _create(session, request, loaded, rules)
        elif stored is None:
            raise InvariantError(f"the state table gives {outcome} for a reserve of a new id")
        elif outcome is Outcome.CURRENT:
            result = stored
        elif outcome is Outcome.RESERVE_AGAIN:
            result = _reserve_again(session, stored, request, loaded, rules)
        else:
            _refuse(outcome, request.kind, stored)
        if result is not None:
            return result
    raise InvariantError(f"transfer {request.transfer_id} kept changing; gave up")


def _refuse(outcome: Outcome, kind: Kind, stored: TransferRecord | None) -> NoReturn:
    """Raise the refusal ``outcome`` stands for."""
    if outcome is Outcome.NOT_FOUND:
        raise NotFoundError(f"{kind.label} not found")
    if outcome is Outcome.MISMATCH:
        raise ConflictError(f"{kind.id_field} already used with different parameters")
    if outcome is Outcome.CONFLICT and stored is not None:
        raise ConflictError(f"{kind.label} is {stored.status.value}")
    raise InvariantError(f"the state table gives {outcome} where it cannot be acted on")


def _find(session: Session, kind: Kind, transfer_id: uuid.UUID) -> TransferRecord | None:
    """The record of ``transfer_id`` if it is of ``kind``; an id of the other kind is unknown."""
    row = session.execute(_GET, {"id": transfer_id}).one_or_none()
    return None if row is None or row.kind != kind.value else _record(row)


def get(session: Session, *, kind: Kind, transfer_id: uuid.UUID) -> TransferRecord:
    """The record of ``transfer_id`` if it is of ``kind``; NotFoundError otherwise."""
    found = _find(session, kind, transfer_id)
    if found is None:
        raise NotFoundError(f"{kind.label} not found")
    return found


def settle(
    session: Session, *, kind: Kind, transfer_id: uuid.UUID, action: Action
) -> TransferRecord:
    """Clear or release a reservation, as the state table decides for its stored state.

    The move is tried first, from every state the table applies ``action`` to (one
    round trip on the busy path); when the row is in no such state, the table
    decides on the state it is in.
    """
    target = TARGET[action]
    movable = applies_from(action)
    for _ in range(_ROUNDS):
        moved = _set_status(session, kind, transfer_id, target, from_states=movable)
        if moved is not None:
            if not _post(session, moved):
                raise InvariantError(f"{kind.value} {transfer_id}: balances cannot cover it")
            return moved
        stored = _find(session, kind, transfer_id)
        outcome = decide(None if stored is None else stored.status, action)
        if outcome is Outcome.CURRENT and stored is not None:
            return stored
        if outcome is not Outcome.APPLY:
            _refuse(outcome, kind, stored)
        # APPLY: it was re-reserved after our update looked; go round again.
    raise InvariantError(f"transfer {transfer_id} kept changing; gave up")


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
    return [_record(r) for r in session.execute(query.limit(limit))]


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
            "SELECT * FROM transfers WHERE status = 'reserved'"
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
    return [_record(r) for r in rows]

"""One small factory per table, built from the domain's own actions (no raw SQL).

Every factory takes the test's session and leaves what it made uncommitted, so the
``db`` fixture's rollback removes it; the concurrency tests pass a session of a
committed transaction instead.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from models import connections, outbox, settlements, trades, transfers
from models.connections import ConnectionRecord, IssuedToken
from models.settlements import SettlementRecord, SettlementStatus
from models.states import Action, Kind, Status
from models.trades import TradeRecord, TradeRequest
from models.transfers import ReserveRequest, Rules, TransferRecord

RULES = Rules(currencies=frozenset({"btc", "eth"}))


# --- connection_tokens, connections -------------------------------------------------


def connection_token(
    db: Session, *, partners_client_id: str | None = None, ttl: timedelta = timedelta(hours=1)
) -> IssuedToken:
    """A fresh connection token for a new exchange user."""
    user = partners_client_id or f"user-{uuid.uuid4().hex[:8]}"
    return connections.issue_token(db, partners_client_id=user, ttl=ttl)


def linked_connection(
    db: Session, *, partners_client_id: str | None = None, active: bool = True
) -> ConnectionRecord:
    """A BitGo connection linked to a new partner account through a fresh token."""
    issued = connection_token(db, partners_client_id=partners_client_id)
    linked = connections.link(
        db,
        connection_id=uuid.uuid4(),
        client_id=uuid.uuid4(),
        token=issued.token,
        client_wallet_id=None,
    )
    if not active:
        linked = connections.set_active(db, linked.partners_connection_id, active=False)
    return linked


# --- transfers (and, through them, accounts and ledger_entries) ---------------------


def reserve_request(
    link: ConnectionRecord,
    kind: Kind,
    quantity: int,
    *,
    transfer_id: uuid.UUID | None = None,
    currency: str = "btc",
) -> ReserveRequest:
    """A reserve request for ``link`` that matches the link in every field."""
    return ReserveRequest(
        kind=kind,
        transfer_id=transfer_id or uuid.uuid4(),
        currency=currency,
        quantity=quantity,
        client_id=link.client_id,
        connection_id=link.connection_id,
        partners_client_id=link.partners_client_id,
        partners_connection_id=link.partners_connection_id,
    )


def funded(db: Session, link: ConnectionRecord, amount: int, currency: str = "btc") -> None:
    """Give the account ``amount`` more available, through a cleared allocation."""
    request = reserve_request(link, Kind.ALLOCATION, amount, currency=currency)
    assert transfers.reserve(db, request=request, rules=RULES).status is Status.RESERVED
    transfers.settle(db, kind=Kind.ALLOCATION, transfer_id=request.transfer_id, action=Action.CLEAR)


def in_state(
    db: Session, request: ReserveRequest, status: Status, *, rules: Rules = RULES
) -> TransferRecord:
    """The transfer of ``request`` brought to ``status`` through reserve, clear and release.

    Afterwards the account could take a fresh reservation of ``request``: a
    deallocation's account holds the quantity available, and a rejection's cause is
    gone. So a repeat that wrongly ran the rules again would show.
    """
    link = _link_of(db, request)
    if status is Status.REJECTED:
        return _rejected_then_curable(db, link, request, rules)
    if request.kind is Kind.DEALLOCATION:
        funded(db, link, 2 * request.quantity, request.currency)
    record = transfers.reserve(db, request=request, rules=rules)
    assert record.status is Status.RESERVED, record
    if status is Status.RESERVED:
        return record
    action = Action.CLEAR if status is Status.CLEARED else Action.RELEASE
    return transfers.settle(db, kind=request.kind, transfer_id=request.transfer_id, action=action)


def _link_of(db: Session, request: ReserveRequest) -> ConnectionRecord:
    return connections.account(db, request.partners_connection_id).connection


def _rejected_then_curable(
    db: Session, link: ConnectionRecord, request: ReserveRequest, rules: Rules
) -> TransferRecord:
    if request.kind is Kind.ALLOCATION:
        connections.set_active(db, link.partners_connection_id, active=False)
        record = transfers.reserve(db, request=request, rules=rules)
        connections.set_active(db, link.partners_connection_id, active=True)
        assert record.rejection_reason == transfers.CONNECTION_INACTIVE, record
        return record
    record = transfers.reserve(db, request=request, rules=rules)
    funded(db, link, 2 * request.quantity, request.currency)
    assert record.rejection_reason == transfers.INSUFFICIENT_FUNDS, record
    return record


# --- trades ---------------------------------------------------------------------------


def trade(
    db: Session,
    link: ConnectionRecord,
    deltas: dict[str, int],
    *,
    external_id: str | None = None,
    rules: Rules = RULES,
) -> TradeRecord:
    """A trading result applied to ``link``'s account."""
    request = TradeRequest(
        external_id=external_id or f"trade-{uuid.uuid4()}",
        partners_connection_id=link.partners_connection_id,
        deltas=deltas,
    )
    return trades.apply(db, request=request, rules=rules)


# --- settlements ----------------------------------------------------------------------


def empty_settlement_pool(db: Session) -> None:
    """Settle whatever unsettled trades other tests committed, in this rolled-back session.

    A settlement nets every unsettled trade in the database, so a test that counts
    what one holds starts from an empty pool.
    """
    while (record := settlements.open_or_start(db)) is not None:
        if record.status is SettlementStatus.COMPLETED:
            continue
        if record.status is SettlementStatus.PREPARING:
            record = signed(db, record)
        assert settlements.finish(db, record.id, SettlementStatus.COMPLETED) is not None


def signed(db: Session, record: SettlementRecord) -> SettlementRecord:
    """Store the body of a preparing settlement, signed with a made-up signature."""
    return settlements.store_body(
        db, record.id, record.signed_body(record.payload(), f"signature-of-{record.seq}")
    )


def pending_settlement(db: Session) -> SettlementRecord:
    """A settlement of every unsettled trade, its signed body stored: ready to post."""
    record = settlements.open_or_start(db)
    assert record is not None
    assert record.status is SettlementStatus.PREPARING, record
    pending = signed(db, record)
    assert pending.status is SettlementStatus.PENDING
    return pending


# --- outbox ---------------------------------------------------------------------------


def outbox_event(
    db: Session, topic: str = "test.event", payload: dict[str, Any] | None = None
) -> uuid.UUID:
    """A pending event written in ``db``'s transaction; its id."""
    written = outbox.event(topic, payload if payload is not None else {"n": 1})
    outbox.emit(db, written)
    return written.id

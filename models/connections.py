"""Connection tokens, linking BitGo connections to partner accounts, and account views."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from models import ledger
from models.errors import Conflict, InvalidConnectionToken, NotFound
from models.tables import accounts, connection_tokens, connections


@dataclass(frozen=True)
class IssuedToken:
    token: str
    partners_client_id: str
    expires_at: datetime


@dataclass(frozen=True)
class ConnectionRecord:
    pk: int
    connection_id: uuid.UUID
    client_id: uuid.UUID
    partners_client_id: str
    partners_connection_id: str
    client_wallet_id: str | None
    active: bool
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> ConnectionRecord:
        m = row._mapping
        return cls(
            pk=m["id"],
            connection_id=m["connection_id"],
            client_id=m["client_id"],
            partners_client_id=m["partners_client_id"],
            partners_connection_id=m["partners_connection_id"],
            client_wallet_id=m["client_wallet_id"],
            active=m["active"],
            created_at=m["created_at"],
        )


@dataclass(frozen=True)
class Balance:
    available: int
    pending_in: int
    held: int


@dataclass(frozen=True)
class AccountView:
    connection: ConnectionRecord
    balances: dict[str, Balance] = field(default_factory=dict)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, *, partners_client_id: str, ttl: timedelta) -> IssuedToken:
    """A fresh single-use connection token for one of the exchange's users."""
    token = secrets.token_urlsafe(32)
    expires_at = session.execute(
        insert(connection_tokens)
        .values(
            token_sha256=_digest(token),
            partners_client_id=partners_client_id,
            expires_at=func.now() + ttl,
        )
        .returning(connection_tokens.c.expires_at)
    ).scalar_one()
    return IssuedToken(token=token, partners_client_id=partners_client_id, expires_at=expires_at)


def _by_connection_id(session: Session, connection_id: uuid.UUID) -> ConnectionRecord | None:
    row = session.execute(
        select(connections).where(connections.c.connection_id == connection_id)
    ).one_or_none()
    return None if row is None else ConnectionRecord.from_row(row)


def link(
    session: Session,
    *,
    connection_id: uuid.UUID,
    client_id: uuid.UUID,
    token: str,
    client_wallet_id: str | None,
) -> ConnectionRecord:
    """Link BitGo's connection to a new partner account, spending the token once."""
    digest = _digest(token)
    for _ in range(2):
        existing = _by_connection_id(session, connection_id)
        if existing is not None:
            used_by = session.execute(
                select(connection_tokens.c.connection_pk).where(
                    connection_tokens.c.token_sha256 == digest
                )
            ).scalar_one_or_none()
            if used_by != existing.pk or existing.client_id != client_id:
                raise Conflict("connectionId already linked with different parameters")
            return existing
        spent = session.execute(
            select(connection_tokens)
            .where(connection_tokens.c.token_sha256 == digest)
            .with_for_update()
        ).one_or_none()
        if spent is None or spent.expires_at <= session.execute(select(func.now())).scalar_one():
            raise InvalidConnectionToken()
        if spent.connection_pk is not None:
            # A racer holding the same token may have linked this very connection
            # while we waited for the token's row lock: that is a retry, not a conflict.
            linked = _by_connection_id(session, connection_id)
            if linked is not None and linked.pk == spent.connection_pk:
                if linked.client_id != client_id:
                    raise Conflict("connectionId already linked with different parameters")
                return linked
            raise Conflict("Connection token already used by another connection")
        row = session.execute(
            pg_insert(connections)
            .values(
                partners_connection_id=str(uuid.uuid4()),
                partners_client_id=spent.partners_client_id,
                connection_id=connection_id,
                client_id=client_id,
                client_wallet_id=client_wallet_id,
            )
            .on_conflict_do_nothing(index_elements=["connection_id"])
            .returning(*connections.c)
        ).one_or_none()
        if row is None:  # a racer linked this connectionId first; answer from its record
            continue
        record = ConnectionRecord.from_row(row)
        session.execute(
            update(connection_tokens)
            .where(connection_tokens.c.token_sha256 == digest)
            .values(connection_pk=record.pk, used_at=func.now())
        )
        ledger.emit(session, _event("connection.linked", record))
        return record
    raise Conflict("connectionId already linked with different parameters")


def _event(topic: str, record: ConnectionRecord) -> ledger.Event:
    return ledger.Event(
        topic=topic,
        id=uuid.uuid4(),
        payload={
            "connectionId": str(record.connection_id),
            "clientId": str(record.client_id),
            "partnersClientId": record.partners_client_id,
            "partnersConnectionId": record.partners_connection_id,
            "active": record.active,
        },
    )


def _where_ident(ident: str) -> Any:
    """Match BitGo's connectionId when ``ident`` is a UUID, and the partner id in any case."""
    try:
        as_uuid = uuid.UUID(ident)
    except ValueError:
        return connections.c.partners_connection_id == ident
    return (connections.c.connection_id == as_uuid) | (
        connections.c.partners_connection_id == ident
    )


def find(session: Session, ident: str) -> ConnectionRecord:
    """A connection by BitGo's connectionId or by partnersConnectionId."""
    row = session.execute(select(connections).where(_where_ident(ident))).first()
    if row is None:
        raise NotFound("Connection not found")
    return ConnectionRecord.from_row(row)


def set_active(session: Session, ident: str, *, active: bool) -> ConnectionRecord:
    """Activate or deactivate a connection; deactivated ones refuse new allocations."""
    row = session.execute(
        update(connections)
        .where(_where_ident(ident))
        .values(active=active, updated_at=func.now())
        .returning(*connections.c)
    ).first()
    if row is None:
        raise NotFound("Connection not found")
    record = ConnectionRecord.from_row(row)
    ledger.emit(
        session, _event("connection.activated" if active else "connection.deactivated", record)
    )
    return record


def listing(session: Session) -> list[ConnectionRecord]:
    rows = session.execute(select(connections).order_by(connections.c.id))
    return [ConnectionRecord.from_row(r) for r in rows]


def account(session: Session, partners_connection_id: str) -> AccountView:
    """A partner account and its balances per currency."""
    row = session.execute(
        select(connections).where(connections.c.partners_connection_id == partners_connection_id)
    ).one_or_none()
    if row is None:
        raise NotFound("Account not found")
    record = ConnectionRecord.from_row(row)
    balances = {
        r.currency: Balance(int(r.available), int(r.pending_in), int(r.held))
        for r in session.execute(
            select(accounts)
            .where(accounts.c.connection_pk == record.pk)
            .order_by(accounts.c.currency)
        )
    }
    return AccountView(connection=record, balances=balances)

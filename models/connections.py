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

from models import outbox
from models.errors import ConflictError, InvalidConnectionTokenError, NotFoundError
from models.rows import as_record
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


def _record(row: Row[Any]) -> ConnectionRecord:
    return as_record(ConnectionRecord, row, pk="id")


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
    return None if row is None else _record(row)


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
                raise ConflictError("connectionId already linked with different parameters")
            return existing
        spent = session.execute(
            select(connection_tokens)
            .where(connection_tokens.c.token_sha256 == digest)
            .with_for_update()
        ).one_or_none()
        if spent is None or spent.expires_at <= session.execute(select(func.now())).scalar_one():
            raise InvalidConnectionTokenError()
        if spent.connection_pk is not None:
            # A racer holding the same token may have linked this very connection
            # while we waited for the token's row lock: that is a retry, not a conflict.
            linked = _by_connection_id(session, connection_id)
            if linked is not None and linked.pk == spent.connection_pk:
                if linked.client_id != client_id:
                    raise ConflictError("connectionId already linked with different parameters")
                return linked
            raise ConflictError("Connection token already used by another connection")
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
        linked = _record(row)
        session.execute(
            update(connection_tokens)
            .where(connection_tokens.c.token_sha256 == digest)
            .values(connection_pk=linked.pk, used_at=func.now())
        )
        outbox.emit(session, _event("connection.linked", linked))
        return linked
    raise ConflictError("connectionId already linked with different parameters")


def _event(topic: str, linked: ConnectionRecord) -> outbox.Event:
    return outbox.event(
        topic,
        {
            "connectionId": str(linked.connection_id),
            "clientId": str(linked.client_id),
            "partnersClientId": linked.partners_client_id,
            "partnersConnectionId": linked.partners_connection_id,
            "active": linked.active,
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


def set_active(session: Session, ident: str, *, active: bool) -> ConnectionRecord:
    """Activate or deactivate a connection; deactivated ones refuse new allocations.

    Only a change is announced: setting the state it already has writes nothing.
    """
    row = session.execute(
        update(connections)
        .where(_where_ident(ident), connections.c.active.is_not(active))
        .values(active=active, updated_at=func.now())
        .returning(*connections.c)
    ).first()
    if row is None:
        unchanged = session.execute(select(connections).where(_where_ident(ident))).first()
        if unchanged is None:
            raise NotFoundError("Connection not found")
        return _record(unchanged)
    changed = _record(row)
    outbox.emit(
        session, _event("connection.activated" if active else "connection.deactivated", changed)
    )
    return changed


def listing(session: Session) -> list[ConnectionRecord]:
    rows = session.execute(select(connections).order_by(connections.c.id))
    return [_record(r) for r in rows]


def account(session: Session, partners_connection_id: str) -> AccountView:
    """A partner account and its balances per currency."""
    row = session.execute(
        select(connections).where(connections.c.partners_connection_id == partners_connection_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError("Account not found")
    linked = _record(row)
    balances = {
        r.currency: as_record(Balance, r)
        for r in session.execute(
            select(accounts)
            .where(accounts.c.connection_pk == linked.pk)
            .order_by(accounts.c.currency)
        )
    }
    return AccountView(connection=linked, balances=balances)

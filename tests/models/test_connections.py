"""Connection tokens, links, activation and account views (contract sections 4.1 and 7)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from models import connections
from models.connections import Balance, ConnectionRecord
from models.errors import ConflictError, InvalidConnectionTokenError, NotFoundError
from tests.models.factories import connection_token, funded, linked_connection
from tests.models.stored import Written, count, events

ALREADY_LINKED = r"^connectionId already linked with different parameters$"


def now(db: Session) -> datetime:
    moment: datetime = db.execute(text("SELECT now()")).scalar_one()
    return moment


def link_with(
    db: Session, token: str, *, connection_id: uuid.UUID, client_id: uuid.UUID
) -> ConnectionRecord:
    return connections.link(
        db, connection_id=connection_id, client_id=client_id, token=token, client_wallet_id=None
    )


def event_of(topic: str, record: ConnectionRecord) -> Written:
    return Written(
        topic,
        {
            "connectionId": str(record.connection_id),
            "clientId": str(record.client_id),
            "partnersClientId": record.partners_client_id,
            "partnersConnectionId": record.partners_connection_id,
            "active": record.active,
        },
    )


# --- tokens -------------------------------------------------------------------------------


def test_issue_token_gives_a_token_for_the_user_valid_for_the_ttl(db: Session) -> None:
    issued = connection_token(db, partners_client_id="alice", ttl=timedelta(minutes=5))
    assert issued.partners_client_id == "alice"
    assert issued.expires_at == now(db) + timedelta(minutes=5)
    assert len(issued.token) >= 32


def test_issue_token_stores_only_a_digest_of_the_token(db: Session) -> None:
    issued = connection_token(db)
    digest = hashlib.sha256(issued.token.encode()).hexdigest()
    assert count(db, "connection_tokens", "token_sha256 = :d", d=digest) == 1
    assert count(db, "connection_tokens", "token_sha256 = :t", t=issued.token) == 0


def test_each_token_issued_is_new(db: Session) -> None:
    assert connection_token(db, partners_client_id="bob").token != (
        connection_token(db, partners_client_id="bob").token
    )


# --- link -----------------------------------------------------------------------------------


def test_link_creates_a_partner_account_for_the_connection(db: Session) -> None:
    issued = connection_token(db, partners_client_id="carol")
    connection_id, client_id = uuid.uuid4(), uuid.uuid4()
    linked = connections.link(
        db,
        connection_id=connection_id,
        client_id=client_id,
        token=issued.token,
        client_wallet_id="w1",
    )
    assert (linked.connection_id, linked.client_id, linked.client_wallet_id) == (
        connection_id,
        client_id,
        "w1",
    )
    assert (linked.partners_client_id, linked.active) == ("carol", True)
    assert str(uuid.UUID(linked.partners_connection_id)) == linked.partners_connection_id
    assert connections.listing(db)[-1] == linked


def test_link_spends_the_token_on_the_connection(db: Session) -> None:
    issued = connection_token(db)
    linked = link_with(db, issued.token, connection_id=uuid.uuid4(), client_id=uuid.uuid4())
    digest = hashlib.sha256(issued.token.encode()).hexdigest()
    spent = db.execute(
        text("SELECT connection_pk, used_at FROM connection_tokens WHERE token_sha256 = :d"),
        {"d": digest},
    ).one()
    assert spent.connection_pk == linked.pk
    assert spent.used_at is not None


def test_link_emits_connection_linked(db: Session) -> None:
    linked = linked_connection(db)
    assert events(db, connectionId=str(linked.connection_id)) == [
        event_of("connection.linked", linked)
    ]


def test_a_retried_link_with_the_same_token_and_client_answers_the_same_and_adds_nothing(
    db: Session,
) -> None:
    issued = connection_token(db)
    connection_id, client_id = uuid.uuid4(), uuid.uuid4()
    first = link_with(db, issued.token, connection_id=connection_id, client_id=client_id)
    assert link_with(db, issued.token, connection_id=connection_id, client_id=client_id) == first
    assert count(db, "connections", "connection_id = :c", c=connection_id) == 1
    assert len(events(db, connectionId=str(connection_id))) == 1


def test_linking_a_linked_connection_with_another_token_is_a_conflict(db: Session) -> None:
    connection_id, client_id = uuid.uuid4(), uuid.uuid4()
    link_with(db, connection_token(db).token, connection_id=connection_id, client_id=client_id)
    other = connection_token(db)
    with pytest.raises(ConflictError, match=ALREADY_LINKED):
        link_with(db, other.token, connection_id=connection_id, client_id=client_id)
    digest = hashlib.sha256(other.token.encode()).hexdigest()
    assert count(db, "connection_tokens", "token_sha256 = :d AND used_at IS NULL", d=digest) == 1


def test_linking_a_linked_connection_for_another_client_is_a_conflict(db: Session) -> None:
    issued = connection_token(db)
    connection_id = uuid.uuid4()
    link_with(db, issued.token, connection_id=connection_id, client_id=uuid.uuid4())
    with pytest.raises(ConflictError, match=ALREADY_LINKED):
        link_with(db, issued.token, connection_id=connection_id, client_id=uuid.uuid4())


def test_a_token_already_used_by_another_connection_is_refused(db: Session) -> None:
    issued = connection_token(db)
    client_id = uuid.uuid4()
    link_with(db, issued.token, connection_id=uuid.uuid4(), client_id=client_id)
    second = uuid.uuid4()
    with pytest.raises(
        ConflictError, match=r"^Connection token already used by another connection$"
    ):
        link_with(db, issued.token, connection_id=second, client_id=client_id)
    assert count(db, "connections", "connection_id = :c", c=second) == 0


def test_an_unknown_token_is_invalid(db: Session) -> None:
    connection_id = uuid.uuid4()
    with pytest.raises(InvalidConnectionTokenError, match=r"^Invalid connection token$"):
        link_with(db, "no-such-token", connection_id=connection_id, client_id=uuid.uuid4())
    assert count(db, "connections", "connection_id = :c", c=connection_id) == 0


@pytest.mark.parametrize(
    "ttl",
    [pytest.param(timedelta(0), id="expiring-now"), pytest.param(timedelta(seconds=-1), id="past")],
)
def test_an_expired_token_is_invalid(db: Session, ttl: timedelta) -> None:
    issued = connection_token(db, ttl=ttl)
    connection_id = uuid.uuid4()
    with pytest.raises(InvalidConnectionTokenError):
        link_with(db, issued.token, connection_id=connection_id, client_id=uuid.uuid4())
    assert count(db, "connections", "connection_id = :c", c=connection_id) == 0


# --- set_active -----------------------------------------------------------------------------


def test_deactivating_by_partners_connection_id_stores_it_and_emits_deactivated(
    db: Session,
) -> None:
    linked = linked_connection(db)
    changed = connections.set_active(db, linked.partners_connection_id, active=False)
    assert changed.active is False
    assert connections.account(db, linked.partners_connection_id).connection == changed
    assert event_of("connection.deactivated", changed) in events(
        db, connectionId=str(linked.connection_id)
    )


def test_a_connection_can_be_named_by_bitgos_connection_id(db: Session) -> None:
    linked = linked_connection(db)
    changed = connections.set_active(db, str(linked.connection_id), active=False)
    assert (changed.pk, changed.active) == (linked.pk, False)


def test_reactivating_stores_it_and_emits_activated(db: Session) -> None:
    linked = linked_connection(db, active=False)
    changed = connections.set_active(db, linked.partners_connection_id, active=True)
    assert changed.active is True
    assert [w.topic for w in events(db, connectionId=str(linked.connection_id))] == [
        "connection.activated",
        "connection.deactivated",
        "connection.linked",
    ]


@pytest.mark.parametrize("active", [True, False])
def test_setting_the_state_a_connection_already_has_announces_nothing(
    db: Session, active: bool
) -> None:
    linked = linked_connection(db, active=active)
    before = events(db, connectionId=str(linked.connection_id))
    same = connections.set_active(db, linked.partners_connection_id, active=active)
    assert same.active is active
    assert events(db, connectionId=str(linked.connection_id)) == before


@pytest.mark.parametrize("ident", ["no-such-partner-id", str(uuid.UUID(int=1))])
def test_set_active_of_an_unknown_connection_is_not_found(db: Session, ident: str) -> None:
    with pytest.raises(NotFoundError, match=r"^Connection not found$"):
        connections.set_active(db, ident, active=False)


# --- account --------------------------------------------------------------------------------


def test_a_new_account_has_no_balances(db: Session) -> None:
    linked = linked_connection(db)
    view = connections.account(db, linked.partners_connection_id)
    assert (view.connection, view.balances) == (linked, {})


def test_an_account_shows_its_balances_per_currency(db: Session) -> None:
    linked = linked_connection(db)
    funded(db, linked, 30, "eth")
    funded(db, linked, 7, "btc")
    balances = connections.account(db, linked.partners_connection_id).balances
    assert balances == {"btc": Balance(7, 0, 0), "eth": Balance(30, 0, 0)}
    assert list(balances) == ["btc", "eth"]


def test_the_account_of_an_unknown_partners_connection_id_is_not_found(db: Session) -> None:
    with pytest.raises(NotFoundError, match=r"^Account not found$"):
        connections.account(db, "no-such-account")

"""SPEC §3.2: every (stored state, reserve request) cell, for both kinds, balances checked."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Keys, Link, row_count

KINDS = ["allocation", "deallocation"]
Q = 1000


def new_id() -> str:
    return str(uuid.uuid4())


def funded(bitgo: BitGo, link: Link, kind: str) -> Link:
    """A deallocation needs available funds; an allocation needs none."""
    if kind == "deallocation":
        bitgo.fund(link, 10 * Q)
    return link


def after_reserve(kind: str, start: tuple[int, int, int], q: int) -> tuple[int, int, int]:
    available, pending_in, held = start
    if kind == "allocation":
        return available, pending_in + q, held
    return available - q, pending_in, held + q


@pytest.mark.parametrize("kind", KINDS)
def test_new_id_passing_the_rules_is_reserved(bitgo: BitGo, link: Link, kind: str) -> None:
    funded(bitgo, link, kind)
    before = bitgo.balances(link)
    transfer_id = new_id()
    answer = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert answer.status_code == 200
    record = answer.json()
    assert record[f"{kind}Id"] == transfer_id
    assert record["status"] == "reserved"
    assert "rejectionReason" not in record
    assert record["amount"] == {"currency": "btc", "quantity": str(Q)}
    assert record["partnersConnectionId"] == link.partners_connection_id
    assert record["partnersClientId"] == link.partners_client_id
    uuid.UUID(record[f"partners{kind.capitalize()}Id"])
    assert bitgo.balances(link) == after_reserve(kind, before, Q)


def rule_cases() -> Iterator[tuple[str, str, dict[str, object]]]:
    for kind in KINDS:
        yield kind, "Unsupported currency", {"currency": "doge"}
        yield kind, "Unknown connection", {"connection_id": new_id()}
        yield kind, "Connection mismatch", {"client_id": new_id()}
        yield kind, "Connection mismatch", {"partners_client_id": "someone-else"}
        yield kind, "Connection mismatch", {"partners_connection_id": "another-account"}
    yield "deallocation", "Insufficient funds", {"quantity": 10 * Q + 1}


@pytest.mark.parametrize(("kind", "reason", "change"), list(rule_cases()))
def test_new_id_failing_a_rule_is_rejected_with_its_reason(
    bitgo: BitGo, link: Link, kind: str, reason: str, change: dict[str, object]
) -> None:
    funded(bitgo, link, kind)
    before = bitgo.balances(link)
    change = dict(change)  # parametrize shares the dict between cases
    quantity = change.pop("quantity", Q)
    currency = str(change.pop("currency", "btc"))
    target = dataclasses.replace(link, **change)  # type: ignore[arg-type]
    transfer_id = new_id()
    answer = bitgo.reserve(kind, target, transfer_id, str(quantity), currency=currency)
    assert answer.status_code == 200
    assert answer.json()["status"] == "rejected"
    assert answer.json()["rejectionReason"] == reason
    assert bitgo.balances(link) == before
    assert bitgo.status(kind, transfer_id).json()["rejectionReason"] == reason


def test_rules_are_checked_in_order_currency_first(bitgo: BitGo, link: Link) -> None:
    stranger = dataclasses.replace(link, connection_id=new_id())
    answer = bitgo.reserve("allocation", stranger, new_id(), str(Q), currency="doge")
    assert answer.json()["rejectionReason"] == "Unsupported currency"


def test_allocation_to_a_deactivated_connection_is_rejected(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session]
) -> None:
    from models import connections

    with sessions.begin() as session:
        connections.set_active(session, link.connection_id, active=False)
    answer = bitgo.reserve("allocation", link, new_id(), str(Q))
    assert answer.json()["rejectionReason"] == "Connection inactive"
    assert bitgo.balances(link) == (0, 0, 0)


def test_deallocation_from_a_deactivated_connection_is_allowed(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session]
) -> None:
    from models import connections

    bitgo.fund(link, Q)
    with sessions.begin() as session:
        connections.set_active(session, link.partners_connection_id, active=False)
    answer = bitgo.reserve("deallocation", link, new_id(), str(Q))
    assert answer.json()["status"] == "reserved"
    assert bitgo.balances(link) == (0, 0, Q)


def fingerprint_changes() -> Iterator[tuple[str, str, dict[str, object]]]:
    for kind in KINDS:
        other = "deallocation" if kind == "allocation" else "allocation"
        yield kind, kind, {"quantity": Q + 1}
        yield kind, kind, {"currency": "eth"}
        yield kind, kind, {"client_id": new_id()}
        yield kind, kind, {"connection_id": new_id()}
        yield kind, kind, {"partners_client_id": "x"}
        yield kind, kind, {"partners_connection_id": "y"}
        yield kind, other, {}


@pytest.mark.parametrize(("kind", "second_kind", "change"), list(fingerprint_changes()))
@pytest.mark.parametrize("stored", ["reserved", "rejected", "cleared", "released"])
def test_reused_id_with_different_parameters_is_a_conflict_and_changes_nothing(
    bitgo: BitGo,
    link: Link,
    sessions: sessionmaker[Session],
    kind: str,
    second_kind: str,
    change: dict[str, object],
    stored: str,
) -> None:
    funded(bitgo, link, kind)
    transfer_id = new_id()
    first_currency = "doge" if stored == "rejected" else "btc"
    assert bitgo.reserve(kind, link, transfer_id, str(Q), currency=first_currency).json()[
        "status"
    ] == ("rejected" if stored == "rejected" else "reserved")
    if stored in ("cleared", "released"):
        action = {"cleared": "clear", "released": "release"}[stored]
        assert bitgo.put(kind, transfer_id, action).status_code == 200
    before_balances = bitgo.balances(link)
    before_record = bitgo.status(kind, transfer_id).json()
    assert before_record["status"] == stored
    change = dict(change)  # parametrize shares the dict between cases
    quantity = change.pop("quantity", Q)
    currency = str(change.pop("currency", first_currency))
    target = dataclasses.replace(link, **change)  # type: ignore[arg-type]
    answer = bitgo.reserve(second_kind, target, transfer_id, str(quantity), currency=currency)
    assert answer.status_code == 409
    assert answer.json()["error"] == f"{second_kind}Id already used with different parameters"
    assert bitgo.balances(link) == before_balances
    assert bitgo.status(kind, transfer_id).json() == before_record
    assert row_count(sessions, "transfers", "id = :id", id=transfer_id) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_reserved_repeat_answers_the_current_record_and_changes_nothing(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    funded(bitgo, link, kind)
    transfer_id = new_id()
    first = bitgo.reserve(kind, link, transfer_id, str(Q)).json()
    balances = bitgo.balances(link)
    again = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert again.status_code == 200
    assert again.json() == first
    assert bitgo.balances(link) == balances


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_repeat_answers_the_stored_rejection_without_re_evaluating(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    transfer_id = new_id()
    if kind == "deallocation":
        first = bitgo.reserve(kind, link, transfer_id, str(Q)).json()
        assert first["rejectionReason"] == "Insufficient funds"
        bitgo.fund(link, 10 * Q)  # the funds are there now; the answer must not change
    else:
        stranger = dataclasses.replace(link, partners_client_id="not-the-owner")
        first = bitgo.reserve(kind, stranger, transfer_id, str(Q)).json()
        assert first["rejectionReason"] == "Connection mismatch"
        link = stranger
    balances = bitgo.balances(dataclasses.replace(link, partners_client_id="_"))
    again = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert again.status_code == 200
    assert again.json() == first
    assert bitgo.balances(link) == balances


@pytest.mark.parametrize("kind", KINDS)
def test_cleared_repeat_answers_cleared_and_reserves_nothing(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    funded(bitgo, link, kind)
    transfer_id = new_id()
    bitgo.reserve(kind, link, transfer_id, str(Q))
    cleared = bitgo.put(kind, transfer_id, "clear").json()
    balances = bitgo.balances(link)
    again = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert again.status_code == 200
    assert again.json() == cleared
    assert bitgo.balances(link) == balances


@pytest.mark.parametrize("kind", KINDS)
def test_released_repeat_reserves_again_with_the_same_partner_id(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    funded(bitgo, link, kind)
    start = bitgo.balances(link)
    transfer_id = new_id()
    first = bitgo.reserve(kind, link, transfer_id, str(Q)).json()
    bitgo.put(kind, transfer_id, "release")
    assert bitgo.balances(link) == start
    again = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert again.status_code == 200
    record = again.json()
    assert record["status"] == "reserved"
    partner_key = f"partners{kind.capitalize()}Id"
    assert record[partner_key] == first[partner_key]
    assert bitgo.balances(link) == after_reserve(kind, start, Q)
    # And the new reservation clears normally, exactly once.
    assert bitgo.put(kind, transfer_id, "clear").json()["status"] == "cleared"


def test_released_deallocation_without_funds_any_more_is_rejected_on_repost(
    bitgo: BitGo, link: Link
) -> None:
    bitgo.fund(link, Q)
    first_id, second_id = new_id(), new_id()
    bitgo.reserve("deallocation", link, first_id, str(Q))
    bitgo.put("deallocation", first_id, "release")
    bitgo.reserve("deallocation", link, second_id, str(Q))  # takes the funds
    again = bitgo.reserve("deallocation", link, first_id, str(Q)).json()
    assert again["status"] == "rejected"
    assert again["rejectionReason"] == "Insufficient funds"
    assert bitgo.balances(link) == (0, 0, Q)


def test_released_allocation_to_a_since_deactivated_connection_is_rejected_on_repost(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session]
) -> None:
    from models import connections

    transfer_id = new_id()
    bitgo.reserve("allocation", link, transfer_id, str(Q))
    bitgo.put("allocation", transfer_id, "release")
    with sessions.begin() as session:
        connections.set_active(session, link.connection_id, active=False)
    again = bitgo.reserve("allocation", link, transfer_id, str(Q)).json()
    assert again["rejectionReason"] == "Connection inactive"
    assert bitgo.balances(link) == (0, 0, 0)


@pytest.fixture(scope="module")
def conflicting_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(dataclasses.replace(settings, released_repost="conflict"))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("kind", KINDS)
def test_released_repost_is_a_conflict_when_so_configured(
    conflicting_client: TestClient, keys: Keys, kind: str
) -> None:
    bitgo = BitGo(conflicting_client, keys.private)
    link = bitgo.link()
    funded(bitgo, link, kind)
    start = bitgo.balances(link)
    transfer_id = new_id()
    bitgo.reserve(kind, link, transfer_id, str(Q))
    bitgo.put(kind, transfer_id, "release")
    again = bitgo.reserve(kind, link, transfer_id, str(Q))
    assert again.status_code == 409
    assert again.json()["error"] == f"{kind.capitalize()} is released"
    assert bitgo.balances(link) == start


def test_an_allocation_that_would_overflow_78_digits_is_rejected(bitgo: BitGo, link: Link) -> None:
    biggest = "9" * 78
    first = bitgo.reserve("allocation", link, new_id(), biggest).json()
    assert first["status"] == "reserved"
    second = bitgo.reserve("allocation", link, new_id(), "1")
    assert second.status_code == 200
    assert second.json()["rejectionReason"] == "Account limit exceeded"
    assert bitgo.balances(link) == (0, int(biggest), 0)
    assert bitgo.put("allocation", first["allocationId"], "clear").status_code == 200
    assert bitgo.balances(link) == (int(biggest), 0, 0)

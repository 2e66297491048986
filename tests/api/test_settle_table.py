"""SPEC §3.3 and §3.4: clear, release and status for every stored state, both kinds."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import BitGo, Link, row_count

KINDS = ["allocation", "deallocation"]
ACTIONS = ["clear", "release"]
Q = 700


def new_id() -> str:
    return str(uuid.uuid4())


def other(kind: str) -> str:
    return "deallocation" if kind == "allocation" else "allocation"


def reserved(bitgo: BitGo, link: Link, kind: str) -> str:
    if kind == "deallocation":
        bitgo.fund(link, Q)
    transfer_id = new_id()
    assert bitgo.reserve(kind, link, transfer_id, str(Q)).json()["status"] == "reserved"
    return transfer_id


# Balances (available, pendingIn, held) once a reservation of Q ends, from an empty account
# (a deallocation's account was first funded with Q).
ENDINGS = {
    ("allocation", "clear"): (Q, 0, 0),
    ("allocation", "release"): (0, 0, 0),
    ("deallocation", "clear"): (0, 0, 0),
    ("deallocation", "release"): (Q, 0, 0),
}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_unknown_id_is_not_found(bitgo: BitGo, kind: str, action: str) -> None:
    answer = bitgo.put(kind, new_id(), action)
    assert answer.status_code == 404
    assert answer.json() == {"error": f"{kind.capitalize()} not found"}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_id_of_the_other_kind_is_not_found_and_untouched(
    bitgo: BitGo, link: Link, kind: str, action: str
) -> None:
    transfer_id = reserved(bitgo, link, other(kind))
    balances = bitgo.balances(link)
    answer = bitgo.put(kind, transfer_id, action)
    assert answer.status_code == 404
    assert answer.json() == {"error": f"{kind.capitalize()} not found"}
    assert bitgo.status(other(kind), transfer_id).json()["status"] == "reserved"
    assert bitgo.balances(link) == balances


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_reserved_moves_to_the_target_state_with_its_balances(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session], kind: str, action: str
) -> None:
    transfer_id = reserved(bitgo, link, kind)
    answer = bitgo.put(kind, transfer_id, action)
    assert answer.status_code == 200
    assert answer.json()["status"] == {"clear": "cleared", "release": "released"}[action]
    assert bitgo.balances(link) == ENDINGS[(kind, action)]
    # Reserve and ending each wrote one balanced posting and one outbox event.
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=transfer_id) == 4
    assert (
        row_count(
            sessions,
            "outbox",
            "payload->>'id' = :id AND topic = :topic",
            id=transfer_id,
            topic=f"{kind}.{answer.json()['status']}",
        )
        == 1
    )


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_repeating_the_same_ending_answers_200_with_no_second_effect(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session], kind: str, action: str
) -> None:
    transfer_id = reserved(bitgo, link, kind)
    first = bitgo.put(kind, transfer_id, action).json()
    again = bitgo.put(kind, transfer_id, action)
    assert again.status_code == 200
    assert again.json() == first
    assert bitgo.balances(link) == ENDINGS[(kind, action)]
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=transfer_id) == 4


@pytest.mark.parametrize(("first", "second"), [("clear", "release"), ("release", "clear")])
@pytest.mark.parametrize("kind", KINDS)
def test_the_opposite_ending_is_a_conflict_naming_the_state(
    bitgo: BitGo, link: Link, kind: str, first: str, second: str
) -> None:
    transfer_id = reserved(bitgo, link, kind)
    done = bitgo.put(kind, transfer_id, first).json()
    answer = bitgo.put(kind, transfer_id, second)
    assert answer.status_code == 409
    assert answer.json() == {"error": f"{kind.capitalize()} is {done['status']}"}
    assert bitgo.balances(link) == ENDINGS[(kind, first)]
    assert bitgo.status(kind, transfer_id).json() == done


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_rejected_is_not_a_reservation(bitgo: BitGo, link: Link, kind: str, action: str) -> None:
    transfer_id = new_id()
    rejected = bitgo.reserve(kind, link, transfer_id, str(Q), currency="doge").json()
    assert rejected["status"] == "rejected"
    answer = bitgo.put(kind, transfer_id, action)
    assert answer.status_code == 404
    assert answer.json() == {"error": f"{kind.capitalize()} not found"}
    assert bitgo.status(kind, transfer_id).json() == rejected


@pytest.mark.parametrize("kind", KINDS)
def test_status_answers_the_record(bitgo: BitGo, link: Link, kind: str) -> None:
    transfer_id = reserved(bitgo, link, kind)
    reserved_record = bitgo.status(kind, transfer_id)
    assert reserved_record.status_code == 200
    assert reserved_record.json()["status"] == "reserved"
    cleared = bitgo.put(kind, transfer_id, "clear").json()
    assert bitgo.status(kind, transfer_id).json() == cleared
    assert cleared["updatedAt"] >= cleared["createdAt"]


@pytest.mark.parametrize("kind", KINDS)
def test_status_of_unknown_or_other_kind_is_not_found(bitgo: BitGo, link: Link, kind: str) -> None:
    assert bitgo.status(kind, new_id()).json() == {"error": f"{kind.capitalize()} not found"}
    transfer_id = reserved(bitgo, link, other(kind))
    answer = bitgo.status(kind, transfer_id)
    assert answer.status_code == 404
    assert answer.json() == {"error": f"{kind.capitalize()} not found"}


def test_a_body_on_clear_is_ignored(bitgo: BitGo, link: Link) -> None:
    transfer_id = reserved(bitgo, link, "allocation")
    answer = bitgo.http.put(
        f"/bitgo/v1/allocation/{transfer_id}/clear",
        content=b"this is not json",
        headers=bitgo.headers(),
    )
    assert answer.status_code == 200
    assert answer.json()["status"] == "cleared"

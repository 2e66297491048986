"""Reserve, clear and release (contract section 5): every cell of the state table, acted on.

Each cell is tested for both kinds, on a session rolled back after the test, by what the
action answers and by what it leaves stored: the record, the balances, the ledger entries
and the outbox events. The state table itself is tested alone in ``test_states.py``.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.orm import Session

from models import connections, transfers
from models.connections import ConnectionRecord
from models.errors import ConflictError, NotFoundError
from models.ledger import ACCOUNT_LIMIT
from models.states import Action, Kind, Status
from models.transfers import ReserveRequest, Rules, TransferRecord
from tests.models.factories import RULES, funded, in_state, linked_connection, reserve_request
from tests.models.stored import Balances, Entry, Written, balances, entries, events, topics

Q = 1000
KINDS = list(Kind)
ENDINGS = [Action.CLEAR, Action.RELEASE]
TARGET = {Action.CLEAR: Status.CLEARED, Action.RELEASE: Status.RELEASED}
OPPOSITE = {Action.CLEAR: Action.RELEASE, Action.RELEASE: Action.CLEAR}

# Written out here rather than taken from models.ledger, so a wrong posting fails.
# (source, destination) of each transition; "available"/"pending_in"/"held" are the client's.
MOVES = {
    (Kind.ALLOCATION, Status.RESERVED): ("network_clearing", "pending_in"),
    (Kind.ALLOCATION, Status.CLEARED): ("pending_in", "available"),
    (Kind.ALLOCATION, Status.RELEASED): ("pending_in", "network_clearing"),
    (Kind.DEALLOCATION, Status.RESERVED): ("available", "held"),
    (Kind.DEALLOCATION, Status.CLEARED): ("held", "network_clearing"),
    (Kind.DEALLOCATION, Status.RELEASED): ("held", "available"),
}


def moved(start: Balances, kind: Kind, status: Status, quantity: int) -> Balances:
    """``start`` after the posting that takes a transfer of ``kind`` into ``status``."""
    source, destination = MOVES[(kind, status)]
    change = {name: 0 for name in Balances._fields}
    change[source] = change.get(source, 0) - quantity
    change[destination] = change.get(destination, 0) + quantity
    return Balances(*(getattr(start, name) + change[name] for name in Balances._fields))


def posting(kind: Kind, status: Status, quantity: int) -> list[Entry]:
    """The two entries of that posting, as stored."""
    source, destination = MOVES[(kind, status)]
    reason = f"{kind.value} {status.value}"
    return [Entry(reason, source, -quantity), Entry(reason, destination, quantity)]


def other(kind: Kind) -> Kind:
    return Kind.DEALLOCATION if kind is Kind.ALLOCATION else Kind.ALLOCATION


def event_of(record: TransferRecord) -> Written:
    """The event the contract (section 10) specifies for ``record``'s current state."""
    return Written(
        f"{record.kind.value}.{record.status.value}",
        {
            "kind": record.kind.value,
            "id": str(record.transfer_id),
            "partnersId": str(record.partners_transfer_id),
            "status": record.status.value,
            "currency": record.currency,
            "quantity": str(record.quantity),
            "connectionId": str(record.connection_id),
            "partnersConnectionId": record.partners_connection_id,
            "partnersClientId": record.partners_client_id,
            "rejectionReason": record.rejection_reason,
        },
    )


@dataclass(frozen=True)
class Snapshot:
    """Everything an action on one transfer could change."""

    record: TransferRecord | None
    balances: Balances
    entries: list[Entry]
    topics: list[str]


def snapshot(db: Session, link: ConnectionRecord, transfer_id: uuid.UUID) -> Snapshot:
    record = None
    for kind in Kind:
        try:
            record = transfers.get(db, kind=kind, transfer_id=transfer_id)
        except NotFoundError:
            continue
    return Snapshot(
        record,
        balances(db, link),
        entries(db, transfer_id=transfer_id),
        topics(db, id=str(transfer_id)),
    )


def reserve(db: Session, request: ReserveRequest, rules: Rules = RULES) -> TransferRecord:
    return transfers.reserve(db, request=request, rules=rules)


def settle(db: Session, request: ReserveRequest, action: Action) -> TransferRecord:
    return transfers.settle(db, kind=request.kind, transfer_id=request.transfer_id, action=action)


@pytest.fixture
def link(db: Session) -> ConnectionRecord:
    return linked_connection(db)


def ready(db: Session, link: ConnectionRecord, kind: Kind, quantity: int = Q) -> ReserveRequest:
    """A request that passes every rule: a deallocation's account is funded for it."""
    if kind is Kind.DEALLOCATION:
        funded(db, link, quantity)
    return reserve_request(link, kind, quantity)


def assert_rejected(
    db: Session, record: TransferRecord, reason: str, *, link: ConnectionRecord, before: Balances
) -> None:
    """Stored rejected with ``reason``, no money moved, ``<kind>.rejected`` emitted."""
    assert (record.status, record.rejection_reason) == (Status.REJECTED, reason)
    assert transfers.get(db, kind=record.kind, transfer_id=record.transfer_id) == record
    assert entries(db, transfer_id=record.transfer_id) == []
    assert balances(db, link) == before
    assert events(db, id=str(record.transfer_id)) == [event_of(record)]


# --- reserve, no record: create ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_of_a_new_id_passing_every_rule_stores_it_reserved(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = ready(db, link, kind)
    record = reserve(db, request)
    assert record.status is Status.RESERVED
    assert record.rejection_reason is None
    assert (record.kind, record.transfer_id, record.currency, record.quantity) == (
        kind,
        request.transfer_id,
        "btc",
        Q,
    )
    assert (record.client_id, record.connection_id, record.connection_pk) == (
        link.client_id,
        link.connection_id,
        link.pk,
    )
    assert record.partners_transfer_id not in (request.transfer_id, None)
    assert transfers.get(db, kind=kind, transfer_id=request.transfer_id) == record


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_reservation_posts_its_kinds_reserve_move(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = ready(db, link, kind)
    before = balances(db, link)
    reserve(db, request)
    assert balances(db, link) == moved(before, kind, Status.RESERVED, Q)
    assert entries(db, transfer_id=request.transfer_id) == posting(kind, Status.RESERVED, Q)


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_reservation_emits_kind_reserved(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    record = reserve(db, ready(db, link, kind))
    assert record.status is Status.RESERVED
    assert events(db, id=str(record.transfer_id)) == [event_of(record)]


# --- reserve, no record: the business rules, in order -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_rejects_an_unsupported_currency_before_any_other_rule(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    # Also an unknown connection: rule 1 must answer first.
    request = dataclasses.replace(
        reserve_request(link, kind, Q, currency="doge"), connection_id=uuid.uuid4()
    )
    before = balances(db, link)
    record = reserve(db, request)
    assert_rejected(db, record, "Unsupported currency", link=link, before=before)


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_rejects_an_unknown_connection_before_comparing_the_link(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = dataclasses.replace(
        reserve_request(link, kind, Q), connection_id=uuid.uuid4(), client_id=uuid.uuid4()
    )
    before = balances(db, link)
    record = reserve(db, request)
    assert_rejected(db, record, "Unknown connection", link=link, before=before)
    assert record.connection_pk is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", ["client_id", "partners_client_id", "partners_connection_id"])
def test_reserve_rejects_a_connection_mismatch_on_each_linked_field_before_later_rules(
    db: Session, kind: Kind, field: str
) -> None:
    # Inactive and unfunded too: rules 4 and 5 would fail as well.
    link = linked_connection(db, active=False)
    other_link = linked_connection(db)
    request = dataclasses.replace(
        reserve_request(link, kind, Q), **{field: getattr(other_link, field)}
    )
    before = balances(db, link)
    record = reserve(db, request)
    assert_rejected(db, record, "Connection mismatch", link=link, before=before)


def test_reserve_rejects_an_allocation_to_an_inactive_connection_before_booking_it(
    db: Session, link: ConnectionRecord
) -> None:
    # The account is at its limit too: booking (rule 5) would fail as well.
    reserve(db, reserve_request(link, Kind.ALLOCATION, ACCOUNT_LIMIT - 1))
    connections.set_active(db, link.partners_connection_id, active=False)
    before = balances(db, link)
    record = reserve(db, reserve_request(link, Kind.ALLOCATION, 1))
    assert_rejected(db, record, "Connection inactive", link=link, before=before)


def test_a_deallocation_from_an_inactive_connection_is_still_reserved(
    db: Session, link: ConnectionRecord
) -> None:
    request = ready(db, link, Kind.DEALLOCATION)
    connections.set_active(db, link.partners_connection_id, active=False)
    assert reserve(db, request).status is Status.RESERVED


def test_a_deallocation_from_an_inactive_connection_it_cannot_cover_is_insufficient_funds(
    db: Session,
) -> None:
    link = linked_connection(db, active=False)
    record = reserve(db, reserve_request(link, Kind.DEALLOCATION, Q))
    assert_rejected(db, record, "Insufficient funds", link=link, before=Balances(0, 0, 0))


def test_reserve_rejects_a_deallocation_larger_than_available(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, Q - 1)
    before = balances(db, link)
    record = reserve(db, reserve_request(link, Kind.DEALLOCATION, Q))
    assert_rejected(db, record, "Insufficient funds", link=link, before=before)


def test_a_deallocation_of_exactly_available_is_reserved(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, Q)
    assert reserve(db, reserve_request(link, Kind.DEALLOCATION, Q)).status is Status.RESERVED
    assert balances(db, link) == Balances(0, 0, Q)


def test_held_funds_are_not_available_to_a_second_deallocation(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, Q)
    reserve(db, reserve_request(link, Kind.DEALLOCATION, Q))
    record = reserve(db, reserve_request(link, Kind.DEALLOCATION, 1))
    assert_rejected(db, record, "Insufficient funds", link=link, before=Balances(0, 0, Q))


def test_reserve_rejects_an_allocation_that_would_reach_the_account_limit(
    db: Session, link: ConnectionRecord
) -> None:
    reserve(db, reserve_request(link, Kind.ALLOCATION, ACCOUNT_LIMIT - 1))
    before = balances(db, link)
    record = reserve(db, reserve_request(link, Kind.ALLOCATION, 1))
    assert_rejected(db, record, "Account limit exceeded", link=link, before=before)


def test_the_account_limit_counts_available_pending_in_and_held_together(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, ACCOUNT_LIMIT - 4)
    reserve(db, reserve_request(link, Kind.DEALLOCATION, 1))
    reserve(db, reserve_request(link, Kind.ALLOCATION, 2))
    assert balances(db, link) == Balances(ACCOUNT_LIMIT - 5, 2, 1)
    before = balances(db, link)
    refused = reserve(db, reserve_request(link, Kind.ALLOCATION, 2))
    assert_rejected(db, refused, "Account limit exceeded", link=link, before=before)
    assert reserve(db, reserve_request(link, Kind.ALLOCATION, 1)).status is Status.RESERVED
    assert balances(db, link) == Balances(ACCOUNT_LIMIT - 5, 3, 1)


# --- reserve on a stored record: fingerprint mismatch, in any state ---------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", list(Status))
def test_reserve_with_another_quantity_is_a_mismatch_in_every_state(
    db: Session, link: ConnectionRecord, kind: Kind, status: Status
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, status)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(ConflictError, match=rf"^{kind.value}Id already used with different"):
        reserve(db, dataclasses.replace(request, quantity=Q + 1))
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "field",
    ["currency", "client_id", "connection_id", "partners_client_id", "partners_connection_id"],
)
def test_reserve_differing_in_any_fingerprint_field_is_a_mismatch(
    db: Session, link: ConnectionRecord, kind: Kind, field: str
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.RESERVED)
    # A value another request could legitimately carry: a supported currency, a real link.
    other_link = linked_connection(db)
    value: Any = "eth" if field == "currency" else getattr(other_link, field)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(
        ConflictError, match=rf"^{kind.value}Id already used with different parameters$"
    ):
        reserve(db, dataclasses.replace(request, **{field: value}))
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", list(Status))
def test_reserve_of_an_id_stored_as_the_other_kind_is_a_mismatch_of_the_requested_kind(
    db: Session, link: ConnectionRecord, kind: Kind, status: Status
) -> None:
    request = reserve_request(link, other(kind), Q)
    in_state(db, request, status)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(
        ConflictError, match=rf"^{kind.value}Id already used with different parameters$"
    ):
        reserve(db, dataclasses.replace(request, kind=kind))
    assert snapshot(db, link, request.transfer_id) == before


def test_a_mismatch_on_a_released_id_is_a_mismatch_even_when_reposts_conflict(
    db: Session, link: ConnectionRecord
) -> None:
    request = reserve_request(link, Kind.ALLOCATION, Q)
    in_state(db, request, Status.RELEASED)
    conflicting = dataclasses.replace(RULES, released_repost_conflicts=True)
    with pytest.raises(ConflictError, match=r"^allocationId already used with different"):
        reserve(db, dataclasses.replace(request, quantity=Q + 1), conflicting)


# --- reserve on a stored record: the same request again ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [Status.RESERVED, Status.REJECTED, Status.CLEARED])
def test_a_repeated_reserve_answers_the_current_record_and_changes_nothing(
    db: Session, link: ConnectionRecord, kind: Kind, status: Status
) -> None:
    request = reserve_request(link, kind, Q)
    stored = in_state(db, request, status)
    before = snapshot(db, link, request.transfer_id)
    assert reserve(db, request) == stored
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_rejection_is_not_re_evaluated_once_its_cause_is_gone(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    # in_state leaves the link active and the account funded: the request would pass now.
    rejected = in_state(db, request, Status.REJECTED)
    assert reserve(db, dataclasses.replace(request)) == rejected
    assert transfers.get(db, kind=kind, transfer_id=request.transfer_id).status is Status.REJECTED


# --- reserve on a released record: reserve again, or conflict ---------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_of_a_released_id_reserves_it_again_under_the_same_partners_id(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    released = in_state(db, request, Status.RELEASED)
    again = reserve(db, request)
    assert again.status is Status.RESERVED
    assert again.rejection_reason is None
    assert (again.partners_transfer_id, again.created_at) == (
        released.partners_transfer_id,
        released.created_at,
    )
    assert transfers.get(db, kind=kind, transfer_id=request.transfer_id) == again


@pytest.mark.parametrize("kind", KINDS)
def test_reserving_a_released_id_again_posts_and_announces_a_new_reservation(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.RELEASED)
    before = balances(db, link)
    again = reserve(db, request)
    assert balances(db, link) == moved(before, kind, Status.RESERVED, Q)
    assert entries(db, transfer_id=request.transfer_id) == [
        *posting(kind, Status.RESERVED, Q),
        *posting(kind, Status.RELEASED, Q),
        *posting(kind, Status.RESERVED, Q),
    ]
    assert topics(db, id=str(request.transfer_id)) == [
        f"{kind.value}.released",
        f"{kind.value}.reserved",
        f"{kind.value}.reserved",
    ]
    assert event_of(again) in events(db, id=str(request.transfer_id))


@pytest.mark.parametrize("kind", KINDS)
def test_a_released_id_reserved_again_can_then_be_cleared(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.RELEASED)
    reserve(db, request)
    before = balances(db, link)
    assert settle(db, request, Action.CLEAR).status is Status.CLEARED
    assert balances(db, link) == moved(before, kind, Status.CLEARED, Q)


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_of_a_released_id_that_now_fails_a_rule_rejects_it_under_the_same_partners_id(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    released = in_state(db, request, Status.RELEASED)
    before = snapshot(db, link, request.transfer_id)
    no_btc = Rules(currencies=frozenset({"eth"}))
    again = reserve(db, request, no_btc)
    assert (again.status, again.rejection_reason) == (Status.REJECTED, "Unsupported currency")
    assert again.partners_transfer_id == released.partners_transfer_id
    assert transfers.get(db, kind=kind, transfer_id=request.transfer_id) == again
    assert balances(db, link) == before.balances
    assert entries(db, transfer_id=request.transfer_id) == before.entries
    assert events(db, id=str(request.transfer_id)).count(event_of(again)) == 1
    assert topics(db, id=str(request.transfer_id)) == sorted(
        [*before.topics, f"{kind.value}.rejected"]
    )


def test_reserve_again_of_a_released_allocation_to_an_inactive_connection_is_rejected(
    db: Session, link: ConnectionRecord
) -> None:
    request = reserve_request(link, Kind.ALLOCATION, Q)
    in_state(db, request, Status.RELEASED)
    connections.set_active(db, link.partners_connection_id, active=False)
    before = balances(db, link)
    again = reserve(db, request)
    assert (again.status, again.rejection_reason) == (Status.REJECTED, "Connection inactive")
    assert balances(db, link) == before


def test_reserve_again_of_a_released_deallocation_the_account_cannot_cover_is_rejected(
    db: Session, link: ConnectionRecord
) -> None:
    request = reserve_request(link, Kind.DEALLOCATION, Q)
    in_state(db, request, Status.RELEASED)
    spend = reserve_request(link, Kind.DEALLOCATION, balances(db, link).available)
    assert reserve(db, spend).status is Status.RESERVED
    before = balances(db, link)
    again = reserve(db, request)
    assert (again.status, again.rejection_reason) == (Status.REJECTED, "Insufficient funds")
    assert balances(db, link) == before
    assert entries(db, transfer_id=request.transfer_id) == [
        *posting(Kind.DEALLOCATION, Status.RESERVED, Q),
        *posting(Kind.DEALLOCATION, Status.RELEASED, Q),
    ]
    assert topics(db, id=str(request.transfer_id)).count("deallocation.rejected") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_reserve_of_a_released_id_is_a_conflict_when_reposts_conflict(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.RELEASED)
    before = snapshot(db, link, request.transfer_id)
    conflicting = dataclasses.replace(RULES, released_repost_conflicts=True)
    with pytest.raises(ConflictError, match=rf"^{kind.label} is released$"):
        reserve(db, request, conflicting)
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [Status.RESERVED, Status.REJECTED, Status.CLEARED])
def test_conflict_mode_changes_only_the_released_cell(
    db: Session, link: ConnectionRecord, kind: Kind, status: Status
) -> None:
    request = reserve_request(link, kind, Q)
    stored = in_state(db, request, status)
    conflicting = dataclasses.replace(RULES, released_repost_conflicts=True)
    assert reserve(db, request, conflicting) == stored


# --- clear and release: no record, the other kind, a rejection --------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_an_unknown_id_is_not_found(
    db: Session, kind: Kind, action: Action
) -> None:
    with pytest.raises(NotFoundError, match=rf"^{kind.label} not found$"):
        transfers.settle(db, kind=kind, transfer_id=uuid.uuid4(), action=action)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_an_id_of_the_other_kind_is_not_found_and_leaves_it(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, other(kind), Q)
    in_state(db, request, Status.RESERVED)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(NotFoundError, match=rf"^{kind.label} not found$"):
        transfers.settle(db, kind=kind, transfer_id=request.transfer_id, action=action)
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
def test_get_of_an_id_of_the_other_kind_is_not_found(
    db: Session, link: ConnectionRecord, kind: Kind
) -> None:
    request = reserve_request(link, other(kind), Q)
    in_state(db, request, Status.RESERVED)
    with pytest.raises(NotFoundError, match=rf"^{kind.label} not found$"):
        transfers.get(db, kind=kind, transfer_id=request.transfer_id)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_a_rejection_is_not_found_and_leaves_it(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.REJECTED)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(NotFoundError, match=rf"^{kind.label} not found$"):
        settle(db, request, action)
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_a_rejection_without_an_account_is_not_found(
    db: Session, link: ConnectionRecord, action: Action
) -> None:
    request = dataclasses.replace(
        reserve_request(link, Kind.ALLOCATION, Q), connection_id=uuid.uuid4()
    )
    assert reserve(db, request).rejection_reason == "Unknown connection"
    with pytest.raises(NotFoundError, match=r"^Allocation not found$"):
        settle(db, request, action)


# --- clear and release: a reservation moves ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_a_reservation_stores_its_ending(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    reserved = in_state(db, request, Status.RESERVED)
    ended = settle(db, request, action)
    assert ended == dataclasses.replace(
        reserved, status=TARGET[action], updated_at=ended.updated_at
    )
    assert transfers.get(db, kind=kind, transfer_id=request.transfer_id) == ended


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_a_reservation_posts_its_move(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    in_state(db, request, Status.RESERVED)
    before = balances(db, link)
    settle(db, request, action)
    assert balances(db, link) == moved(before, kind, TARGET[action], Q)
    assert entries(db, transfer_id=request.transfer_id) == [
        *posting(kind, Status.RESERVED, Q),
        *posting(kind, TARGET[action], Q),
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_clear_or_release_of_a_reservation_emits_its_ending(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    reserved = in_state(db, request, Status.RESERVED)
    ended = settle(db, request, action)
    assert events(db, id=str(request.transfer_id)) == sorted(
        [event_of(reserved), event_of(ended)], key=lambda w: w.topic
    )


@pytest.mark.parametrize(
    ("kind", "action", "net"),
    [
        # From nothing, reserve then end: what the account holds afterwards.
        (Kind.ALLOCATION, Action.CLEAR, Balances(Q, 0, 0)),
        (Kind.ALLOCATION, Action.RELEASE, Balances(0, 0, 0)),
        (Kind.DEALLOCATION, Action.CLEAR, Balances(0, 0, 0)),
        (Kind.DEALLOCATION, Action.RELEASE, Balances(Q, 0, 0)),
    ],
)
def test_each_ending_leaves_the_specified_balances(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action, net: Balances
) -> None:
    request = ready(db, link, kind)  # a deallocation's account starts with Q available
    reserve(db, request)
    settle(db, request, action)
    assert balances(db, link) == net


# --- clear and release: an ended record -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_the_same_ending_repeated_answers_the_current_record_without_a_second_posting(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    ended = in_state(db, request, TARGET[action])
    # Another reservation on the account, so a second posting would have funds to take.
    in_state(db, reserve_request(link, kind, Q), Status.RESERVED)
    before = snapshot(db, link, request.transfer_id)
    assert settle(db, request, action) == ended
    assert snapshot(db, link, request.transfer_id) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ENDINGS)
def test_the_opposite_ending_is_a_conflict_naming_the_stored_status(
    db: Session, link: ConnectionRecord, kind: Kind, action: Action
) -> None:
    request = reserve_request(link, kind, Q)
    ended = in_state(db, request, TARGET[OPPOSITE[action]])
    in_state(db, reserve_request(link, kind, Q), Status.RESERVED)
    before = snapshot(db, link, request.transfer_id)
    with pytest.raises(ConflictError, match=rf"^{kind.label} is {ended.status.value}$"):
        settle(db, request, action)
    assert snapshot(db, link, request.transfer_id) == before

"""The outbox (contract section 10): written with its change, published after commit,
claimed once, retried then dead-lettered, relayed when overdue, re-driven.

Tests of publishing really commit and roll back, through the run's sessionmaker; the
others work in the rolled-back ``db`` session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models import outbox, transfers
from models.outbox import EventStatus, Failure, RetryPolicy
from models.states import Kind
from tests.models.factories import RULES, linked_connection, outbox_event, reserve_request
from tests.models.stored import count, due_in, events, outbox_row

POLICY = RetryPolicy(max_attempts=3, base=10, cap=100)
ALL = 10**6  # a relay limit no test reaches: other tests' pending events may be due too


def plant_due(db: Session, event_id: uuid.UUID, ago: timedelta) -> None:
    """Make an event due ``ago`` before now, as if its time had passed."""
    db.execute(
        text("UPDATE outbox SET next_attempt_at = now() - :ago WHERE id = :id"),
        {"ago": ago, "id": event_id},
    )


def dead_letter(db: Session) -> uuid.UUID:
    event_id = outbox_event(db)
    claimed = outbox.claim(db, event_id)
    assert claimed is not None
    outbox.failed(db, claimed, error="HTTP 400", retriable=False, policy=POLICY)
    return event_id


def delivered_event(db: Session) -> uuid.UUID:
    event_id = outbox_event(db)
    assert outbox.claim(db, event_id) is not None
    outbox.delivered(db, event_id)
    return event_id


def fail(db: Session, event_id: uuid.UUID, *, retriable: bool = True) -> Failure:
    claimed = outbox.claim(db, event_id)
    assert claimed is not None
    return outbox.failed(db, claimed, error="HTTP 503", retriable=retriable, policy=POLICY)


@pytest.fixture
def published(sessions: sessionmaker[Session]) -> Iterator[list[list[uuid.UUID]]]:
    """What a test's transactions handed to the publisher, one list per transaction."""
    batches: list[list[uuid.UUID]] = []
    yield batches
    # No worker runs here: mark what was committed delivered, as one would have.
    with sessions.begin() as session:
        outbox.delivered_locally(session, [i for batch in batches for i in batch])


def committed_event(sessions: sessionmaker[Session], published: list[list[uuid.UUID]]) -> uuid.UUID:
    with outbox.transaction(sessions, published.append) as session:
        return outbox_event(session)


# --- written with the change, published after commit ------------------------------------


def test_an_event_is_written_in_the_transaction_of_its_change_and_published_after_commit(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    with sessions.begin() as session:
        link = linked_connection(session)
    request = reserve_request(link, Kind.ALLOCATION, 10)
    with outbox.transaction(sessions, published.append) as session:
        transfers.reserve(session, request=request, rules=RULES)
        [written] = events(session, id=str(request.transfer_id))
        assert written.topic == "allocation.reserved"
        with sessions() as outsider:
            assert count(outsider, "transfers", "id = :id", id=request.transfer_id) == 0
            assert events(outsider, id=str(request.transfer_id)) == []
        assert published == []
    with sessions() as outsider:
        [event_id] = outsider.execute(
            text("SELECT id FROM outbox WHERE payload->>'id' = :id"),
            {"id": str(request.transfer_id)},
        ).scalars()
        assert count(outsider, "transfers", "id = :id", id=request.transfer_id) == 1
    assert published == [[event_id]]


def test_a_rolled_back_transaction_publishes_nothing_and_leaves_no_event(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    with sessions.begin() as session:
        link = linked_connection(session)
    request = reserve_request(link, Kind.ALLOCATION, 10)

    def reserve_then_fail() -> None:
        with outbox.transaction(sessions, published.append) as session:
            transfers.reserve(session, request=request, rules=RULES)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        reserve_then_fail()
    assert published == []
    with sessions() as outsider:
        assert count(outsider, "transfers", "id = :id", id=request.transfer_id) == 0
        assert events(outsider, id=str(request.transfer_id)) == []


def test_a_committed_transaction_publishes_exactly_its_event_ids_in_order(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    with outbox.transaction(sessions, published.append) as session:
        first, second = outbox_event(session), outbox_event(session)
    assert published == [[first, second]]


def test_each_transaction_publishes_only_its_own_events(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    first = committed_event(sessions, published)
    second = committed_event(sessions, published)
    assert published == [[first], [second]]


def test_a_transaction_without_events_does_not_call_the_publisher(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    with outbox.transaction(sessions, published.append) as session:
        session.execute(text("SELECT 1"))
    assert published == []


# --- claim and delivery -----------------------------------------------------------------


def test_claim_returns_a_pending_event_as_stored(db: Session) -> None:
    event_id = outbox_event(db, "test.claimed", {"n": 7})
    claimed = outbox.claim(db, event_id)
    assert claimed is not None
    assert (claimed.id, claimed.topic, claimed.payload) == (event_id, "test.claimed", {"n": 7})
    assert (claimed.status, claimed.attempts, claimed.last_error) == (EventStatus.PENDING, 0, None)


def test_claim_skips_an_unknown_event(db: Session) -> None:
    assert outbox.claim(db, uuid.uuid4()) is None


def test_claim_skips_a_delivered_event(db: Session) -> None:
    assert outbox.claim(db, delivered_event(db)) is None


def test_claim_skips_an_event_delivered_locally(db: Session) -> None:
    event_id = outbox_event(db)
    outbox.delivered(db, event_id, locally=True)
    assert outbox.claim(db, event_id) is None


def test_claim_skips_a_dead_letter(db: Session) -> None:
    assert outbox.claim(db, dead_letter(db)) is None


def test_claim_skips_an_event_another_transaction_is_delivering(
    db: Session, sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    event_id = committed_event(sessions, published)
    with sessions.begin() as deliverer:
        assert outbox.claim(deliverer, event_id) is not None
        assert outbox.claim(db, event_id) is None
    # The deliverer let go without delivering: the event can be claimed again.
    assert outbox.claim(db, event_id) is not None


def test_delivered_marks_the_event_delivered_and_counts_the_attempt(db: Session) -> None:
    event = outbox_row(db, delivered_event(db))
    assert (event.status, event.attempts, event.last_error) == (EventStatus.DELIVERED, 1, None)
    assert event.delivered_at is not None


def test_delivered_locally_marks_the_event_without_counting_an_attempt(db: Session) -> None:
    event_id = outbox_event(db)
    outbox.delivered(db, event_id, locally=True)
    event = outbox_row(db, event_id)
    assert (event.status, event.attempts) == (EventStatus.DELIVERED_LOCALLY, 0)
    assert event.delivered_at is not None


def test_delivered_locally_in_bulk_marks_only_pending_events(db: Session) -> None:
    pending, dead = outbox_event(db), dead_letter(db)
    assert outbox.delivered_locally(db, [pending, dead, uuid.uuid4()]) == 1
    assert outbox_row(db, pending).status is EventStatus.DELIVERED_LOCALLY
    assert outbox_row(db, dead).status is EventStatus.DEAD


def test_delivered_locally_in_bulk_skips_an_event_being_delivered(
    db: Session, sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    event_id = committed_event(sessions, published)
    with sessions.begin() as deliverer:
        assert outbox.claim(deliverer, event_id) is not None
        assert outbox.delivered_locally(db, [event_id]) == 0


# --- failures: retry, then dead letter ----------------------------------------------------


def test_a_retriable_failure_below_max_attempts_is_retried_after_the_policy_delay(
    db: Session,
) -> None:
    event_id = outbox_event(db)
    failure = fail(db, event_id)
    assert (failure.status, failure.attempt) == (EventStatus.PENDING, 1)
    assert failure.retry_in is not None
    assert 5 <= failure.retry_in <= 10  # the first delay, base 10, with equal jitter
    event = outbox_row(db, event_id)
    assert (event.status, event.attempts, event.last_error) == (
        EventStatus.PENDING,
        1,
        "HTTP 503",
    )
    assert abs(due_in(db, event_id) - timedelta(seconds=failure.retry_in)) < timedelta(
        milliseconds=1
    )


def test_the_failure_at_max_attempts_makes_a_dead_letter(db: Session) -> None:
    event_id = outbox_event(db)
    failures = [fail(db, event_id) for _ in range(POLICY.max_attempts)]
    assert [(f.status, f.attempt) for f in failures] == [
        (EventStatus.PENDING, 1),
        (EventStatus.PENDING, 2),
        (EventStatus.DEAD, 3),
    ]
    assert failures[-1].retry_in is None
    event = outbox_row(db, event_id)
    assert (event.status, event.attempts) == (EventStatus.DEAD, 3)


def test_a_failure_not_worth_retrying_makes_a_dead_letter_at_once(db: Session) -> None:
    event_id = outbox_event(db)
    assert fail(db, event_id, retriable=False) == Failure(EventStatus.DEAD, 1, None)
    event = outbox_row(db, event_id)
    assert (event.status, event.attempts, event.last_error) == (EventStatus.DEAD, 1, "HTTP 503")


def test_a_failure_keeps_the_first_1000_characters_of_the_error(db: Session) -> None:
    event_id = outbox_event(db)
    claimed = outbox.claim(db, event_id)
    assert claimed is not None
    outbox.failed(db, claimed, error="x" * 5000, retriable=True, policy=POLICY)
    assert outbox_row(db, event_id).last_error == "x" * 1000


@pytest.mark.parametrize(
    ("failures", "longest"), [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (30, 100)]
)
def test_the_retry_delay_doubles_up_to_the_cap_with_equal_jitter(
    failures: int, longest: float
) -> None:
    delays = [POLICY.delay(failures) for _ in range(200)]
    assert all(longest / 2 <= d <= longest for d in delays)
    assert len(set(delays)) > 1


# --- relay: overdue pending events, leased ------------------------------------------------


def test_relay_leaves_an_event_not_yet_overdue_by_the_grace(db: Session) -> None:
    event_id = outbox_event(db)
    plant_due(db, event_id, timedelta(seconds=10))
    outbox.relay_due(db, grace=30, lease=60, limit=ALL)
    assert due_in(db, event_id) == timedelta(seconds=-10)


def test_relay_takes_an_event_overdue_by_the_grace_and_leases_it(db: Session) -> None:
    event_id = outbox_event(db)
    plant_due(db, event_id, timedelta(seconds=10))
    assert outbox.relay_due(db, grace=5, lease=60, limit=ALL) >= 1
    assert due_in(db, event_id) == timedelta(seconds=60)
    assert outbox_row(db, event_id).status is EventStatus.PENDING


def test_a_leased_event_is_not_relayed_again_before_its_lease_ends(db: Session) -> None:
    event_id = outbox_event(db)
    plant_due(db, event_id, timedelta(seconds=10))
    outbox.relay_due(db, grace=5, lease=60, limit=ALL)
    outbox.relay_due(db, grace=0, lease=999, limit=ALL)
    assert due_in(db, event_id) == timedelta(seconds=60)


def test_relay_leaves_delivered_and_dead_events(db: Session) -> None:
    delivered, dead = delivered_event(db), dead_letter(db)
    for event_id in (delivered, dead):
        plant_due(db, event_id, timedelta(hours=1))
    outbox.relay_due(db, grace=0, lease=60, limit=ALL)
    assert due_in(db, delivered) == due_in(db, dead) == timedelta(hours=-1)


def test_relay_takes_at_most_limit_events_oldest_first(db: Session) -> None:
    older, newer = outbox_event(db), outbox_event(db)
    plant_due(db, older, timedelta(hours=3))
    plant_due(db, newer, timedelta(hours=2))
    # A grace of an hour leaves out every event other tests of this run wrote.
    assert outbox.relay_due(db, grace=3600, lease=60, limit=1) == 1
    assert due_in(db, older) == timedelta(seconds=60)
    assert due_in(db, newer) == timedelta(hours=-2)


def test_relay_skips_an_event_being_delivered(
    db: Session, sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    event_id = committed_event(sessions, published)
    with sessions.begin() as session:
        plant_due(session, event_id, timedelta(hours=1))
    with sessions.begin() as deliverer:
        assert outbox.claim(deliverer, event_id) is not None
        outbox.relay_due(db, grace=30, lease=60, limit=ALL)
    assert due_in(db, event_id) < timedelta(0)


def test_relay_publishes_the_ids_it_took_after_commit(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    event_id = committed_event(sessions, published)
    with sessions.begin() as session:
        plant_due(session, event_id, timedelta(days=365 * 30))
    relayed: list[list[uuid.UUID]] = []
    with outbox.transaction(sessions, relayed.append) as session:
        assert outbox.relay_due(session, grace=30, lease=60, limit=1) == 1
        assert relayed == []
    assert relayed == [[event_id]]
    with sessions() as session:
        assert due_in(session, event_id) > timedelta(seconds=30)


# --- redrive: dead letters back to pending ------------------------------------------------


def test_redrive_revives_a_dead_letter_with_a_fresh_count(db: Session) -> None:
    event_id = outbox_event(db)
    fail(db, event_id)
    fail(db, event_id, retriable=False)
    assert outbox.redrive(db, [event_id]) == [event_id]
    event = outbox_row(db, event_id)
    assert (event.status, event.attempts, event.last_error) == (EventStatus.PENDING, 0, None)
    assert due_in(db, event_id) == timedelta(0)


def test_redrive_of_named_ids_leaves_other_dead_letters(db: Session) -> None:
    named, other = dead_letter(db), dead_letter(db)
    assert outbox.redrive(db, [named]) == [named]
    assert outbox_row(db, other).status is EventStatus.DEAD


def test_redrive_without_ids_revives_every_dead_letter(db: Session) -> None:
    first, second = dead_letter(db), dead_letter(db)
    assert {first, second} <= set(outbox.redrive(db))
    assert count(db, "outbox", "status = 'dead'") == 0


def test_redrive_leaves_events_that_are_not_dead(db: Session) -> None:
    pending, delivered = outbox_event(db), delivered_event(db)
    assert outbox.redrive(db, [pending, delivered]) == []
    assert outbox_row(db, delivered).status is EventStatus.DELIVERED


def test_redrive_publishes_the_revived_ids_after_commit(
    sessions: sessionmaker[Session], published: list[list[uuid.UUID]]
) -> None:
    with sessions.begin() as session:
        event_id = dead_letter(session)
    with outbox.transaction(sessions, published.append) as session:
        assert outbox.redrive(session, [event_id]) == [event_id]
        assert published == []
    assert published == [[event_id]]

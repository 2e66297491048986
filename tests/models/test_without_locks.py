"""The invariants hold on PostgreSQL alone: domain actions raced from threads, no Redis lock.

Each thread runs its own committed transaction on its own connection. Only the refusals
a test names are results; anything else raised in a thread (an InvariantError, a
database error) fails the test.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from models import connections, ledger, transfers
from models.connections import ConnectionRecord
from models.errors import ConflictError, DomainError, NotFoundError
from models.states import Action, Kind, Status
from models.transfers import ReserveRequest, TransferRecord
from tests.conftest import row_count
from tests.models.factories import RULES, funded, linked_connection, reserve_request
from tests.models.stored import entries, postings_balance

T = TypeVar("T")


def linked(sessions: sessionmaker[Session]) -> ConnectionRecord:
    """A connection linked in a committed transaction, for threads to share."""
    with sessions.begin() as session:
        return linked_connection(session, partners_client_id="racer")


def in_tx(sessions: sessionmaker[Session], action: Callable[[Session], T]) -> T:
    with sessions.begin() as session:
        return action(session)


def race(
    count: int, work: Callable[[int], T], *, refusals: tuple[type[DomainError], ...] = ()
) -> list[T | DomainError]:
    """Run ``work(i)`` on ``count`` threads released together; their results, in order.

    A refusal of one of the types given is a result; any other exception is raised here.
    """
    barrier = threading.Barrier(count)

    def one(i: int) -> T | DomainError:
        barrier.wait()
        try:
            return work(i)
        except refusals as refused:
            return refused

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def fund(sessions: sessionmaker[Session], link: ConnectionRecord, quantity: int) -> None:
    with sessions.begin() as session:
        funded(session, link, quantity)


def assert_ledger_ok(sessions: sessionmaker[Session]) -> None:
    report = in_tx(sessions, ledger.check)
    assert report.ok, report.problems


def test_identical_reserves_without_locks_make_one_reservation(
    sessions: sessionmaker[Session],
) -> None:
    link = linked(sessions)
    req = reserve_request(link, Kind.ALLOCATION, 42)
    results = race(
        20, lambda _: in_tx(sessions, lambda s: transfers.reserve(s, request=req, rules=RULES))
    )
    assert all(isinstance(r, TransferRecord) for r in results)
    assert len({r.partners_transfer_id for r in results if isinstance(r, TransferRecord)}) == 1
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=req.transfer_id) == 2
    view = in_tx(sessions, lambda s: connections.account(s, link.partners_connection_id))
    assert view.balances["btc"].pending_in == 42
    assert_ledger_ok(sessions)


def test_deallocations_without_locks_never_overdraw(sessions: sessionmaker[Session]) -> None:
    link = linked(sessions)
    fund(sessions, link, 1000)
    results = race(
        20,
        lambda _: in_tx(
            sessions,
            lambda s: transfers.reserve(
                s, request=reserve_request(link, Kind.DEALLOCATION, 100), rules=RULES
            ),
        ),
    )
    statuses = Counter(r.status.value for r in results if isinstance(r, TransferRecord))
    assert statuses == {"reserved": 10, "rejected": 10}
    view = in_tx(sessions, lambda s: connections.account(s, link.partners_connection_id))
    assert (view.balances["btc"].available, view.balances["btc"].held) == (0, 1000)
    assert_ledger_ok(sessions)


def test_clears_and_releases_without_locks_apply_one_outcome_once(
    sessions: sessionmaker[Session],
) -> None:
    link = linked(sessions)
    req = reserve_request(link, Kind.ALLOCATION, 77)
    in_tx(sessions, lambda s: transfers.reserve(s, request=req, rules=RULES))
    actions = [Action.CLEAR, Action.RELEASE] * 10
    results = race(
        len(actions),
        lambda i: in_tx(
            sessions,
            lambda s: transfers.settle(
                s, kind=Kind.ALLOCATION, transfer_id=req.transfer_id, action=actions[i]
            ),
        ),
        refusals=(ConflictError,),
    )
    finals = {r.status for r in results if isinstance(r, TransferRecord)}
    assert len(finals) == 1
    [final] = finals
    winner = Action.CLEAR if final is Status.CLEARED else Action.RELEASE
    # Every call of the winning action answers the ending; every other one is refused.
    for action, result in zip(actions, results, strict=True):
        if action is winner:
            assert isinstance(result, TransferRecord), result
        else:
            assert isinstance(result, ConflictError), result
            assert result.message == f"Allocation is {final.value}"
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=req.transfer_id) == 4
    assert_ledger_ok(sessions)


_ENDED = {Action.CLEAR: Status.CLEARED, Action.RELEASE: Status.RELEASED}


def test_seeded_random_races_keep_every_invariant(sessions: sessionmaker[Session]) -> None:
    """Many threads doing random things to a few ids and one account.

    Every answer is a record or an expected refusal, each id's ledger entries agree with
    the answers it got and the state it ended in, and the account adds up.
    """
    link = linked(sessions)
    fund(sessions, link, 500)
    rng = random.Random(20261123)
    pool = [reserve_request(link, rng.choice(list(Kind)), rng.randint(1, 200)) for _ in range(8)]
    plan = [(rng.choice(pool), rng.choice(list(Action))) for _ in range(160)]

    def step(i: int) -> TransferRecord:
        req, action = plan[i]
        if action is Action.RESERVE:
            return in_tx(sessions, lambda s: transfers.reserve(s, request=req, rules=RULES))
        return in_tx(
            sessions,
            lambda s: transfers.settle(
                s, kind=req.kind, transfer_id=req.transfer_id, action=action
            ),
        )

    results: list[TransferRecord | DomainError] = []
    for chunk in range(0, len(plan), 16):
        results += race(
            16,
            lambda i, base=chunk: step(base + i),  # type: ignore[misc]
            refusals=(ConflictError, NotFoundError),
        )

    answers: dict[uuid.UUID, Counter[tuple[Action, str]]] = {r.transfer_id: Counter() for r in pool}
    for (req, action), result in zip(plan, results, strict=True):
        if isinstance(result, TransferRecord):
            assert (result.transfer_id, result.kind) == (req.transfer_id, req.kind)
            if action is not Action.RESERVE:
                assert result.status is _ENDED[action], (action, result)
            answer = result.status.value
        else:
            # Reserve is never refused here: no id is reused with other parameters.
            assert action is not Action.RESERVE, result
            expected = {f"{req.kind.label} not found"}
            expected |= {f"{req.kind.label} is {s.value}" for s in _ENDED.values()}
            assert result.message in expected, (action, result)
            answer = result.message
        answers[req.transfer_id][(action, answer)] += 1

    # The seed makes the race reach both refusals; a new seed must too, or it proves less.
    assert {type(r) for r in results} == {TransferRecord, ConflictError, NotFoundError}

    available = 500
    with sessions() as session:
        for req in pool:
            available += _check_one(session, req, answers[req.transfer_id])

    view = in_tx(sessions, lambda s: connections.account(s, link.partners_connection_id))
    balance = view.balances["btc"]
    assert balance.available == available
    assert min(balance.available, balance.pending_in, balance.held) >= 0
    assert_ledger_ok(sessions)


def _check_one(session: Session, req: ReserveRequest, got: Counter[tuple[Action, str]]) -> int:
    """Check one id's entries against the answers it got and its final state.

    Returns how much its postings changed the account's available balance.
    """
    written = entries(session, transfer_id=req.transfer_id)
    assert len(written) % 2 == 0
    assert postings_balance(session, transfer_id=req.transfer_id)
    # Both entries of a posting carry its reason ("allocation reserved", ...).
    by_reason = Counter(e.reason for e in written)
    assert all(n % 2 == 0 for n in by_reason.values()), by_reason
    reserves = by_reason[f"{req.kind.value} reserved"] // 2
    clears = by_reason[f"{req.kind.value} cleared"] // 2
    releases = by_reason[f"{req.kind.value} released"] // 2
    # A posting happened exactly when some call answered with its state.
    assert (reserves > 0) == (got[(Action.RESERVE, "reserved")] > 0), got
    assert (clears > 0) == (got[(Action.CLEAR, "cleared")] > 0), got
    assert (releases > 0) == (got[(Action.RELEASE, "released")] > 0), got
    assert clears <= 1
    if not any(action is Action.RESERVE for action, _ in got):
        assert written == []
        return 0
    final = transfers.get(session, kind=req.kind, transfer_id=req.transfer_id)
    # Each reservation ended at most once, and only the last one may still be open.
    assert reserves == clears + releases + (final.status is Status.RESERVED), final
    assert (clears == 1) == (final.status is Status.CLEARED), final
    if final.status is Status.REJECTED:
        assert final.rejection_reason == transfers.INSUFFICIENT_FUNDS
    if req.kind is Kind.ALLOCATION:
        return req.quantity * clears
    return -req.quantity * (reserves - releases)


def test_racing_links_of_one_connection_with_one_token_both_succeed(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        token = connections.issue_token(
            session, partners_client_id="twin", ttl=timedelta(hours=1)
        ).token
    connection_id, client_id = uuid.uuid4(), uuid.uuid4()
    results = race(
        8,
        lambda _: in_tx(
            sessions,
            lambda s: connections.link(
                s,
                connection_id=connection_id,
                client_id=client_id,
                token=token,
                client_wallet_id=None,
            ),
        ),
    )
    assert all(isinstance(r, ConnectionRecord) for r in results), results
    assert len({r.partners_connection_id for r in results if isinstance(r, ConnectionRecord)}) == 1

"""The invariants hold on PostgreSQL alone: domain actions raced from threads, no Redis lock."""

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
from models.errors import DomainError
from models.states import Action, Kind
from models.transfers import ReserveRequest, Rules, TransferRecord
from tests.conftest import row_count

RULES = Rules(currencies=frozenset({"btc"}))
T = TypeVar("T")


def linked(sessions: sessionmaker[Session]) -> ConnectionRecord:
    with sessions.begin() as session:
        issued = connections.issue_token(
            session, partners_client_id="racer", ttl=timedelta(hours=1)
        )
        return connections.link(
            session,
            connection_id=uuid.uuid4(),
            client_id=uuid.uuid4(),
            token=issued.token,
            client_wallet_id=None,
        )


def request(
    kind: Kind, link: ConnectionRecord, quantity: int, transfer_id: uuid.UUID | None = None
) -> ReserveRequest:
    return ReserveRequest(
        kind=kind,
        transfer_id=transfer_id or uuid.uuid4(),
        currency="btc",
        quantity=quantity,
        client_id=link.client_id,
        connection_id=link.connection_id,
        partners_client_id=link.partners_client_id,
        partners_connection_id=link.partners_connection_id,
    )


def in_tx(sessions: sessionmaker[Session], action: Callable[[Session], T]) -> T:
    with sessions.begin() as session:
        return action(session)


def race(count: int, work: Callable[[int], T]) -> list[T | Exception]:
    """Run ``work(i)`` on ``count`` threads released together."""
    barrier = threading.Barrier(count)

    def one(i: int) -> T | Exception:
        barrier.wait()
        try:
            return work(i)
        except DomainError as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def fund(sessions: sessionmaker[Session], link: ConnectionRecord, quantity: int) -> None:
    alloc = request(Kind.ALLOCATION, link, quantity)
    in_tx(sessions, lambda s: transfers.reserve(s, request=alloc, rules=RULES))
    in_tx(
        sessions,
        lambda s: transfers.settle(
            s, kind=Kind.ALLOCATION, transfer_id=alloc.transfer_id, action=Action.CLEAR
        ),
    )


def assert_ledger_ok(sessions: sessionmaker[Session]) -> None:
    report = in_tx(sessions, ledger.check)
    assert report.ok, report.problems


def test_identical_reserves_without_locks_make_one_reservation(
    sessions: sessionmaker[Session],
) -> None:
    link = linked(sessions)
    req = request(Kind.ALLOCATION, link, 42)
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
                s, request=request(Kind.DEALLOCATION, link, 100), rules=RULES
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
    req = request(Kind.ALLOCATION, link, 77)
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
    )
    finals = {r.status for r in results if isinstance(r, TransferRecord)}
    assert len(finals) == 1
    conflicts = [r for r in results if isinstance(r, DomainError)]
    assert len(conflicts) == 10
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=req.transfer_id) == 4
    assert_ledger_ok(sessions)


def test_seeded_random_races_keep_every_invariant(sessions: sessionmaker[Session]) -> None:
    """Many threads doing random things to a few ids and one account; the ledger must balance."""
    link = linked(sessions)
    fund(sessions, link, 500)
    rng = random.Random(20261123)
    pool = [request(rng.choice(list(Kind)), link, rng.randint(1, 200)) for _ in range(8)]
    plan = [(rng.choice(pool), rng.choice(list(Action))) for _ in range(160)]

    def step(i: int) -> object:
        req, action = plan[i]
        if action is Action.RESERVE:
            return in_tx(sessions, lambda s: transfers.reserve(s, request=req, rules=RULES))
        return in_tx(
            sessions,
            lambda s: transfers.settle(
                s, kind=req.kind, transfer_id=req.transfer_id, action=action
            ),
        )

    for chunk in range(0, len(plan), 16):
        race(16, lambda i, base=chunk: step(base + i))  # type: ignore[misc]
    view = in_tx(sessions, lambda s: connections.account(s, link.partners_connection_id))
    balance = view.balances["btc"]
    assert min(balance.available, balance.pending_in, balance.held) >= 0
    assert_ledger_ok(sessions)


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

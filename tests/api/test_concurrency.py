"""SPEC §3.6 under real concurrency: real HTTP connections to ``oes-partner serve``."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from cli.devkeys import sign
from models import ledger
from tests.conftest import BitGo, Keys, LiveServer, row_count


@pytest.fixture
def live(live_server: LiveServer, keys: Keys) -> BitGo:
    return BitGo(httpx.Client(base_url=live_server.url, timeout=30), keys.private)


async def storm(
    url: str, private: bytes, calls: list[tuple[str, str, Any]]
) -> list[httpx.Response]:
    """Fire every call at once, each on its own connection, tokens signed beforehand."""
    signed = [(m, p, b, sign(private)) for m, p, b in calls]
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        start = asyncio.Event()

        async def one(method: str, path: str, body: Any, token: str) -> httpx.Response:
            await start.wait()
            return await client.request(
                method, path, json=body, headers={"X-BitGo-Signature": token}
            )

        tasks = [asyncio.create_task(one(*c)) for c in signed]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))


def run_storm(live: BitGo, calls: list[tuple[str, str, Any]]) -> list[httpx.Response]:
    return asyncio.run(storm(str(live.http.base_url), live.private, calls))


def assert_ledger_ok(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        report = ledger.check(session)
    assert report.ok, report.problems


def test_fifty_identical_reserves_give_fifty_identical_answers_and_one_reservation(
    live: BitGo, sessions: sessionmaker[Session]
) -> None:
    link = live.link()
    transfer_id = str(uuid.uuid4())
    body = link.body("allocation", transfer_id, "12345")
    answers = run_storm(live, [("POST", "/bitgo/v1/allocations", body)] * 50)
    assert [a.status_code for a in answers] == [200] * 50
    assert len({a.text for a in answers}) == 1
    assert answers[0].json()["status"] == "reserved"
    assert row_count(sessions, "transfers", "id = :id", id=transfer_id) == 1
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=transfer_id) == 2
    assert live.balances(link) == (0, 12345, 0)
    assert_ledger_ok(sessions)


@pytest.mark.parametrize("kind", ["allocation", "deallocation"])
def test_racing_clears_and_releases_leave_exactly_one_outcome_applied_once(
    live: BitGo, sessions: sessionmaker[Session], kind: str
) -> None:
    link = live.link()
    if kind == "deallocation":
        live.fund(link, 500)
    transfer_id = str(uuid.uuid4())
    assert live.reserve(kind, link, transfer_id, "500").json()["status"] == "reserved"
    calls = [
        ("PUT", f"/bitgo/v1/{kind}/{transfer_id}/{action}", None)
        for _ in range(15)
        for action in ("clear", "release")
    ]
    answers = run_storm(live, calls)
    final = live.status(kind, transfer_id).json()["status"]
    winner = {"cleared": "clear", "released": "release"}[final]
    for (_, path, _), answer in zip(calls, answers, strict=True):
        if path.endswith(f"/{winner}"):
            assert answer.status_code == 200
            assert answer.json()["status"] == final
        else:
            assert answer.status_code == 409
            assert answer.json() == {"error": f"{kind.capitalize()} is {final}"}
    assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=transfer_id) == 4
    expected = {
        ("allocation", "cleared"): (500, 0, 0),
        ("allocation", "released"): (0, 0, 0),
        ("deallocation", "cleared"): (0, 0, 0),
        ("deallocation", "released"): (500, 0, 0),
    }[(kind, final)]
    assert live.balances(link) == expected
    assert_ledger_ok(sessions)


def test_deallocations_asking_twice_the_balance_reserve_only_what_fits(
    live: BitGo, sessions: sessionmaker[Session]
) -> None:
    link = live.link()
    live.fund(link, 1000)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    calls = [("POST", "/bitgo/v1/deallocations", link.body("deallocation", i, "100")) for i in ids]
    answers = run_storm(live, calls)
    assert all(a.status_code == 200 for a in answers)
    outcomes = Counter(a.json()["status"] for a in answers)
    assert outcomes == {"reserved": 10, "rejected": 10}
    reasons = {a.json().get("rejectionReason") for a in answers if a.json()["status"] == "rejected"}
    assert reasons == {"Insufficient funds"}
    assert live.balances(link) == (0, 0, 1000)
    assert_ledger_ok(sessions)


def test_reserves_racing_their_own_clears_end_consistent(
    live: BitGo, sessions: sessionmaker[Session]
) -> None:
    link = live.link()
    ids = [str(uuid.uuid4()) for _ in range(15)]
    calls: list[tuple[str, str, Any]] = []
    for transfer_id in ids:
        calls.append(("PUT", f"/bitgo/v1/allocation/{transfer_id}/clear", None))
        calls.append(("POST", "/bitgo/v1/allocations", link.body("allocation", transfer_id, "10")))
    answers = run_storm(live, calls)
    cleared = 0
    for index, transfer_id in enumerate(ids):
        clear, reserve = answers[2 * index], answers[2 * index + 1]
        assert reserve.status_code == 200
        assert reserve.json()["status"] in ("reserved", "cleared")
        final = live.status("allocation", transfer_id).json()["status"]
        if clear.status_code == 200:
            assert final == "cleared"
            cleared += 1
        else:
            assert clear.status_code == 404
            assert final == "reserved"
    assert live.balances(link) == (10 * cleared, 10 * (len(ids) - cleared), 0)
    assert_ledger_ok(sessions)


def test_a_lock_held_past_the_wait_answers_request_in_progress(
    live: BitGo, live_server: LiveServer, redis_url: str
) -> None:
    import redis

    link = live.link()
    transfer_id = str(uuid.uuid4())
    client = redis.Redis.from_url(redis_url)
    client.set(f"oes:lock:transfer:{transfer_id}", b"someone-else", px=20_000)
    try:
        answer = live.reserve("allocation", link, transfer_id, "1")
    finally:
        client.delete(f"oes:lock:transfer:{transfer_id}")
    assert answer.status_code == 409
    assert answer.json() == {"error": "Request in progress"}
    assert live.status("allocation", transfer_id).status_code == 404

"""Stale reservations converged with BitGo's view; balances compared with BitGo's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from models import ledger, reconciliation
from tests.conftest import Link
from tests.stubs import Seen
from tests.workers.conftest import Stack, eventually

ENTERPRISE = "/api/network/v1/enterprises/enterprise-1/partners"


@pytest.fixture
def bitgo_view(stack: Stack) -> Iterator[dict[str, dict[str, Any]]]:
    """BitGo's records by id; ids not in it are 404 there. Balances under "balances"."""
    view: dict[str, dict[str, Any]] = {}

    def answer(seen: Seen) -> tuple[int, Any]:
        assert seen.headers["authorization"] == "Bearer test-access-token"
        if seen.path == f"{ENTERPRISE}/balances":
            return 200, {"networkBalances": view.get("balances", {})}
        prefix = f"{ENTERPRISE}/allocations/"
        if seen.path.startswith(prefix) and seen.path[len(prefix) :] in view:
            return 200, view[seen.path[len(prefix) :]]
        return 404, {"error": "allocation not found"}

    stack.bitgo_api.handler = answer
    yield view
    stack.bitgo_api.handler = lambda seen: (404, {"error": "not found"})


def _age(stack: Stack, *transfer_ids: str) -> None:
    """Make reservations look older than OES_STALE_AFTER."""
    with stack.sessions.begin() as session:
        session.execute(
            text(
                "UPDATE transfers SET updated_at = now() - interval '1 hour' "
                "WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": list(transfer_ids)},
        )


def _status(stack: Stack, transfer_id: str) -> str:
    with stack.sessions() as session:
        return str(
            session.execute(
                text("SELECT status FROM transfers WHERE id = :id"), {"id": transfer_id}
            ).scalar_one()
        )


def _reserve(stack: Stack, link: Link, kind: str, quantity: int) -> str:
    transfer_id = str(uuid.uuid4())
    answer = stack.bitgo.reserve(kind, link, transfer_id, str(quantity))
    assert answer.json()["status"] == "reserved", answer.text
    return transfer_id


def test_stale_reservations_converge_with_bitgo(
    stack: Stack, bitgo_view: dict[str, dict[str, Any]]
) -> None:
    link = stack.bitgo.link()
    stack.bitgo.fund(link, 1000)
    cleared_there = _reserve(stack, link, "allocation", 100)
    released_there = _reserve(stack, link, "allocation", 200)
    unknown_there = _reserve(stack, link, "allocation", 300)
    reserved_there = _reserve(stack, link, "allocation", 400)
    withdrawn_there = _reserve(stack, link, "deallocation", 50)
    kept_there = _reserve(stack, link, "deallocation", 60)
    fresh = _reserve(stack, link, "allocation", 7)  # not stale: left alone whatever BitGo says
    bitgo_view[cleared_there] = {"id": cleared_there, "type": "allocation", "status": "cleared"}
    bitgo_view[released_there] = {"id": released_there, "type": "allocation", "status": "released"}
    bitgo_view[reserved_there] = {"id": reserved_there, "type": "allocation", "status": "reserved"}
    bitgo_view[withdrawn_there] = {
        "id": withdrawn_there,
        "type": "deallocation",
        "status": "cleared",
    }
    bitgo_view[kept_there] = {"id": kept_there, "type": "deallocation", "status": "released"}
    bitgo_view[fresh] = {"id": fresh, "type": "allocation", "status": "cleared"}
    _age(
        stack,
        cleared_there,
        released_there,
        unknown_there,
        reserved_there,
        withdrawn_there,
        kept_there,
    )
    assert stack.bitgo.balances(link) == (890, 1007, 110)

    runs = len(stack.runs("workers.remediation.sweep_stale_transfers"))
    stack.call("workers.remediation.sweep_stale_transfers", 2)  # pages of two
    summary = stack.wait_run("workers.remediation.sweep_stale_transfers", runs)

    assert _status(stack, cleared_there) == "cleared"
    assert _status(stack, released_there) == "released"
    assert _status(stack, unknown_there) == "released"
    assert _status(stack, reserved_there) == "reserved"
    assert _status(stack, withdrawn_there) == "cleared"
    assert _status(stack, kept_there) == "released"
    assert _status(stack, fresh) == "reserved"
    # available: 1000 - 50 - 60 + 100 (cleared in) + 60 (deallocation released back)
    assert stack.bitgo.balances(link) == (1050, 400 + 7, 0)
    assert summary == {"examined": 6, "cleared": 2, "released": 3, "still_reserved": 1}
    with stack.sessions() as session:
        report = ledger.check(session)
    assert report.ok, report.problems

    # A second sweep finds only what BitGo still holds reserved, and changes nothing.
    stack.call("workers.remediation.sweep_stale_transfers")
    again = stack.wait_run("workers.remediation.sweep_stale_transfers", runs + 1)
    assert again == {"examined": 1, "still_reserved": 1}
    assert stack.bitgo.balances(link) == (1050, 407, 0)


def test_reconcile_reports_drift_and_changes_nothing(
    stack: Stack, bitgo_view: dict[str, dict[str, Any]]
) -> None:
    with stack.sessions() as session:
        agreed = reconciliation.expected(session)
    # BitGo agrees with every other account, and sees this one 5 short.
    network: dict[str, Any] = {}
    for (connection_id, currency), total in agreed.items():
        network.setdefault(connection_id, {"balances": {}})["balances"][currency] = {
            "available": str(total),
            "held": "0",
        }
    link = stack.bitgo.link()
    stack.bitgo.fund(link, 40)
    network[link.connection_id] = {"balances": {"btc": {"available": "30", "held": "5"}}}
    bitgo_view["balances"] = network
    with stack.sessions() as session:
        entries_before = session.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()

    runs = len(stack.runs("workers.remediation.reconcile_balances"))
    stack.call("workers.remediation.reconcile_balances")
    summary = stack.wait_run("workers.remediation.reconcile_balances", runs)

    assert summary["drifts"] == 1
    assert stack.bitgo.balances(link) == (40, 0, 0)
    with stack.sessions() as session:
        entries_after = session.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
    assert entries_after == entries_before
    assert f"connection {link.connection_id} btc: expected 40 at BitGo, BitGo reports 35" in (
        stack.worker.log.read_text()
    )
    metrics = stack.bitgo.http.get("/metrics").text
    assert "oes_balance_drifts 1.0" in metrics
    assert 'oes_task_last_run_timestamp_seconds{task="workers.remediation.reconcile_balances"}' in (
        metrics
    )


def test_a_broken_invariant_stops_the_sweep_loudly_and_changes_nothing(
    stack: Stack, bitgo_view: dict[str, dict[str, Any]]
) -> None:
    link = stack.bitgo.link()
    transfer_id = _reserve(stack, link, "allocation", 100)
    bitgo_view[transfer_id] = {"id": transfer_id, "type": "allocation", "status": "cleared"}
    _age(stack, transfer_id)
    planted = "connection_pk = (SELECT id FROM connections WHERE connection_id = :c)"
    with stack.sessions.begin() as session:  # pending_in no longer covers the reservation
        session.execute(
            text(f"UPDATE accounts SET pending_in = 0 WHERE {planted}"), {"c": link.connection_id}
        )
    try:
        stack.call("workers.remediation.sweep_stale_transfers")
        eventually(
            lambda: b'"invariant_broken"' in stack.worker.log.read_bytes(),
            what="the invariant_broken error line",
        )
        line = next(
            json.loads(raw)
            for raw in stack.worker.log.read_bytes().splitlines()
            if b'"invariant_broken"' in raw
        )
        assert line["level"] == "error"
        assert "balances cannot cover it" in line["error"]
        assert _status(stack, transfer_id) == "reserved"
    finally:
        with stack.sessions.begin() as session:
            session.execute(
                text(f"UPDATE accounts SET pending_in = 100 WHERE {planted}"),
                {"c": link.connection_id},
            )

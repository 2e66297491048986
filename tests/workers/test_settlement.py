"""Settlement: trades netted, signed through Express, the same body posted until final."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import Link
from tests.stubs import Seen
from tests.workers.conftest import Stack, eventually

SETTLEMENTS = "/api/network/v1/enterprises/enterprise-1/partners/settlements"
SIGN = "/api/v2/ofc/signPayload"
RUN = "workers.settlement.run_settlement"


@dataclass
class BitGoSettlements:
    """BitGo's settlement route answering from a script, and Express signing payloads."""

    script: list[tuple[int, Any]] = field(default_factory=list)
    posted: list[bytes] = field(default_factory=list)
    signed: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, seen: Seen) -> tuple[int, Any]:
        if seen.path == SIGN:
            request = seen.json()
            self.signed.append(request)
            digest = hashlib.sha256(request["payload"].encode()).hexdigest()
            return 200, {"payload": request["payload"], "signature": f"sig-{digest}"}
        if seen.path == SETTLEMENTS and seen.method == "POST":
            self.posted.append(seen.body)
            return self.script.pop(0) if self.script else (500, {"error": "script ran out"})
        return 404, {"error": "not found"}


@pytest.fixture
def settlements_api(stack: Stack) -> Iterator[BitGoSettlements]:
    api = BitGoSettlements()
    stack.bitgo_api.handler = api
    yield api
    stack.bitgo_api.handler = lambda seen: (404, {"error": "not found"})


def _trade(stack: Stack, link: Link, deltas: dict[str, str]) -> str:
    external_id = f"trade-{uuid.uuid4()}"
    answer = stack.bitgo.http.post(
        "/internal/v1/trades",
        json={
            "externalId": external_id,
            "partnersConnectionId": link.partners_connection_id,
            "deltas": deltas,
        },
        headers=stack.bitgo.internal(),
    )
    assert answer.status_code == 200, answer.text
    return external_id


def _settled(stack: Stack, trade_ids: list[str]) -> list[bool]:
    with stack.sessions() as session:
        rows = session.execute(
            text("SELECT external_id, settled_at FROM trades WHERE external_id = ANY(:ids)"),
            {"ids": trade_ids},
        )
        settled = {r.external_id: r.settled_at is not None for r in rows}
    return [settled[i] for i in trade_ids]


def _settlement(stack: Stack, external_id: str) -> Any:
    with stack.sessions() as session:
        return session.execute(
            text("SELECT * FROM settlements WHERE external_id = :id"), {"id": external_id}
        ).one()


def test_a_failed_settlement_is_reposted_identically_and_trades_settle_once(
    stack: Stack, settlements_api: BitGoSettlements
) -> None:
    alice, bob = stack.bitgo.link(), stack.bitgo.link()
    stack.bitgo.fund(alice, 1000)
    stack.bitgo.fund(bob, 1000)
    trades = [
        _trade(stack, alice, {"btc": "70"}),
        _trade(stack, alice, {"btc": "-20", "eth": "5"}),
        _trade(stack, bob, {"btc": "-30"}),
        _trade(stack, bob, {"btc": "30"}),  # bob nets to zero: not in settlementAmounts
    ]
    settlements_api.script = [
        (200, {"settlement": {"id": "bitgo-s1", "status": "failed", "reason": "insufficient"}}),
        (200, {"settlement": {"id": "bitgo-s1", "status": "completed"}}),
    ]
    runs = len(stack.runs(RUN))
    stack.call(RUN)
    stack.wait_run(RUN, runs)
    eventually(lambda: all(_settled(stack, trades)), what="the trades to be settled")

    assert len(settlements_api.posted) == 2
    first, second = settlements_api.posted
    assert first == second
    body = json.loads(first)
    amounts = body["settlementAmounts"]
    assert amounts[alice.connection_id] == {"btc": "50", "eth": "5"}
    assert bob.connection_id not in amounts
    assert json.loads(body["payload"]) == {
        k: body[k] for k in ("externalId", "settlementAmounts", "nonce", "notes")
    }
    (signed,) = settlements_api.signed
    assert signed == {"walletId": "trading-wallet-1", "payload": body["payload"]}
    assert body["signature"] == "sig-" + hashlib.sha256(body["payload"].encode()).hexdigest()
    settlement = _settlement(stack, body["externalId"])
    assert settlement.status == "completed"
    assert settlement.bitgo_id == "bitgo-s1"
    assert stack.outbox("settlement.completed", str(settlement.id))

    # Nothing is left to settle: the next run posts nothing.
    stack.call(RUN)
    assert stack.wait_run(RUN, runs + 1) == {"outcome": "nothing to settle"}
    assert len(settlements_api.posted) == 2


def test_a_conflict_from_bitgo_stops_the_settlement_and_reports_it(
    stack: Stack, settlements_api: BitGoSettlements
) -> None:
    link = stack.bitgo.link()
    trade = _trade(stack, link, {"usdc": "125"})
    settlements_api.script = [(409, {"error": "externalId already used with another body"})]
    runs = len(stack.runs(RUN))
    stack.call(RUN)
    summary = stack.wait_run(RUN, runs)

    assert summary["outcome"] == "conflict"
    assert summary["error"] == "externalId already used with another body"
    settlement = _settlement(stack, summary["settlement"])
    assert settlement.status == "conflict"
    assert "409" in settlement.reason
    assert _settled(stack, [trade]) == [False]
    assert '"settlement_conflict"' in stack.worker.log.read_text()
    time.sleep(1)  # a retry would come within OES_SETTLEMENT_RETRY (0.3 s); none may
    assert len(settlements_api.posted) == 1


def test_a_rejected_settlement_returns_its_trades_to_the_next_one(
    stack: Stack, settlements_api: BitGoSettlements
) -> None:
    link = stack.bitgo.link()
    trade = _trade(stack, link, {"eth": "9"})
    settlements_api.script = [
        (200, {"id": "bitgo-r1", "status": "rejected", "reason": "client account closed"}),
        (200, {"id": "bitgo-r2", "status": "completed"}),
    ]
    runs = len(stack.runs(RUN))
    stack.call(RUN)
    assert stack.wait_run(RUN, runs)["outcome"] == "rejected"
    assert _settled(stack, [trade]) == [False]
    stack.call(RUN)
    assert stack.wait_run(RUN, runs + 1)["outcome"] == "completed"

    rejected, completed = (json.loads(b) for b in settlements_api.posted)
    assert rejected["externalId"] != completed["externalId"]
    assert completed["settlementAmounts"][link.connection_id] == {"eth": "9"}
    assert _settled(stack, [trade]) == [True]
    assert _settlement(stack, rejected["externalId"]).reason == "client account closed"


@dataclass
class RefusingOne(BitGoSettlements):
    """BitGo refusing every settlement that names one connection, completing the others."""

    refused: str = ""

    def __call__(self, seen: Seen) -> tuple[int, Any]:
        if seen.path == SETTLEMENTS and seen.method == "POST":
            self.posted.append(seen.body)
            amounts = json.loads(seen.body)["settlementAmounts"]
            status = "rejected" if self.refused in amounts else "completed"
            return 200, {"id": f"bitgo-{len(self.posted)}", "status": status}
        return super().__call__(seen)


def test_a_connection_bitgo_refuses_does_not_hold_up_the_others(stack: Stack) -> None:
    bad, good = stack.bitgo.link(), stack.bitgo.link()  # the refused one's turn comes first
    api = RefusingOne(refused=bad.connection_id)
    stack.bitgo_api.handler = api
    try:
        refused = _trade(stack, bad, {"eth": "4"})
        settled_good = _trade(stack, good, {"eth": "9"})
        runs = len(stack.runs(RUN))
        stack.call(RUN)
        assert stack.wait_run(RUN, runs)["outcome"] == "rejected"  # both, netted together
        stack.call(RUN)
        stack.wait_run(RUN, runs + 1)
        assert _settled(stack, [settled_good, refused]) == [True, False]
        together, *alone = (json.loads(b)["settlementAmounts"] for b in api.posted)
        assert set(together) == {good.connection_id, bad.connection_id}
        assert all(len(amounts) == 1 for amounts in alone)
    finally:
        stack.bitgo_api.handler = lambda seen: (404, {"error": "not found"})

"""Platform hooks delivered by a real worker: once, signed, retried, dead-lettered, re-driven."""

from __future__ import annotations

import itertools
import time
import uuid

from tests.workers.conftest import Stack, eventually


def _cleared_allocation(stack: Stack) -> str:
    link = stack.bitgo.link()
    transfer_id = str(uuid.uuid4())
    assert stack.bitgo.reserve("allocation", link, transfer_id, "1000").status_code == 200
    assert stack.bitgo.put("allocation", transfer_id, "clear").status_code == 200
    return transfer_id


def _status(stack: Stack, topic: str, subject: str) -> str | None:
    rows = stack.outbox(topic, subject)
    return rows[0].status if rows else None


def test_a_cleared_allocation_reaches_the_platform_once_signed(stack: Stack) -> None:
    transfer_id = _cleared_allocation(stack)
    eventually(
        lambda: _status(stack, "allocation.cleared", transfer_id) == "delivered",
        what="the cleared event to be delivered",
    )
    # A relay pass afterwards must not deliver it again.
    runs = len(stack.runs("workers.remediation.relay_outbox"))
    stack.call("workers.remediation.relay_outbox")
    stack.wait_run("workers.remediation.relay_outbox", runs)
    time.sleep(0.5)
    cleared = [
        i
        for i in stack.platform.ids_for(transfer_id)
        if stack.platform.events[i]["type"] == "allocation.cleared"
    ]
    assert len(cleared) == 1
    assert stack.platform.received[cleared[0]] == 1
    assert stack.platform.applied[cleared[0]] == 1
    assert stack.platform.bad_signatures == 0
    event = stack.platform.events[cleared[0]]
    assert event["data"]["status"] == "cleared"
    assert event["data"]["quantity"] == "1000"


def test_a_webhook_that_stays_down_is_retried_with_growing_delays_then_dead_lettered(
    stack: Stack,
) -> None:
    link = stack.bitgo.link()
    transfer_id = str(uuid.uuid4())
    stack.platform.failing.add(transfer_id)
    assert stack.bitgo.reserve("allocation", link, transfer_id, "5").status_code == 200
    eventually(
        lambda: _status(stack, "allocation.reserved", transfer_id) == "dead",
        timeout=30,
        what="the event to be dead-lettered",
    )
    (row,) = stack.outbox("allocation.reserved", transfer_id)
    assert row.attempts == 4  # OES_HOOK_MAX_ATTEMPTS
    assert "HTTP 503" in row.last_error
    times = stack.platform.times[transfer_id]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Equal jitter on 0.4 s doubling: each wait is at least half its nominal delay.
    for gap, floor in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert gap >= floor - 0.05, gaps
    assert gaps[2] > gaps[0], gaps

    # The platform recovers; an operator re-drives the dead letter from the command line.
    stack.platform.failing.discard(transfer_id)
    stack.call("workers.hooks.redrive_dead", [str(row.id)])
    eventually(
        lambda: _status(stack, "allocation.reserved", transfer_id) == "delivered",
        what="the re-driven event to be delivered",
    )
    assert stack.platform.applied[str(row.id)] == 1


def test_a_refusing_webhook_dead_letters_at_once(stack: Stack) -> None:
    link = stack.bitgo.link()
    transfer_id = str(uuid.uuid4())
    stack.platform.refusing.add(transfer_id)
    assert stack.bitgo.reserve("allocation", link, transfer_id, "5").status_code == 200
    eventually(
        lambda: _status(stack, "allocation.reserved", transfer_id) == "dead",
        what="the refused event to be dead-lettered",
    )
    (row,) = stack.outbox("allocation.reserved", transfer_id)
    assert row.attempts == 1
    assert "HTTP 400" in row.last_error


def test_a_trade_event_is_delivered(stack: Stack) -> None:
    link = stack.bitgo.link()
    external_id = f"trade-{uuid.uuid4()}"
    answer = stack.bitgo.http.post(
        "/internal/v1/trades",
        json={
            "externalId": external_id,
            "partnersConnectionId": link.partners_connection_id,
            "deltas": {"btc": "70"},
        },
        headers=stack.bitgo.internal(),
    )
    assert answer.status_code == 200, answer.text
    eventually(
        lambda: _status(stack, "trade.applied", external_id) == "delivered",
        what="the trade event to be delivered",
    )
    (event_id,) = stack.platform.ids_for(external_id)
    assert stack.platform.events[event_id]["data"]["deltas"] == {"btc": "70"}

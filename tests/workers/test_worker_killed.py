"""A worker SIGKILLed mid-delivery loses nothing and applies nothing twice."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from tests.workers.conftest import Stack, eventually


def test_a_worker_killed_while_the_webhook_stalls_delivers_once_after_restart(
    stack: Stack,
) -> None:
    link = stack.bitgo.link()
    transfer_id = str(uuid.uuid4())
    stack.platform.stalled.clear()
    stack.platform.release.clear()
    stack.platform.stall_on.add(transfer_id)
    assert stack.bitgo.reserve("allocation", link, transfer_id, "9").status_code == 200

    # The platform has the request (and has applied it) but has not answered yet.
    assert stack.platform.stalled.wait(20), "the delivery never reached the platform"
    stack.worker.kill()
    (row,) = stack.outbox("allocation.reserved", transfer_id)
    assert row.status == "pending"
    assert row.attempts == 0

    stack.platform.release.set()  # the old connection is gone; let the stalled handler end
    stack.worker.start()
    # The killed worker's message is unacked until the visibility timeout; the relay
    # sweep is what finds the event, as beat would run it.
    stack.call("workers.remediation.relay_outbox")
    eventually(
        lambda: stack.outbox("allocation.reserved", transfer_id)[0].status == "delivered",
        what="the event to be delivered by the new worker",
    )
    event_id = str(row.id)
    assert stack.platform.received[event_id] == 2  # once to the dead worker, once after
    assert stack.platform.applied[event_id] == 1
    # Nothing stays undelivered: one more relay pass leaves no event pending.
    stack.call("workers.remediation.relay_outbox")
    eventually(lambda: _pending(stack) == 0, what="nothing left pending")


def _pending(stack: Stack) -> int:
    with stack.sessions() as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM outbox WHERE status = 'pending'")
            ).scalar_one()
        )

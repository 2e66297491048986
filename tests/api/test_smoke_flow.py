"""A first allocation through the gateway, end to end in-process."""

from __future__ import annotations

import uuid

from tests.conftest import BitGo, Link


def test_allocation_reserved_then_cleared_credits_available(bitgo: BitGo, link: Link) -> None:
    transfer_id = str(uuid.uuid4())
    reserved = bitgo.reserve("allocation", link, transfer_id, "1000")
    assert reserved.status_code == 200, reserved.text
    assert reserved.json()["status"] == "reserved"
    assert bitgo.balances(link) == (0, 1000, 0)
    cleared = bitgo.put("allocation", transfer_id, "clear")
    assert cleared.json()["status"] == "cleared"
    assert bitgo.balances(link) == (1000, 0, 0)

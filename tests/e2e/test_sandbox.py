"""End to end through the sandbox: the gateway and BitGo agree on every id and balance."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import INTERNAL_TOKEN
from tests.e2e.conftest import System
from tests.workers.conftest import eventually


def _balance(
    system: System, partners_connection_id: str, currency: str = "btc"
) -> tuple[int, int, int]:
    """(available, pendingIn, held) of the account at the gateway."""
    answer = system.gateway.get(
        f"/internal/v1/accounts/{partners_connection_id}",
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    b = answer.json()["balances"].get(currency, {"available": "0", "pendingIn": "0", "held": "0"})
    return int(b["available"]), int(b["pendingIn"]), int(b["held"])


def _bitgo_balance(system: System, connection_id: str, currency: str = "btc") -> tuple[int, int]:
    entry = system.partner("/balances")["networkBalances"][connection_id]["balances"]
    b = entry.get(currency, {"available": "0", "held": "0"})
    return int(b["available"]), int(b["held"])


def test_a_full_cycle_allocate_trade_deallocate_settle(system: System) -> None:
    client = system.client()
    connection = client.connect(f"alice-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]

    allocated = client.transfer("allocation", cid, 1000)
    assert allocated.status_code == 200, allocated.text
    record = allocated.json()["allocation"]
    assert record["status"] == "cleared"
    assert record["retriable"] is False
    assert set(record) >= {
        "id",
        "amount",
        "connectionId",
        "clientExternalId",
        "partnerExternalId",
        "initiatedBy",
        "createdAt",
        "updatedAt",
        "retriable",
        "status",
    }
    # Optional fields with nothing in them are left out, as BitGo does, never null.
    assert "reason" not in record
    assert "notes" not in record
    assert None not in record.values()
    assert record["partnerExternalId"]  # the gateway's partnersAllocationId
    assert _balance(system, pcid) == (1000, 0, 0)
    assert _bitgo_balance(system, cid) == (1000, 0)

    trade = system.gateway.post(
        "/internal/v1/trades",
        json={
            "externalId": f"t-{uuid.uuid4()}",
            "partnersConnectionId": pcid,
            "deltas": {"btc": "-300"},
        },
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
    )
    assert trade.status_code == 200, trade.text

    too_much = client.transfer("deallocation", cid, 5000)
    assert too_much.status_code == 422
    assert too_much.json()["allocation"]["status"] == "released"
    assert too_much.json()["allocation"]["reason"] == "Insufficient funds"
    assert too_much.json()["error"] == "Insufficient funds"
    assert _balance(system, pcid) == (700, 0, 0)

    within = client.transfer("deallocation", cid, 200)
    assert within.status_code == 200, within.text
    assert within.json()["allocation"]["status"] == "cleared"
    assert _balance(system, pcid) == (500, 0, 0)

    summary = system.run("workers.settlement.run_settlement")
    assert summary["outcome"] == "completed", summary
    (settlement,) = [
        s
        for s in system.sandbox.get("/sandbox/settlements").json()["settlements"]
        if cid in s["settlementAmounts"]
    ]
    assert settlement["status"] == "completed"
    assert settlement["settlementAmounts"][cid] == {"btc": "-300"}
    assert _bitgo_balance(system, cid) == (500, 0)
    system.assert_agree()


def test_an_answer_lost_in_a_timeout_is_retried_by_the_client_and_clears(system: System) -> None:
    client = system.client()
    connection = client.connect(f"bob-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    external, nonce = str(uuid.uuid4()), uuid.uuid4().hex

    first = client.transfer(
        "allocation", cid, 70, external_id=external, nonce=nonce, fault="timeout"
    )
    assert first.status_code == 500
    assert first.json()["allocation"]["status"] == "reserved"
    assert first.json()["allocation"]["retriable"] is True
    transfer_id = first.json()["allocation"]["id"]
    assert system.gateway_status(transfer_id) == "reserved"  # the gateway did act
    assert _balance(system, pcid) == (0, 70, 0)  # pending, not yet available

    again = client.transfer("allocation", cid, 70, external_id=external, nonce=nonce)
    assert again.status_code == 200, again.text
    assert again.json()["allocation"]["id"] == transfer_id
    assert "reason" not in again.json()["allocation"]
    assert again.json()["allocation"]["retriable"] is False
    assert system.gateway_status(transfer_id) == "cleared"
    assert _balance(system, pcid) == (70, 0, 0)
    system.assert_agree()


def test_duplicated_and_delayed_calls_move_money_once(system: System) -> None:
    client = system.client()
    connection = client.connect(f"carol-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    assert client.transfer("allocation", cid, 400, fault="duplicate").status_code == 200
    started = time.monotonic()
    assert client.transfer("deallocation", cid, 150, fault="delay:1").status_code == 200
    assert time.monotonic() - started >= 1
    assert client.transfer("deallocation", cid, 50, fault="duplicate").status_code == 200
    assert _balance(system, pcid) == (200, 0, 0)
    assert _bitgo_balance(system, cid) == (200, 0)
    system.assert_agree()


def test_a_clear_never_sent_is_converged_by_the_stale_sweep(system: System) -> None:
    client = system.client()
    connection = client.connect(f"dave-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    answer = client.transfer("allocation", cid, 90, fault="no_clear")
    assert answer.status_code == 200
    transfer_id = answer.json()["allocation"]["id"]
    assert system.gateway_status(transfer_id) == "reserved"
    assert _balance(system, pcid) == (0, 90, 0)

    system.age(transfer_id)
    summary = system.run("workers.remediation.sweep_stale_transfers")
    assert summary["cleared"] == 1, summary
    assert system.gateway_status(transfer_id) == "cleared"
    assert _balance(system, pcid) == (90, 0, 0)
    system.assert_agree()


def test_a_release_instead_of_a_clear_leaves_nothing_moved(system: System) -> None:
    client = system.client()
    connection = client.connect(f"erin-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    answer = client.transfer("allocation", cid, 60, fault="release")
    assert answer.status_code == 422
    assert answer.json()["allocation"]["status"] == "released"
    assert system.gateway_status(answer.json()["allocation"]["id"]) == "released"
    assert _balance(system, pcid) == (0, 0, 0)
    assert _bitgo_balance(system, cid) == (0, 0)
    system.assert_agree()


def test_a_standing_rule_and_a_replayed_nonce(system: System) -> None:
    client = system.client()
    cid = client.connect(f"fay-{uuid.uuid4().hex[:6]}")["id"]
    rule = system.sandbox.post("/sandbox/faults", json={"mode": "duplicate", "times": 2})
    assert rule.json()["faults"][0]["times"] == 2
    for _ in range(3):
        assert client.transfer("allocation", cid, 10).status_code == 200
    assert system.sandbox.get("/sandbox/faults").json()["faults"] == []

    nonce = uuid.uuid4().hex
    assert client.transfer("allocation", cid, 5, nonce=nonce).status_code == 200
    reused = client.transfer("allocation", cid, 5, nonce=nonce)
    assert reused.status_code == 400
    assert reused.json()["error"] == "nonce already used"
    system.assert_agree()


def test_a_failed_settlement_is_reposted_until_completed(system: System) -> None:
    client = system.client()
    connection = client.connect(f"gus-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    assert client.transfer("allocation", cid, 500, currency="eth").status_code == 200
    trade = system.gateway.post(
        "/internal/v1/trades",
        json={
            "externalId": f"t-{uuid.uuid4()}",
            "partnersConnectionId": pcid,
            "deltas": {"eth": "25"},
        },
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
    )
    assert trade.status_code == 200
    system.sandbox.post("/sandbox/faults", json={"mode": "fail", "times": 1})

    summary = system.run("workers.settlement.run_settlement")
    assert summary["outcome"] == "failed", summary

    def completed() -> dict[str, object] | None:
        for s in system.sandbox.get("/sandbox/settlements").json()["settlements"]:
            if cid in s["settlementAmounts"] and s["status"] == "completed":
                return dict(s)
        return None

    settled = eventually(completed, timeout=30, what="the re-posted settlement to complete")
    assert settled["settlementAmounts"] == {cid: {"eth": "25"}}
    assert _bitgo_balance(system, cid, "eth") == (525, 0)
    assert _balance(system, pcid, "eth") == (525, 0, 0)
    system.assert_agree()


def test_a_deallocation_whose_answer_is_lost_is_retried_and_clears_once(system: System) -> None:
    client = system.client()
    connection = client.connect(f"hal-{uuid.uuid4().hex[:6]}")
    cid, pcid = connection["id"], connection["partnersConnectionId"]
    assert client.transfer("allocation", cid, 100).status_code == 200
    assert _balance(system, pcid) == (100, 0, 0)
    external, nonce = str(uuid.uuid4()), uuid.uuid4().hex
    lost = client.transfer(
        "deallocation", cid, 40, external_id=external, nonce=nonce, fault="timeout"
    )
    assert lost.status_code == 500
    assert _balance(system, pcid) == (60, 0, 40)  # held at the gateway, not yet gone
    again = client.transfer("deallocation", cid, 40, external_id=external, nonce=nonce)
    assert again.status_code == 200
    assert _balance(system, pcid) == (60, 0, 0)
    assert _bitgo_balance(system, cid) == (60, 0)
    system.assert_agree()


def test_the_client_cli_shows_how_to_resend_an_answer_lost_in_a_timeout(
    system: System,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.main import main

    monkeypatch.setenv("OES_SANDBOX_URL", system.sandbox_url)
    monkeypatch.setenv("OES_INTERNAL_TOKEN", system.env["OES_INTERNAL_TOKEN"])
    base = ["sandbox", "--data-dir", str(tmp_path), "--gateway", system.gateway_url]
    assert main([*base, "connect", "--partners-client-id", "carol"]) == 0
    capsys.readouterr()
    assert main(
        [*base, "allocate", "--connection", "carol", "--quantity", "5", "--fault", "timeout"]
    )
    said = capsys.readouterr().out
    assert said.startswith("clientExternalId: ")
    resend = said.split("re-send the identical request with\n", 1)[1].split()
    assert resend[:3] == ["oes-partner", "sandbox", "allocate"]
    assert main([*base, *resend[2:]]) == 0
    assert '"status": "cleared"' in capsys.readouterr().out

"""The sandbox keeps its state in its data directory: a restart forgets nothing BitGo would
remember (clients, connections, allocations and their status, balances, settlements, used
nonces, clientExternalIds). A stand-in plays the gateway, so every call is in-process."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cli.devkeys import ensure_key_pair
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE, create_sandbox_app
from sandbox.gateway import NoAnswer
from sandbox.store import INTERRUPTED, Allocation, Connection, StateError, Store, hmac_hex

PARTNER = f"/api/network/v1/enterprises/{SANDBOX_ENTERPRISE}/partners"
AUTH = {"Authorization": f"Bearer {SANDBOX_ACCESS_TOKEN}"}


@dataclass
class StandInGateway:
    """Answers as the gateway does, or not at all while ``mute`` (a network failure)."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    mute: bool = False

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any
    ) -> tuple[int, dict[str, Any]]:
        self.calls.append((method, path))
        if self.mute:
            raise NoAnswer("no answer")
        if path == "/bitgo/v1/connections":
            assert body is not None
            return 200, {"partnersClientId": "alice", "partnersConnectionId": str(uuid.uuid4())}
        if method == "POST":
            return 200, {"status": "reserved", "partnersAllocationId": str(uuid.uuid4())}
        return 200, {"status": "cleared"}

    async def close(self) -> None:
        pass


@contextmanager
def sandbox(state: Path, gateway: StandInGateway) -> Iterator[TestClient]:
    """One run of the sandbox on ``state``: started, used, stopped."""
    private, _ = ensure_key_pair(state.parent)
    app = create_sandbox_app(gateway_url="http://127.0.0.1:9", private_key=private, state=state)
    with TestClient(app) as client:
        app.state.gateway = gateway
        yield client
    app.state.store.close()


@dataclass
class Client:
    http: TestClient
    enterprise: str
    key: str

    def url(self, connection: str, kind: str = "allocation") -> str:
        return (
            f"/api/network/v1/enterprises/{self.enterprise}/clients/connections/"
            f"{connection}/{kind}s"
        )

    def body(
        self,
        connection: str,
        quantity: int,
        *,
        external: str | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        fields = {
            "amount": {"currency": "btc", "quantity": str(quantity)},
            "clientExternalId": external or str(uuid.uuid4()),
            "nonce": nonce or uuid.uuid4().hex,
        }
        payload = json.dumps(
            {**fields, "connectionId": connection, "enterpriseId": self.enterprise}
        )
        return {**fields, "payload": payload, "signature": hmac_hex(self.key, payload)}


def _everything(http: TestClient) -> dict[str, Any]:
    """What BitGo's side shows: allocations, balances, settlements."""
    return {
        "allocations": http.get(f"{PARTNER}/allocations", headers=AUTH).json(),
        "balances": http.get(f"{PARTNER}/balances", headers=AUTH).json(),
        "settlements": http.get("/sandbox/settlements").json(),
    }


def test_a_restart_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "sandbox.sqlite3"
    gateway = StandInGateway()
    with sandbox(state, gateway) as http:
        registered = http.post("/sandbox/clients", json={}).json()
        client = Client(http, registered["enterpriseId"], registered["clientKey"])
        linked = http.post(
            f"/api/network/v1/enterprises/{client.enterprise}/clients/connections",
            json={"connectionToken": "t"},
        )
        assert linked.status_code == 200, linked.text
        connection = linked.json()["connection"]["id"]
        cleared = client.body(connection, 1000)
        assert http.post(client.url(connection), json=cleared).status_code == 200
        out = client.body(connection, 300)
        assert http.post(client.url(connection, "deallocation"), json=out).status_code == 200
        # One the gateway never answered: reserved and retriable, as BitGo keeps it.
        gateway.mute = True
        stuck = client.body(connection, 50)
        answer = http.post(client.url(connection), json=stuck)
        gateway.mute = False
        assert answer.status_code == 500, answer.text
        stuck_id = answer.json()["allocation"]["id"]
        # A settlement, signed by the partner's Express key.
        fields = {
            "externalId": "s-1",
            "settlementAmounts": {connection: {"btc": "-200", "usdt": "9"}},
            "nonce": "n-1",
        }
        signed = http.post(
            "/api/v2/ofc/signPayload",
            json={"walletId": "w", "payload": json.dumps(fields)},
            headers=AUTH,
        ).json()
        settlement = {**fields, "payload": signed["payload"], "signature": signed["signature"]}
        settled = http.post(f"{PARTNER}/settlements", json=settlement, headers=AUTH)
        assert settled.json()["settlement"]["status"] == "completed"
        before = _everything(http)
    balances = before["balances"]["networkBalances"][connection]["balances"]
    assert balances == {
        "btc": {"available": "500", "held": "50"},
        "usdt": {"available": "9", "held": "0"},
    }

    gateway = StandInGateway()
    with sandbox(state, gateway) as http:
        assert _everything(http) == before
        # The client is known, with the same key, and so is its connection.
        again = http.post("/sandbox/clients", json={"enterpriseId": client.enterprise}).json()
        assert again["clientKey"] == client.key
        client.http = http
        # An identical re-send is answered from memory; the gateway hears nothing.
        repeat = http.post(client.url(connection), json=cleared)
        assert repeat.status_code == 200
        assert repeat.json()["allocation"]["status"] == "cleared"
        # A spent nonce stays spent; a clientExternalId stays bound to its fields.
        reused = client.body(connection, 1, nonce=cleared["nonce"])
        assert http.post(client.url(connection), json=reused).json() == {
            "error": "nonce already used"
        }
        changed = client.body(connection, 2, external=cleared["clientExternalId"])
        assert http.post(client.url(connection), json=changed).status_code == 409
        assert gateway.calls == []
        # The retriable one, re-sent, goes to the gateway again with the same id and clears.
        retried = http.post(client.url(connection), json=stuck)
        assert retried.status_code == 200, retried.text
        assert retried.json()["allocation"]["id"] == stuck_id
        assert gateway.calls == [
            ("POST", "/bitgo/v1/allocations"),
            ("PUT", f"/bitgo/v1/allocation/{stuck_id}/clear"),
        ]
        # The settlement's signature still holds (the Express key is kept) and it is the same.
        resent = http.post(f"{PARTNER}/settlements", json=settlement, headers=AUTH)
        assert resent.status_code == 200, resent.text
        assert resent.json() == settled.json()
        after = http.get(f"{PARTNER}/balances", headers=AUTH).json()["networkBalances"]
        assert after[connection]["balances"]["btc"] == {"available": "550", "held": "0"}


def test_an_allocation_cut_short_by_a_stop_is_retriable_afterwards(tmp_path: Path) -> None:
    """Stopped between the reserve and the answer: BitGo would let the client re-send."""
    state = tmp_path / "sandbox.sqlite3"
    store = Store.open(state, partner_enterprise_id="p", access_token="t")
    enterprise, _ = store.register_client()
    connection = store.add_connection(
        Connection(str(uuid.uuid4()), enterprise, store.client_ids[enterprise], "a", "pa")
    )
    allocation = Allocation(
        id=str(uuid.uuid4()),
        type="allocation",
        currency="btc",
        quantity=10**40,  # beyond 64 bits, as BitGo's amounts may be
        connection_id=connection.id,
        enterprise_id=enterprise,
        client_external_id="x",
        initiated_by="me",
        notes=None,
        request={"clientExternalId": "x"},
    )
    store.add_allocation(allocation, "nonce-1")
    store.close()  # the process dies here, mid-call

    again = Store.open(state, partner_enterprise_id="p", access_token="t")
    kept = again.allocations[allocation.id]
    assert (kept.status, kept.retriable, kept.reason) == ("reserved", True, INTERRUPTED)
    assert again.balances[connection.id]["btc"] == [0, 10**40]
    assert again.by_external[(enterprise, "allocation", "x")] == allocation.id
    assert again.nonces[(enterprise, "nonce-1")] == "allocation:x"
    again.close()


def test_a_file_that_is_not_sandbox_state_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "sandbox.sqlite3"
    state.write_text("not a database, but someone's notes")
    with pytest.raises(StateError):
        Store.open(state, partner_enterprise_id="p", access_token="t")
    assert state.read_text() == "not a database, but someone's notes"

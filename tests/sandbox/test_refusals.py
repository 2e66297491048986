"""The sandbox refuses what BitGo refuses, before it ever calls the gateway."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cli.devkeys import ensure_key_pair
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE, create_sandbox_app
from sandbox.cli import parse_fault
from sandbox.store import Connection, Store, hmac_hex

PARTNER = f"/api/network/v1/enterprises/{SANDBOX_ENTERPRISE}/partners"
AUTH = {"Authorization": f"Bearer {SANDBOX_ACCESS_TOKEN}"}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[TestClient]:
    private, _ = ensure_key_pair(tmp_path)
    # No gateway listens there: these requests must be refused before any call.
    app = create_sandbox_app(gateway_url="http://127.0.0.1:9", private_key=private)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(sandbox: TestClient) -> tuple[str, str, str]:
    """(enterpriseId, clientKey, connectionId) of a linked client."""
    registered = sandbox.post("/sandbox/clients", json={}).json()
    store: Store = sandbox.app.state.store  # type: ignore[attr-defined]
    connection_id = str(uuid.uuid4())
    store.connections[connection_id] = Connection(
        id=connection_id,
        enterprise_id=registered["enterpriseId"],
        client_id=store.client_ids[registered["enterpriseId"]],
        partners_client_id="alice",
        partners_connection_id=str(uuid.uuid4()),
    )
    return registered["enterpriseId"], registered["clientKey"], connection_id


def _body(enterprise: str, key: str, connection: str, **change: Any) -> dict[str, Any]:
    fields = {
        "amount": {"currency": "btc", "quantity": "10"},
        "clientExternalId": str(uuid.uuid4()),
        "nonce": uuid.uuid4().hex,
    }
    payload = json.dumps({**fields, "connectionId": connection, "enterpriseId": enterprise})
    return {**fields, "payload": payload, "signature": hmac_hex(key, payload), **change}


def _url(enterprise: str, connection: str) -> str:
    return f"/api/network/v1/enterprises/{enterprise}/clients/connections/{connection}/allocations"


def test_a_wrong_signature_is_401(sandbox: TestClient, client: tuple[str, str, str]) -> None:
    enterprise, key, connection = client
    answer = sandbox.post(
        _url(enterprise, connection), json=_body(enterprise, key, connection, signature="00")
    )
    assert answer.status_code == 401
    assert answer.json() == {"error": "Invalid signature"}


def test_a_payload_that_differs_from_the_fields_is_400(
    sandbox: TestClient, client: tuple[str, str, str]
) -> None:
    enterprise, key, connection = client
    body = _body(enterprise, key, connection)
    body["amount"] = {"currency": "btc", "quantity": "1000"}  # signed 10, asks 1000
    answer = sandbox.post(_url(enterprise, connection), json=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": "payload does not match the request"}


@pytest.mark.parametrize(
    "change",
    [
        {"amount": {"currency": "btc", "quantity": "-5"}},
        {"amount": {"currency": "btc", "quantity": 1.5}},
        {"clientExternalId": ""},
        {"nonce": None},
        {"payload": None},
    ],
)
def test_malformed_requests_are_400(
    sandbox: TestClient, client: tuple[str, str, str], change: dict[str, Any]
) -> None:
    enterprise, key, connection = client
    answer = sandbox.post(
        _url(enterprise, connection), json=_body(enterprise, key, connection, **change)
    )
    assert answer.status_code == 400
    assert sandbox.app.state.store.allocations == {}  # type: ignore[attr-defined]


def test_unknown_enterprise_and_connection(
    sandbox: TestClient, client: tuple[str, str, str]
) -> None:
    enterprise, _, connection = client
    assert sandbox.post(_url("nobody", connection), json={}).status_code == 401
    other = str(uuid.uuid4())
    assert sandbox.post(_url(enterprise, other), json={}).status_code == 404


def test_partner_routes_need_the_access_token(sandbox: TestClient) -> None:
    assert sandbox.get(f"{PARTNER}/balances").status_code == 401
    assert sandbox.get(f"{PARTNER}/balances", headers=AUTH).json() == {"networkBalances": {}}
    unknown = sandbox.get(f"{PARTNER}/allocations/{uuid.uuid4()}", headers=AUTH)
    assert unknown.status_code == 404
    other = "/api/network/v1/enterprises/someone-else/partners/balances"
    assert sandbox.get(other, headers=AUTH).status_code == 403


def _settlement(
    sandbox: TestClient, external_id: str, amounts: dict[str, Any], nonce: str
) -> dict[str, Any]:
    """A settlement body signed through the sandbox's Express, as the gateway builds one."""
    fields = {"externalId": external_id, "settlementAmounts": amounts, "nonce": nonce}
    payload = json.dumps(fields)
    signed = sandbox.post(
        "/api/v2/ofc/signPayload", json={"walletId": "w", "payload": payload}, headers=AUTH
    ).json()
    return {**fields, "payload": signed["payload"], "signature": signed["signature"]}


def test_settlements_are_idempotent_and_refuse_a_changed_body(
    sandbox: TestClient, client: tuple[str, str, str]
) -> None:
    _, _, connection = client
    body = _settlement(sandbox, "s-1", {connection: {"btc": "25"}}, "n-1")
    first = sandbox.post(f"{PARTNER}/settlements", json=body, headers=AUTH)
    again = sandbox.post(f"{PARTNER}/settlements", json=body, headers=AUTH)
    assert first.json()["settlement"]["status"] == "completed"
    assert again.json() == first.json()
    balances = sandbox.get(f"{PARTNER}/balances", headers=AUTH).json()["networkBalances"]
    assert balances[connection]["balances"]["btc"] == {"available": "25", "held": "0"}
    changed = _settlement(sandbox, "s-1", {connection: {"btc": "25"}}, "n-2")
    refused = sandbox.post(f"{PARTNER}/settlements", json=changed, headers=AUTH)
    assert refused.status_code == 409
    assert refused.json() == {"error": "externalId already used with a different body"}
    forged = {**body, "externalId": "s-2", "signature": "00"}
    assert sandbox.post(f"{PARTNER}/settlements", json=forged, headers=AUTH).status_code == 401


def test_a_settlement_that_would_overdraw_fails_and_moves_nothing(
    sandbox: TestClient, client: tuple[str, str, str]
) -> None:
    _, _, connection = client
    body = _settlement(sandbox, "s-9", {connection: {"btc": "-1"}}, "n")
    answer = sandbox.post(f"{PARTNER}/settlements", json=body, headers=AUTH)
    assert answer.json()["settlement"]["status"] == "failed"
    balances = sandbox.get(f"{PARTNER}/balances", headers=AUTH).json()["networkBalances"]
    assert balances[connection]["balances"] == {"btc": {"available": "0", "held": "0"}}


@pytest.mark.parametrize(
    ("text", "mode", "seconds", "times"),
    [
        ("timeout", "timeout", 0.0, 1),
        ("delay:2.5", "delay", 2.5, 1),
        ("duplicate*0", "duplicate", 0.0, None),
        ("release*3", "release", 0.0, 3),
    ],
)
def test_fault_rules_parse(text: str, mode: str, seconds: float, times: int | None) -> None:
    fault = parse_fault(text)
    assert (fault.mode, fault.seconds, fault.times) == (mode, seconds, times)


def test_an_unknown_fault_mode_is_refused(sandbox: TestClient) -> None:
    assert sandbox.post("/sandbox/faults", json={"mode": "explode"}).status_code == 400


@pytest.mark.parametrize("header", ["bogus", "delay:abc", "delay:2s", "timeout:"])
def test_a_bad_fault_header_is_400_and_reserves_nothing(
    sandbox: TestClient, client: tuple[str, str, str], header: str
) -> None:
    enterprise, key, connection = client
    answer = sandbox.post(
        _url(enterprise, connection),
        json=_body(enterprise, key, connection),
        headers={"X-Sandbox-Fault": header},
    )
    assert answer.status_code == 400
    assert sandbox.app.state.store.allocations == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "rule",
    [
        {"mode": "timeout", "times": "2"},
        {"mode": "delay", "seconds": "x"},
        {"mode": "delay", "seconds": -1},
        {"mode": "fail", "kinds": "settlement"},
        {"mode": "release", "kinds": ["settlement"]},
    ],
)
def test_a_malformed_fault_rule_is_400_and_not_kept(
    sandbox: TestClient, rule: dict[str, Any]
) -> None:
    assert sandbox.post("/sandbox/faults", json=rule).status_code == 400
    assert sandbox.get("/sandbox/faults").json() == {"faults": []}


def test_a_client_external_id_reused_on_another_connection_is_409(
    sandbox: TestClient, client: tuple[str, str, str]
) -> None:
    enterprise, key, connection = client
    store: Store = sandbox.app.state.store  # type: ignore[attr-defined]
    first = _body(enterprise, key, connection)
    # No gateway answers, so the first try stays reserved and retriable.
    assert sandbox.post(_url(enterprise, connection), json=first).status_code == 500
    other = str(uuid.uuid4())
    store.connections[other] = Connection(
        id=other,
        enterprise_id=enterprise,
        client_id=store.client_ids[enterprise],
        partners_client_id="alice",
        partners_connection_id=str(uuid.uuid4()),
    )
    fields = {k: first[k] for k in ("amount", "clientExternalId", "nonce")}
    payload = json.dumps({**fields, "connectionId": other, "enterpriseId": enterprise})
    again = {**fields, "payload": payload, "signature": hmac_hex(key, payload)}
    answer = sandbox.post(_url(enterprise, other), json=again)
    assert answer.status_code == 409
    assert len(store.allocations) == 1

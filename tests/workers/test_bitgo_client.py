"""BitGoClient against real HTTP servers on 127.0.0.1 standing in for BitGo and BitGo Express."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.stubs import Answer, Handler, Seen, Stub, serving
from workers.bitgo_client import (
    BitGoClient,
    BitGoConfig,
    BitGoConflictError,
    BitGoError,
    BitGoNotFoundError,
    BitGoUnavailableError,
)

TOKEN = "bitgo-test-token-abcdef"
ENTERPRISE = "ent-1"
PARTNERS = f"/api/network/v1/enterprises/{ENTERPRISE}/partners"
SIGN = "/api/v2/ofc/signPayload"


def make_config(url: str, **changes: Any) -> BitGoConfig:
    base = BitGoConfig(
        api_url=url,
        access_token=TOKEN,
        enterprise_id=ENTERPRISE,
        express_url=url,
        wallet_id="wallet-1",
        timeout=5.0,
        retries=3,
        backoff=0.5,
    )
    return dataclasses.replace(base, **changes)


def make_client(url: str, delays: list[float], **changes: Any) -> BitGoClient:
    return BitGoClient(make_config(url, **changes), sleep=delays.append)


def in_turn(*answers: Answer) -> Handler:
    """A handler giving ``answers`` one request at a time, then the last one forever."""
    lock = threading.Lock()
    queue = list(answers)

    def handler(seen: Seen) -> Answer:
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture(scope="module")
def server() -> Iterator[Stub]:
    # One server for the module: each stub's shutdown waits out a 0.5 s poll.
    with serving() as stub:
        yield stub


@pytest.fixture
def stub(server: Stub) -> Stub:
    """The module's server, forgetting earlier requests, answering 200 {} until told otherwise."""
    with server.lock:
        server.seen.clear()
    server.handler = lambda seen: (200, {})
    return server


@pytest.fixture
def bitgo(stub: Stub, delays: list[float]) -> Iterator[BitGoClient]:
    with make_client(stub.url, delays) as client:
        yield client


def test_allocation_gets_the_record_with_the_bearer_token(stub: Stub, bitgo: BitGoClient) -> None:
    record = {"id": "a1", "status": "cleared", "amount": {"currency": "ofctbtc", "quantity": "5"}}
    stub.handler = lambda seen: (200, record)
    assert bitgo.allocation("a1") == record
    [seen] = stub.requests()
    assert (seen.method, seen.path) == ("GET", f"{PARTNERS}/allocations/a1")
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["accept"] == "application/json"
    assert seen.headers["user-agent"] == "oes-partner"


def test_allocation_id_with_a_slash_is_url_quoted(stub: Stub, bitgo: BitGoClient) -> None:
    stub.handler = lambda seen: (200, {"id": "x"})
    bitgo.allocation("a/b c?")
    assert stub.requests()[0].path == f"{PARTNERS}/allocations/a%2Fb%20c%3F"


def test_enterprise_id_is_url_quoted(stub: Stub, delays: list[float]) -> None:
    stub.handler = lambda seen: (200, {"networkBalances": {}})
    with make_client(stub.url, delays, enterprise_id="e/1") as bitgo:
        bitgo.balances()
    assert stub.requests()[0].path == "/api/network/v1/enterprises/e%2F1/partners/balances"


def test_allocation_unwraps_an_allocation_envelope(stub: Stub, bitgo: BitGoClient) -> None:
    record = {"id": "a1", "status": "reserved"}
    stub.handler = lambda seen: (200, {"allocation": record})
    assert bitgo.allocation("a1") == record


def test_allocation_404_raises_bitgo_not_found(stub: Stub, bitgo: BitGoClient) -> None:
    stub.handler = lambda seen: (404, {"error": "allocation not found"})
    with pytest.raises(BitGoNotFoundError) as caught:
        bitgo.allocation("nope")
    assert (caught.value.status, caught.value.message) == (404, "allocation not found")
    assert len(stub.requests()) == 1


def test_balances_returns_network_balances_by_connection(stub: Stub, bitgo: BitGoClient) -> None:
    balances = {
        "c1": {
            "clientId": "cl1",
            "partnersConnectionId": "c1",
            "balances": {"ofctbtc": {"available": "100", "held": "5"}},
        }
    }
    stub.handler = lambda seen: (200, {"networkBalances": balances})
    assert bitgo.balances() == balances
    [seen] = stub.requests()
    assert (seen.method, seen.path) == ("GET", f"{PARTNERS}/balances")
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"


def test_post_settlement_sends_identical_bytes_for_equal_dicts(
    stub: Stub, bitgo: BitGoClient
) -> None:
    first = {"externalId": "s1", "nonce": "n", "settlementAmounts": {"c1": {"ofctbtc": "-5"}}}
    second = {"settlementAmounts": {"c1": {"ofctbtc": "-5"}}, "nonce": "n", "externalId": "s1"}
    stub.handler = lambda seen: (200, {"id": "x", "status": "completed"})
    bitgo.post_settlement(first)
    bitgo.post_settlement(second)
    one, two = stub.requests()
    assert (one.method, one.path) == ("POST", f"{PARTNERS}/settlements")
    assert one.headers["content-type"] == "application/json"
    assert one.headers["authorization"] == f"Bearer {TOKEN}"
    assert one.body == two.body
    assert one.body == json.dumps(first, separators=(",", ":"), sort_keys=True).encode()


def test_post_settlement_unwraps_the_settlement_envelope(stub: Stub, bitgo: BitGoClient) -> None:
    settlement = {"id": "st1", "externalId": "s1", "status": "completed"}
    stub.handler = lambda seen: (200, {"settlement": settlement})
    assert bitgo.post_settlement({"externalId": "s1"}) == settlement


def test_post_settlement_409_raises_bitgo_conflict_with_bitgo_text(
    stub: Stub, bitgo: BitGoClient
) -> None:
    stub.handler = lambda seen: (409, {"error": "externalId already used with a different body"})
    with pytest.raises(BitGoConflictError) as caught:
        bitgo.post_settlement({"externalId": "s1"})
    assert caught.value.status == 409
    assert caught.value.message == "externalId already used with a different body"
    assert len(stub.requests()) == 1


def test_5xx_is_retried_with_backoff_until_it_succeeds(
    stub: Stub, bitgo: BitGoClient, delays: list[float]
) -> None:
    stub.handler = in_turn((503, {"error": "busy"}), (500, {}), (200, {"networkBalances": {}}))
    assert bitgo.balances() == {}
    assert delays == [0.5, 1.0]
    assert len(stub.requests()) == 3


def test_5xx_on_every_attempt_raises_bitgo_unavailable(
    stub: Stub, bitgo: BitGoClient, delays: list[float]
) -> None:
    stub.handler = lambda seen: (502, {"error": "bad gateway"})
    with pytest.raises(BitGoUnavailableError) as caught:
        bitgo.balances()
    assert caught.value.status == 502
    assert len(stub.requests()) == 4
    assert delays == [0.5, 1.0, 2.0]


def test_4xx_is_not_retried(stub: Stub, bitgo: BitGoClient, delays: list[float]) -> None:
    stub.handler = lambda seen: (400, {"error": "enterprise id malformed"})
    with pytest.raises(BitGoError) as caught:
        bitgo.balances()
    assert type(caught.value) is BitGoError
    assert (caught.value.status, caught.value.message) == (400, "enterprise id malformed")
    assert len(stub.requests()) == 1
    assert delays == []


def test_4xx_without_an_error_text_gets_a_short_description(stub: Stub, bitgo: BitGoClient) -> None:
    stub.handler = lambda seen: (403, {})
    with pytest.raises(BitGoError) as caught:
        bitgo.balances()
    assert (caught.value.status, caught.value.message) == (403, "HTTP 403 Forbidden")


def test_connection_refused_raises_bitgo_unavailable_after_every_retry(
    delays: list[float],
) -> None:
    with (
        make_client(closed_port_url(), delays, retries=2) as bitgo,
        pytest.raises(BitGoUnavailableError) as caught,
    ):
        bitgo.balances()
    assert caught.value.status is None
    # One sleep between each pair of attempts: retries + 1 attempts were made.
    assert delays == [0.5, 1.0]


def test_dropped_connection_is_retried(stub: Stub, bitgo: BitGoClient, delays: list[float]) -> None:
    stub.handler = in_turn(None, (200, {"networkBalances": {}}))
    assert bitgo.balances() == {}
    assert len(stub.requests()) == 2
    assert delays == [0.5]


def test_read_timeout_raises_bitgo_unavailable(stub: Stub, delays: list[float]) -> None:
    release = threading.Event()

    def stall(seen: Seen) -> Answer:
        release.wait(10)
        return None

    stub.handler = stall
    try:
        with (
            make_client(stub.url, delays, timeout=0.3, retries=1) as bitgo,
            pytest.raises(BitGoUnavailableError) as caught,
        ):
            bitgo.allocation("a1")
    finally:
        release.set()
    assert caught.value.status is None
    assert len(stub.requests()) == 2
    assert delays == [0.5]


def test_non_json_2xx_body_raises_bitgo_error(stub: Stub, bitgo: BitGoClient) -> None:
    stub.handler = lambda seen: (200, b"<html>maintenance</html>")
    with pytest.raises(BitGoError) as caught:
        bitgo.allocation("a1")
    assert type(caught.value) is BitGoError
    assert caught.value.status == 200
    assert len(stub.requests()) == 1


@pytest.mark.parametrize(
    ("call", "body"),
    [
        (lambda bitgo: bitgo.allocation("a1"), ["not", "an", "object"]),
        (lambda bitgo: bitgo.balances(), {"balances": {}}),
        (lambda bitgo: bitgo.balances(), {"networkBalances": {"c1": "100"}}),
        (lambda bitgo: bitgo.post_settlement({}), "completed"),
        (lambda bitgo: bitgo.sign_payload("p"), {"payload": "p"}),
    ],
)
def test_wrong_shaped_2xx_body_raises_bitgo_error(
    stub: Stub, bitgo: BitGoClient, call: Any, body: Any
) -> None:
    stub.handler = lambda seen: (200, body)
    with pytest.raises(BitGoError):
        call(bitgo)


def test_sign_payload_posts_wallet_and_payload_to_express(stub: Stub, delays: list[float]) -> None:
    payload = '{"amounts":{"c1":{"ofctbtc":"-5"}},"nonce":"n1"}'
    with (
        serving(lambda seen: (200, {"payload": payload, "signature": "20ab"})) as express,
        make_client(stub.url, delays, express_url=express.url) as bitgo,
    ):
        assert bitgo.sign_payload(payload) == (payload, "20ab")
    [seen] = express.requests()
    assert (seen.method, seen.path) == ("POST", SIGN)
    assert seen.json() == {"walletId": "wallet-1", "payload": payload}
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert stub.requests() == []


def test_sign_payload_returns_the_payload_string_exactly_as_express_did(
    stub: Stub, bitgo: BitGoClient
) -> None:
    signed = '{ "nonce" : "n1",  "amounts": {} }'
    stub.handler = lambda seen: (200, {"payload": signed, "signature": "20ab"})
    assert bitgo.sign_payload('{"nonce":"n1","amounts":{}}') == (signed, "20ab")


def test_sign_payload_rejects_a_payload_that_is_not_a_string(
    stub: Stub, bitgo: BitGoClient
) -> None:
    stub.handler = lambda seen: (200, {"payload": {"nonce": "n1"}, "signature": "20ab"})
    with pytest.raises(BitGoError, match="Express returned no payload string"):
        bitgo.sign_payload('{"nonce":"n1"}')


@pytest.mark.parametrize(
    ("missing", "message"),
    [("express_url", "BITGO_EXPRESS_URL is not set"), ("wallet_id", "BITGO_WALLET_ID is not set")],
)
def test_sign_payload_without_express_settings_raises(
    stub: Stub, delays: list[float], missing: str, message: str
) -> None:
    stub.handler = lambda seen: (200, {"payload": "p", "signature": "s"})
    with (
        make_client(stub.url, delays, **{missing: None}) as bitgo,
        pytest.raises(BitGoError) as caught,
    ):
        bitgo.sign_payload("p")
    assert caught.value.message == message
    assert stub.requests() == []


def test_trailing_slashes_on_base_urls_are_tolerated(stub: Stub, delays: list[float]) -> None:
    stub.handler = lambda seen: (200, {"payload": "p", "signature": "s", "networkBalances": {}})
    with make_client(stub.url + "/", delays, express_url=stub.url + "/") as bitgo:
        bitgo.balances()
        bitgo.sign_payload("p")
    assert [s.path for s in stub.requests()] == [f"{PARTNERS}/balances", SIGN]


def test_config_repr_leaves_out_the_access_token() -> None:
    assert TOKEN not in repr(make_config("http://127.0.0.1:1"))

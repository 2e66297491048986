"""Answers Starlette itself would give, in the contract's shape: JSON errors, no redirects."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from cli.devkeys import sign
from tests.conftest import (
    INTERNAL_TOKEN,
    BitGo,
    Keys,
    Link,
    LiveServer,
    row_count,
    serving_gateway,
)


@pytest.mark.parametrize("path", ["/nope", "/bitgo/v1", "/bitgo/v1/allocation/x/clear/more"])
def test_an_unknown_path_is_a_json_404(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.json() == {"error": "Not Found"}


def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(client: TestClient) -> None:
    answer = client.delete("/bitgo/v1/allocations")
    assert answer.status_code == 405
    assert answer.json() == {"error": "Method Not Allowed"}
    assert answer.headers["allow"] == "POST"


def test_a_trailing_slash_is_not_found_never_a_redirect(bitgo: BitGo, link: Link) -> None:
    body = link.body("allocation", str(uuid.uuid4()), "5")
    answer = bitgo.http.post(
        "/bitgo/v1/allocations/", json=body, headers=bitgo.headers(), follow_redirects=False
    )
    assert answer.status_code == 404
    assert answer.json() == {"error": "Not Found"}


def test_two_signature_headers_are_refused_and_change_nothing(
    bitgo: BitGo, link: Link, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    transfer_id = str(uuid.uuid4())
    answer = bitgo.http.post(
        "/bitgo/v1/allocations",
        json=link.body("allocation", transfer_id, "5"),
        headers=[("X-BitGo-Signature", sign(keys.private)), ("X-BitGo-Signature", "junk")],
    )
    assert answer.status_code == 401
    assert answer.json() == {"error": "More than one X-BitGo-Signature header"}
    assert row_count(sessions, "transfers", "id = :id", id=transfer_id) == 0


# --- the server's own limits, on a real `oes-partner serve` -------------------------------

EDGE_ENV = {
    "OES_HTTP_MAX_HEADER_BYTES": "8192",
    "OES_HTTP_HEADER_TIMEOUT": "1",
    "OES_HTTP_BODY_TIMEOUT": "1",
    "OES_HTTP_MAX_CONNECTIONS": "20",
}


@pytest.fixture(scope="module")
def edge(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("edge") / "serve.log"
    with serving_gateway({**env, **EDGE_ENV}, log) as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_past_the_cap_are_refused_with_431(edge: LiveServer) -> None:
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert answer.endswith(b'{"error": "Request headers too large"}')


def test_a_huge_header_is_cut_off_without_being_buffered(edge: LiveServer) -> None:
    sent = 0
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # the server closed on us
            pass
        try:
            answer = read_all(sock)
        except OSError:
            answer = b""
    assert sent < 4 * 1024 * 1024, f"{sent} bytes of one header were taken"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")


def test_a_client_that_sends_nothing_is_dropped_after_the_header_timeout(
    edge: LiveServer,
) -> None:
    started = time.monotonic()
    with connect(edge) as sock:
        answer = read_all(sock)
    assert time.monotonic() - started < 3
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_client_that_trickles_its_headers_is_dropped(edge: LiveServer) -> None:
    started = time.monotonic()
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.5)
        sock.sendall(b"Host: x\r\n")
        answer = read_all(sock)
    assert time.monotonic() - started < 3
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_never_arrives_ends_the_request_in_time(edge: LiveServer) -> None:
    started = time.monotonic()
    with connect(edge) as sock:
        sock.sendall(
            b"POST /internal/v1/trades HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + INTERNAL_TOKEN.encode() + b"\r\n\r\n{"
        )
        read_all(sock)
    assert time.monotonic() - started < 3
    assert httpx.get(f"{edge.url}/healthz").status_code == 200


def test_connections_past_the_limit_are_answered_503(edge: LiveServer) -> None:
    held = [connect(edge) for _ in range(int(EDGE_ENV["OES_HTTP_MAX_CONNECTIONS"]))]
    try:
        time.sleep(0.2)
        answer = httpx.get(f"{edge.url}/healthz")
        assert answer.status_code == 503
        assert answer.json() == {"error": "Too many requests in progress, retry later"}
        assert answer.headers["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{edge.url}/healthz").status_code == 200


def test_head_on_a_signed_route_is_refused_without_spending_the_token(
    bitgo: BitGo, link: Link
) -> None:
    transfer_id = str(uuid.uuid4())
    assert bitgo.reserve("allocation", link, transfer_id, "5").status_code == 200
    token = bitgo.headers()
    head = bitgo.http.head(f"/bitgo/v1/allocation/{transfer_id}", headers=token)
    assert head.status_code == 405
    assert bitgo.http.get(f"/bitgo/v1/allocation/{transfer_id}", headers=token).status_code == 200


def test_the_connection_token_is_never_cached(bitgo: BitGo) -> None:
    answer = bitgo.http.post(
        "/internal/v1/connection-tokens",
        json={"partnersClientId": "cache-test"},
        headers=bitgo.internal(),
    )
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"


def test_two_authorization_headers_on_an_internal_route_are_refused(bitgo: BitGo) -> None:
    good = f"Bearer {INTERNAL_TOKEN}"
    answer = bitgo.http.get(
        "/internal/v1/transfers", headers=[("Authorization", good), ("Authorization", good)]
    )
    assert answer.status_code == 401
    assert answer.json() == {"error": "Missing or wrong internal token"}


def test_a_client_gone_mid_body_is_not_a_server_error(
    edge: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def requests_with(status: str) -> float:
        text = httpx.get(f"{edge.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("oes_http_requests_total{")
            and 'route="/internal/v1/trades"' in line
            and f'status="{status}"' in line
        )

    before = requests_with("500"), requests_with("499")
    with connect(edge) as sock:
        sock.sendall(
            b"POST /internal/v1/trades HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + INTERNAL_TOKEN.encode() + b'\r\n\r\n{"exter'
        )
        time.sleep(0.2)
    time.sleep(0.3)
    assert (requests_with("500"), requests_with("499")) == (before[0], before[1] + 1)


def route_count(server: LiveServer, route: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("oes_http_requests_total{") and f'route="{route}"' in line
    )


def test_a_request_refused_for_its_headers_never_reaches_the_app(edge: LiveServer) -> None:
    before = route_count(edge, "/healthz")
    with connect(edge) as sock:  # all of it in one packet: the parser reads on after the cap
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")
    assert route_count(edge, "/healthz") == before


def test_an_early_answer_is_the_only_answer_when_the_body_never_comes(edge: LiveServer) -> None:
    with connect(edge) as sock:  # refused for its signature before its body is read
        sock.sendall(
            b"POST /bitgo/v1/allocations HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.count(b"HTTP/1.1 ") == 1


def test_a_pipelined_request_s_slow_headers_never_replace_the_answer_being_served(
    edge: LiveServer, bitgo: BitGo, link: Link, redis_url: str
) -> None:
    transfer_id = str(uuid.uuid4())
    body = json.dumps(link.body("allocation", transfer_id, "5")).encode()
    with redis.Redis.from_url(redis_url) as r:  # the id is busy for longer than the deadline
        r.set(f"oes:lock:transfer:{transfer_id}", b"someone", px=1800)
    with connect(edge) as sock:
        sock.sendall(
            b"POST /bitgo/v1/allocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-BitGo-Signature: " + bitgo.headers()["X-BitGo-Signature"].encode() + b"\r\n"
            b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # ... and the rest never comes
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"status":"reserved"' in answer

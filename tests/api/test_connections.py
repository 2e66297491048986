"""SPEC §3.1 and §5: connection tokens and linking."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from models import connections
from tests.conftest import BitGo, row_count


def link_body(
    token: str, connection_id: str | None = None, client_id: str | None = None
) -> dict[str, str]:
    return {
        "clientId": client_id or str(uuid.uuid4()),
        "connectionId": connection_id or str(uuid.uuid4()),
        "connectionToken": token,
    }


def test_a_valid_token_links_a_new_partner_account(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    body = link_body(bitgo.token("alice"))
    answer = bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    assert answer.status_code == 200
    linked = answer.json()
    assert linked["clientId"] == body["clientId"]
    assert linked["connectionId"] == body["connectionId"]
    assert linked["partnersClientId"] == "alice"
    assert linked["partnersConnectionId"]
    assert row_count(sessions, "connections", "connection_id = :id", id=body["connectionId"]) == 1


def test_a_retry_answers_the_same_and_creates_nothing(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    body = link_body(bitgo.token("bob"))
    first = bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    again = bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    assert again.status_code == 200
    assert again.json() == first.json()
    assert row_count(sessions, "connections", "connection_id = :id", id=body["connectionId"]) == 1


def test_each_link_gets_its_own_account(bitgo: BitGo) -> None:
    one = bitgo.http.post(
        "/bitgo/v1/connections", json=link_body(bitgo.token("carol")), headers=bitgo.headers()
    )
    two = bitgo.http.post(
        "/bitgo/v1/connections", json=link_body(bitgo.token("carol")), headers=bitgo.headers()
    )
    assert one.json()["partnersClientId"] == two.json()["partnersClientId"] == "carol"
    assert one.json()["partnersConnectionId"] != two.json()["partnersConnectionId"]


def test_a_token_used_by_another_connection_is_a_conflict(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    token = bitgo.token("dave")
    assert (
        bitgo.http.post(
            "/bitgo/v1/connections", json=link_body(token), headers=bitgo.headers()
        ).status_code
        == 200
    )
    second = link_body(token)
    answer = bitgo.http.post("/bitgo/v1/connections", json=second, headers=bitgo.headers())
    assert answer.status_code == 409
    assert "error" in answer.json()
    assert row_count(sessions, "connections", "connection_id = :id", id=second["connectionId"]) == 0


def test_a_linked_connection_id_with_another_token_is_a_conflict(bitgo: BitGo) -> None:
    body = link_body(bitgo.token("erin"))
    bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    body["connectionToken"] = bitgo.token("erin")
    answer = bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    assert answer.status_code == 409


def test_an_unknown_token_is_unprocessable(bitgo: BitGo, sessions: sessionmaker[Session]) -> None:
    body = link_body("no-such-token")
    answer = bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers())
    assert answer.status_code == 422
    assert answer.json() == {"error": "Invalid connection token"}
    assert row_count(sessions, "connections", "connection_id = :id", id=body["connectionId"]) == 0


def test_an_expired_token_is_unprocessable(bitgo: BitGo, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        issued = connections.issue_token(
            session, partners_client_id="frank", ttl=timedelta(seconds=-1)
        )
    answer = bitgo.http.post(
        "/bitgo/v1/connections", json=link_body(issued.token), headers=bitgo.headers()
    )
    assert answer.status_code == 422
    assert answer.json() == {"error": "Invalid connection token"}


def test_tokens_are_stored_only_as_digests(bitgo: BitGo, sessions: sessionmaker[Session]) -> None:
    token = bitgo.token("grace")
    assert row_count(sessions, "connection_tokens", "token_sha256 = :t", t=token) == 0
    assert row_count(sessions, "connection_tokens", "partners_client_id = 'grace'") == 1


def test_internal_routes_refuse_a_missing_or_wrong_token(bitgo: BitGo) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "Basic x"},
    ):
        answer = bitgo.http.post(
            "/internal/v1/connection-tokens", json={"partnersClientId": "h"}, headers=headers
        )
        assert answer.status_code == 401
        assert "error" in answer.json()


def test_bitgo_routes_do_not_accept_the_internal_token(bitgo: BitGo) -> None:
    answer = bitgo.http.post(
        "/bitgo/v1/connections",
        json=link_body("x"),
        headers={"X-BitGo-Signature": "Bearer " + "x" * 30},
    )
    assert answer.status_code == 401


def test_account_view_shows_balances_as_strings(bitgo: BitGo) -> None:
    link = bitgo.link()
    bitgo.fund(link, 5, currency="eth")
    answer = bitgo.http.get(
        f"/internal/v1/accounts/{link.partners_connection_id}", headers=bitgo.internal()
    )
    assert answer.json()["balances"] == {"eth": {"available": "5", "pendingIn": "0", "held": "0"}}
    assert answer.json()["active"] is True
    missing = bitgo.http.get("/internal/v1/accounts/nope", headers=bitgo.internal())
    assert missing.status_code == 404


def test_transfer_listing_filters_and_pages_newest_first(bitgo: BitGo) -> None:
    link = bitgo.link()
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for transfer_id in ids:
        bitgo.reserve("allocation", link, transfer_id, "1")
    bitgo.put("allocation", ids[0], "clear")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"connectionId": link.connection_id, "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        page = bitgo.http.get(
            "/internal/v1/transfers", params=params, headers=bitgo.internal()
        ).json()
        seen += [t["allocationId"] for t in page["transfers"]]
        cursor = page["nextCursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    cleared = bitgo.http.get(
        "/internal/v1/transfers",
        params={"connectionId": link.connection_id, "status": "cleared", "kind": "allocation"},
        headers=bitgo.internal(),
    ).json()["transfers"]
    assert [t["allocationId"] for t in cleared] == [ids[0]]
    bad = bitgo.http.get(
        "/internal/v1/transfers", params={"status": "lost"}, headers=bitgo.internal()
    )
    assert bad.status_code == 400


@pytest.mark.parametrize(
    "cursor",
    [
        f"1_{uuid.UUID(int=7).hex}",  # not hyphenated
        f"1_{{{uuid.UUID(int=7)}}}",  # braces
        f"123456789012345678_{uuid.UUID(int=7)}",  # 18 digits
        f"x_{uuid.UUID(int=7)}",
        "1_",
    ],
)
def test_a_cursor_not_as_nextcursor_gives_it_is_refused(bitgo: BitGo, cursor: str) -> None:
    answer = bitgo.http.get(
        "/internal/v1/transfers", params={"cursor": cursor}, headers=bitgo.internal()
    )
    assert answer.status_code == 400
    assert answer.json() == {"error": "cursor is malformed; pass back nextCursor as given"}

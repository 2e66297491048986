"""SPEC §5: POST /internal/v1/trades applies trading results to ``available`` once per
externalId, all legs or none, and refuses anything malformed without storing a thing."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import httpx2
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models import ledger
from tests.conftest import INTERNAL_TOKEN, BitGo, Link, LiveServer, row_count

ROUTE = "/internal/v1/trades"
MAX = 10**78 - 1  # the largest amount NUMERIC(78,0) holds
# Starlette's TestClient answers with httpx2 responses, the live server's clients with httpx.
Response = httpx.Response | httpx2.Response


def new_id() -> str:
    return f"trade-{uuid.uuid4()}"


def trade(link: Link, external_id: str, deltas: dict[str, Any]) -> dict[str, Any]:
    return {
        "externalId": external_id,
        "partnersConnectionId": link.partners_connection_id,
        "deltas": deltas,
    }


def post(bitgo: BitGo, body: Any) -> Response:
    return bitgo.http.post(ROUTE, json=body, headers=bitgo.internal())


def traces(sessions: sessionmaker[Session], external_id: str) -> tuple[int, int, int]:
    """(trades rows, ledger entries, trade.applied events) stored for ``external_id``."""
    return (
        row_count(sessions, "trades", "external_id = :id", id=external_id),
        row_count(sessions, "ledger_entries", "trade_external_id = :id", id=external_id),
        row_count(
            sessions,
            "outbox",
            "topic = 'trade.applied' AND payload->>'externalId' = :id",
            id=external_id,
        ),
    )


def totals(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    """(trades rows, trade ledger entries, trade.applied events) across the whole database."""
    return (
        row_count(sessions, "trades"),
        row_count(sessions, "ledger_entries", "trade_external_id IS NOT NULL"),
        row_count(sessions, "outbox", "topic = 'trade.applied'"),
    )


def assert_error(answer: Response, status: int, message: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    if message is not None:
        assert body["error"] == message


def assert_ledger_ok(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        report = ledger.check(session)
    assert report.ok, report.problems


@pytest.fixture
def funded(bitgo: BitGo, link: Link) -> Link:
    """A linked account with 100 btc and 100 usdc available."""
    bitgo.fund(link, 100, "btc")
    bitgo.fund(link, 100, "usdc")
    return link


@pytest.fixture
def nothing_stored(bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]) -> Iterator[None]:
    """After the test: no trade, trade entry or trade event anywhere, balances as before."""
    before = totals(sessions), [bitgo.balances(funded, c) for c in ("btc", "eth", "usdc")]
    yield
    assert (totals(sessions), [bitgo.balances(funded, c) for c in ("btc", "eth", "usdc")]) == (
        before
    )


# --- applying ----------------------------------------------------------------------------------


def test_credit_adds_to_available(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"btc": "25"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "btc") == (125, 0, 0)


def test_debit_takes_from_available(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"btc": "-40"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "btc") == (60, 0, 0)


def test_debit_of_everything_available_leaves_zero(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"btc": "-100"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "btc") == (0, 0, 0)


def test_credit_of_a_currency_never_held_opens_it(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"eth": "7"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "eth") == (7, 0, 0)


def test_multi_currency_trade_applies_every_leg(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"usdc": "-60", "btc": "3", "eth": "9"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "btc") == (103, 0, 0)
    assert bitgo.balances(funded, "eth") == (9, 0, 0)
    assert bitgo.balances(funded, "usdc") == (40, 0, 0)


def test_answer_is_the_record_with_deltas_as_sorted_strings(bitgo: BitGo, funded: Link) -> None:
    external_id = new_id()
    answer = post(bitgo, trade(funded, external_id, {"usdc": -60, "btc": "3", "eth": 9}))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {
        "externalId",
        "partnersConnectionId",
        "connectionId",
        "deltas",
        "settled",
        "createdAt",
    }
    assert body["externalId"] == external_id
    assert body["partnersConnectionId"] == funded.partners_connection_id
    assert body["connectionId"] == funded.connection_id
    assert body["deltas"] == {"btc": "3", "eth": "9", "usdc": "-60"}
    assert list(body["deltas"]) == ["btc", "eth", "usdc"]
    assert body["settled"] is False
    assert isinstance(body["createdAt"], str)
    assert body["createdAt"]


def test_partner_connection_id_spelling_is_accepted(bitgo: BitGo, funded: Link) -> None:
    body = {
        "externalId": new_id(),
        "partnerConnectionId": funded.partners_connection_id,
        "deltas": {"btc": "5"},
    }
    answer = post(bitgo, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["partnersConnectionId"] == funded.partners_connection_id
    assert bitgo.balances(funded, "btc") == (105, 0, 0)


def test_json_integer_deltas_are_accepted(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"btc": -30, "usdc": 30}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["deltas"] == {"btc": "-30", "usdc": "30"}
    assert bitgo.balances(funded, "btc") == (70, 0, 0)
    assert bitgo.balances(funded, "usdc") == (130, 0, 0)


def test_a_78_digit_credit_is_applied_exactly(bitgo: BitGo, link: Link) -> None:
    answer = post(bitgo, trade(link, new_id(), {"btc": str(MAX)}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["deltas"] == {"btc": str(MAX)}
    assert bitgo.balances(link, "btc") == (MAX, 0, 0)


def test_a_credit_taking_the_account_past_numeric_78_is_422_and_stores_nothing(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session]
) -> None:
    assert post(bitgo, trade(link, new_id(), {"btc": str(MAX)})).status_code == 200
    external_id = new_id()
    answer = post(bitgo, trade(link, external_id, {"btc": "1"}))
    assert_error(answer, 422, "Account limit exceeded: btc")
    assert traces(sessions, external_id) == (0, 0, 0)
    assert bitgo.balances(link, "btc") == (MAX, 0, 0)


# --- what an applied trade stores --------------------------------------------------------------


def test_applied_trade_stores_one_row_two_entries_per_leg_and_one_event(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    answer = post(bitgo, trade(funded, external_id, {"btc": "-10", "eth": "4"}))
    assert answer.status_code == 200, answer.text
    assert traces(sessions, external_id) == (1, 4, 1)


def test_debit_entries_move_available_to_trading(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-10"})).status_code == 200
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT currency, account, amount, reason FROM ledger_entries "
                "WHERE trade_external_id = :id ORDER BY account"
            ),
            {"id": external_id},
        ).all()
    assert [tuple(r) for r in rows] == [
        ("btc", "available", -10, "trade"),
        ("btc", "trading", 10, "trade"),
    ]


def test_credit_entries_move_trading_to_available(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"usdc": "12"})).status_code == 200
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT currency, account, amount FROM ledger_entries "
                "WHERE trade_external_id = :id ORDER BY account"
            ),
            {"id": external_id},
        ).all()
    assert [tuple(r) for r in rows] == [("usdc", "available", 12), ("usdc", "trading", -12)]


def test_trade_applied_event_carries_the_trade(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"usdc": 5, "btc": "-5"})).status_code == 200
    with sessions() as session:
        payload = session.execute(
            text(
                "SELECT payload FROM outbox "
                "WHERE topic = 'trade.applied' AND payload->>'externalId' = :id"
            ),
            {"id": external_id},
        ).scalar_one()
    assert payload == {
        "externalId": external_id,
        "partnersConnectionId": funded.partners_connection_id,
        "connectionId": funded.connection_id,
        "deltas": {"btc": "-5", "usdc": "5"},
    }


def test_applied_trade_keeps_the_ledger_balanced(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    assert post(bitgo, trade(funded, new_id(), {"btc": "-99", "usdc": "1"})).status_code == 200
    assert_ledger_ok(sessions)


# --- idempotency -------------------------------------------------------------------------------


def test_repeat_with_the_same_body_answers_the_same_record(bitgo: BitGo, funded: Link) -> None:
    body = trade(funded, new_id(), {"btc": "-10", "usdc": "10"})
    first = post(bitgo, body)
    second = post(bitgo, body)
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()


def test_repeat_with_the_same_body_applies_nothing_again(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    body = trade(funded, external_id, {"btc": "-10", "usdc": "10"})
    for _ in range(3):
        assert post(bitgo, body).status_code == 200
    assert bitgo.balances(funded, "btc") == (90, 0, 0)
    assert bitgo.balances(funded, "usdc") == (110, 0, 0)
    assert traces(sessions, external_id) == (1, 4, 1)


@pytest.mark.parametrize(
    ("first", "repeat"),
    [
        pytest.param({"btc": "-10"}, {"btc": -10}, id="json-integer"),
        pytest.param(
            {"btc": "-10", "usdc": "10"}, {"usdc": "10", "btc": "-10"}, id="other-key-order"
        ),
    ],
)
def test_repeat_spelled_differently_is_the_same_request(
    bitgo: BitGo,
    funded: Link,
    sessions: sessionmaker[Session],
    first: dict[str, Any],
    repeat: dict[str, Any],
) -> None:
    external_id = new_id()
    original = post(bitgo, trade(funded, external_id, first))
    answer = post(bitgo, trade(funded, external_id, repeat))
    assert answer.status_code == 200, answer.text
    assert answer.json() == original.json()
    assert bitgo.balances(funded, "btc") == (90, 0, 0)
    assert traces(sessions, external_id) == (1, 2 * len(first), 1)


def test_repeat_with_the_other_connection_id_spelling_is_the_same_request(
    bitgo: BitGo, funded: Link
) -> None:
    external_id = new_id()
    first = post(bitgo, trade(funded, external_id, {"btc": "-10"}))
    second = post(
        bitgo,
        {
            "externalId": external_id,
            "partnerConnectionId": funded.partners_connection_id,
            "deltas": {"btc": "-10"},
        },
    )
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert bitgo.balances(funded, "btc") == (90, 0, 0)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"btc": "-11"}, id="other-amount"),
        pytest.param({"btc": "10"}, id="other-sign"),
        pytest.param({"btc": "-10", "usdc": "10"}, id="extra-currency"),
        pytest.param({"usdc": "-10"}, id="other-currency"),
    ],
)
def test_same_external_id_with_other_deltas_is_409_and_changes_nothing(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session], other: dict[str, str]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-10"})).status_code == 200
    answer = post(bitgo, trade(funded, external_id, other))
    assert_error(answer, 409, "externalId already used with different parameters")
    assert bitgo.balances(funded, "btc") == (90, 0, 0)
    assert bitgo.balances(funded, "usdc") == (100, 0, 0)
    assert traces(sessions, external_id) == (1, 2, 1)


def test_same_external_id_on_another_connection_is_409_and_changes_nothing(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    other = bitgo.link()
    bitgo.fund(other, 100)
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-10"})).status_code == 200
    answer = post(bitgo, trade(other, external_id, {"btc": "-10"}))
    assert_error(answer, 409, "externalId already used with different parameters")
    assert bitgo.balances(funded, "btc") == (90, 0, 0)
    assert bitgo.balances(other, "btc") == (100, 0, 0)
    assert traces(sessions, external_id) == (1, 2, 1)


def test_same_external_id_on_an_unknown_connection_is_409(bitgo: BitGo, funded: Link) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-10"})).status_code == 200
    body = {"externalId": external_id, "partnersConnectionId": "nobody", "deltas": {"btc": "-10"}}
    assert_error(post(bitgo, body), 409, "externalId already used with different parameters")


# --- refusals: 422, 404 ------------------------------------------------------------------------


def test_debit_beyond_available_is_422(bitgo: BitGo, funded: Link) -> None:
    answer = post(bitgo, trade(funded, new_id(), {"btc": "-101"}))
    assert_error(answer, 422, "Insufficient funds: btc")


def test_debit_beyond_available_stores_nothing(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-101"})).status_code == 422
    assert traces(sessions, external_id) == (0, 0, 0)
    assert bitgo.balances(funded, "btc") == (100, 0, 0)


def test_debit_of_a_currency_never_held_is_422(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    answer = post(bitgo, trade(funded, external_id, {"eth": "-1"}))
    assert_error(answer, 422, "Insufficient funds: eth")
    assert traces(sessions, external_id) == (0, 0, 0)
    assert bitgo.balances(funded, "eth") == (0, 0, 0)


def test_debit_cannot_reach_funds_pending_in_or_held(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    held = str(uuid.uuid4())
    assert bitgo.reserve("deallocation", funded, held, "60").json()["status"] == "reserved"
    pending = str(uuid.uuid4())
    assert bitgo.reserve("allocation", funded, pending, "500").json()["status"] == "reserved"
    external_id = new_id()
    answer = post(bitgo, trade(funded, external_id, {"btc": "-41"}))
    assert_error(answer, 422, "Insufficient funds: btc")
    assert bitgo.balances(funded, "btc") == (40, 500, 60)
    assert traces(sessions, external_id) == (0, 0, 0)


@pytest.mark.parametrize(
    "deltas",
    [
        # Legs are applied in currency order: the short leg comes after an applied one...
        pytest.param({"btc": "50", "eth": "5", "usdc": "-101"}, id="short-leg-last"),
        # ...or before the others are tried.
        pytest.param({"btc": "-101", "eth": "5", "usdc": "50"}, id="short-leg-first"),
    ],
)
def test_multi_currency_trade_with_one_short_leg_applies_no_leg(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session], deltas: dict[str, str]
) -> None:
    external_id = new_id()
    answer = post(bitgo, trade(funded, external_id, deltas))
    short = next(c for c, d in deltas.items() if d == "-101")
    assert_error(answer, 422, f"Insufficient funds: {short}")
    assert bitgo.balances(funded, "btc") == (100, 0, 0)
    assert bitgo.balances(funded, "eth") == (0, 0, 0)
    assert bitgo.balances(funded, "usdc") == (100, 0, 0)
    assert traces(sessions, external_id) == (0, 0, 0)


def test_replay_after_insufficient_funds_applies_once_funds_arrive(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    body = trade(link, external_id, {"btc": "-30"})
    assert_error(post(bitgo, body), 422, "Insufficient funds: btc")
    bitgo.fund(link, 100)
    answer = post(bitgo, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["deltas"] == {"btc": "-30"}
    assert bitgo.balances(link, "btc") == (70, 0, 0)
    assert traces(sessions, external_id) == (1, 2, 1)


def test_after_a_422_the_external_id_is_free_for_other_deltas(
    bitgo: BitGo, funded: Link, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    assert post(bitgo, trade(funded, external_id, {"btc": "-101"})).status_code == 422
    answer = post(bitgo, trade(funded, external_id, {"btc": "-1"}))
    assert answer.status_code == 200, answer.text
    assert bitgo.balances(funded, "btc") == (99, 0, 0)
    assert traces(sessions, external_id) == (1, 2, 1)


@pytest.mark.parametrize(
    ("deltas", "message"),
    [
        pytest.param({"doge": "5"}, "Unsupported currency: doge", id="alone"),
        pytest.param({"btc": "5", "doge": "5"}, "Unsupported currency: doge", id="beside-btc"),
        pytest.param({"xrp": "1", "doge": "-1"}, "Unsupported currency: doge, xrp", id="two"),
        pytest.param({"BTC": "5"}, "Unsupported currency: BTC", id="upper-case"),
    ],
)
def test_unsupported_currency_is_422_and_stores_nothing(
    bitgo: BitGo,
    funded: Link,
    sessions: sessionmaker[Session],
    deltas: dict[str, str],
    message: str,
) -> None:
    external_id = new_id()
    assert_error(post(bitgo, trade(funded, external_id, deltas)), 422, message)
    assert traces(sessions, external_id) == (0, 0, 0)
    assert bitgo.balances(funded, "btc") == (100, 0, 0)


def test_sixty_four_currencies_are_parsed_and_checked(bitgo: BitGo, funded: Link) -> None:
    deltas = {f"c{i:02d}": "1" for i in range(63)} | {"btc": "1"}
    answer = post(bitgo, trade(funded, new_id(), deltas))
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith("Unsupported currency: c00, c01,")


def test_unknown_partners_connection_id_is_404_and_stores_nothing(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    external_id = new_id()
    body = {"externalId": external_id, "partnersConnectionId": "nobody", "deltas": {"btc": "5"}}
    assert_error(post(bitgo, body), 404, "Account not found")
    assert traces(sessions, external_id) == (0, 0, 0)


# --- malformed bodies: 400 ---------------------------------------------------------------------

DROP = object()


def shaped(link: Link, field: str, value: Any) -> dict[str, Any]:
    body = trade(link, new_id(), {"btc": "-1"})
    if field.startswith("deltas."):
        body["deltas"] = {field.removeprefix("deltas."): value}
    elif value is DROP:
        del body[field]
    else:
        body[field] = value
    return body


MALFORMED = [
    ("externalId", DROP, "externalId-missing"),
    ("externalId", None, "externalId-null"),
    ("externalId", "", "externalId-empty"),
    ("externalId", "   ", "externalId-blank"),
    ("externalId", 12345, "externalId-number"),
    ("externalId", ["x"], "externalId-array"),
    ("externalId", "x" * 257, "externalId-too-long"),
    ("externalId", "a\x00b", "externalId-nul"),
    ("partnersConnectionId", DROP, "partnersConnectionId-missing"),
    ("partnersConnectionId", "", "partnersConnectionId-empty"),
    ("partnersConnectionId", 7, "partnersConnectionId-number"),
    ("deltas", DROP, "deltas-missing"),
    ("deltas", None, "deltas-null"),
    ("deltas", {}, "deltas-empty"),
    ("deltas", [["btc", "1"]], "deltas-array"),
    ("deltas", "btc:1", "deltas-string"),
    ("deltas.btc", "0", "zero-string"),
    ("deltas.btc", 0, "zero-integer"),
    ("deltas.btc", "-0", "minus-zero"),
    ("deltas.btc", "+5", "plus-sign"),
    ("deltas.btc", "01", "leading-zero"),
    ("deltas.btc", "-01", "negative-leading-zero"),
    ("deltas.btc", "1.5", "decimal-string"),
    ("deltas.btc", "1e3", "exponent-string"),
    ("deltas.btc", " 5", "leading-space"),
    ("deltas.btc", "5 ", "trailing-space"),
    ("deltas.btc", "-", "bare-minus"),
    ("deltas.btc", "", "empty-string"),
    ("deltas.btc", "five", "word"),
    ("deltas.btc", 1.5, "float"),
    ("deltas.btc", 5.0, "integral-float"),
    ("deltas.btc", True, "true"),
    ("deltas.btc", False, "false"),
    ("deltas.btc", None, "null"),
    ("deltas.btc", ["5"], "array"),
    ("deltas.btc", {"quantity": "5"}, "object"),
    ("deltas.btc", "1" + "0" * 78, "79-digit-string"),
    ("deltas.btc", "-1" + "0" * 78, "79-digit-negative-string"),
    ("deltas.btc", 10**78, "79-digit-integer"),
    ("deltas.btc", -(10**78), "79-digit-negative-integer"),
    ("deltas.", "5", "empty-currency"),
    ("deltas.  ", "5", "blank-currency"),
]


@pytest.mark.parametrize(
    ("field", "value"), [pytest.param(f, v, id=name) for f, v, name in MALFORMED]
)
@pytest.mark.usefixtures("nothing_stored")
def test_malformed_body_is_400(bitgo: BitGo, funded: Link, field: str, value: Any) -> None:
    assert_error(post(bitgo, shaped(funded, field, value)), 400)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([], id="array"),
        pytest.param("trade", id="string"),
        pytest.param(None, id="null"),
        pytest.param(5, id="number"),
    ],
)
@pytest.mark.usefixtures("nothing_stored")
def test_body_that_is_not_an_object_is_400(bitgo: BitGo, body: Any) -> None:
    # Sent as text: httpx sends no body at all for json=None.
    answer = bitgo.http.post(
        ROUTE,
        content=json.dumps(body).encode(),
        headers={**bitgo.internal(), "Content-Type": "application/json"},
    )
    assert_error(answer, 400, "Body must be a JSON object")


@pytest.mark.parametrize(
    "literal",
    [
        pytest.param("1e3", id="exponent"),
        pytest.param("5.0", id="decimal-point"),
        pytest.param("-0", id="minus-zero"),
        pytest.param("NaN", id="nan"),
        pytest.param("-Infinity", id="minus-infinity"),
    ],
)
@pytest.mark.usefixtures("nothing_stored")
def test_raw_json_number_literal_as_delta_is_400(bitgo: BitGo, funded: Link, literal: str) -> None:
    raw = json.dumps(trade(funded, new_id(), {"btc": "LITERAL"})).replace('"LITERAL"', literal)
    answer = bitgo.http.post(
        ROUTE,
        content=raw.encode(),
        headers={**bitgo.internal(), "Content-Type": "application/json"},
    )
    assert_error(answer, 400)


@pytest.mark.usefixtures("nothing_stored")
def test_body_that_is_not_json_is_400(bitgo: BitGo) -> None:
    answer = bitgo.http.post(
        ROUTE,
        content=b"{externalId: 1",
        headers={**bitgo.internal(), "Content-Type": "application/json"},
    )
    assert_error(answer, 400, "Body is not valid JSON")


@pytest.mark.usefixtures("nothing_stored")
def test_more_than_sixty_four_currencies_is_400(bitgo: BitGo, funded: Link) -> None:
    deltas = {f"c{i:02d}": "1" for i in range(64)} | {"btc": "1"}
    assert_error(post(bitgo, trade(funded, new_id(), deltas)), 400)


@pytest.mark.usefixtures("nothing_stored")
def test_one_malformed_leg_refuses_the_whole_trade(bitgo: BitGo, funded: Link) -> None:
    deltas = {"btc": "5", "usdc": "1.5"}
    assert_error(post(bitgo, trade(funded, new_id(), deltas)), 400)


# --- authentication: 401 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer not-the-internal-token"}, id="wrong-token"),
        pytest.param({"Authorization": f"Bearer {INTERNAL_TOKEN}x"}, id="token-with-suffix"),
        pytest.param({"Authorization": f"Basic {INTERNAL_TOKEN}"}, id="other-scheme"),
        pytest.param({"Authorization": INTERNAL_TOKEN}, id="no-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
    ],
)
@pytest.mark.usefixtures("nothing_stored")
def test_missing_or_wrong_internal_token_is_401(
    bitgo: BitGo, funded: Link, headers: dict[str, str]
) -> None:
    answer = bitgo.http.post(ROUTE, json=trade(funded, new_id(), {"btc": "-5"}), headers=headers)
    assert_error(answer, 401)


@pytest.mark.usefixtures("nothing_stored")
def test_bitgo_signature_is_not_an_internal_token(bitgo: BitGo, funded: Link) -> None:
    answer = bitgo.http.post(
        ROUTE, json=trade(funded, new_id(), {"btc": "-5"}), headers=bitgo.headers()
    )
    assert_error(answer, 401)


# --- concurrency, over real HTTP ---------------------------------------------------------------


def race(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at once from its own thread, each on its own connection."""
    start = threading.Barrier(len(bodies))
    headers = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}

    def one(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=30) as http:
            start.wait()
            return http.post(ROUTE, json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_twenty_identical_trades_at_once_all_answer_the_record_and_apply_once(
    bitgo: BitGo, live_server: LiveServer, sessions: sessionmaker[Session]
) -> None:
    link = bitgo.link()
    bitgo.fund(link, 1000)
    external_id = new_id()
    answers = race(live_server.url, [trade(link, external_id, {"btc": "-300", "eth": "2"})] * 20)
    # The per-externalId lock (OES_LOCK_WAIT=3 s) queues the racers: none waits long
    # enough to be told "Request in progress".
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers]
    assert len({a.text for a in answers}) == 1
    assert bitgo.balances(link, "btc") == (700, 0, 0)
    assert bitgo.balances(link, "eth") == (2, 0, 0)
    assert traces(sessions, external_id) == (1, 4, 1)
    assert_ledger_ok(sessions)


def test_ten_debits_racing_for_half_their_total_apply_exactly_five(
    bitgo: BitGo, live_server: LiveServer, sessions: sessionmaker[Session]
) -> None:
    link = bitgo.link()
    bitgo.fund(link, 50)
    ids = [new_id() for _ in range(10)]
    answers = race(live_server.url, [trade(link, i, {"btc": "-10"}) for i in ids])
    assert Counter(a.status_code for a in answers) == {200: 5, 422: 5}
    assert {a.json()["error"] for a in answers if a.status_code == 422} == {
        "Insufficient funds: btc"
    }
    assert bitgo.balances(link, "btc") == (0, 0, 0)
    for external_id, answer in zip(ids, answers, strict=True):
        applied = answer.status_code == 200
        assert traces(sessions, external_id) == ((1, 2, 1) if applied else (0, 0, 0))
    assert_ledger_ok(sessions)


def test_a_trade_lock_held_past_the_wait_answers_request_in_progress(
    bitgo: BitGo, funded: Link, redis_url: str, sessions: sessionmaker[Session]
) -> None:
    import redis

    external_id = new_id()
    client = redis.Redis.from_url(redis_url)
    client.set(f"oes:lock:trade:{external_id}", b"someone-else", px=20_000)
    try:
        answer = post(bitgo, trade(funded, external_id, {"btc": "-5"}))
    finally:
        client.delete(f"oes:lock:trade:{external_id}")
        client.close()
    assert_error(answer, 409, "Request in progress")
    assert traces(sessions, external_id) == (0, 0, 0)
    assert bitgo.balances(funded, "btc") == (100, 0, 0)

"""Reconciliation: what BitGo reports, what we expect it to hold, and where the two differ."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from models.reconciliation import Drift, compare, expected, reported
from tests.conftest import BitGo

A = "0f5c6b0e-3a51-4d43-9f0e-2c9a7d1e8b44"
B = "7a1d2c3b-0000-4000-8000-000000000002"


def network(**balances: Any) -> dict[str, Any]:
    """BitGo's networkBalances with one connection, A, holding ``balances``."""
    return {A: {"clientId": "c", "partnersConnectionId": "p", "balances": balances}}


# --- reported ----------------------------------------------------------------------------------


def test_reported_sums_available_and_held() -> None:
    assert reported(network(btc={"available": "70", "held": "30"})) == {(A, "btc"): 100}


def test_reported_reads_json_integers() -> None:
    assert reported(network(btc={"available": 70, "held": 30})) == {(A, "btc"): 100}


def test_reported_reads_strings_and_integers_side_by_side() -> None:
    assert reported(network(btc={"available": "70", "held": 30})) == {(A, "btc"): 100}


def test_reported_keeps_all_78_digits() -> None:
    big = 10**77
    answer = reported(network(btc={"available": str(big), "held": str(big)}))
    assert answer == {(A, "btc"): 2 * big}


def test_reported_counts_a_missing_figure_as_zero() -> None:
    assert reported(network(btc={"available": "70"}, eth={"held": "5"})) == {
        (A, "btc"): 70,
        (A, "eth"): 5,
    }


def test_reported_ignores_figures_other_than_available_and_held() -> None:
    answer = reported(network(btc={"available": "1", "held": "2", "pendingIn": "1000"}))
    assert answer == {(A, "btc"): 3}


def test_reported_lists_every_connection_and_currency() -> None:
    balances = {
        A: {"balances": {"btc": {"available": "1"}, "eth": {"available": "2"}}},
        B: {"balances": {"btc": {"held": "3"}}},
    }
    assert reported(balances) == {(A, "btc"): 1, (A, "eth"): 2, (B, "btc"): 3}


@pytest.mark.parametrize(
    "figure",
    [
        pytest.param("1.5", id="decimal"),
        pytest.param("1e3", id="exponent"),
        pytest.param("", id="empty"),
        pytest.param("ten", id="word"),
        pytest.param(" 10", id="space"),
        pytest.param("1" * 79, id="79-digits"),
        pytest.param(1.5, id="float"),
        pytest.param(10.0, id="integral-float"),
        pytest.param(True, id="boolean"),
        pytest.param(None, id="null"),
        pytest.param({"value": "10"}, id="object"),
        pytest.param(["10"], id="array"),
    ],
)
@pytest.mark.parametrize("name", ["available", "held"])
def test_reported_gives_none_when_a_figure_is_unreadable(name: str, figure: Any) -> None:
    other = "held" if name == "available" else "available"
    assert reported(network(btc={name: figure, other: "10"})) == {(A, "btc"): None}


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("100", id="string"),
        pytest.param(100, id="number"),
        pytest.param(None, id="null"),
        pytest.param(["100"], id="array"),
    ],
)
def test_reported_gives_none_when_a_currency_entry_is_not_an_object(entry: Any) -> None:
    assert reported(network(btc=entry)) == {(A, "btc"): None}


def test_an_unreadable_currency_does_not_spoil_the_others() -> None:
    answer = reported(network(btc={"available": "x"}, eth={"available": "4"}))
    assert answer == {(A, "btc"): None, (A, "eth"): 4}


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("oops", id="string"),
        pytest.param(None, id="null"),
        pytest.param(["balances"], id="array"),
        pytest.param({}, id="no-balances"),
        pytest.param({"balances": None}, id="null-balances"),
        pytest.param({"balances": [{"available": "1"}]}, id="array-balances"),
        pytest.param({"balances": "1"}, id="string-balances"),
    ],
)
def test_reported_skips_connections_without_a_balances_object(entry: Any) -> None:
    balances = {B: entry, A: {"balances": {"btc": {"available": "9"}}}}
    assert reported(balances) == {(A, "btc"): 9}


def test_reported_of_nothing_is_empty() -> None:
    assert reported({}) == {}


# --- compare -----------------------------------------------------------------------------------


def test_compare_finds_nothing_when_both_agree() -> None:
    ours = {(A, "btc"): 100, (B, "eth"): 5}
    theirs: dict[tuple[str, str], int | None] = {(A, "btc"): 100, (B, "eth"): 5}
    assert compare(ours, theirs) == []


def test_compare_reports_a_differing_figure() -> None:
    assert compare({(A, "btc"): 100}, {(A, "btc"): 99}) == [Drift(A, "btc", 100, 99)]


def test_compare_counts_a_figure_bitgo_does_not_report_as_zero() -> None:
    assert compare({(A, "btc"): 100}, {}) == [Drift(A, "btc", 100, 0)]


def test_compare_counts_a_figure_we_do_not_hold_as_zero() -> None:
    assert compare({}, {(A, "btc"): 7}) == [Drift(A, "btc", 0, 7)]


def test_compare_accepts_zero_on_one_side_and_absence_on_the_other() -> None:
    assert compare({(A, "btc"): 0}, {}) == []
    assert compare({}, {(A, "btc"): 0}) == []


def test_compare_reports_an_unreadable_figure_even_against_zero() -> None:
    assert compare({(A, "btc"): 0}, {(A, "btc"): None}) == [Drift(A, "btc", 0, None)]
    assert compare({}, {(A, "btc"): None}) == [Drift(A, "btc", 0, None)]


def test_compare_returns_only_the_differing_keys_sorted() -> None:
    ours = {(B, "btc"): 1, (A, "usdc"): 2, (A, "btc"): 3, (A, "eth"): 4}
    theirs: dict[tuple[str, str], int | None] = {
        (B, "btc"): 9,
        (A, "usdc"): 2,
        (A, "btc"): 8,
        (A, "eth"): 4,
    }
    assert compare(ours, theirs) == [Drift(A, "btc", 3, 8), Drift(B, "btc", 1, 9)]


def test_drift_line_names_the_connection_currency_and_both_figures() -> None:
    assert Drift(A, "btc", 100, 99).line() == (
        f"connection {A} btc: expected 100 at BitGo, BitGo reports 99"
    )
    assert Drift(A, "btc", 100, None).line() == (
        f"connection {A} btc: expected 100 at BitGo, BitGo reports nothing usable"
    )


# --- expected, from the database ---------------------------------------------------------------


def trade(bitgo: BitGo, partners_connection_id: str, deltas: dict[str, str]) -> None:
    answer = bitgo.http.post(
        "/internal/v1/trades",
        json={
            "externalId": f"trade-{uuid.uuid4()}",
            "partnersConnectionId": partners_connection_id,
            "deltas": deltas,
        },
        headers=bitgo.internal(),
    )
    assert answer.status_code == 200, answer.text


def test_expected_adds_back_an_unsettled_debit(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    link = bitgo.link()
    bitgo.fund(link, 100)
    trade(bitgo, link.partners_connection_id, {"btc": "-30"})
    assert bitgo.balances(link, "btc") == (70, 0, 0)
    with sessions() as session:
        ours = expected(session)
    # BitGo has not seen the trade: it still holds all 100 (70 available - (-30) unsettled).
    assert ours[(link.connection_id, "btc")] == 100


def test_expected_takes_away_an_unsettled_credit(
    bitgo: BitGo, sessions: sessionmaker[Session]
) -> None:
    link = bitgo.link()
    trade(bitgo, link.partners_connection_id, {"eth": "20"})
    with sessions() as session:
        ours = expected(session)
    assert ours[(link.connection_id, "eth")] == 0


def test_expected_counts_pending_in_and_held(bitgo: BitGo, sessions: sessionmaker[Session]) -> None:
    link = bitgo.link()
    bitgo.fund(link, 100)
    assert bitgo.reserve("deallocation", link, str(uuid.uuid4()), "40").status_code == 200
    assert bitgo.reserve("allocation", link, str(uuid.uuid4()), "5").status_code == 200
    assert bitgo.balances(link, "btc") == (60, 5, 40)
    with sessions() as session:
        ours = expected(session)
    assert ours[(link.connection_id, "btc")] == 105

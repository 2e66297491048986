"""Trading results (contract section 7, Trades): applied to ``available`` once per
externalId, all or nothing."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from models import trades
from models.connections import ConnectionRecord
from models.errors import ConflictError, NotFoundError, UnprocessableError
from models.ledger import ACCOUNT_LIMIT
from models.trades import TradeRequest
from models.transfers import Rules
from tests.models.factories import RULES, funded, linked_connection, trade
from tests.models.stored import Balances, Entry, Written, balances, count, entries, events


@pytest.fixture
def link(db: Session) -> ConnectionRecord:
    return linked_connection(db)


def refused_without_trace(
    db: Session, link: ConnectionRecord, request: TradeRequest, rules: Rules = RULES
) -> str:
    """Apply ``request`` in a savepoint the caller rolls back on refusal; the refusal's text.

    Asserts the rollback left nothing: no trade row, no entries, no event, same balances.
    """
    before = {c: balances(db, link, c) for c in ("btc", "eth")}
    with pytest.raises(UnprocessableError) as refused, db.begin_nested():
        trades.apply(db, request=request, rules=rules)
    assert count(db, "trades", "external_id = :id", id=request.external_id) == 0
    assert entries(db, trade_external_id=request.external_id) == []
    assert events(db, externalId=request.external_id) == []
    assert {c: balances(db, link, c) for c in ("btc", "eth")} == before
    return refused.value.message


def request_for(link: ConnectionRecord, deltas: dict[str, int], external_id: str) -> TradeRequest:
    return TradeRequest(
        external_id=external_id, partners_connection_id=link.partners_connection_id, deltas=deltas
    )


def test_a_positive_delta_credits_available_from_trading(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 50})
    assert balances(db, link) == Balances(50, 0, 0)
    assert entries(db, trade_external_id=applied.external_id) == [
        Entry("trade", "trading", -50),
        Entry("trade", "available", 50),
    ]


def test_a_negative_delta_debits_available_to_trading(db: Session, link: ConnectionRecord) -> None:
    funded(db, link, 100)
    applied = trade(db, link, {"btc": -30})
    assert balances(db, link) == Balances(70, 0, 0)
    assert entries(db, trade_external_id=applied.external_id) == [
        Entry("trade", "available", -30),
        Entry("trade", "trading", 30),
    ]


def test_a_trade_applies_every_currency_it_names(db: Session, link: ConnectionRecord) -> None:
    funded(db, link, 100, "eth")
    trade(db, link, {"btc": 5, "eth": -40})
    assert (balances(db, link, "btc"), balances(db, link, "eth")) == (
        Balances(5, 0, 0),
        Balances(60, 0, 0),
    )


def test_an_applied_trade_is_stored_and_emits_trade_applied(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"eth": 7, "btc": 3}, external_id="t-stored")
    assert (applied.external_id, applied.partners_connection_id, applied.connection_id) == (
        "t-stored",
        link.partners_connection_id,
        link.connection_id,
    )
    assert applied.deltas == {"btc": 3, "eth": 7}
    assert (applied.settlement_id, applied.settled_at) == (None, None)
    assert events(db, externalId="t-stored") == [
        Written(
            "trade.applied",
            {
                "externalId": "t-stored",
                "partnersConnectionId": link.partners_connection_id,
                "connectionId": str(link.connection_id),
                "deltas": {"btc": "3", "eth": "7"},
            },
        )
    ]


def test_the_same_trade_again_answers_the_stored_one_without_applying_it_twice(
    db: Session, link: ConnectionRecord
) -> None:
    first = trade(db, link, {"btc": 50}, external_id="t-repeat")
    assert trade(db, link, {"btc": 50}, external_id="t-repeat") == first
    assert balances(db, link) == Balances(50, 0, 0)
    assert len(entries(db, trade_external_id="t-repeat")) == 2
    assert len(events(db, externalId="t-repeat")) == 1


def test_a_repeat_answers_even_when_its_currency_is_no_longer_supported(
    db: Session, link: ConnectionRecord
) -> None:
    first = trade(db, link, {"eth": 5}, external_id="t-shrunk")
    only_btc = Rules(currencies=frozenset({"btc"}))
    assert trade(db, link, {"eth": 5}, external_id="t-shrunk", rules=only_btc) == first


def test_the_same_external_id_with_other_deltas_is_a_conflict(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 50}, external_id="t-reused")
    with pytest.raises(ConflictError, match=r"^externalId already used with different parameters$"):
        trade(db, link, {"btc": 51}, external_id="t-reused")
    assert balances(db, link) == Balances(50, 0, 0)


def test_the_same_external_id_for_another_account_is_a_conflict(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 50}, external_id="t-elsewhere")
    other = linked_connection(db)
    with pytest.raises(ConflictError, match=r"^externalId already used with different parameters$"):
        trade(db, other, {"btc": 50}, external_id="t-elsewhere")
    assert balances(db, other) == Balances(0, 0, 0)


def test_a_trade_for_an_unknown_account_is_not_found(db: Session) -> None:
    request = TradeRequest(
        external_id="t-nobody", partners_connection_id="nobody", deltas={"btc": 1}
    )
    with pytest.raises(NotFoundError, match=r"^Account not found$"):
        trades.apply(db, request=request, rules=RULES)


def test_a_debit_larger_than_available_is_refused_with_nothing_applied(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, 10, "eth")
    # Currencies apply in order: the btc credit is posted before the eth debit fails.
    request = request_for(link, {"btc": 5, "eth": -11}, "t-overdraw")
    assert refused_without_trace(db, link, request) == "Insufficient funds: eth"


def test_a_debit_of_a_currency_never_held_is_insufficient_funds(
    db: Session, link: ConnectionRecord
) -> None:
    request = request_for(link, {"eth": -1}, "t-never-held")
    assert refused_without_trace(db, link, request) == "Insufficient funds: eth"


def test_a_credit_reaching_the_account_limit_is_refused_with_nothing_applied(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, ACCOUNT_LIMIT - 1)
    request = request_for(link, {"btc": 1}, "t-limit")
    assert refused_without_trace(db, link, request) == "Account limit exceeded: btc"


def test_unsupported_currencies_are_refused_together_sorted(
    db: Session, link: ConnectionRecord
) -> None:
    request = request_for(link, {"xrp": 1, "btc": 1, "doge": -1}, "t-unsupported")
    assert refused_without_trace(db, link, request) == "Unsupported currency: doge, xrp"

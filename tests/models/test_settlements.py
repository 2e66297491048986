"""Settlements (contract section 11): unsettled trades netted per connection and currency,
one settlement in flight, its body stored once, and the effects of each final answer."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from models import settlements
from models.connections import ConnectionRecord
from models.errors import ConflictError, NotFoundError
from models.settlements import SettlementRecord, SettlementStatus, Verdict, verdict
from models.trades import TradeRecord
from tests.models.factories import (
    empty_settlement_pool,
    funded,
    linked_connection,
    pending_settlement,
    trade,
)
from tests.models.stored import Written, count, events


@pytest.fixture(autouse=True)
def pool(db: Session) -> None:
    """Every settlement here starts from a pool holding only the test's own trades."""
    empty_settlement_pool(db)


@pytest.fixture
def link(db: Session) -> ConnectionRecord:
    return linked_connection(db)


def attachment(db: Session, *applied: TradeRecord) -> list[tuple[uuid.UUID | None, bool]]:
    """(settlement id, settled?) of each trade, in the order given."""
    rows = {
        r.external_id: (r.settlement_id, r.settled_at is not None)
        for r in db.execute(
            text(
                "SELECT external_id, settlement_id, settled_at FROM trades"
                " WHERE external_id = ANY(:ids)"
            ),
            {"ids": [t.external_id for t in applied]},
        )
    }
    return [rows[t.external_id] for t in applied]


def event_of(record: SettlementRecord) -> Written:
    return Written(
        f"settlement.{record.status.value}",
        {
            "id": str(record.id),
            "externalId": record.external_id,
            "status": record.status.value,
            "settlementAmounts": record.amounts,
            "bitgoSettlementId": record.bitgo_id,
            "reason": record.reason,
        },
    )


# --- open_or_start ----------------------------------------------------------------------


def test_with_no_unsettled_trades_no_settlement_starts(db: Session) -> None:
    before = count(db, "settlements")
    assert settlements.open_or_start(db) is None
    assert count(db, "settlements") == before


def test_a_new_settlement_nets_its_trades_per_connection_and_currency(db: Session) -> None:
    a, b = linked_connection(db), linked_connection(db)
    funded(db, b, 4)
    trade(db, a, {"btc": 10})
    trade(db, a, {"btc": -3, "eth": 5})
    trade(db, b, {"btc": -4, "eth": 2})
    trade(db, b, {"eth": -2})
    record = settlements.open_or_start(db)
    assert record is not None
    # b's eth nets to zero and is left out.
    assert record.amounts == {
        str(a.connection_id): {"btc": "7", "eth": "5"},
        str(b.connection_id): {"btc": "-4"},
    }
    assert (record.status, record.body, record.attempts) == (SettlementStatus.PREPARING, None, 0)


def test_a_new_settlement_attaches_every_unsettled_trade(
    db: Session, link: ConnectionRecord
) -> None:
    applied = [trade(db, link, {"btc": n}) for n in (1, 2, 3)]
    record = settlements.open_or_start(db)
    assert record is not None
    assert attachment(db, *applied) == [(record.id, False)] * 3


def test_the_external_id_names_the_sequence_and_a_digest_of_the_trades(
    db: Session, link: ConnectionRecord
) -> None:
    applied = [trade(db, link, {"btc": 1}, external_id=f"t-{n}") for n in ("b", "a", "c")]
    record = settlements.open_or_start(db)
    assert record is not None
    digest = hashlib.sha256("\n".join(sorted(t.external_id for t in applied)).encode())
    assert record.external_id == f"oes-settlement-{record.seq}-{digest.hexdigest()[:16]}"


def test_open_or_start_answers_the_settlement_in_flight_and_attaches_nothing_more(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 1})
    started = settlements.open_or_start(db)
    later = trade(db, link, {"btc": 2})
    assert settlements.open_or_start(db) == started
    assert attachment(db, later) == [(None, False)]


def test_trades_that_net_to_zero_complete_the_settlement_without_a_body_to_post(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, 5)
    applied = [trade(db, link, {"btc": -5}), trade(db, link, {"btc": 5})]
    record = settlements.open_or_start(db)
    assert record is not None
    assert (record.status, record.amounts, record.body) == (SettlementStatus.COMPLETED, {}, None)
    assert record.reason == "trades net to zero; nothing to post"
    assert record.finalized_at is not None
    assert attachment(db, *applied) == [(record.id, True)] * 2
    assert events(db, id=str(record.id)) == [event_of(record)]


# --- the body ---------------------------------------------------------------------------


def test_store_body_stores_the_signed_body_and_makes_it_pending(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 1})
    started = settlements.open_or_start(db)
    assert started is not None
    body = started.signed_body("payload", "signature")
    stored = settlements.store_body(db, started.id, body)
    assert (stored.status, stored.body) == (SettlementStatus.PENDING, body)


def test_store_body_keeps_the_first_body_stored(db: Session, link: ConnectionRecord) -> None:
    trade(db, link, {"btc": 1})
    started = settlements.open_or_start(db)
    assert started is not None
    first = started.signed_body("payload", "first")
    settlements.store_body(db, started.id, first)
    again = settlements.store_body(db, started.id, started.signed_body("payload", "second"))
    assert again.body == first
    assert settlements.get(db, started.id).body == first


def test_unsigned_holds_the_fields_bitgo_receives(db: Session, link: ConnectionRecord) -> None:
    trade(db, link, {"btc": 9})
    record = settlements.open_or_start(db)
    assert record is not None
    assert record.unsigned() == {
        "externalId": record.external_id,
        "settlementAmounts": {str(link.connection_id): {"btc": "9"}},
        "nonce": str(record.id),
        "notes": f"oes-partner settlement {record.seq}",
    }


def test_the_payload_is_the_unsigned_fields_as_compact_key_sorted_json(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 9})
    record = settlements.open_or_start(db)
    assert record is not None
    payload = record.payload()
    assert json.loads(payload) == record.unsigned()
    assert payload == json.dumps(record.unsigned(), sort_keys=True, separators=(",", ":"))


def test_the_signed_body_is_the_unsigned_fields_with_payload_and_signature(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 9})
    record = settlements.open_or_start(db)
    assert record is not None
    assert record.signed_body("p", "s") == {**record.unsigned(), "payload": "p", "signature": "s"}


# --- finish: the final answers ----------------------------------------------------------


def test_completed_settles_its_trades_and_emits_settlement_completed(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    done = settlements.finish(
        db, pending.id, SettlementStatus.COMPLETED, bitgo_id="bg-1", bitgo_status="completed"
    )
    assert done is not None
    assert (done.status, done.bitgo_id, done.bitgo_status, done.attempts) == (
        SettlementStatus.COMPLETED,
        "bg-1",
        "completed",
        1,
    )
    assert done.finalized_at is not None
    assert attachment(db, applied) == [(pending.id, True)]
    assert events(db, id=str(done.id)) == [event_of(done)]


def test_a_completed_settlement_forgets_the_reason_an_earlier_attempt_failed(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    retried = settlements.attempted(db, pending.id, reason="BitGo answered failed")
    assert retried is not None
    assert retried.reason == "BitGo answered failed"
    done = settlements.finish(db, pending.id, SettlementStatus.COMPLETED, bitgo_status="completed")
    assert done is not None
    assert done.reason is None
    assert events(db, id=str(done.id))[0].payload["reason"] is None


def test_rejected_returns_its_trades_to_the_pool_and_emits_settlement_rejected(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    done = settlements.finish(db, pending.id, SettlementStatus.REJECTED, reason="bad amounts")
    assert done is not None
    assert (done.status, done.reason) == (SettlementStatus.REJECTED, "bad amounts")
    assert attachment(db, applied) == [(None, False)]
    assert events(db, id=str(done.id)) == [event_of(done)]


def test_trades_of_a_rejected_settlement_are_netted_again_by_the_next(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    settlements.finish(db, pending.id, SettlementStatus.REJECTED)
    following = settlements.open_or_start(db)
    assert following is not None
    assert following.seq > pending.seq
    assert following.amounts == pending.amounts
    assert following.external_id != pending.external_id
    assert attachment(db, applied) == [(following.id, False)]


def test_conflict_keeps_its_trades_attached_unsettled_and_emits_settlement_conflict(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    done = settlements.finish(db, pending.id, SettlementStatus.CONFLICT, reason="409")
    assert done is not None
    assert done.status is SettlementStatus.CONFLICT
    assert attachment(db, applied) == [(pending.id, False)]
    assert events(db, id=str(done.id)) == [event_of(done)]
    # An operator must act: the next settlement does not take them.
    assert settlements.open_or_start(db) is None


def conflicted(db: Session) -> SettlementRecord:
    pending = pending_settlement(db)
    done = settlements.finish(db, pending.id, SettlementStatus.CONFLICT, reason="409")
    assert done is not None
    return done


def test_a_conflict_resolved_as_completed_settles_its_trades_and_says_so(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    stopped = conflicted(db)
    resolved = settlements.resolve(
        db, stopped.id, settlements.Resolution.MARK_COMPLETED, note="BitGo has it as completed"
    )
    assert resolved.status is SettlementStatus.COMPLETED
    assert resolved.reason == (
        "resolved by an operator (mark_completed): BitGo has it as completed"
    )
    assert attachment(db, applied) == [(stopped.id, True)]
    said = [e for e in events(db, id=str(stopped.id)) if e.topic == "settlement.resolved"]
    assert [(e.payload["status"], e.payload["resolution"]) for e in said] == [
        ("completed", "mark_completed")
    ]
    assert settlements.open_or_start(db) is None  # nothing left to settle


def test_a_conflict_resolved_by_releasing_puts_its_trades_into_the_next_settlement(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    stopped = conflicted(db)
    resolved = settlements.resolve(
        db, stopped.id, settlements.Resolution.RELEASE_TRADES, note="unknown at BitGo"
    )
    assert resolved.status is SettlementStatus.REJECTED
    assert attachment(db, applied) == [(None, False)]
    following = settlements.open_or_start(db)
    assert following is not None
    assert following.id != stopped.id
    assert attachment(db, applied) == [(following.id, False)]


def test_only_a_conflict_can_be_resolved(db: Session, link: ConnectionRecord) -> None:
    trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    with pytest.raises(
        ConflictError, match=r"^Settlement is pending; only a conflict is resolved$"
    ):
        settlements.resolve(db, pending.id, settlements.Resolution.RELEASE_TRADES, note="")
    with pytest.raises(NotFoundError):
        settlements.resolve(db, uuid.uuid4(), settlements.Resolution.RELEASE_TRADES, note="")


def test_a_resolved_conflict_cannot_be_resolved_again(db: Session, link: ConnectionRecord) -> None:
    trade(db, link, {"btc": 3})
    stopped = conflicted(db)
    settlements.resolve(db, stopped.id, settlements.Resolution.RELEASE_TRADES, note="")
    with pytest.raises(ConflictError, match=r"^Settlement is rejected"):
        settlements.resolve(db, stopped.id, settlements.Resolution.MARK_COMPLETED, note="")


def test_a_settlement_is_finished_once(db: Session, link: ConnectionRecord) -> None:
    trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    first = settlements.finish(db, pending.id, SettlementStatus.COMPLETED)
    assert settlements.finish(db, pending.id, SettlementStatus.REJECTED) is None
    assert settlements.get(db, pending.id) == first
    assert len(events(db, id=str(pending.id))) == 1


def test_a_settlement_without_its_body_cannot_be_finished(
    db: Session, link: ConnectionRecord
) -> None:
    trade(db, link, {"btc": 3})
    preparing = settlements.open_or_start(db)
    assert preparing is not None
    assert settlements.finish(db, preparing.id, SettlementStatus.COMPLETED) is None
    assert settlements.get(db, preparing.id).status is SettlementStatus.PREPARING


def test_an_attempt_that_settles_nothing_keeps_it_pending_and_counts_it(
    db: Session, link: ConnectionRecord
) -> None:
    applied = trade(db, link, {"btc": 3})
    pending = pending_settlement(db)
    again = settlements.attempted(db, pending.id, reason="HTTP 503", bitgo_status="failed")
    assert again is not None
    assert (again.status, again.attempts, again.reason, again.bitgo_status) == (
        SettlementStatus.PENDING,
        1,
        "HTTP 503",
        "failed",
    )
    assert again.finalized_at is None
    assert attachment(db, applied) == [(pending.id, False)]
    assert events(db, id=str(pending.id)) == []


def test_get_of_an_unknown_settlement_is_not_found(db: Session) -> None:
    with pytest.raises(NotFoundError, match=r"^Settlement not found$"):
        settlements.get(db, uuid.uuid4())


# --- verdict: what BitGo's answer means -------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(
            {"id": "bg-1", "status": "completed"},
            Verdict(SettlementStatus.COMPLETED, None, "bg-1", "completed"),
            id="completed",
        ),
        pytest.param(
            {"id": "bg-2", "status": "rejected", "reason": "limits"},
            Verdict(SettlementStatus.REJECTED, "limits", "bg-2", "rejected"),
            id="rejected",
        ),
        pytest.param(
            {"id": "bg-3", "status": "failed"},
            Verdict(SettlementStatus.PENDING, "BitGo answered failed", "bg-3", "failed"),
            id="failed-waits",
        ),
        pytest.param(
            {"id": "bg-4", "status": "pending", "reason": "queued"},
            Verdict(SettlementStatus.PENDING, "queued", "bg-4", "pending"),
            id="pending-keeps-its-reason",
        ),
        pytest.param(
            {},
            Verdict(SettlementStatus.PENDING, "BitGo answered no status", None, None),
            id="no-status",
        ),
        pytest.param(
            {"id": 7, "status": None},
            Verdict(SettlementStatus.PENDING, "BitGo answered no status", "7", None),
            id="null-status-numeric-id",
        ),
    ],
)
def test_verdict_reads_bitgos_answer(answer: dict[str, Any], expected: Verdict) -> None:
    assert verdict(answer) == expected


def test_a_rejected_settlement_s_connections_are_then_settled_one_at_a_time_in_turn(
    db: Session,
) -> None:
    first, second, newcomer = (linked_connection(db) for _ in range(3))
    a, b = trade(db, first, {"btc": 3}), trade(db, second, {"btc": 4})
    together = pending_settlement(db)
    assert settlements.finish(db, together.id, SettlementStatus.REJECTED, reason="x") is not None
    c = trade(db, newcomer, {"btc": 5})

    # The connections no rejection touched go first, among themselves.
    clean = pending_settlement(db)
    assert attachment(db, a, b, c) == [(None, False), (None, False), (clean.id, False)]
    assert settlements.finish(db, clean.id, SettlementStatus.COMPLETED) is not None

    # Then each rejected connection alone; one BitGo refuses again waits its next turn.
    alone = pending_settlement(db)
    assert attachment(db, a, b) == [(alone.id, False), (None, False)]
    assert settlements.finish(db, alone.id, SettlementStatus.REJECTED, reason="x") is not None
    turn = pending_settlement(db)
    assert attachment(db, a, b) == [(None, False), (turn.id, False)]
    assert settlements.finish(db, turn.id, SettlementStatus.COMPLETED) is not None
    assert attachment(db, b) == [(turn.id, True)]

"""The ledger (contract section 9): postings move balances, never below zero nor to the
limit, and ``check`` finds every kind of drift (planted with raw SQL, rolled back)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from models import ledger, transfers
from models.connections import ConnectionRecord
from models.ledger import ACCOUNT_LIMIT, Account, Posting
from models.states import Kind
from tests.models.factories import RULES, funded, linked_connection, reserve_request, trade
from tests.models.stored import Balances, balances, count


@pytest.fixture
def link(db: Session) -> ConnectionRecord:
    return linked_connection(db)


def post(
    db: Session, link: ConnectionRecord, source: Account, destination: Account, amount: int
) -> bool:
    return ledger.post(
        db,
        connection_pk=link.pk,
        currency="btc",
        posting=Posting(source, destination, amount),
        reason="test",
    )


def entry_rows(db: Session, link: ConnectionRecord) -> list[tuple[uuid.UUID, str, int]]:
    rows = db.execute(
        text(
            "SELECT posting_id, account, amount FROM ledger_entries"
            " WHERE connection_pk = :pk ORDER BY id"
        ),
        {"pk": link.pk},
    )
    return [(r.posting_id, r.account, int(r.amount)) for r in rows]


def plant_entry(
    db: Session, link: ConnectionRecord, posting_id: uuid.UUID, account: str, amount: int
) -> None:
    """Write one ledger entry by hand, as no domain action would."""
    db.execute(
        text(
            "INSERT INTO ledger_entries (posting_id, connection_pk, currency, account, amount,"
            " reason) VALUES (:posting_id, :pk, 'btc', :account, :amount, 'planted')"
        ),
        {"posting_id": posting_id, "pk": link.pk, "account": account, "amount": amount},
    )


# --- postings ---------------------------------------------------------------------------


def test_a_posting_into_an_account_without_a_row_creates_it(
    db: Session, link: ConnectionRecord
) -> None:
    assert post(db, link, Account.NETWORK_CLEARING, Account.PENDING_IN, 5)
    assert balances(db, link) == Balances(0, 5, 0)


def test_a_posting_between_client_balances_moves_the_amount(
    db: Session, link: ConnectionRecord
) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, 10)
    assert post(db, link, Account.AVAILABLE, Account.HELD, 4)
    assert balances(db, link) == Balances(6, 0, 4)


def test_a_posting_writes_two_entries_sharing_a_posting_id_and_summing_to_zero(
    db: Session, link: ConnectionRecord
) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, 10)
    [(first_id, source, taken), (second_id, destination, given)] = entry_rows(db, link)
    assert first_id == second_id
    assert (source, taken, destination, given) == ("trading", -10, "available", 10)


def test_a_posting_that_would_take_a_balance_below_zero_writes_nothing(
    db: Session, link: ConnectionRecord
) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, 10)
    before = entry_rows(db, link)
    assert not post(db, link, Account.AVAILABLE, Account.HELD, 11)
    assert balances(db, link) == Balances(10, 0, 0)
    assert entry_rows(db, link) == before


def test_a_posting_out_of_an_account_without_a_row_writes_nothing_and_creates_none(
    db: Session, link: ConnectionRecord
) -> None:
    assert not post(db, link, Account.AVAILABLE, Account.TRADING, 1)
    assert count(db, "accounts", "connection_pk = :pk", pk=link.pk) == 0
    assert entry_rows(db, link) == []


def test_a_posting_that_would_bring_the_account_total_to_the_limit_writes_nothing(
    db: Session, link: ConnectionRecord
) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, ACCOUNT_LIMIT - 2)
    post(db, link, Account.NETWORK_CLEARING, Account.PENDING_IN, 1)
    post(db, link, Account.AVAILABLE, Account.HELD, 1)
    # available + pending_in + held is one below the limit: one more unit would reach it.
    assert not post(db, link, Account.NETWORK_CLEARING, Account.PENDING_IN, 1)
    assert not post(db, link, Account.TRADING, Account.AVAILABLE, 1)
    assert balances(db, link) == Balances(ACCOUNT_LIMIT - 3, 1, 1)
    assert len(entry_rows(db, link)) == 6


def test_a_move_between_client_balances_of_an_account_at_the_limit_still_applies(
    db: Session, link: ConnectionRecord
) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, ACCOUNT_LIMIT - 1)
    assert post(db, link, Account.AVAILABLE, Account.HELD, ACCOUNT_LIMIT - 1)
    assert balances(db, link) == Balances(0, 0, ACCOUNT_LIMIT - 1)


def test_a_posting_keeps_all_78_digits(db: Session, link: ConnectionRecord) -> None:
    post(db, link, Account.TRADING, Account.AVAILABLE, ACCOUNT_LIMIT - 1)
    assert balances(db, link).available == 10**78 - 1


def test_a_posting_moves_between_two_different_accounts() -> None:
    with pytest.raises(ValueError, match="between two accounts"):
        Posting(Account.AVAILABLE, Account.AVAILABLE, 1)


# --- check ------------------------------------------------------------------------------


def test_check_passes_on_what_the_domain_actions_wrote(db: Session, link: ConnectionRecord) -> None:
    funded(db, link, 100)
    transfers.reserve(db, request=reserve_request(link, Kind.DEALLOCATION, 30), rules=RULES)
    transfers.reserve(db, request=reserve_request(link, Kind.ALLOCATION, 5), rules=RULES)
    trade(db, link, {"btc": -20, "eth": 7})
    report = ledger.check(db)
    assert report.ok, report.problems
    assert report.entries == count(db, "ledger_entries")
    assert report.accounts >= 2


def test_check_reports_a_posting_whose_entries_do_not_sum_to_zero(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, 100)
    posting_id = uuid.uuid4()
    # Counter accounts only, so no client balance differs from its entries.
    plant_entry(db, link, posting_id, "network_clearing", -5)
    plant_entry(db, link, posting_id, "trading", 4)
    assert ledger.check(db).problems == (f"posting {posting_id}: 2 entries summing to -1",)


def test_check_reports_a_posting_with_one_entry(db: Session, link: ConnectionRecord) -> None:
    funded(db, link, 100)
    posting_id = uuid.uuid4()
    plant_entry(db, link, posting_id, "trading", 5)
    assert ledger.check(db).problems == (f"posting {posting_id}: 1 entries summing to 5",)


def test_check_reports_a_balance_that_differs_from_its_entries(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, 100)
    db.execute(
        text("UPDATE accounts SET available = available + 5 WHERE connection_pk = :pk"),
        {"pk": link.pk},
    )
    assert ledger.check(db).problems == (
        f"account {link.pk}/btc: available is 105, entries give 100",
    )


def test_check_reports_entries_without_an_account_row(db: Session, link: ConnectionRecord) -> None:
    posting_id = uuid.uuid4()
    plant_entry(db, link, posting_id, "trading", -5)
    plant_entry(db, link, posting_id, "available", 5)
    assert ledger.check(db).problems == (
        f"account {link.pk}/btc: entries exist but the account row is missing",
    )


def test_check_reports_pending_in_that_differs_from_the_reserved_allocations(
    db: Session, link: ConnectionRecord
) -> None:
    request = reserve_request(link, Kind.ALLOCATION, 40)
    transfers.reserve(db, request=request, rules=RULES)
    # The status moves without its posting: the entries still give 40 pending.
    db.execute(
        text("UPDATE transfers SET status = 'released' WHERE id = :id"),
        {"id": request.transfer_id},
    )
    assert ledger.check(db).problems == (
        f"account {link.pk}/btc: pending_in is 40, reserved transfers give 0",
    )


def test_check_reports_held_that_differs_from_the_reserved_deallocations(
    db: Session, link: ConnectionRecord
) -> None:
    funded(db, link, 100)
    request = reserve_request(link, Kind.DEALLOCATION, 40)
    transfers.reserve(db, request=request, rules=RULES)
    db.execute(
        text("UPDATE transfers SET quantity = 30 WHERE id = :id"), {"id": request.transfer_id}
    )
    assert ledger.check(db).problems == (
        f"account {link.pk}/btc: held is 40, reserved transfers give 30",
    )


def test_check_reports_every_drift_it_finds(db: Session, link: ConnectionRecord) -> None:
    funded(db, link, 100)
    db.execute(
        text("UPDATE accounts SET available = 90, held = 10 WHERE connection_pk = :pk"),
        {"pk": link.pk},
    )
    assert ledger.check(db).problems == (
        f"account {link.pk}/btc: available is 90, entries give 100",
        f"account {link.pk}/btc: held is 10, entries give 0",
        f"account {link.pk}/btc: held is 10, reserved transfers give 0",
    )

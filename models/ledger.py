"""Double-entry postings against partner accounts, and the check that rebuilds balances.

Every movement of a client balance is one posting: two append-only entries, one
taking ``amount`` from a source account and one giving it to a destination, so
each posting sums to zero. The client accounts are ``available``, ``pending_in``
and ``held``; ``network_clearing`` (BitGo's side) and ``trading`` (the
exchange's order books) are the counter accounts and may go negative.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.states import Kind, Status


class Account(StrEnum):
    AVAILABLE = "available"
    PENDING_IN = "pending_in"
    HELD = "held"
    NETWORK_CLEARING = "network_clearing"
    TRADING = "trading"


CLIENT_ACCOUNTS = (Account.AVAILABLE, Account.PENDING_IN, Account.HELD)

# NUMERIC(78,0) holds below 10**78. Keeping an account's total under it when money
# comes in means no later move between its balances can overflow.
ACCOUNT_LIMIT = 10**78


@dataclass(frozen=True)
class Posting:
    source: Account
    destination: Account
    amount: int

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError("a posting moves a positive amount")
        if self.source == self.destination:
            raise ValueError("a posting moves between two accounts")

    def entries(self) -> tuple[tuple[Account, int], tuple[Account, int]]:
        return ((self.source, -self.amount), (self.destination, self.amount))

    def deltas(self) -> dict[Account, int]:
        """How each client account changes."""
        changes = dict.fromkeys(CLIENT_ACCOUNTS, 0)
        for account, amount in self.entries():
            if account in changes:
                changes[account] += amount
        return changes


_TRANSFER_MOVES: dict[tuple[Kind, Status], tuple[Account, Account]] = {
    (Kind.ALLOCATION, Status.RESERVED): (Account.NETWORK_CLEARING, Account.PENDING_IN),
    (Kind.ALLOCATION, Status.CLEARED): (Account.PENDING_IN, Account.AVAILABLE),
    (Kind.ALLOCATION, Status.RELEASED): (Account.PENDING_IN, Account.NETWORK_CLEARING),
    (Kind.DEALLOCATION, Status.RESERVED): (Account.AVAILABLE, Account.HELD),
    (Kind.DEALLOCATION, Status.CLEARED): (Account.HELD, Account.NETWORK_CLEARING),
    (Kind.DEALLOCATION, Status.RELEASED): (Account.HELD, Account.AVAILABLE),
}


def transfer_posting(kind: Kind, status: Status, amount: int) -> Posting:
    """The posting that takes a transfer of ``kind`` into ``status``."""
    source, destination = _TRANSFER_MOVES[(kind, status)]
    return Posting(source, destination, amount)


def trade_posting(delta: int) -> Posting:
    """The posting for a trading result: positive credits available, negative debits it."""
    if delta > 0:
        return Posting(Account.TRADING, Account.AVAILABLE, delta)
    return Posting(Account.AVAILABLE, Account.TRADING, -delta)


# One statement: move the balances (refusing any that would go negative) and write
# both entries. The entries select FROM the account change, so when it matches no
# row nothing is written.
_CHANGE_EXISTING = """
    UPDATE accounts SET available = available + :d_available,
                        pending_in = pending_in + :d_pending_in,
                        held = held + :d_held,
                        updated_at = now()
    WHERE connection_pk = :connection_pk AND currency = :currency
      AND available + :d_available >= 0
      AND pending_in + :d_pending_in >= 0
      AND held + :d_held >= 0
    RETURNING 1
"""
_CHANGE_UPSERT = """
    INSERT INTO accounts AS a (connection_pk, currency, available, pending_in, held)
    VALUES (:connection_pk, :currency, :d_available, :d_pending_in, :d_held)
    ON CONFLICT (connection_pk, currency) DO UPDATE
       SET available = a.available + EXCLUDED.available,
           pending_in = a.pending_in + EXCLUDED.pending_in,
           held = a.held + EXCLUDED.held,
           updated_at = now()
     WHERE a.available + a.pending_in + a.held
           + EXCLUDED.available + EXCLUDED.pending_in + EXCLUDED.held < :limit
    RETURNING 1
"""
_POST = """
WITH changed AS ({change}),
entries AS (
    INSERT INTO ledger_entries
        (posting_id, connection_pk, currency, account, amount,
         transfer_id, trade_external_id, reason)
    SELECT :posting_id, :connection_pk, :currency, e.account, e.amount,
           :transfer_id, :trade_external_id, :reason
    FROM changed,
         (VALUES (CAST(:source AS text), -CAST(:amount AS numeric)),
                 (CAST(:destination AS text), CAST(:amount AS numeric))) AS e(account, amount)
)
SELECT count(*) FROM changed
"""
_POST_EXISTING = text(_POST.format(change=_CHANGE_EXISTING))
_POST_UPSERT = text(_POST.format(change=_CHANGE_UPSERT))


def post(
    session: Session,
    *,
    connection_pk: int,
    currency: str,
    posting: Posting,
    reason: str,
    transfer_id: uuid.UUID | None = None,
    trade_external_id: str | None = None,
) -> bool:
    """Apply ``posting`` to one account.

    False, writing nothing, if a balance would go negative or the account's total
    would reach ``ACCOUNT_LIMIT``.
    """
    deltas = posting.deltas()
    # Only a posting that adds to the client's accounts may create them.
    statement = _POST_UPSERT if min(deltas.values()) >= 0 else _POST_EXISTING
    result = session.execute(
        statement,
        {
            "connection_pk": connection_pk,
            "currency": currency,
            "limit": ACCOUNT_LIMIT,
            "d_available": deltas[Account.AVAILABLE],
            "d_pending_in": deltas[Account.PENDING_IN],
            "d_held": deltas[Account.HELD],
            "posting_id": uuid.uuid4(),
            "source": posting.source.value,
            "destination": posting.destination.value,
            "amount": posting.amount,
            "transfer_id": transfer_id,
            "trade_external_id": trade_external_id,
            "reason": reason,
        },
    )
    return bool(result.scalar_one())


@dataclass(frozen=True)
class LedgerReport:
    """What ``check`` found: counts, and one line per discrepancy (the first MAX_PROBLEMS)."""

    accounts: int
    entries: int
    problems: tuple[str, ...]
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


MAX_PROBLEMS = 1000
_STREAM = 1000  # rows fetched at a time: memory stays flat however large the ledger


_REBUILT_VS_STORED = text(
    """
    WITH rebuilt AS (
        SELECT connection_pk, currency,
               coalesce(sum(amount) FILTER (WHERE account = 'available'), 0) AS available,
               coalesce(sum(amount) FILTER (WHERE account = 'pending_in'), 0) AS pending_in,
               coalesce(sum(amount) FILTER (WHERE account = 'held'), 0) AS held
        FROM ledger_entries GROUP BY connection_pk, currency
    ),
    reserved AS (
        SELECT connection_pk, currency,
               coalesce(sum(quantity) FILTER (WHERE kind = 'allocation'), 0) AS pending_in,
               coalesce(sum(quantity) FILTER (WHERE kind = 'deallocation'), 0) AS held
        FROM transfers WHERE status = 'reserved' GROUP BY connection_pk, currency
    )
    SELECT k.connection_pk, k.currency,
           a.available, a.pending_in, a.held,
           coalesce(r.available, 0), coalesce(r.pending_in, 0), coalesce(r.held, 0),
           coalesce(t.pending_in, 0), coalesce(t.held, 0)
    FROM (SELECT connection_pk, currency FROM accounts
          UNION SELECT connection_pk, currency FROM rebuilt
          UNION SELECT connection_pk, currency FROM reserved) AS k
    LEFT JOIN accounts a USING (connection_pk, currency)
    LEFT JOIN rebuilt r USING (connection_pk, currency)
    LEFT JOIN reserved t USING (connection_pk, currency)
    ORDER BY k.connection_pk, k.currency
    """
)


def check(session: Session, progress: Callable[[int], object] | None = None) -> LedgerReport:
    """Rebuild every balance from the entries and compare with what is stored.

    PostgreSQL does the sums; the rows stream through in bounded batches, so memory
    stays flat. ``progress`` is told how many accounts each batch covered.
    """
    problems: list[str] = []
    found = 0

    def problem(line: str) -> None:
        nonlocal found
        found += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(line)

    unbalanced = session.execute(
        text(
            "SELECT posting_id, sum(amount), count(*) FROM ledger_entries "
            "GROUP BY posting_id HAVING sum(amount) <> 0 OR count(*) <> 2"
        ),
        execution_options={"yield_per": _STREAM},
    )
    for posting_id, total, count in unbalanced:
        problem(f"posting {posting_id}: {count} entries summing to {total}")
    accounts = 0
    rows = session.execute(_REBUILT_VS_STORED, execution_options={"yield_per": _STREAM})
    for batch in rows.partitions():
        for pk, currency, *amounts in batch:
            accounts += 1
            for line in _account_problems(f"account {pk}/{currency}", amounts):
                problem(line)
        if progress is not None:
            progress(len(batch))
    entries = session.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
    return LedgerReport(
        accounts=accounts, entries=int(entries), problems=tuple(problems), problem_count=found
    )


def account_count(session: Session) -> int:
    """How many accounts ``check`` will go through (for a progress bar)."""
    return int(session.execute(text("SELECT count(*) FROM accounts")).scalar_one())


def _account_problems(where: str, amounts: list[object]) -> list[str]:
    stored = dict(zip(("available", "pending_in", "held"), amounts[0:3], strict=True))
    rebuilt = dict(zip(("available", "pending_in", "held"), amounts[3:6], strict=True))
    reserved = {"pending_in": amounts[6], "held": amounts[7]}
    out: list[str] = []
    for name, value in stored.items():
        if value is None:
            return [*out, f"{where}: entries exist but the account row is missing"]
        if value != rebuilt[name]:
            out.append(f"{where}: {name} is {value}, entries give {rebuilt[name]}")
        if name in reserved and value != reserved[name]:
            out.append(f"{where}: {name} is {value}, reserved transfers give {reserved[name]}")
        if isinstance(value, int | Decimal) and value < 0:
            out.append(f"{where}: {name} is negative ({value})")
    return out

"""The pure pieces: the (state, request) table and the ledger postings."""

from __future__ import annotations

import pytest

from models.ledger import Account, Posting, trade_posting, transfer_posting
from models.states import Action, Kind, Outcome, Status, decide

EXPECTED = [
    (None, Action.RESERVE, Outcome.CREATE),
    (Status.RESERVED, Action.RESERVE, Outcome.CURRENT),
    (Status.REJECTED, Action.RESERVE, Outcome.CURRENT),
    (Status.CLEARED, Action.RESERVE, Outcome.CURRENT),
    (Status.RELEASED, Action.RESERVE, Outcome.RESERVE_AGAIN),
    (None, Action.CLEAR, Outcome.NOT_FOUND),
    (Status.RESERVED, Action.CLEAR, Outcome.APPLY),
    (Status.REJECTED, Action.CLEAR, Outcome.NOT_FOUND),
    (Status.CLEARED, Action.CLEAR, Outcome.CURRENT),
    (Status.RELEASED, Action.CLEAR, Outcome.CONFLICT),
    (None, Action.RELEASE, Outcome.NOT_FOUND),
    (Status.RESERVED, Action.RELEASE, Outcome.APPLY),
    (Status.REJECTED, Action.RELEASE, Outcome.NOT_FOUND),
    (Status.CLEARED, Action.RELEASE, Outcome.CONFLICT),
    (Status.RELEASED, Action.RELEASE, Outcome.CURRENT),
]


@pytest.mark.parametrize(("stored", "action", "outcome"), EXPECTED)
def test_every_state_and_request_has_the_specified_outcome(
    stored: Status | None, action: Action, outcome: Outcome
) -> None:
    assert decide(stored, action, released_repost_conflicts=False) is outcome


def test_the_table_covers_every_pair() -> None:
    covered = {(stored, action) for stored, action, _ in EXPECTED}
    assert covered == {(s, a) for s in (None, *Status) for a in Action}


def test_released_repost_can_be_configured_to_conflict() -> None:
    assert decide(Status.RELEASED, Action.RESERVE, released_repost_conflicts=True) is (
        Outcome.CONFLICT
    )
    # Only the released cell changes.
    for stored, action, outcome in EXPECTED:
        if (stored, action) != (Status.RELEASED, Action.RESERVE):
            assert decide(stored, action, released_repost_conflicts=True) is outcome


# (available, pending_in, held) changes for each transfer transition.
TRANSITIONS = [
    (Kind.ALLOCATION, Status.RESERVED, (0, 7, 0)),
    (Kind.ALLOCATION, Status.CLEARED, (7, -7, 0)),
    (Kind.ALLOCATION, Status.RELEASED, (0, -7, 0)),
    (Kind.DEALLOCATION, Status.RESERVED, (-7, 0, 7)),
    (Kind.DEALLOCATION, Status.CLEARED, (0, 0, -7)),
    (Kind.DEALLOCATION, Status.RELEASED, (7, 0, -7)),
]


@pytest.mark.parametrize(("kind", "status", "deltas"), TRANSITIONS)
def test_transfer_postings_move_the_specified_balances(
    kind: Kind, status: Status, deltas: tuple[int, int, int]
) -> None:
    posting = transfer_posting(kind, status, 7)
    changes = posting.deltas()
    assert (
        changes[Account.AVAILABLE],
        changes[Account.PENDING_IN],
        changes[Account.HELD],
    ) == deltas
    assert sum(amount for _, amount in posting.entries()) == 0


@pytest.mark.parametrize("kind", list(Kind))
def test_a_reservation_and_either_ending_nets_to_the_specified_effect(kind: Kind) -> None:
    def net(*statuses: Status) -> dict[Account, int]:
        total = dict.fromkeys(Account, 0)
        for status in statuses:
            for account, amount in transfer_posting(kind, status, 5).entries():
                total[account] += amount
        return total

    released = net(Status.RESERVED, Status.RELEASED)
    assert all(v == 0 for v in released.values())
    cleared = net(Status.RESERVED, Status.CLEARED)
    sign = 1 if kind is Kind.ALLOCATION else -1
    assert cleared[Account.AVAILABLE] == 5 * sign
    assert cleared[Account.NETWORK_CLEARING] == -5 * sign
    assert cleared[Account.PENDING_IN] == cleared[Account.HELD] == 0


def test_trade_postings_credit_and_debit_available() -> None:
    assert trade_posting(9).deltas()[Account.AVAILABLE] == 9
    assert trade_posting(-9).deltas()[Account.AVAILABLE] == -9


@pytest.mark.parametrize("amount", [0, -1])
def test_a_posting_refuses_non_positive_amounts(amount: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        Posting(Account.TRADING, Account.AVAILABLE, amount)

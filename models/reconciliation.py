"""Our balances beside BitGo's: what each connection should hold there, and where it differs.

BitGo sees what was allocated and settled; it does not see trades not yet
settled. So for each connection and currency we expect BitGo's available + held
to equal our available + pending_in + held minus the net of unsettled trades.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

_POSITIONS = text(
    """
    SELECT c.connection_id, a.currency, a.available + a.pending_in + a.held AS total,
           coalesce((SELECT sum(CAST(t.deltas ->> a.currency AS numeric)) FROM trades t
                     WHERE t.connection_pk = c.id AND t.settled_at IS NULL
                       AND t.deltas ? a.currency), 0) AS unsettled
    FROM accounts a JOIN connections c ON c.id = a.connection_pk
    """
)
_AMOUNT = re.compile(r"-?[0-9]{1,78}")


@dataclass(frozen=True)
class Drift:
    connection_id: str
    currency: str
    expected: int  # what BitGo should report as available + held
    reported: int | None  # None: BitGo's figure is missing or unreadable

    def line(self) -> str:
        seen = "nothing usable" if self.reported is None else str(self.reported)
        return (
            f"connection {self.connection_id} {self.currency}: "
            f"expected {self.expected} at BitGo, BitGo reports {seen}"
        )


def expected(session: Session) -> dict[tuple[str, str], int]:
    """(connectionId, currency) -> what BitGo should hold: our total less unsettled trades."""
    return {
        (str(connection_id), currency): int(total) - int(unsettled)
        for connection_id, currency, total, unsettled in session.execute(_POSITIONS)
    }


def _amount(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _AMOUNT.fullmatch(value):
        return int(value)
    return None


def reported(network_balances: dict[str, Any]) -> dict[tuple[str, str], int | None]:
    """(connectionId, currency) -> BitGo's available + held; None where it is unreadable."""
    out: dict[tuple[str, str], int | None] = {}
    for connection_id, entry in network_balances.items():
        balances = entry.get("balances") if isinstance(entry, dict) else None
        if not isinstance(balances, dict):
            continue
        for currency, b in balances.items():
            parts = (
                [_amount(b.get(k, "0")) for k in ("available", "held")]
                if isinstance(b, dict)
                else [None]
            )
            known = [p for p in parts if p is not None]
            out[(connection_id, currency)] = sum(known) if len(known) == len(parts) else None
    return out


def compare(
    ours: dict[tuple[str, str], int], theirs: dict[tuple[str, str], int | None]
) -> list[Drift]:
    """Every (connection, currency) where the two disagree; absent counts as zero."""
    drifts = []
    for key in sorted(set(ours) | set(theirs)):
        want = ours.get(key, 0)
        have = theirs.get(key, 0)
        if have != want:
            drifts.append(Drift(key[0], key[1], want, have))
    return drifts

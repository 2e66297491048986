"""The transfer state machine: one exact outcome per (stored state, request) pair.

Pure: no I/O. ``models.transfers`` does what the outcome says, for every cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Any


class Kind(StrEnum):
    ALLOCATION = "allocation"
    DEALLOCATION = "deallocation"

    @property
    def label(self) -> str:
        return self.value.capitalize()

    @property
    def id_field(self) -> str:
        return f"{self.value}Id"


class Status(StrEnum):
    RESERVED = "reserved"
    REJECTED = "rejected"
    CLEARED = "cleared"
    RELEASED = "released"


class Action(StrEnum):
    RESERVE = "reserve"
    CLEAR = "clear"
    RELEASE = "release"


class Outcome(Enum):
    CREATE = "create"  # no record: run the rules, store reserved or rejected
    CURRENT = "current"  # answer with the stored record, change nothing
    RESERVE_AGAIN = "reserve_again"  # released: run the rules again on the same record
    APPLY = "apply"  # move to the action's target state and post its money
    CONFLICT = "conflict"  # 409 "<Kind> is <status>"
    MISMATCH = "mismatch"  # 409 "<kindId> already used with different parameters"
    NOT_FOUND = "not_found"  # 404 "<Kind> not found"


TARGET = {Action.CLEAR: Status.CLEARED, Action.RELEASE: Status.RELEASED}

TABLE: Mapping[tuple[Status | None, Action], Outcome] = {
    (None, Action.RESERVE): Outcome.CREATE,
    (Status.RESERVED, Action.RESERVE): Outcome.CURRENT,
    (Status.REJECTED, Action.RESERVE): Outcome.CURRENT,
    (Status.CLEARED, Action.RESERVE): Outcome.CURRENT,
    (Status.RELEASED, Action.RESERVE): Outcome.RESERVE_AGAIN,
    (None, Action.CLEAR): Outcome.NOT_FOUND,
    (Status.REJECTED, Action.CLEAR): Outcome.NOT_FOUND,
    (Status.RESERVED, Action.CLEAR): Outcome.APPLY,
    (Status.CLEARED, Action.CLEAR): Outcome.CURRENT,
    (Status.RELEASED, Action.CLEAR): Outcome.CONFLICT,
    (None, Action.RELEASE): Outcome.NOT_FOUND,
    (Status.REJECTED, Action.RELEASE): Outcome.NOT_FOUND,
    (Status.RESERVED, Action.RELEASE): Outcome.APPLY,
    (Status.CLEARED, Action.RELEASE): Outcome.CONFLICT,
    (Status.RELEASED, Action.RELEASE): Outcome.CURRENT,
}


def decide(
    stored: Status | None,
    action: Action,
    *,
    same_request: bool = True,
    released_repost_conflicts: bool = False,
) -> Outcome:
    """The outcome of ``action`` on a record in state ``stored`` (None: no record).

    A reserve that does not match the stored record's parameters is a mismatch
    whatever the state; ``released_repost_conflicts`` (OES_RELEASED_REPOST=conflict)
    turns a reserve of a released id into a conflict.
    """
    if action is Action.RESERVE and stored is not None and not same_request:
        return Outcome.MISMATCH
    outcome = TABLE[(stored, action)]
    if outcome is Outcome.RESERVE_AGAIN and released_repost_conflicts:
        return Outcome.CONFLICT
    return outcome


def applies_from(action: Action) -> tuple[Status, ...]:
    """The stored states from which ``action`` moves a transfer (its APPLY cells)."""
    return tuple(s for s in Status if TABLE[(s, action)] is Outcome.APPLY)


class Verdict(Enum):
    """What BitGo's record of a stale reservation says to do with ours."""

    CLEAR = "cleared"
    RELEASE = "released"
    STILL_RESERVED = "still_reserved"
    KIND_MISMATCH = "kind_mismatch"
    UNEXPECTED_STATUS = "unexpected_status"

    @property
    def action(self) -> Action | None:
        return {Verdict.CLEAR: Action.CLEAR, Verdict.RELEASE: Action.RELEASE}.get(self)


def stale_verdict(kind: Kind, remote: Mapping[str, Any] | None) -> Verdict:
    """Converge a stale reservation with BitGo's record of it (None: BitGo answered 404).

    Cleared there is cleared here; released there, or unknown there (BitGo never
    reserved it, or forgot it, so nothing will ever clear it), is released here.
    """
    if remote is None:
        return Verdict.RELEASE
    remote_kind = remote.get("type")
    if remote_kind is not None and remote_kind != kind.value:
        return Verdict.KIND_MISMATCH
    return {
        "cleared": Verdict.CLEAR,
        "released": Verdict.RELEASE,
        "reserved": Verdict.STILL_RESERVED,
    }.get(str(remote.get("status")), Verdict.UNEXPECTED_STATUS)

"""The transfer state machine: one exact outcome per (stored state, request) pair.

Pure: no I/O. ``models.transfers`` does what the outcome says.
"""

from __future__ import annotations

from enum import Enum, StrEnum


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
    APPLY = "apply"  # reserved: move to the action's target state
    CONFLICT = "conflict"  # 409 "<Kind> is <status>"
    NOT_FOUND = "not_found"  # 404 "<Kind> not found"


TARGET = {Action.CLEAR: Status.CLEARED, Action.RELEASE: Status.RELEASED}

_TABLE: dict[tuple[Status | None, Action], Outcome] = {
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


def decide(stored: Status | None, action: Action, *, released_repost_conflicts: bool) -> Outcome:
    """The outcome of ``action`` on a record in state ``stored`` (None: no record)."""
    outcome = _TABLE[(stored, action)]
    if outcome is Outcome.RESERVE_AGAIN and released_repost_conflicts:
        return Outcome.CONFLICT
    return outcome

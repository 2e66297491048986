"""Typed domain errors; the API maps each to one HTTP answer in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every refusal the domain makes on purpose: the request is answered, not failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DomainError):
    """The thing asked for does not exist (or is not of the kind asked for)."""


class ConflictError(DomainError):
    """The request contradicts what is stored: reused id, wrong state, used token."""


class InvalidConnectionTokenError(DomainError):
    """A connection token that is unknown or has expired."""

    def __init__(self) -> None:
        super().__init__("Invalid connection token")


class UnprocessableError(DomainError):
    """A well-formed request that the business rules refuse."""


class InvariantError(Exception):
    """Stored state breaks an invariant: a bug, not a refusal.

    Not a ``DomainError``, so nothing that handles refusals swallows it; the
    transaction rolls back, it is logged at error level and counted.
    """

"""Typed domain errors; the API maps each to one HTTP answer in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """The thing asked for does not exist (or is not of the kind asked for)."""


class Conflict(DomainError):
    """The request contradicts what is stored: reused id, wrong state, used token."""


class InvalidConnectionToken(DomainError):
    """A connection token that is unknown or has expired."""

    def __init__(self) -> None:
        super().__init__("Invalid connection token")


class Unprocessable(DomainError):
    """A well-formed request that the business rules refuse."""


class InvariantViolation(DomainError):
    """Stored state breaks an invariant; the transaction must roll back."""

"""HTTP errors and the one place that maps every error to an answer."""

from __future__ import annotations

import structlog
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from models.errors import (
    Conflict,
    DomainError,
    InvalidConnectionToken,
    NotFound,
    Unprocessable,
)

log = structlog.get_logger(__name__)


class HTTPError(Exception):
    """An answer decided at the HTTP edge: ``status`` with ``{"error": message}``."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    status = 401


class PayloadTooLarge(HTTPError):
    status = 413


class LockBusy(HTTPError):
    status = 409

    def __init__(self) -> None:
        super().__init__("Request in progress")


_DOMAIN_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (InvalidConnectionToken, 422),
    (Unprocessable, 422),
)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error(exc.status, exc.message)


async def on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    for kind, status in _DOMAIN_STATUS:
        if isinstance(exc, kind):
            return error(status, exc.message)
    log.error("domain_invariant_violated", error=exc.message)
    return error(500, "Internal error")


async def on_unavailable(request: Request, exc: Exception) -> Response:
    """Redis or PostgreSQL unreachable: fail closed, ask BitGo to come back."""
    which = "Redis" if isinstance(exc, RedisError | OSError) else "Database"
    log.warning("dependency_unavailable", which=which, error=str(exc))
    return error(503, f"{which} unavailable, retry later", headers={"Retry-After": "1"})


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error")
    return error(500, "Internal error")


EXCEPTION_HANDLERS = {
    HTTPError: on_http_error,
    DomainError: on_domain_error,
    RedisError: on_unavailable,
    OperationalError: on_unavailable,
    InterfaceError: on_unavailable,
    PoolTimeout: on_unavailable,
    ConnectionError: on_unavailable,
    Exception: on_unexpected,
}

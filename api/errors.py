"""HTTP errors and the one place that maps every error to an answer."""

from __future__ import annotations

import structlog
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from api.observability import INVARIANT_VIOLATIONS
from models.errors import (
    ConflictError,
    DomainError,
    InvalidConnectionTokenError,
    InvariantError,
    NotFoundError,
    UnprocessableError,
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
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidConnectionTokenError, 422),
    (UnprocessableError, 422),
)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPError):  # Starlette routes only HTTPError here
        return await on_unexpected(request, exc)
    return error(exc.status, exc.message)


async def on_starlette_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (unknown path 404, wrong method 405) in our error shape."""
    if not isinstance(exc, StarletteHTTPException):
        return await on_unexpected(request, exc)
    return error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


async def on_domain_error(request: Request, exc: Exception) -> Response:
    for kind, status in _DOMAIN_STATUS:
        if isinstance(exc, kind):
            return error(status, str(exc))
    return await on_unexpected(request, exc)


async def on_invariant_broken(request: Request, exc: Exception) -> Response:
    """A bug: the transaction has rolled back; say so loudly and count it."""
    INVARIANT_VIOLATIONS.inc()
    log.error("invariant_broken", error=str(exc), path=request.url.path)
    return error(500, "Internal error")


async def on_unavailable(request: Request, exc: Exception) -> Response:
    """Redis or PostgreSQL unreachable: fail closed, ask BitGo to come back."""
    which = "Redis" if isinstance(exc, RedisError | OSError) else "Database"
    log.warning("dependency_unavailable", which=which, error=str(exc))
    return error(503, f"{which} unavailable, retry later", headers={"Retry-After": "1"})


# nginx's "client closed request": no one reads it, but the metrics say whose doing it was.
CLIENT_CLOSED = 499


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: its doing, not a server error."""
    log.info("client_disconnected", path=request.url.path)
    return Response(status_code=CLIENT_CLOSED)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error")
    return error(500, "Internal error")


EXCEPTION_HANDLERS = {
    HTTPError: on_http_error,
    StarletteHTTPException: on_starlette_error,
    ClientDisconnect: on_client_gone,
    DomainError: on_domain_error,
    InvariantError: on_invariant_broken,
    RedisError: on_unavailable,
    OperationalError: on_unavailable,
    InterfaceError: on_unavailable,
    PoolTimeout: on_unavailable,
    ConnectionError: on_unavailable,
    Exception: on_unexpected,
}

"""The dashboard's login: a signed session cookie, its record in Redis, and its CSRF token.

The cookie carries a random session id and an HMAC of it under a key derived from
``OES_DASHBOARD_TOKEN``, so changing the token ends every session. Redis keeps each
live session (under a hash of its id) for ``SESSION_TTL``, so logging out ends it
on the server too. The CSRF token of a session is another HMAC of its id: nothing
to store, and a form from one session is refused in another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from config.settings import Secret

COOKIE = "oes_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_TTL = 8 * 3600  # seconds a login lasts
_PREFIX = "oes:dashboard:session:"


@dataclass(frozen=True)
class DashboardSession:
    id: str
    csrf: str


def _key(token: Secret) -> bytes:
    return hmac.new(token.value.encode(), b"oes-dashboard-session-key", hashlib.sha256).digest()


def _mac(token: Secret, purpose: str, session_id: str) -> str:
    message = f"{purpose}:{session_id}".encode()
    return hmac.new(_key(token), message, hashlib.sha256).hexdigest()


def _stored(session_id: str) -> str:
    # A dump of Redis gives no cookie: the key is a hash of the id, and the cookie needs the MAC.
    return _PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


def token_matches(token: Secret, given: str) -> bool:
    """Whether ``given`` is the dashboard token, compared in constant time."""
    digest = hashlib.sha256
    return hmac.compare_digest(
        digest(given.encode()).digest(), digest(token.value.encode()).digest()
    )


def _session(token: Secret, session_id: str) -> DashboardSession:
    return DashboardSession(id=session_id, csrf=_mac(token, "csrf", session_id))


async def start(redis: Redis, token: Secret, response: Response) -> DashboardSession:
    """A new session, remembered in Redis and set as the cookie on ``response``."""
    session_id = secrets.token_urlsafe(32)
    await redis.set(_stored(session_id), "1", ex=SESSION_TTL)
    response.set_cookie(
        COOKIE,
        f"{session_id}.{_mac(token, 'session', session_id)}",
        max_age=SESSION_TTL,
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return _session(token, session_id)


async def current(request: Request, redis: Redis, token: Secret) -> DashboardSession | None:
    """The request's session, if its cookie is signed by the token and still live."""
    session_id, _, mac = request.cookies.get(COOKIE, "").partition(".")
    if not session_id or not hmac.compare_digest(
        mac.encode(), _mac(token, "session", session_id).encode()
    ):
        return None
    if not await redis.exists(_stored(session_id)):
        return None
    return _session(token, session_id)


def csrf_ok(session: DashboardSession, given: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())


async def end(redis: Redis, session: DashboardSession, response: Response) -> None:
    """Forget the session in Redis and tell the browser to drop the cookie."""
    await redis.delete(_stored(session.id))
    response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")

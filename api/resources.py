"""What the web process holds while it runs: engine, Redis, verifier, rules, publisher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from starlette.requests import Request

from api import locks
from api.settings import Settings
from api.signatures import Verifier
from models import outbox
from models.db import async_engine, async_session_factory
from models.transfers import Rules
from workers.publish import Batcher, publisher

P = ParamSpec("P")
T = TypeVar("T")
_ATTEMPTS = 3
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass
class Resources:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    verifier: Verifier
    rules: Rules
    publish: Batcher

    @classmethod
    def start(cls, settings: Settings) -> Resources:
        engine = async_engine(settings.database_url)
        redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
            # A pooled connection that died with a Redis restart fails once; the command is
            # sent again on a fresh one before anyone is answered 503.
            retry=Retry(NoBackoff(), retries=1),
            retry_on_error=[RedisConnectionError],
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=async_session_factory(engine),
            redis=redis,
            verifier=Verifier(
                keys=settings.bitgo_keys,
                redis=redis,
                max_age=settings.jwt_max_age,
                leeway=settings.jwt_leeway,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            ),
            rules=Rules(
                currencies=settings.currencies,
                released_repost_conflicts=settings.released_repost == "conflict",
            ),
            publish=Batcher(publisher(settings.redis_url)),
        )

    async def stop(self) -> None:
        await self.publish.close()
        await self.redis.aclose()
        await self.engine.dispose()

    async def run(
        self, action: Callable[Concatenate[Session, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a domain action in one transaction, committed before the answer leaves.

        A deadlock or serialization failure rolls everything back, so the action
        is simply run again from the start.
        """
        for _ in range(_ATTEMPTS - 1):
            try:
                return await outbox.run_in_transaction(
                    self.sessions, self.publish, action, *args, **kwargs
                )
            except DBAPIError as exc:
                if not isinstance(exc.orig, _TRANSIENT):
                    raise
        return await outbox.run_in_transaction(self.sessions, self.publish, action, *args, **kwargs)

    async def locked(self, key: str, action: Callable[..., T], /, **kwargs: Any) -> T:
        """Run a domain action in one transaction while holding the Redis lock on ``key``."""
        async with locks.held(
            self.redis, key, wait=self.settings.lock_wait, ttl=self.settings.lock_ttl
        ):
            return await self.run(action, **kwargs)


def resources(request: Request) -> Resources:
    """The running process's resources, for a route."""
    value: Resources = request.app.state.resources
    return value

"""What the web process holds while it runs: engines, Redis, the verifier, the rules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from celery import Celery
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session

from api.settings import Settings
from api.signatures import Verifier
from models import ledger
from models.db import async_engine, async_session_factory
from models.transfers import Rules
from workers.celery import make_app
from workers.runtime import publish
from workers.settings import broker_url

P = ParamSpec("P")
_ATTEMPTS = 3
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
T = TypeVar("T")
FLUSH_EVERY = 0.05  # seconds; what an event may wait before its delivery is queued


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker  # type: ignore[type-arg]
    redis: Redis
    verifier: Verifier
    rules: Rules
    publisher: Celery
    outgoing: list[uuid.UUID] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        engine = async_engine(settings.database_url)
        redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
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
            publisher=make_app(broker_url(settings.redis_url)),
        )

    async def stop(self) -> None:
        if self.flusher is not None:
            await asyncio.wait([self.flusher], timeout=5)
        self.publisher.close()
        await self.redis.aclose()
        await self.engine.dispose()

    async def run(
        self, action: Callable[Concatenate[Session, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a domain action in one transaction, committed before the answer leaves.

        A deadlock or serialization failure rolls everything back, so the action
        is simply run again from the start.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self.sessions() as session:
                    async with session.begin():
                        result: Any = await session.run_sync(action, *args, **kwargs)
                    self._publish(ledger.written_events(session.sync_session))
                    return result  # type: ignore[no-any-return]
            except DBAPIError as exc:
                if attempt == _ATTEMPTS or not isinstance(exc.orig, _TRANSIENT):
                    raise
        raise AssertionError("unreachable")

    def _publish(self, event_ids: list[uuid.UUID]) -> None:
        """Queue the committed events' deliveries off the request path.

        Events gather for FLUSH_EVERY and while a publish is in flight, and go out
        together, so under load one broker message carries many events. The broker client
        blocks, so it runs in a thread; if it fails, the events stay pending in the
        outbox and the relay sweep queues them later.
        """
        if not event_ids:
            return
        self.outgoing.extend(event_ids)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self.outgoing:
            # A moment's wait lets a busy process put many events in one message.
            await asyncio.sleep(FLUSH_EVERY)
            batch, self.outgoing = self.outgoing, []
            await loop.run_in_executor(None, publish, self.publisher, batch)

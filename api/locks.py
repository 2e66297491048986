"""Per-id Redis locks that serialize racing calls on one BitGo id.

They only spare racers wasted work and let them answer from committed state;
correctness rests on PostgreSQL (see ``models.transfers``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from redis.asyncio import Redis
from redis.exceptions import LockError, RedisError

from api.errors import LockBusy
from api.observability import LOCK_TIMEOUTS, LOCK_WAIT_SECONDS

log = structlog.get_logger(__name__)


@asynccontextmanager
async def held(redis: Redis, key: str, *, wait: float, ttl: float) -> AsyncIterator[None]:
    """Hold the lock on ``key`` for the block; LockBusy if it is not free within ``wait``."""
    lock = redis.lock(f"oes:lock:{key}", timeout=ttl, sleep=0.005, blocking_timeout=wait)
    started = time.perf_counter()
    if not await lock.acquire():
        LOCK_TIMEOUTS.inc()
        raise LockBusy()
    LOCK_WAIT_SECONDS.observe(time.perf_counter() - started)
    try:
        yield
    finally:
        try:
            await lock.release()
        except LockError:
            # The TTL ran out while we worked; the database kept things right.
            log.warning("lock_expired_before_release", key=key, ttl=ttl)
        except RedisError as exc:
            # The work is committed: answering 503 now would report a failure that is not
            # one. The lock expires by itself after its TTL.
            log.warning("lock_release_failed", key=key, error=type(exc).__name__)

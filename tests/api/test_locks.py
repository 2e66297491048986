"""The per-id lock's own rules; a fake Redis is enough for these, real races are elsewhere."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest

from api import locks
from api.errors import LockBusy


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_second_holder_waits_for_the_first_to_finish() -> None:
    async def scenario() -> list[str]:
        redis = fakeredis.FakeAsyncRedis()
        order: list[str] = []

        async def hold(name: str, pause: float) -> None:
            async with locks.held(redis, "transfer:x", wait=2, ttl=5):
                order.append(f"{name} in")
                await asyncio.sleep(pause)
                order.append(f"{name} out")

        first = asyncio.create_task(hold("first", 0.1))
        await asyncio.sleep(0.01)
        await hold("second", 0)
        await first
        return order

    assert run(scenario()) == ["first in", "first out", "second in", "second out"]


def test_a_lock_busy_past_the_wait_is_refused() -> None:
    async def scenario() -> None:
        redis = fakeredis.FakeAsyncRedis()
        await redis.set("oes:lock:transfer:y", b"someone", px=10_000)
        async with locks.held(redis, "transfer:y", wait=0.05, ttl=5):
            pass

    with pytest.raises(LockBusy, match="Request in progress"):
        run(scenario())


def test_a_lock_that_expired_under_its_holder_is_released_quietly() -> None:
    async def scenario() -> bool:
        redis = fakeredis.FakeAsyncRedis()
        async with locks.held(redis, "transfer:z", wait=1, ttl=0.05):
            await asyncio.sleep(0.1)  # the TTL runs out; someone else may take it
            await redis.set("oes:lock:transfer:z", b"next-holder", px=10_000)
        # The next holder's lock is untouched.
        return await redis.get("oes:lock:transfer:z") == b"next-holder"

    assert run(scenario()) is True


def test_different_ids_do_not_wait_for_each_other() -> None:
    async def scenario() -> tuple[list[str], float, set[bytes | str]]:
        redis = fakeredis.FakeAsyncRedis()
        order: list[str] = []
        a_held = asyncio.Event()

        async def hold_a() -> None:
            async with locks.held(redis, "transfer:a", wait=2, ttl=5):
                order.append("a in")
                a_held.set()
                await asyncio.sleep(0.3)
                order.append("a out")

        first = asyncio.create_task(hold_a())
        await a_held.wait()
        started = time.perf_counter()
        async with locks.held(redis, "transfer:b", wait=2, ttl=5):
            waited = time.perf_counter() - started
            order.append("b in")
            held_keys = set(await redis.keys("oes:lock:*"))
        order.append("b out")
        await first
        return order, waited, held_keys

    order, waited, held_keys = asyncio.run(scenario())
    # b was taken while a was still held, at once rather than after a's 0.3 s.
    assert order == ["a in", "b in", "b out", "a out"]
    assert waited < 0.1
    assert held_keys == {b"oes:lock:transfer:a", b"oes:lock:transfer:b"}

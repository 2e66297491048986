"""A real Celery worker process on real Redis and PostgreSQL, with stubs for BitGo and
the platform webhook. Worker tests get a database and a Redis database of their own,
so the web tests' undelivered events never reach these workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from models.db import session_factory, sync_engine
from tests.conftest import INTERNAL_TOKEN, BitGo, Keys, fresh_database
from tests.stubs import Seen, Stub, serving
from workers.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from workers.publish import QUEUES, publisher

SECRET = "platform-webhook-secret-0123456789"
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], *, timeout: float = 20, what: str = "") -> T:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(0.05)


_SPARE_DBS = random.sample(range(8, 16), 8)


def spare_redis_db(url: str) -> str:
    """The same Redis server, a database number no other stack of this run uses.

    Two stacks sharing a number would have each worker take the other's tasks.
    """
    return redis_db(url, _SPARE_DBS.pop())


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another database number."""
    if url.startswith("unix://"):
        return f"{url.partition('?')[0]}?db={db}"
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@dataclass
class Platform:
    """The exchange's platform: verifies signatures and applies each event id once."""

    applied: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    bad_signatures: int = 0
    failing: set[str] = field(default_factory=set)  # data ids answered with 503
    refusing: set[str] = field(default_factory=set)  # data ids answered with 400
    stall_on: set[str] = field(default_factory=set)  # data ids held unanswered
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    times: dict[str, list[float]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, seen: Seen) -> tuple[int, Any] | None:
        timestamp = seen.headers.get(TIMESTAMP_HEADER.lower(), "")
        if seen.headers.get(SIGNATURE_HEADER.lower()) != signature(SECRET, timestamp, seen.body):
            with self.lock:
                self.bad_signatures += 1
            return 401, {"error": "bad signature"}
        event = seen.json()
        subject = str(event["data"].get("id") or event["data"].get("externalId"))
        with self.lock:
            self.received[event["id"]] += 1
            self.times.setdefault(subject, []).append(time.monotonic())
            self.events[event["id"]] = event
        if subject in self.failing:
            return 503, {"error": "platform down"}
        if subject in self.refusing:
            return 400, {"error": "we do not want this"}
        with self.lock:
            if not self.applied[event["id"]]:
                self.applied[event["id"]] += 1
        if subject in self.stall_on:
            self.stall_on.discard(subject)
            self.stalled.set()
            self.release.wait(60)
        return 200, {"ok": True}

    def ids_for(self, subject: str) -> list[str]:
        with self.lock:
            return [i for i, e in self.events.items() if subject in json.dumps(e["data"])]


@dataclass
class Worker:
    """``celery -A workers worker`` in its own process group."""

    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.write_bytes(b"")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers",
                    "worker",
                    "--loglevel",
                    "INFO",
                    "--concurrency",
                    "1",
                    "--queues",
                    ",".join(QUEUES),
                    "--hostname",
                    f"test-{uuid.uuid4().hex[:6]}@%h",
                    "--without-mingle",
                    "--without-gossip",
                ],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        eventually(
            lambda: self._alive() and b"ready." in self.log.read_bytes(),
            timeout=60,
            what="the worker to be ready",
        )

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker died:\n{self.log.read_text()}")
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its pool children: no goodbye, no ack, no cleanup."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class Stack:
    env: dict[str, str]
    bitgo_api: Stub
    platform: Platform
    worker: Worker
    tasks: Celery
    sessions: sessionmaker[Session]
    bitgo: BitGo

    def call(self, task: str, *args: Any) -> None:
        """What an operator types: ``celery -A workers call <task> --args ...``."""
        command = [sys.executable, "-m", "celery", "-A", "workers", "call", task]
        if args:
            command += ["--args", json.dumps(list(args))]
        subprocess.run(command, env={**os.environ, **self.env}, check=True, capture_output=True)

    def runs(self, task: str) -> list[dict[str, Any]]:
        with self.sessions() as session:
            return [
                r.summary
                for r in session.execute(
                    text("SELECT summary FROM task_runs WHERE task = :task ORDER BY id"),
                    {"task": task},
                )
            ]

    def wait_run(self, task: str, after: int) -> dict[str, Any]:
        """The summary of ``task``'s run number ``after + 1``."""
        runs = eventually(lambda: self.runs(task)[after:], what=f"{task} to run")
        return runs[0]

    def outbox(self, topic: str, subject: str) -> list[Any]:
        with self.sessions() as session:
            return list(
                session.execute(
                    text(
                        "SELECT * FROM outbox WHERE topic = :topic AND "
                        "(payload->>'id' = :subject OR payload->>'externalId' = :subject)"
                    ),
                    {"topic": topic, "subject": subject},
                )
            )


def default_bitgo(seen: Seen) -> tuple[int, Any]:
    return 404, {"error": "not found"}


@pytest.fixture(scope="session")
def stack(
    server_database_url: str,
    redis_url: str,
    keys: Keys,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    platform = Platform()
    with (
        fresh_database(server_database_url) as database_url,
        serving(platform) as platform_stub,
        serving(default_bitgo) as bitgo_api,
    ):
        # A database number of its own, away from the web tests' queues.
        worker_redis = spare_redis_db(redis_url)
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": worker_redis,
            "BITGO_PUBLIC_KEYS": str(keys.public),
            "OES_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "OES_CURRENCIES": "btc,eth,usdc",
            "PLATFORM_WEBHOOK_URL": f"{platform_stub.url}/hooks",
            "PLATFORM_WEBHOOK_SECRET": SECRET,
            "BITGO_API_URL": bitgo_api.url,
            "BITGO_ACCESS_TOKEN": "test-access-token",
            "BITGO_ENTERPRISE_ID": "enterprise-1",
            "BITGO_EXPRESS_URL": bitgo_api.url,
            "BITGO_WALLET_ID": "trading-wallet-1",
            "OES_HOOK_MAX_ATTEMPTS": "4",
            "OES_HOOK_BACKOFF": "0.4",
            "OES_HOOK_BACKOFF_MAX": "5",
            "OES_HOOK_TIMEOUT": "5",
            "OES_OUTBOX_GRACE": "0",
            "OES_SETTLEMENT_RETRY": "0.3",
        }
        tasks = publisher(worker_redis)
        with tasks.connection_for_write() as connection:
            for queue in QUEUES:
                connection.default_channel.queue_purge(queue)
        engine = sync_engine(database_url)
        worker = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log")
        worker.start()
        try:
            with TestClient(create_app(Settings.from_env(env))) as client:
                yield Stack(
                    env=env,
                    bitgo_api=bitgo_api,
                    platform=platform,
                    worker=worker,
                    tasks=tasks,
                    sessions=session_factory(engine),
                    bitgo=BitGo(client, keys.private),
                )
        finally:
            platform.release.set()
            worker.stop()
            tasks.close()
            engine.dispose()

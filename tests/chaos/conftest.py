"""A whole gateway of the chaos tests' own: PostgreSQL, Redis, the API, a worker with beat
and the platform's webhook receiver, each a process the tests may kill and start again.

Nothing here touches the machine's shared PostgreSQL or Redis: the cluster is made with
``initdb`` in a temporary directory (as the ``pgserver`` user under root, which initdb
requires), and Redis is a ``redis-server`` of its own on a free port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import INTERNAL_TOKEN, Keys, free_port, scratch_dir
from tests.servers import OwnRedis
from tests.stubs import Seen, Stub, serving
from workers.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from workers.publish import QUEUES

SECRET = "chaos-webhook-secret-0123456789"
LONG = os.environ.get("OES_CHAOS", "").lower() == "long"


@pytest.fixture(scope="session", autouse=True)
def ledger_check_after_everything() -> None:
    """The chaos tests check their own cluster's ledger; never create a database on the
    shared server just for the suite-wide check."""


def _wait(probe: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pg_bin() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.skip("no initdb on this machine")
    return Path(initdb).resolve().parent


class OwnPostgres:
    """A PostgreSQL cluster in a temporary directory, on a TCP port of its own."""

    def __init__(self, directory: Path) -> None:
        self.bin = _pg_bin()
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = free_port()
        self.as_user: list[str] = []
        directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("pgserver")
            except KeyError:
                pytest.skip("running as root and no unprivileged 'pgserver' user for initdb")
            os.chown(directory, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", user.pw_name, "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self.as_user, *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )

    def _ctl(self, *args: str) -> None:
        pg_ctl = str(self.bin / "pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/oes"

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            *("-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"),
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.data.parent}'\n"
                # fsync off is safe here: an immediate shutdown is not a machine crash, and
                # commits still reach the OS. synchronous_commit must stay on, or an
                # immediate shutdown loses commits the clients were already told of.
                "max_connections = 300\nfsync = off\n"
            )
        self._ctl("start")
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE oes")

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast|immediate``; returns once it accepts connections."""
        self._ctl("-m", mode, "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("-m", "immediate", "stop")


@dataclass
class Service:
    """A process of the gateway's (the API, the worker) in a process group of its own."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    ready: Any  # () -> bool
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, command: list[str] | None = None) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts} ===\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                command or self.command,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{self.name} died:\n{self.log.read_text()[-4000:]}")
            return bool(self.ready())

        _wait(up, timeout=60, what=f"{self.name} to be ready")

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return

    def kill(self) -> None:
        """SIGKILL the whole process group: no goodbye, no ack, no clean-up."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.process is None:
            return
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        # Pool children or anything else left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Receiver:
    """The exchange's platform: checks each signature and applies each event id once."""

    received: Counter[str] = field(default_factory=Counter)  # event id -> deliveries
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # applied, by event id
    delivered_at: list[float] = field(default_factory=list)  # monotonic, every 2xx answer
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, seen: Seen) -> tuple[int, Any]:
        timestamp = seen.headers.get(TIMESTAMP_HEADER.lower(), "")
        if seen.headers.get(SIGNATURE_HEADER.lower()) != signature(SECRET, timestamp, seen.body):
            with self.lock:
                self.bad_signatures += 1
            return 401, {"error": "bad signature"}
        event = seen.json()
        with self.lock:
            self.received[event["id"]] += 1
            self.events.setdefault(event["id"], event)  # dedup on the event id
            self.delivered_at.append(time.monotonic())
        return 200, {"ok": True}

    def first_delivery_after(self, moment: float) -> float | None:
        with self.lock:
            later = [t for t in self.delivered_at if t > moment]
        return min(later) if later else None


@dataclass
class Chaos:
    env: dict[str, str]
    postgres: OwnPostgres
    redis: OwnRedis
    api: Service
    worker: Service
    receiver: Receiver
    receiver_stub: Stub
    url: str
    keys: Keys
    directory: Path
    beat_runs: int = 0

    def restart_worker(self) -> None:
        self.worker.start(worker_command(self.directory, self.worker.starts + 1))

    def oes(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.postgres.url, connect_timeout=5) as conn:
            return list(conn.execute(sql).fetchall())


def worker_command(directory: Path, n: int) -> list[str]:
    # A fresh beat schedule at each start: beat then runs the relay at once, as a new
    # beat on a platform without a persistent disk would.
    return [
        *(sys.executable, "-m", "celery", "-A", "workers", "worker", "--beat"),
        *("--schedule", str(directory / f"beat-schedule-{n}")),
        *("--loglevel", "INFO", "--concurrency", "2", "--queues", ",".join(QUEUES)),
        *("--hostname", f"chaos-{uuid.uuid4().hex[:6]}@%h"),
        "--without-mingle",
        "--without-gossip",
    ]


def _api_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def chaos(keys: Keys) -> Iterator[Chaos]:
    with scratch_dir("oes-chaos-") as directory, serving() as stub:
        directory.chmod(0o755)
        receiver = Receiver()
        stub.handler = receiver
        postgres = OwnPostgres(directory / "pg")  # made below, owned by pgserver under root
        own_redis = OwnRedis(directory)
        services: list[Service] = []
        try:
            postgres.init()
            own_redis.start()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {
                "DATABASE_URL": postgres.url,
                "REDIS_URL": own_redis.url,
                "BITGO_PUBLIC_KEYS": str(keys.public),
                "OES_INTERNAL_TOKEN": INTERNAL_TOKEN,
                "OES_CURRENCIES": "btc",
                "OES_LOCK_WAIT": "3",
                "OES_LOCK_TTL": "5",
                "PLATFORM_WEBHOOK_URL": f"{stub.url}/hooks",
                "PLATFORM_WEBHOOK_SECRET": SECRET,
                "OES_OUTBOX_GRACE": "1",
                "OES_HOOK_BACKOFF": "0.2",
                "OES_HOOK_BACKOFF_MAX": "2",
                "OES_HOOK_TIMEOUT": "5",
                "OES_HOOK_MAX_ATTEMPTS": "30",
            }
            chaos = Chaos(
                env=env,
                postgres=postgres,
                redis=own_redis,
                api=Service(
                    "the API",
                    [
                        *(sys.executable, "-m", "cli.main", "serve"),
                        *("--host", "127.0.0.1", "--port", str(port)),
                    ],
                    env,
                    directory / "api.log",
                    lambda: _api_ready(url),
                ),
                worker=Service(
                    "the worker",
                    worker_command(directory, 1),
                    env,
                    directory / "worker.log",
                    lambda: False,
                ),
                receiver=receiver,
                receiver_stub=stub,
                url=url,
                keys=keys,
                directory=directory,
            )
            worker_log = chaos.worker.log

            def worker_ready() -> bool:
                text = worker_log.read_bytes().rpartition(b"=== start")[2]
                return b"ready." in text

            chaos.worker.ready = worker_ready
            services += [chaos.api, chaos.worker]
            migrated = chaos.oes("db", "upgrade")
            assert migrated.returncode == 0, migrated.stderr
            chaos.api.start()
            chaos.worker.start()
            yield chaos
        finally:
            for service in services:
                service.stop()
            own_redis.kill()
            postgres.stop()

"""Real PostgreSQL and Redis for every test: the machine's when DATABASE_URL / REDIS_URL
are set, embedded servers otherwise. Each run gets a database of its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psycopg
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from cli.devkeys import sign
from cli.embedded import start_postgres, start_redis
from models.db import session_factory, sync_engine
from models.migrate import upgrade
from workers.publish import QUEUES

INTERNAL_TOKEN = "test-internal-token-0123456789"
# What the test client (httpx2, under Starlette's TestClient) or httpx answers with.
Response = httpx.Response | httpx2.Response


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A directory outside pytest's numbered temp dirs, which other pytest runs prune."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server_database_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with scratch_dir("oes-test-pg-") as data:
        url, server = start_postgres(data / "postgres")
        yield url
        server.cleanup()


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server, dropped afterwards."""
    name = f"oes_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = name
    params = "&".join(f"{k}={v}" for k, v in info.items() if k not in ("dbname",) and v)
    url = f"postgresql:///{name}?{params}"
    upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url(server_database_url: str) -> Iterator[str]:
    """A fresh, migrated database on the server, dropped after the run."""
    with fresh_database(server_database_url) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with scratch_dir("oes-test-redis-") as data:
        url, server = start_redis(data)
        yield url
        server.shutdown()


def _key_pair(directory: Path, name: str) -> tuple[bytes, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = directory / f"{name}.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@dataclass(frozen=True)
class Keys:
    private: bytes  # BitGo's signing key
    public: Path  # what the gateway trusts
    other_private: bytes  # a key the gateway does not trust
    other_public: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    private, public = _key_pair(directory, "bitgo")
    other_private, other_public = _key_pair(directory, "other")
    return Keys(private, public, other_private, other_public)


@pytest.fixture(scope="session")
def env(database_url: str, redis_url: str, keys: Keys) -> dict[str, str]:
    """The gateway's environment for this run."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "BITGO_PUBLIC_KEYS": str(keys.public),
        "OES_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "OES_CURRENCIES": "btc,eth,usdc",
        "OES_LOCK_WAIT": "3",
    }


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
    # No worker consumes these tests' deliveries; leave the broker as we found it.
    with redis.Redis.from_url(settings.redis_url) as broker:
        broker.delete(*QUEUES)


@pytest.fixture(scope="session")
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = sync_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@dataclass(frozen=True)
class Link:
    connection_id: str
    client_id: str
    partners_client_id: str
    partners_connection_id: str

    def body(
        self, kind: str, transfer_id: str, quantity: Any, currency: str = "btc"
    ) -> dict[str, Any]:
        return {
            f"{kind}Id": transfer_id,
            "amount": {"currency": currency, "quantity": quantity},
            "clientId": self.client_id,
            "connectionId": self.connection_id,
            "partnersClientId": self.partners_client_id,
            "partnersConnectionId": self.partners_connection_id,
        }


class BitGo:
    """Plays BitGo (and the exchange's back office) against the gateway under test."""

    def __init__(self, http: TestClient | httpx.Client, private: bytes) -> None:
        self.http = http
        self.private = private

    def headers(self) -> dict[str, str]:
        return {"X-BitGo-Signature": sign(self.private)}

    def internal(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {INTERNAL_TOKEN}"}

    def token(self, partners_client_id: str) -> str:
        answer = self.http.post(
            "/internal/v1/connection-tokens",
            json={"partnersClientId": partners_client_id},
            headers=self.internal(),
        )
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["connectionToken"]
        return token

    def link(self) -> Link:
        user = f"user-{uuid.uuid4().hex[:8]}"
        connection_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
        answer = self.http.post(
            "/bitgo/v1/connections",
            json={
                "clientId": client_id,
                "connectionId": connection_id,
                "connectionToken": self.token(user),
            },
            headers=self.headers(),
        )
        assert answer.status_code == 200, answer.text
        return Link(connection_id, client_id, user, answer.json()["partnersConnectionId"])

    def reserve(
        self, kind: str, link: Link, transfer_id: str, quantity: Any, **kw: Any
    ) -> Response:
        return self.http.post(
            f"/bitgo/v1/{kind}s",
            json=link.body(kind, transfer_id, quantity, **kw),
            headers=self.headers(),
        )

    def put(self, kind: str, transfer_id: str, action: str) -> Response:
        return self.http.put(f"/bitgo/v1/{kind}/{transfer_id}/{action}", headers=self.headers())

    def status(self, kind: str, transfer_id: str) -> Response:
        return self.http.get(f"/bitgo/v1/{kind}/{transfer_id}", headers=self.headers())

    def balances(self, link: Link, currency: str = "btc") -> tuple[int, int, int]:
        """(available, pendingIn, held) of the linked account."""
        answer = self.http.get(
            f"/internal/v1/accounts/{link.partners_connection_id}", headers=self.internal()
        )
        assert answer.status_code == 200, answer.text
        b = answer.json()["balances"].get(
            currency, {"available": "0", "pendingIn": "0", "held": "0"}
        )
        return int(b["available"]), int(b["pendingIn"]), int(b["held"])

    def fund(self, link: Link, quantity: int, currency: str = "btc") -> None:
        """Give the account ``quantity`` available through a cleared allocation."""
        transfer_id = str(uuid.uuid4())
        assert (
            self.reserve("allocation", link, transfer_id, str(quantity), currency=currency).json()[
                "status"
            ]
            == "reserved"
        )
        assert self.put("allocation", transfer_id, "clear").status_code == 200


@pytest.fixture
def bitgo(client: TestClient, keys: Keys) -> BitGo:
    return BitGo(client, keys.private)


@pytest.fixture
def link(bitgo: BitGo) -> Link:
    return bitgo.link()


def row_count(
    sessions: sessionmaker[Session], table: str, where: str = "true", **params: Any
) -> int:
    with sessions() as session:
        return int(
            session.execute(
                text(f"SELECT count(*) FROM {table} WHERE {where}"), params
            ).scalar_one()
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    url: str, process: subprocess.Popen[Any], *, timeout: float, output: Callable[[], str]
) -> None:
    """Wait for ``GET /readyz`` to answer 200; kill the process if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{url} did not become ready:\n{output()}")
        time.sleep(0.1)


@dataclass(frozen=True)
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def live_server(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """``oes-partner serve`` in its own process on a real TCP port."""
    with serving_gateway(env, tmp_path_factory.mktemp("live") / "serve.log") as server:
        yield server


@contextmanager
def serving_gateway(env: dict[str, str], log: Path) -> Iterator[LiveServer]:
    """``oes-partner serve`` with ``env`` on a free port, until the block ends."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, timeout=30, output=log.read_text)
    try:
        yield LiveServer(url, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def ledger_check_after_everything(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Whatever the tests did, the ledger must balance at the end of the run."""
    yield
    from models import ledger

    with sessions() as session:
        report = ledger.check(session)
    assert report.ok, report.problems

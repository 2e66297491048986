"""A hook delivery that meets PostgreSQL down is retried by the task itself, with backoff."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from models import outbox
from tests.workers.conftest import Stack, Worker, eventually, spare_redis_db
from workers.publish import QUEUES, publish, publisher


class Proxy:
    """A TCP front for PostgreSQL that can refuse everyone, as a restarting server does."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target  # (host, port), or a unix socket path
        self.up = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _dial(self) -> socket.socket:
        if isinstance(self.target, str):
            backend = socket.socket(socket.AF_UNIX)
            backend.connect(self.target)
            return backend
        return socket.create_connection(self.target)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()  # the server is down: the connection is refused outright
                continue
            backend = self._dial()
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.listener.close()


@contextmanager
def proxied(database_url: str) -> Iterator[tuple[Proxy, str]]:
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port = str(info.get("host") or "/tmp"), int(info.get("port") or 5432)
    target: tuple[str, int] | str = (
        f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
    )
    proxy = Proxy(target)
    info.update(host="127.0.0.1", port=str(proxy.port))
    params = "&".join(f"{k}={v}" for k, v in info.items() if k != "dbname" and v)
    try:
        yield proxy, f"postgresql:///{info['dbname']}?{params}"
    finally:
        proxy.close()


@pytest.fixture
def worker_behind_a_proxy(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Worker, Proxy, str]]:
    """A second worker, on a broker database of its own, reaching PostgreSQL through a proxy."""
    with proxied(stack.env["DATABASE_URL"]) as (proxy, url):
        proxy.up.set()
        broker = spare_redis_db(stack.env["REDIS_URL"])
        worker = Worker(
            {**stack.env, "DATABASE_URL": url, "REDIS_URL": broker},
            tmp_path_factory.mktemp("proxied") / "worker.log",
        )
        worker.start()
        try:
            yield worker, proxy, broker
        finally:
            worker.stop()


def test_a_delivery_meeting_the_database_down_is_retried_until_it_is_back(
    stack: Stack, worker_behind_a_proxy: tuple[Worker, Proxy, str]
) -> None:
    worker, proxy, broker = worker_behind_a_proxy
    subject = str(uuid.uuid4())
    with outbox.transaction(stack.sessions, lambda ids: None) as session:
        event = outbox.event("test.database_down", {"id": subject})
        outbox.emit(session, event)
    proxy.up.clear()
    tasks = publisher(broker)
    try:
        with tasks.connection_for_write() as connection:
            for queue in QUEUES:
                connection.default_channel.queue_purge(queue)
        assert publish(tasks, [event.id]) == 1
        eventually(
            lambda: b"Retry in" in worker.log.read_bytes(),
            timeout=30,
            what="the delivery to be retried while the database is down",
        )
        proxy.up.set()
        eventually(
            lambda: stack.platform.received[str(event.id)] == 1,
            timeout=30,
            what="the delivery once the database is back",
        )
    finally:
        tasks.close()
    # The platform has it; the worker records so once its POST has returned.
    eventually(
        lambda: stack.outbox("test.database_down", subject)[0].status == "delivered",
        timeout=30,
        what="the event to be recorded delivered",
    )

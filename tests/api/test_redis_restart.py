"""After Redis restarts, the pooled connections that died with it are retried, not 503s."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Keys
from tests.servers import OwnRedis


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

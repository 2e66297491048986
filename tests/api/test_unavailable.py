"""Fail closed: an unreachable PostgreSQL is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Keys, Link


@pytest.fixture
def no_database(settings: Settings) -> Iterator[TestClient]:
    broken = dataclasses.replace(settings, database_url="postgresql://postgres@127.0.0.1:1/none")
    with TestClient(create_app(broken)) as client:
        yield client


def test_reserve_without_the_database_is_503_with_retry_after(
    no_database: TestClient, keys: Keys, link: Link
) -> None:
    bitgo = BitGo(no_database, keys.private)
    answer = bitgo.reserve("allocation", link, str(uuid.uuid4()), "1")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json() == {"error": "Database unavailable, retry later"}


def test_metrics_still_answer_without_the_database(no_database: TestClient) -> None:
    answer = no_database.get("/metrics")
    assert answer.status_code == 200
    assert "oes_http_requests_total" in answer.text
    assert no_database.get("/readyz").status_code == 503

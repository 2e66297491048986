"""SPEC §9: health, readiness, metrics and request ids."""

from __future__ import annotations

import dataclasses
import uuid

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Link


def samples(client: TestClient, name: str) -> list[tuple[dict[str, str], float]]:
    exposition = client.get("/metrics").text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name
    ]


def test_healthz_and_readyz_answer_ok(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0"))
    with TestClient(app) as broken:
        ready = broken.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("unavailable")
    assert ready.json()["checks"]["database"] == "ok"


def test_metrics_count_requests_by_route_template_and_status(
    bitgo: BitGo, link: Link, client: TestClient
) -> None:
    def count(status: str) -> float:
        return sum(
            value
            for labels, value in samples(client, "oes_http_requests_total")
            if labels["route"] == "/bitgo/v1/allocation/{id}/clear" and labels["status"] == status
        )

    before_ok, before_missing = count("200"), count("404")
    transfer_id = str(uuid.uuid4())
    bitgo.reserve("allocation", link, transfer_id, "3")
    bitgo.put("allocation", transfer_id, "clear")
    bitgo.put("allocation", str(uuid.uuid4()), "clear")
    assert count("200") == before_ok + 1
    assert count("404") == before_missing + 1
    assert any(
        labels["route"] == "/bitgo/v1/allocations"
        for labels, _ in samples(client, "oes_http_request_duration_seconds_count")
    )


def test_metrics_report_transfers_by_state_and_outbox_backlog(
    bitgo: BitGo, link: Link, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    def reserved() -> float:
        return next(
            value
            for labels, value in samples(client, "oes_transfers")
            if labels == {"kind": "allocation", "status": "reserved"}
        )

    def backlog() -> float:
        ((_, value),) = samples(client, "oes_outbox_backlog")
        return value

    before, backlog_before = reserved(), backlog()
    transfer_id = str(uuid.uuid4())
    assert bitgo.reserve("allocation", link, transfer_id, "3").json()["status"] == "reserved"
    assert reserved() == before + 1
    # No worker consumes this client's broker, so the events it wrote stay pending.
    with sessions() as session:
        written = session.execute(
            text("SELECT topic, status FROM outbox WHERE payload->>'id' = :id"),
            {"id": transfer_id},
        ).all()
    assert [tuple(row) for row in written] == [("allocation.reserved", "pending")]
    assert backlog() == backlog_before + len(written)


def test_replayed_tokens_are_counted(bitgo: BitGo, client: TestClient) -> None:
    def replays() -> float:
        return samples(client, "oes_jwt_replays_refused_total")[0][1]

    before = replays()
    headers = bitgo.headers()
    client.get(f"/bitgo/v1/allocation/{uuid.uuid4()}", headers=headers)
    assert client.get(f"/bitgo/v1/allocation/{uuid.uuid4()}", headers=headers).status_code == 401
    assert replays() == before + 1


def test_every_answer_carries_a_request_id(client: TestClient) -> None:
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )

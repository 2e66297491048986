"""A broken invariant is a bug, not a refusal: 500, logged at error level, counted, rolled back."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from tests.api.test_observability import samples
from tests.conftest import BitGo, Link, row_count


def test_a_clear_the_balances_cannot_cover_is_a_counted_500_that_changes_nothing(
    bitgo: BitGo,
    link: Link,
    client: TestClient,
    sessions: sessionmaker[Session],
    capsys: pytest.CaptureFixture[str],
) -> None:
    transfer_id = str(uuid.uuid4())
    assert bitgo.reserve("allocation", link, transfer_id, "100").json()["status"] == "reserved"
    planted = "connection_pk = (SELECT id FROM connections WHERE connection_id = :c)"
    with sessions.begin() as session:  # break the books: pending_in no longer covers it
        session.execute(
            text(f"UPDATE accounts SET pending_in = 0 WHERE {planted}"),
            {"c": link.connection_id},
        )
    before = samples(client, "oes_invariant_violations_total")[0][1]
    try:
        answer = bitgo.put("allocation", transfer_id, "clear")
        assert answer.status_code == 500
        assert answer.json() == {"error": "Internal error"}
        assert samples(client, "oes_invariant_violations_total")[0][1] == before + 1
        logged = capsys.readouterr().out
        assert "invariant_broken" in logged
        assert "balances cannot cover it" in logged
        assert bitgo.status("allocation", transfer_id).json()["status"] == "reserved"
        assert row_count(sessions, "ledger_entries", "transfer_id = :id", id=transfer_id) == 2
    finally:
        with sessions.begin() as session:  # mend them, so the run's ledger check holds
            session.execute(
                text(f"UPDATE accounts SET pending_in = 100 WHERE {planted}"),
                {"c": link.connection_id},
            )
    assert bitgo.put("allocation", transfer_id, "release").status_code == 200

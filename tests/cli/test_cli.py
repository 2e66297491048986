"""The command line (SPEC §8) against the test database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from cli.main import main
from models.migrate import alembic_config
from models.tables import metadata
from tests.conftest import BitGo, row_count


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)


def test_issue_token_prints_a_token_that_links(
    cli_env: None, bitgo: BitGo, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["connections", "issue-token", "--partners-client-id", "cli-user"]) == 0
    out = capsys.readouterr().out
    token = next(
        line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("connectionToken")
    )
    connection_id = str(uuid.uuid4())
    answer = bitgo.http.post(
        "/bitgo/v1/connections",
        json={
            "clientId": str(uuid.uuid4()),
            "connectionId": connection_id,
            "connectionToken": token,
        },
        headers=bitgo.headers(),
    )
    assert answer.status_code == 200
    assert answer.json()["partnersClientId"] == "cli-user"
    assert main(["connections", "list"]) == 0
    assert connection_id in capsys.readouterr().out


@pytest.mark.parametrize("by", ["connection_id", "partners_connection_id"])
def test_deactivate_and_activate_by_either_id(
    cli_env: None, bitgo: BitGo, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    link = bitgo.link()
    ident = getattr(link, by)
    assert main(["connections", "deactivate", ident]) == 0
    assert "inactive" in capsys.readouterr().out
    rejected = bitgo.reserve("allocation", link, str(uuid.uuid4()), "5").json()
    assert rejected["rejectionReason"] == "Connection inactive"
    assert main(["connections", "activate", ident]) == 0
    assert bitgo.reserve("allocation", link, str(uuid.uuid4()), "5").json()["status"] == "reserved"


def test_deactivating_an_unknown_connection_fails(
    cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["connections", "deactivate", str(uuid.uuid4())]) == 1
    assert "Connection not found" in capsys.readouterr().err


def test_transfers_list_filters_by_status(
    cli_env: None, bitgo: BitGo, capsys: pytest.CaptureFixture[str]
) -> None:
    link = bitgo.link()
    transfer_id = str(uuid.uuid4())
    bitgo.reserve("allocation", link, transfer_id, "5", currency="doge")
    assert main(["transfers", "list", "--status", "rejected"]) == 0
    out = capsys.readouterr().out
    assert transfer_id in out
    assert "Unsupported currency" in out
    assert main(["transfers", "list", "--status", "cleared"]) == 0
    assert transfer_id not in capsys.readouterr().out


def test_ledger_check_passes_then_reports_drift(
    cli_env: None, bitgo: BitGo, sessions: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    link = bitgo.link()
    bitgo.fund(link, 100)
    assert main(["ledger", "check"]) == 0
    assert "ok" in capsys.readouterr().out
    tamper = text(
        "UPDATE accounts SET available = available + :d FROM connections c "
        "WHERE c.id = accounts.connection_pk AND c.partners_connection_id = :p"
    )
    with sessions.begin() as session:
        session.execute(tamper, {"d": 1, "p": link.partners_connection_id})
    try:
        assert main(["ledger", "check"]) == 1
        out = capsys.readouterr().out
        assert "DRIFT" in out
        assert "available is 101, entries give 100" in out
    finally:
        with sessions.begin() as session:
            session.execute(tamper, {"d": -1, "p": link.partners_connection_id})
    assert main(["ledger", "check"]) == 0


def test_ledger_entries_cannot_be_edited(bitgo: BitGo, sessions: sessionmaker[Session]) -> None:
    bitgo.fund(bitgo.link(), 1)
    with pytest.raises(Exception, match="append-only"), sessions.begin() as session:
        session.execute(text("UPDATE ledger_entries SET amount = amount * 2"))


def test_a_missing_setting_stops_with_one_line_naming_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["oes-partner: DATABASE_URL is required and not set"]


@contextmanager
def empty_database(server_url: str) -> Iterator[str]:
    """A new database on the server with no schema at all, dropped afterwards."""
    name = f"oes_test_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    params = "&".join(f"{k}={v}" for k, v in info.items() if k != "dbname" and v)
    try:
        yield f"postgresql:///{name}?{params}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _schema(url: str) -> tuple[list[str], dict[str, list[str]]]:
    """(alembic_version rows, {table: columns}) of the public schema at ``url``."""
    with psycopg.connect(url) as connection:
        columns: dict[str, list[str]] = {}
        for table, column in connection.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ):
            columns.setdefault(str(table), []).append(str(column))
        versions = (
            [str(r[0]) for r in connection.execute("SELECT version_num FROM alembic_version")]
            if "alembic_version" in columns
            else []
        )
    return versions, columns


def test_db_upgrade_is_idempotent(
    server_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with empty_database(server_database_url) as url:
        assert _schema(url) == ([], {})
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        assert head is not None
        monkeypatch.setenv("DATABASE_URL", url)

        assert main(["db", "upgrade"]) == 0
        assert capsys.readouterr().out.strip() == "database at head"
        first = _schema(url)
        versions, columns = first
        assert versions == [head]
        assert set(columns) == {*metadata.tables, "alembic_version"}
        for name, table in metadata.tables.items():
            assert set(columns[name]) == {c.name for c in table.columns}, name

        assert main(["db", "upgrade"]) == 0
        assert capsys.readouterr().out.strip() == "database at head"
        assert _schema(url) == first


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL must start with"),
        ({"BITGO_PUBLIC_KEYS": "/nonexistent.pem"}, "BITGO_PUBLIC_KEYS: no such file"),
        ({"OES_JWT_MAX_AGE": "sixty"}, "OES_JWT_MAX_AGE must be a whole number"),
        ({"OES_LOCK_WAIT": "-1"}, "OES_LOCK_WAIT must be a positive number"),
        ({"OES_RELEASED_REPOST": "maybe"}, "OES_RELEASED_REPOST must be"),
        ({"OES_INTERNAL_TOKEN": "short"}, "OES_INTERNAL_TOKEN must be at least 16"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(
    env: dict[str, str], change: dict[str, str], named: str
) -> None:
    from api.settings import Settings
    from config.settings import SettingsError

    with pytest.raises(SettingsError, match=named):
        Settings.from_env({**env, **change})


def test_a_key_file_without_keys_is_refused_at_start(env: dict[str, str], tmp_path: Path) -> None:
    from api.settings import Settings
    from config.settings import SettingsError

    empty = tmp_path / "keys.pem"
    empty.write_text("not a key\n")
    with pytest.raises(SettingsError, match=r"BITGO_PUBLIC_KEYS: .*no RSA public keys"):
        Settings.from_env({**env, "BITGO_PUBLIC_KEYS": str(empty)})


def test_settlements_resolve_releases_a_conflicts_trades(
    cli_env: None,
    sessions: sessionmaker[Session],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from models import settlements
    from models.settlements import SettlementStatus

    with sessions.begin() as session:  # a settlement BitGo stopped with a 409
        settlement_id = uuid.uuid4()
        session.execute(
            text(
                "INSERT INTO settlements (id, external_id, status, amounts, body, finalized_at)"
                " VALUES (:id, :ext, 'conflict', '{}', '{}', now())"
            ),
            {"id": settlement_id, "ext": f"oes-settlement-test-{settlement_id.hex[:8]}"},
        )
    assert main(["settlements", "list"]) == 0
    assert str(settlement_id) in capsys.readouterr().out
    resolved = ["settlements", "resolve", str(settlement_id), "--release-trades", "--note", "x"]
    assert main(resolved) == 0
    assert "is rejected (release_trades)" in capsys.readouterr().out
    with sessions() as session:
        assert settlements.get(session, settlement_id).status is SettlementStatus.REJECTED
    assert main(resolved) == 1
    assert "only a conflict is resolved" in capsys.readouterr().err
    assert main(["settlements", "resolve", "nope", "--mark-completed"]) == 2


@pytest.fixture
def worker_env(cli_env: None, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[None]:
    from workers.settings import settings as worker_settings

    monkeypatch.setenv("REDIS_URL", redis_url)
    worker_settings.cache_clear()
    yield
    worker_settings.cache_clear()


def test_tasks_list_names_every_task_with_its_queue(
    worker_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "8 task(s)" in out
    for name, queue in (
        ("workers.hooks.deliver ", "hooks"),
        ("workers.remediation.relay_outbox ", "remediation"),
        ("workers.settlement.run_settlement ", "settlement"),
    ):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert queue in line.split()


def test_tasks_run_runs_the_task_here_and_prints_its_summary(
    worker_env: None, sessions: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    before = row_count(sessions, "task_runs", "task = 'workers.remediation.relay_outbox'")
    assert main(["tasks", "run", "workers.remediation.relay_outbox"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("relayed=")
    after = row_count(sessions, "task_runs", "task = 'workers.remediation.relay_outbox'")
    assert after == before + 1


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["tasks", "run", "workers.nope"], "no task 'workers.nope'"),
        (["tasks", "run", "celery.backend_cleanup"], "no task"),
        (["tasks", "run", "workers.hooks.deliver", "--args", "{}"], "--args is a JSON list"),
    ],
)
def test_tasks_run_refuses_what_it_cannot_run(
    worker_env: None, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_tasks_run_without_settings_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.settings import settings as worker_settings

    monkeypatch.delenv("DATABASE_URL", raising=False)
    worker_settings.cache_clear()
    with pytest.raises(SystemExit) as stopped:
        main(["tasks", "run", "workers.remediation.relay_outbox"])
    assert stopped.value.code == 2
    assert "DATABASE_URL is required and not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [[], ["serve"], ["standalone"], ["outbox", "redrive"], ["settlements", "resolve"], ["tasks"]],
)
def test_help_is_plain_text_with_defaults(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    if command in (["serve"], ["standalone"]):
        assert "(default: " in text


def test_outbox_redrive_revives_dead_letters_and_queues_them_after_commit(
    worker_env: None,
    redis_url: str,
    sessions: sessionmaker[Session],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis

    ids = [uuid.uuid4() for _ in range(3)]
    with sessions.begin() as session:
        for ident in ids:
            session.execute(
                text(
                    "INSERT INTO outbox (id, topic, payload, status, attempts, last_error)"
                    " VALUES (:id, 'test.dead', '{}', 'dead', 15, 'HTTP 400')"
                ),
                {"id": ident},
            )
    with redis.Redis.from_url(redis_url) as broker:
        queued = broker.llen("hooks")
        assert main(["outbox", "redrive", *map(str, ids)]) == 0
        assert broker.llen("hooks") == queued + 1  # one message carries the batch
    assert "re-driven 3 dead letter(s)" in capsys.readouterr().out
    with sessions() as session:
        found = session.execute(
            text("SELECT status FROM outbox WHERE id = ANY(:ids)"), {"ids": ids}
        )
        statuses = {row.status for row in found}
    assert statuses == {"pending"}
    with sessions.begin() as session:  # no worker here: leave nothing for a later test
        session.execute(
            text("UPDATE outbox SET status = 'delivered_locally' WHERE id = ANY(:ids)"),
            {"ids": ids},
        )

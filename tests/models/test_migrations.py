"""The migrations build exactly the schema ``models.tables`` describes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pprint import pformat
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from models.db import sync_engine
from models.migrate import alembic_config, upgrade
from models.tables import metadata

# What alembic's autogenerate does not compare: CHECK constraints, partial-index
# predicates, identity columns. Read from the catalogue instead.
_CATALOGUE = {
    "columns": """
        SELECT table_name, column_name, data_type, numeric_precision, numeric_scale,
               is_nullable, column_default, is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'alembic_version'
    """,
    "constraints": """
        SELECT c.relname, con.conname, pg_get_constraintdef(con.oid)
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relname <> 'alembic_version'
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'alembic_version'
    """,
}


def catalogue(engine: Engine) -> dict[str, set[tuple[Any, ...]]]:
    with engine.connect() as connection:
        return {
            name: {tuple(row) for row in connection.execute(text(query))}
            for name, query in _CATALOGUE.items()
        }


@pytest.fixture
def migrated(database_url: str) -> Iterator[Engine]:
    """The run's database, which the session fixture migrated to head."""
    engine = sync_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def scratch(server_database_url: str) -> Iterator[Engine]:
    """An empty database of its own, dropped afterwards."""
    name = f"oes_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_database_url)
    params = "&".join(f"{k}={v}" for k, v in info.items() if k != "dbname" and v)
    engine = sync_engine(f"postgresql:///{name}?{params}")
    yield engine
    engine.dispose()
    with psycopg.connect(server_database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_migrated_database_matches_the_tables_module(migrated: Engine) -> None:
    with migrated.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, metadata)
    assert diff == [], pformat(diff)


def test_migrated_database_is_at_the_head_revision(migrated: Engine, database_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    with migrated.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == head


def test_migrated_catalogue_equals_one_built_from_the_tables_module(
    migrated: Engine, scratch: Engine
) -> None:
    metadata.create_all(scratch)
    ours, theirs = catalogue(migrated), catalogue(scratch)
    for part in _CATALOGUE:
        only_migrated = sorted(ours[part] - theirs[part], key=repr)
        only_tables = sorted(theirs[part] - ours[part], key=repr)
        assert (only_migrated, only_tables) == ([], []), part


def test_ledger_entries_refuse_updates_and_deletes(migrated: Engine) -> None:
    # The append-only trigger lives only in the migration, not in the tables module.
    for statement in (
        "UPDATE ledger_entries SET reason = reason",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
    ):
        with migrated.connect() as connection, pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text(statement))


def test_downgrade_to_base_and_upgrade_again_round_trips(scratch: Engine) -> None:
    url = url_of(scratch)
    upgrade(url)
    built = catalogue(scratch)
    with scratch.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    with scratch.connect() as connection:
        left = connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        assert sorted(left) == ["alembic_version"]
    upgrade(url)
    assert catalogue(scratch) == built

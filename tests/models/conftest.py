"""A session on the run's real PostgreSQL per domain test, rolled back when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker


@pytest.fixture
def db(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A ``Session`` inside a transaction that is rolled back after the test.

    SQLAlchemy 2's recipe: the connection's own transaction is never committed; the
    session works in savepoints of it, so a domain action that flushes, or a test that
    rolls a savepoint back, still leaves nothing behind.
    """
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()

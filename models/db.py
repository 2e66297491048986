"""Engines and sessions for PostgreSQL through psycopg 3."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker


def sqlalchemy_url(url: str) -> str:
    """Turn a libpq-style URL (``postgres://``, ``postgresql://``) into a psycopg 3 one."""
    for prefix in ("postgresql+psycopg://", "postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must start with postgresql:// or postgres://")


def sync_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for workers, the command line and tests."""
    return create_engine(sqlalchemy_url(url), pool_size=pool_size, pool_pre_ping=True)


def async_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    """An engine for the web process."""
    return create_async_engine(
        sqlalchemy_url(url), pool_size=pool_size, max_overflow=10, pool_pre_ping=False
    )


def session_factory(engine: Engine) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(engine, expire_on_commit=False)


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(engine, expire_on_commit=False)

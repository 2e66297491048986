"""The command line's settings: read from the environment here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config.settings import Reader, SettingsError, environment

__all__ = [
    "CommandDefaults",
    "SettingsError",
    "database_url",
    "defaults",
    "environment",
    "redis_url",
]


def database_url() -> str:
    """``DATABASE_URL``, required by every command that reads or writes the database."""
    return Reader.from_environ().database_url()


def redis_url() -> str | None:
    """``REDIS_URL`` when set (commands queue deliveries through it), else None."""
    reader = Reader.from_environ()
    return reader.redis_url() if reader.optional("REDIS_URL") else None


@dataclass(frozen=True)
class CommandDefaults:
    """Defaults of command-line options, from the environment."""

    host: str
    port: int
    web_concurrency: int
    data_dir: Path
    sandbox_port: int
    sandbox_url: str | None
    gateway_url: str
    internal_token: str | None


def defaults() -> CommandDefaults:
    reader = Reader.from_environ()
    return CommandDefaults(
        host=reader.text("HOST"),
        port=reader.port("PORT"),
        web_concurrency=reader.count("WEB_CONCURRENCY"),
        data_dir=Path(reader.text("OES_DATA_DIR")),
        sandbox_port=reader.port("OES_SANDBOX_PORT"),
        sandbox_url=reader.http_url("OES_SANDBOX_URL"),
        gateway_url=reader.http_url("OES_GATEWAY_URL") or "",
        internal_token=reader.optional("OES_INTERNAL_TOKEN"),
    )

"""Every setting's name and default, written once, and the reader that validates them.

This is the only module that touches ``os.environ``; each process has one settings
module (``api.settings``, ``workers.settings``, ``cli.settings``) that builds its
typed settings from a ``Reader`` over the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(Exception):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in logs or reprs."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('**********')"


# None: no default (unset, or required where a process needs it). The README's settings
# table and docker-compose.yml are checked against this by tests/config.
DEFAULTS: dict[str, str | None] = {
    "DATABASE_URL": None,
    "REDIS_URL": None,
    "BITGO_PUBLIC_KEYS": None,
    "OES_INTERNAL_TOKEN": None,
    "OES_CURRENCIES": "btc,eth,usdc,usdt,sol,tbtc,teth,ofcbtc,ofceth,ofctbtc,ofcteth",
    "OES_JWT_MAX_AGE": "60",
    "OES_JWT_LEEWAY": "5",
    "OES_JWT_ISSUER": None,
    "OES_JWT_AUDIENCE": None,
    "OES_LOCK_WAIT": "5",
    "OES_LOCK_TTL": "10",
    "OES_RELEASED_REPOST": "reserve",
    "OES_CONNECTION_TOKEN_TTL": "86400",
    "OES_STALE_AFTER": "600",
    "OES_HTTP_MAX_HEADER_BYTES": "16384",
    "OES_HTTP_HEADER_TIMEOUT": "10",
    "OES_HTTP_BODY_TIMEOUT": "10",
    "OES_HTTP_MAX_CONNECTIONS": "1000",
    "OES_DASHBOARD_TOKEN": None,
    "OES_CURRENCY_DECIMALS": None,
    "PLATFORM_WEBHOOK_URL": None,
    "PLATFORM_WEBHOOK_SECRET": None,
    "OES_HOOK_MAX_ATTEMPTS": "15",
    "OES_HOOK_BACKOFF": "2",
    "OES_HOOK_BACKOFF_MAX": "600",
    "OES_HOOK_TIMEOUT": "10",
    "OES_OUTBOX_GRACE": "30",
    "BITGO_API_URL": "https://app.bitgo-test.com",
    "BITGO_ACCESS_TOKEN": None,
    "BITGO_ENTERPRISE_ID": None,
    "BITGO_EXPRESS_URL": None,
    "BITGO_WALLET_ID": None,
    "OES_SETTLEMENT_SCHEDULE": "0 0 * * *",
    "OES_SETTLEMENT_RETRY": "60",
    # The command line's own.
    "OES_DATA_DIR": ".oes-data",
    "HOST": "0.0.0.0",  # noqa: S104 - a server's job is to listen
    "PORT": "8000",
    "WEB_CONCURRENCY": "1",
    "OES_SANDBOX_PORT": "8100",
    "OES_SANDBOX_URL": None,
    "OES_GATEWAY_URL": "http://127.0.0.1:8000",
    # Read by the Procfile's shell, not by Python.
    "WORKER_CONCURRENCY": "2",
    "CELERYBEAT_SCHEDULE_FILE": "/tmp/oes-celerybeat-schedule",  # noqa: S108 - a default path
}


def environment() -> dict[str, str]:
    """A copy of this process's environment: what settings are read from, or children get."""
    return dict(os.environ)


@dataclass(frozen=True)
class Reader:
    """Reads settings from one environment, refusing malformed values by name."""

    env: Mapping[str, str]

    @classmethod
    def from_environ(cls) -> Reader:
        return cls(environment())

    def text(self, name: str) -> str:
        """The value, or the setting's default; empty when it has none."""
        return self.env.get(name, "").strip() or DEFAULTS[name] or ""

    def optional(self, name: str) -> str | None:
        return self.text(name) or None

    def required(self, name: str) -> str:
        value = self.text(name)
        if not value:
            raise SettingsError(f"{name} is required and not set")
        return value

    def database_url(self) -> str:
        url = self.required("DATABASE_URL")
        if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise SettingsError("DATABASE_URL must start with postgresql:// or postgres://")
        return url

    def redis_url(self) -> str:
        url = self.required("REDIS_URL")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")
        return url

    def http_url(self, name: str) -> str | None:
        """An http(s) URL, or None when unset."""
        url = self.text(name)
        if url and not url.startswith(("http://", "https://")):
            raise SettingsError(f"{name} must start with http:// or https://")
        return url or None

    def secret(self, name: str) -> Secret | None:
        value = self.text(name)
        return Secret(value) if value else None

    def integer(self, name: str, *, minimum: int, unit: str = "seconds") -> int:
        raw = self.text(name)
        if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < minimum:
            raise SettingsError(
                f"{name} must be a whole number of {unit} >= {minimum}, not {raw!r}"
            )
        return int(raw)

    def port(self, name: str) -> int:
        raw = self.text(name)
        if not re.fullmatch(r"[0-9]{1,5}", raw) or not 0 < int(raw) < 65536:
            raise SettingsError(f"{name} must be a TCP port (1-65535), not {raw!r}")
        return int(raw)

    def count(self, name: str) -> int:
        raw = self.text(name)
        if not re.fullmatch(r"[0-9]{1,4}", raw) or int(raw) < 1:
            raise SettingsError(f"{name} must be a whole number >= 1, not {raw!r}")
        return int(raw)

    def number(self, name: str) -> float:
        raw = self.text(name)
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise SettingsError(f"{name} must be a positive number of seconds, not {raw!r}")
        return value

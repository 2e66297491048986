"""The web process's settings, read once from the environment and validated at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from api.signatures import KeySet


class SettingsError(Exception):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in logs or reprs."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('**********')"


DEFAULT_CURRENCIES = "btc,eth,usdc,usdt,sol,tbtc,teth,ofcbtc,ofceth,ofctbtc,ofcteth"


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    bitgo_public_keys: Path
    bitgo_keys: KeySet = field(repr=False)
    internal_token: Secret
    currencies: frozenset[str]
    jwt_max_age: int = 60
    jwt_leeway: int = 5
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    lock_wait: float = 5.0
    lock_ttl: float = 10.0
    released_repost: Literal["reserve", "conflict"] = "reserve"
    connection_token_ttl: int = 86400
    stale_after: int = 600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting; raise SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        reader = Reader(env)
        database_url = reader.database_url()
        redis_url = reader.redis_url()
        repost = reader.text("OES_RELEASED_REPOST", "reserve")
        if repost not in ("reserve", "conflict"):
            raise SettingsError("OES_RELEASED_REPOST must be 'reserve' or 'conflict'")
        keys = Path(reader.required("BITGO_PUBLIC_KEYS"))
        if not keys.is_file():
            raise SettingsError(f"BITGO_PUBLIC_KEYS: no such file: {keys}")
        try:
            bitgo_keys = KeySet.load(keys)
        except ValueError as exc:
            raise SettingsError(f"BITGO_PUBLIC_KEYS: {exc}") from None
        currencies = frozenset(
            c.strip() for c in reader.text("OES_CURRENCIES", DEFAULT_CURRENCIES).split(",")
        ) - {""}
        if not currencies:
            raise SettingsError("OES_CURRENCIES must list at least one currency")
        internal_token = reader.required("OES_INTERNAL_TOKEN")
        if len(internal_token) < 16:
            raise SettingsError("OES_INTERNAL_TOKEN must be at least 16 characters")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            bitgo_public_keys=keys,
            bitgo_keys=bitgo_keys,
            internal_token=Secret(internal_token),
            currencies=currencies,
            jwt_max_age=reader.integer("OES_JWT_MAX_AGE", 60, minimum=1),
            jwt_leeway=reader.integer("OES_JWT_LEEWAY", 5, minimum=0),
            jwt_issuer=reader.text("OES_JWT_ISSUER", "") or None,
            jwt_audience=reader.text("OES_JWT_AUDIENCE", "") or None,
            lock_wait=reader.number("OES_LOCK_WAIT", 5.0),
            lock_ttl=reader.number("OES_LOCK_TTL", 10.0),
            released_repost="conflict" if repost == "conflict" else "reserve",
            connection_token_ttl=reader.integer("OES_CONNECTION_TOKEN_TTL", 86400, minimum=1),
            stale_after=reader.integer("OES_STALE_AFTER", 600, minimum=1),
        )


@dataclass(frozen=True)
class Reader:
    """Reads settings from one environment, refusing malformed values by name."""

    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.env.get(name, "").strip()
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

    def http_url(self, name: str, default: str = "") -> str | None:
        """An http(s) URL, or None when unset."""
        url = self.text(name, default)
        if url and not url.startswith(("http://", "https://")):
            raise SettingsError(f"{name} must start with http:// or https://")
        return url or None

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        raw = self.text(name, str(default))
        if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < minimum:
            raise SettingsError(
                f"{name} must be a whole number of seconds >= {minimum}, not {raw!r}"
            )
        return int(raw)

    def number(self, name: str, default: float) -> float:
        raw = self.text(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise SettingsError(f"{name} must be a positive number of seconds, not {raw!r}")
        return value

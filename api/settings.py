"""The web process's settings, read once from the environment and validated at start."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from api.signatures import KeySet
from config.settings import Reader, Secret, SettingsError


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    bitgo_public_keys: Path
    bitgo_keys: KeySet = field(repr=False)
    internal_token: Secret
    currencies: frozenset[str]
    jwt_max_age: int
    jwt_leeway: int
    jwt_issuer: str | None
    jwt_audience: str | None
    lock_wait: float
    lock_ttl: float
    released_repost: Literal["reserve", "conflict"]
    connection_token_ttl: int
    stale_after: int
    http_max_header_bytes: int
    http_header_timeout: float
    http_body_timeout: float
    http_max_connections: int
    # None: the dashboard is off and its paths answer 404.
    dashboard_token: Secret | None
    currency_decimals: Mapping[str, int]
    # The dashboard's read-only look at an allocation BitGo holds; unset: not shown.
    bitgo_api_url: str
    bitgo_access_token: Secret | None
    bitgo_enterprise_id: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting (from ``env``, or this process's environment).

        Raises SettingsError naming the first bad one.
        """
        reader = Reader.from_environ() if env is None else Reader(env)
        database_url = reader.database_url()
        redis_url = reader.redis_url()
        repost = reader.text("OES_RELEASED_REPOST")
        if repost not in ("reserve", "conflict"):
            raise SettingsError("OES_RELEASED_REPOST must be 'reserve' or 'conflict'")
        keys = Path(reader.required("BITGO_PUBLIC_KEYS"))
        if not keys.is_file():
            raise SettingsError(f"BITGO_PUBLIC_KEYS: no such file: {keys}")
        try:
            bitgo_keys = KeySet.load(keys)
        except ValueError as exc:
            raise SettingsError(f"BITGO_PUBLIC_KEYS: {exc}") from None
        currencies = frozenset(c.strip() for c in reader.text("OES_CURRENCIES").split(",")) - {""}
        if not currencies:
            raise SettingsError("OES_CURRENCIES must list at least one currency")
        internal_token = reader.required("OES_INTERNAL_TOKEN")
        if len(internal_token) < 16:
            raise SettingsError("OES_INTERNAL_TOKEN must be at least 16 characters")
        dashboard_token = reader.secret("OES_DASHBOARD_TOKEN")
        if dashboard_token is not None and len(dashboard_token.value) < 16:
            raise SettingsError("OES_DASHBOARD_TOKEN must be at least 16 characters when set")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            bitgo_public_keys=keys,
            bitgo_keys=bitgo_keys,
            internal_token=Secret(internal_token),
            currencies=currencies,
            jwt_max_age=reader.integer("OES_JWT_MAX_AGE", minimum=1),
            jwt_leeway=reader.integer("OES_JWT_LEEWAY", minimum=0),
            jwt_issuer=reader.optional("OES_JWT_ISSUER"),
            jwt_audience=reader.optional("OES_JWT_AUDIENCE"),
            lock_wait=reader.number("OES_LOCK_WAIT"),
            lock_ttl=reader.number("OES_LOCK_TTL"),
            released_repost="conflict" if repost == "conflict" else "reserve",
            connection_token_ttl=reader.integer("OES_CONNECTION_TOKEN_TTL", minimum=1),
            stale_after=reader.integer("OES_STALE_AFTER", minimum=1),
            http_max_header_bytes=reader.integer(
                "OES_HTTP_MAX_HEADER_BYTES", minimum=1024, unit="bytes"
            ),
            http_header_timeout=reader.number("OES_HTTP_HEADER_TIMEOUT"),
            http_body_timeout=reader.number("OES_HTTP_BODY_TIMEOUT"),
            http_max_connections=reader.integer(
                "OES_HTTP_MAX_CONNECTIONS", minimum=1, unit="connections"
            ),
            dashboard_token=dashboard_token,
            currency_decimals=currency_decimals(reader.text("OES_CURRENCY_DECIMALS")),
            bitgo_api_url=reader.http_url("BITGO_API_URL") or "",
            bitgo_access_token=reader.secret("BITGO_ACCESS_TOKEN"),
            bitgo_enterprise_id=reader.optional("BITGO_ENTERPRISE_ID"),
        )


_DECIMALS = re.compile(r"([^:,\s]+):([0-9]{1,2})")
MAX_DECIMALS = 77  # a quantity has at most 78 digits


def currency_decimals(raw: str) -> dict[str, int]:
    """``btc:8,eth:18`` as {currency: decimals}; refuses anything else by the setting's name."""
    decimals: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        match = _DECIMALS.fullmatch(item)
        if match is None or int(match[2]) > MAX_DECIMALS or match[1] in decimals:
            raise SettingsError(
                "OES_CURRENCY_DECIMALS must list currency:decimals pairs (each currency once, "
                f"0-{MAX_DECIMALS} decimals), e.g. btc:8,eth:18; not {item!r}"
            )
        decimals[match[1]] = int(match[2])
    return decimals

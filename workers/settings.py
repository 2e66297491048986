"""The worker processes' settings, read once from the environment and validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from celery.schedules import crontab

from api.settings import Reader, Secret, SettingsError

# Half the broker's visibility timeout (workers.celery): the longest a task may wait.
MAX_COUNTDOWN = 1800.0


def broker_url(redis_url: str | None = None) -> str:
    """Celery's broker: the same Redis as the web process (``REDIS_URL``)."""
    url = (redis_url or os.environ.get("REDIS_URL", "")).strip() or "redis://127.0.0.1:6379/0"
    # Celery spells a unix-socket Redis differently from redis-py.
    if url.startswith("unix://"):
        path, _, query = url[len("unix://") :].partition("?")
        db = dict(p.partition("=")[::2] for p in query.split("&") if p).get("db")
        return f"redis+socket://{path}" + (f"?virtual_host={db}" if db else "")
    return url


def schedule(line: str) -> crontab:
    """A crontab from a five-field line: minute hour day-of-month month day-of-week."""
    fields = line.split()
    if len(fields) != 5:
        raise SettingsError(f"OES_SETTLEMENT_SCHEDULE must be a five-field crontab line: {line!r}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except ValueError as exc:
        raise SettingsError(f"OES_SETTLEMENT_SCHEDULE is not a crontab line: {exc}") from None


@dataclass(frozen=True)
class WorkerSettings:
    database_url: str
    redis_url: str
    stale_after: int = 600
    hook_url: str | None = None
    hook_secret: Secret | None = None
    hook_max_attempts: int = 15
    hook_backoff: float = 2.0
    hook_backoff_max: float = 600.0
    hook_timeout: float = 10.0
    outbox_grace: int = 30
    bitgo_api_url: str = "https://app.bitgo-test.com"
    bitgo_access_token: Secret | None = None
    bitgo_enterprise_id: str | None = None
    bitgo_express_url: str | None = None
    bitgo_wallet_id: str | None = None
    settlement_schedule: str = "0 0 * * *"
    settlement_retry: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read every setting; raise SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        reader = Reader(env)
        database_url = reader.database_url()
        redis_url = reader.redis_url()
        hook_url = reader.http_url("PLATFORM_WEBHOOK_URL")
        secret = reader.text("PLATFORM_WEBHOOK_SECRET", "")
        if hook_url and len(secret) < 16:
            raise SettingsError(
                "PLATFORM_WEBHOOK_SECRET must be set (16+ characters) when PLATFORM_WEBHOOK_URL is"
            )
        api_url = reader.http_url("BITGO_API_URL", cls.bitgo_api_url) or cls.bitgo_api_url
        express = reader.http_url("BITGO_EXPRESS_URL")
        backoff_max = reader.number("OES_HOOK_BACKOFF_MAX", 600.0)
        if backoff_max > MAX_COUNTDOWN:
            # A countdown past the broker's visibility timeout is delivered twice.
            raise SettingsError(f"OES_HOOK_BACKOFF_MAX must be at most {MAX_COUNTDOWN:.0f} seconds")
        line = reader.text("OES_SETTLEMENT_SCHEDULE", cls.settlement_schedule)
        schedule(line)
        token = reader.text("BITGO_ACCESS_TOKEN", "")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            stale_after=reader.integer("OES_STALE_AFTER", 600, minimum=1),
            hook_url=hook_url,
            hook_secret=Secret(secret) if secret else None,
            hook_max_attempts=reader.integer("OES_HOOK_MAX_ATTEMPTS", 15, minimum=1),
            hook_backoff=reader.number("OES_HOOK_BACKOFF", 2.0),
            hook_backoff_max=backoff_max,
            hook_timeout=reader.number("OES_HOOK_TIMEOUT", 10.0),
            outbox_grace=reader.integer("OES_OUTBOX_GRACE", 30, minimum=0),
            bitgo_api_url=api_url,
            bitgo_access_token=Secret(token) if token else None,
            bitgo_enterprise_id=reader.text("BITGO_ENTERPRISE_ID", "") or None,
            bitgo_express_url=express,
            bitgo_wallet_id=reader.text("BITGO_WALLET_ID", "") or None,
            settlement_schedule=line,
            settlement_retry=reader.number("OES_SETTLEMENT_RETRY", 60.0),
        )


@cache
def settings() -> WorkerSettings:
    """This process's settings, read on first use."""
    return WorkerSettings.from_env()

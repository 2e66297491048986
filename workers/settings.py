"""The worker and beat processes' settings, read once from the environment and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from celery.schedules import crontab

from config.settings import Reader, Secret, SettingsError

# Half the broker's visibility timeout (workers.publish): the longest a task may wait.
MAX_COUNTDOWN = 1800.0


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
    stale_after: int
    hook_url: str | None
    hook_secret: Secret | None
    hook_max_attempts: int
    hook_backoff: float
    hook_backoff_max: float
    hook_timeout: float
    outbox_grace: int
    bitgo_api_url: str
    bitgo_access_token: Secret | None
    bitgo_enterprise_id: str | None
    bitgo_express_url: str | None
    bitgo_wallet_id: str | None
    settlement_schedule: str
    settlement_retry: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read every setting (from ``env``, or this process's environment).

        Raises SettingsError naming the first bad one.
        """
        reader = Reader.from_environ() if env is None else Reader(env)
        database_url = reader.database_url()
        redis_url = reader.redis_url()
        hook_url = reader.http_url("PLATFORM_WEBHOOK_URL")
        secret = reader.secret("PLATFORM_WEBHOOK_SECRET")
        if hook_url and (secret is None or len(secret.value) < 16):
            raise SettingsError(
                "PLATFORM_WEBHOOK_SECRET must be set (16+ characters) when PLATFORM_WEBHOOK_URL is"
            )
        backoff_max = reader.number("OES_HOOK_BACKOFF_MAX")
        if backoff_max > MAX_COUNTDOWN:
            # A countdown past the broker's visibility timeout is delivered twice.
            raise SettingsError(f"OES_HOOK_BACKOFF_MAX must be at most {MAX_COUNTDOWN:.0f} seconds")
        line = reader.text("OES_SETTLEMENT_SCHEDULE")
        schedule(line)
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            stale_after=reader.integer("OES_STALE_AFTER", minimum=1),
            hook_url=hook_url,
            hook_secret=secret,
            hook_max_attempts=reader.integer("OES_HOOK_MAX_ATTEMPTS", minimum=1),
            hook_backoff=reader.number("OES_HOOK_BACKOFF"),
            hook_backoff_max=backoff_max,
            hook_timeout=reader.number("OES_HOOK_TIMEOUT"),
            outbox_grace=reader.integer("OES_OUTBOX_GRACE", minimum=0),
            bitgo_api_url=reader.http_url("BITGO_API_URL") or "",
            bitgo_access_token=reader.secret("BITGO_ACCESS_TOKEN"),
            bitgo_enterprise_id=reader.optional("BITGO_ENTERPRISE_ID"),
            bitgo_express_url=reader.http_url("BITGO_EXPRESS_URL"),
            bitgo_wallet_id=reader.optional("BITGO_WALLET_ID"),
            settlement_schedule=line,
            settlement_retry=reader.number("OES_SETTLEMENT_RETRY"),
        )


@dataclass(frozen=True)
class BrokerSettings:
    """What any Celery command of ours needs, ``celery call`` included: the broker and beat."""

    redis_url: str
    settlement_schedule: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerSettings:
        reader = Reader.from_environ() if env is None else Reader(env)
        line = reader.text("OES_SETTLEMENT_SCHEDULE")
        schedule(line)
        return cls(redis_url=reader.redis_url(), settlement_schedule=line)


@cache
def settings() -> WorkerSettings:
    """This process's settings, read on first use."""
    return WorkerSettings.from_env()

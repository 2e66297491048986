"""Worker settings, the broker URL, the beat schedule and the hook signature, without a worker."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys

import pytest
from celery import Celery

from config.settings import SettingsError
from models.outbox import RetryPolicy
from workers.celery import app, beat_schedule
from workers.hooks import signature
from workers.publish import broker_url
from workers.settings import WorkerSettings

BASE = {"DATABASE_URL": "postgresql://db/x", "REDIS_URL": "redis://r:6379/1"}


def test_defaults_follow_the_spec() -> None:
    s = WorkerSettings.from_env(BASE)
    assert s.stale_after == 600
    assert s.settlement_schedule == "0 0 * * *"
    assert s.hook_url is None
    assert s.bitgo_access_token is None
    assert s.bitgo_api_url == "https://app.bitgo-test.com"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"REDIS_URL": "http://r"}, "REDIS_URL"),
        ({"PLATFORM_WEBHOOK_URL": "ftp://x"}, "PLATFORM_WEBHOOK_URL"),
        ({"PLATFORM_WEBHOOK_URL": "https://platform/hooks"}, "PLATFORM_WEBHOOK_SECRET"),
        ({"PLATFORM_WEBHOOK_URL": "https://p/h", "PLATFORM_WEBHOOK_SECRET": "short"}, "SECRET"),
        ({"OES_HOOK_MAX_ATTEMPTS": "0"}, "OES_HOOK_MAX_ATTEMPTS"),
        ({"OES_HOOK_BACKOFF": "-1"}, "OES_HOOK_BACKOFF"),
        ({"OES_STALE_AFTER": "ten"}, "OES_STALE_AFTER"),
        ({"BITGO_API_URL": "app.bitgo.com"}, "BITGO_API_URL"),
        ({"BITGO_EXPRESS_URL": "localhost:3080"}, "BITGO_EXPRESS_URL"),
        ({"OES_SETTLEMENT_SCHEDULE": "0 0 * *"}, "OES_SETTLEMENT_SCHEDULE"),
        ({"OES_SETTLEMENT_SCHEDULE": "61 * * * *"}, "OES_SETTLEMENT_SCHEDULE"),
    ],
)
def test_a_bad_setting_is_refused_by_name(extra: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        WorkerSettings.from_env({**BASE, **extra})


@pytest.mark.parametrize(
    "command",
    [
        ["worker", "--loglevel", "WARNING"],
        ["beat", "--loglevel", "WARNING"],
        ["call", "workers.remediation.relay_outbox"],
    ],
)
def test_without_redis_url_every_celery_command_stops_with_one_line(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "oes-partner worker: REDIS_URL is required and not set" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_with_a_bad_setting_stops_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # never reached: the settings stop it first
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "oes-partner worker: DATABASE_URL is required and not set" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("redis_url", "celery_url"),
    [
        ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
        ("rediss://u:p@host:6380/0", "rediss://u:p@host:6380/0"),
        ("unix:///tmp/r.sock", "redis+socket:///tmp/r.sock"),
        ("unix:///tmp/r.sock?db=9", "redis+socket:///tmp/r.sock?virtual_host=9"),
    ],
)
def test_the_broker_is_the_same_redis(redis_url: str, celery_url: str) -> None:
    assert broker_url(redis_url) == celery_url


@pytest.fixture
def tasks(monkeypatch: pytest.MonkeyPatch) -> Celery:
    """The worker app with its task modules loaded; its broker is never reached."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    app.loader.import_default_modules()
    return app


def test_beat_schedules_every_sweep_and_the_settlement_on_registered_tasks(tasks: Celery) -> None:
    schedule = beat_schedule("30 2 * * 1-5")
    names = {entry["task"] for entry in schedule.values()}
    assert names == {
        "workers.remediation.relay_outbox",
        "workers.remediation.sweep_stale_transfers",
        "workers.remediation.reconcile_balances",
        "workers.settlement.run_settlement",
    }
    assert names <= set(tasks.tasks)
    settlement = schedule["run-settlement"]["schedule"]
    assert settlement.hour == {2}
    assert settlement.minute == {30}
    assert settlement.day_of_week == {1, 2, 3, 4, 5}


def test_every_task_has_its_module_name_and_acks_late(tasks: Celery) -> None:
    ours = {name: task for name, task in tasks.tasks.items() if name.startswith("workers.")}
    assert len(ours) == 8
    for name, task in ours.items():
        assert name == f"{task.__module__}.{task.__wrapped__.__name__}"
        assert task.acks_late is True


def test_the_signature_is_an_hmac_of_timestamp_and_body() -> None:
    body = b'{"id":"e1"}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("s3cret", "1700000000", body) == f"sha256={expected}"
    assert signature("s3cret", "1700000001", body) != signature("s3cret", "1700000000", body)
    assert signature("other", "1700000000", body) != signature("s3cret", "1700000000", body)


def test_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    for failures, nominal in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 600.0)):
        policy = RetryPolicy(max_attempts=15, base=2.0, cap=600.0)
        delays = [policy.delay(failures) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal / 10  # jittered, not fixed

"""``oes-partner standalone``: the whole gateway on one machine with no set-up."""

from __future__ import annotations

import contextlib
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from api.app import create_app
from api.settings import Settings
from cli.devkeys import ensure_key_pair
from cli.embedded import start_postgres, start_redis
from cli.settings import environment
from config.logs import configure_logging
from models.migrate import upgrade
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE, SANDBOX_WALLET
from workers.publish import QUEUES


def _internal_token(data_dir: Path) -> str:
    path = data_dir / "internal-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


@contextlib.contextmanager
def prepared(data_dir: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """Environment for a full gateway, embedded servers started where URLs are unset."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    notes: list[str] = []
    servers = []
    try:
        if not env.get("DATABASE_URL"):
            env["DATABASE_URL"], pg = start_postgres(data_dir / "postgres")
            servers.append(pg.cleanup)
            notes.append(f"embedded PostgreSQL: {data_dir / 'postgres'}")
        if not env.get("REDIS_URL"):
            env["REDIS_URL"], redis = start_redis(data_dir / "redis")
            servers.append(redis.shutdown)
            notes.append(f"embedded Redis: {env['REDIS_URL']}")
        if not env.get("BITGO_PUBLIC_KEYS"):
            private, public = ensure_key_pair(data_dir)
            env["BITGO_PUBLIC_KEYS"] = str(public)
            notes.append(f"development BitGo key pair: private {private}, public {public}")
        if not env.get("OES_INTERNAL_TOKEN"):
            env["OES_INTERNAL_TOKEN"] = _internal_token(data_dir)
            notes.append(f"internal token (OES_INTERNAL_TOKEN): {data_dir / 'internal-token'}")
        upgrade(env["DATABASE_URL"])
        yield env, notes
    finally:
        for stop in reversed(servers):
            with contextlib.suppress(Exception):
                stop()


_SHARED = ("DATABASE_URL", "REDIS_URL", "BITGO_PUBLIC_KEYS", "OES_INTERNAL_TOKEN")


def _write_env(data_dir: Path, env: dict[str, str]) -> Path:
    """The settings the command line needs to reach these servers: ``set -a; . <file>``."""
    path = data_dir / "env"
    path.write_text("".join(f"{name}={shlex.quote(env[name])}\n" for name in _SHARED))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def _child(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process of ours, stopped (warm, then hard) when the block ends."""
    # Our own interpreter and fixed arguments: nothing here comes from input.
    process = subprocess.Popen([sys.executable, "-m", *command], env=env)  # noqa: S603
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _worker_command(data_dir: Path) -> list[str]:
    """A Celery worker with beat embedded."""
    return [
        "celery",
        "-A",
        "workers",
        "worker",
        "--beat",
        "--schedule",
        str(data_dir / "celerybeat-schedule"),
        "--loglevel",
        "INFO",
        "--concurrency",
        "1",
        "--queues",
        ",".join(QUEUES),
    ]


def _wire_sandbox(env: dict[str, str], sandbox_url: str) -> bool:
    """Point the workers at the sandbox, unless a real BitGo (URL or keys) is configured.

    The sandbox signs with the development key pair, so the gateway must trust it.
    """
    if env.get("BITGO_API_URL") or environment().get("BITGO_PUBLIC_KEYS"):
        return False
    env.update(
        BITGO_API_URL=sandbox_url,
        BITGO_EXPRESS_URL=sandbox_url,
        BITGO_ACCESS_TOKEN=SANDBOX_ACCESS_TOKEN,
        BITGO_ENTERPRISE_ID=SANDBOX_ENTERPRISE,
        BITGO_WALLET_ID=SANDBOX_WALLET,
    )
    return True


def run(*, data_dir: Path, host: str, port: int, sandbox_port: int | None) -> int:
    data_dir = data_dir.resolve()
    with prepared(data_dir) as (env, notes), contextlib.ExitStack() as children:
        settings = Settings.from_env(env)
        sandbox_url = f"http://{host}:{sandbox_port}"
        sandbox = sandbox_port is not None and _wire_sandbox(env, sandbox_url)
        env_file = _write_env(data_dir, env)
        print("oes-partner standalone")
        for note in notes:
            print(f"  {note}")
        print(f"  settings for the command line: set -a; . {env_file}; set +a")
        print(f"  API listening on http://{host}:{port}  (OpenAPI at /openapi.json)")
        print("  Celery worker with beat: hooks, settlement, remediation")
        if sandbox:
            print(f"  BitGo sandbox on {sandbox_url}, wired to the gateway and the workers")
            print("  try: oes-partner sandbox connect --partners-client-id alice")
            print("       oes-partner sandbox allocate --connection alice --quantity 100000")
        print("  Ctrl-C stops everything", flush=True)
        configure_logging()
        children.enter_context(_child(_worker_command(data_dir), env))
        if sandbox:
            command = [
                "cli.main",
                "sandbox",
                "--host",
                host,
                "--port",
                str(sandbox_port),
                "--gateway",
                f"http://{host}:{port}",
                "--data-dir",
                str(data_dir),
            ]
            children.enter_context(_child(command, env))
        uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None)
    return 0

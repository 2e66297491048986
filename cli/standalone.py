"""``oes-partner standalone``: the whole gateway on one machine with no set-up.

One process holds the data directory (a lock file) and supervises everything it starts:
the embedded PostgreSQL and Redis when no URLs are configured, then the API
(``oes-partner serve``), a Celery worker with beat and the BitGo sandbox, each a child in
a process group of its own. A child that dies is started again, after a back-off that
grows while it keeps dying. SIGINT, SIGTERM and SIGHUP all stop everything: the children
in parallel (SIGTERM, then SIGKILL after a grace), then the embedded servers. On Linux
the children also get SIGTERM from the kernel should this process die without a word
(SIGKILL), and the next run takes over the servers it left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.supervisor import (
    Child,
    Signals,
    Stopped,
    say,
    start_up,
    stop_children,
    watch,
)

if TYPE_CHECKING:
    from cli.embedded import Owned

LOCK_FILE = "standalone.lock"


class DataDirectoryInUse(Exception):
    pass


# --- the data directory's lock ------------------------------------------------------------


def _lock(data_dir: Path) -> int:
    """Hold ``data_dir`` for this process (``flock``, released when the process ends)."""
    # Not inherited by children (PEP 446), so an orphan can never keep holding it.
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise DataDirectoryInUse(
            f"data directory {data_dir} is in use by "
            + (f"PID {holder}" if holder else "another process")
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str | None:
    """The PID the holder wrote, which it does just after taking the lock."""
    for _ in range(10):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def _stop_servers(servers: list[Owned]) -> None:
    """The embedded servers, in parallel."""
    threads = [threading.Thread(target=server.stop, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)


# --- what runs ----------------------------------------------------------------------------


def _internal_token(data_dir: Path) -> str:
    path = data_dir / "internal-token"
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(24))
    return path.read_text().strip()


def _prepare(
    data_dir: Path, servers: list[Owned], signals: Signals
) -> tuple[dict[str, str], list[str]]:
    """Environment for a full gateway, embedded servers started where URLs are unset."""
    from cli.devkeys import ensure_key_pair
    from cli.embedded import own_postgres, own_redis
    from cli.settings import environment
    from models.migrate import upgrade

    env = environment()
    notes: list[str] = []
    if not env.get("DATABASE_URL"):
        servers.append(own_postgres(data_dir / "postgres"))
        env["DATABASE_URL"] = servers[-1].url
        notes.append(f"embedded PostgreSQL: {data_dir / 'postgres'}")
        signals.check()
    if not env.get("REDIS_URL"):
        servers.append(own_redis(data_dir / "redis"))
        env["REDIS_URL"] = servers[-1].url
        notes.append(f"embedded Redis: {env['REDIS_URL']}")
        signals.check()
    if not env.get("BITGO_PUBLIC_KEYS"):
        private, public = ensure_key_pair(data_dir)
        env["BITGO_PUBLIC_KEYS"] = str(public)
        notes.append(f"development BitGo key pair: private {private}, public {public}")
    if not env.get("OES_INTERNAL_TOKEN"):
        env["OES_INTERNAL_TOKEN"] = _internal_token(data_dir)
        notes.append(f"internal token (OES_INTERNAL_TOKEN): {data_dir / 'internal-token'}")
    upgrade(env["DATABASE_URL"])
    signals.check()
    return env, notes


_SHARED = ("DATABASE_URL", "REDIS_URL", "BITGO_PUBLIC_KEYS", "OES_INTERNAL_TOKEN")
# With the sandbox wired in, tasks run by hand (oes-partner tasks run) talk to it too.
_SANDBOX = (
    "BITGO_API_URL",
    "BITGO_EXPRESS_URL",
    "BITGO_ACCESS_TOKEN",
    "BITGO_ENTERPRISE_ID",
    "BITGO_WALLET_ID",
)


def _write_private(path: Path, content: str) -> None:
    """Write a secret readable by us alone from its first byte (not chmod-ed after)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()  # left by a crash, perhaps with another mode
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(content)
    partial.replace(path)


def _write_env(data_dir: Path, env: dict[str, str]) -> Path:
    """The settings the command line needs to reach these servers: ``set -a; . <file>``."""
    path = data_dir / "env"
    names = [n for n in (*_SHARED, *_SANDBOX) if env.get(n)]
    _write_private(path, "".join(f"{name}={shlex.quote(env[name])}\n" for name in names))
    return path


def _worker_command(data_dir: Path, node: str) -> list[str]:
    """A Celery worker with beat embedded: the only worker on its broker, so no mingling."""
    from workers.publish import QUEUES

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
        "--hostname",
        node,
        "--without-mingle",
        "--without-gossip",
    ]


def _wire_sandbox(env: dict[str, str], sandbox_url: str) -> bool:
    """Point the workers at the sandbox, unless a real BitGo (URL or keys) is configured.

    The sandbox signs with the development key pair, so the gateway must trust it.
    """
    from cli.settings import environment
    from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE, SANDBOX_WALLET

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


def _local(host: str) -> str:
    """Where to reach a server listening on ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104


def _answers(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=0.5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


class _WorkerPing:
    """Whether our Celery worker answers a ping through the broker."""

    def __init__(self, redis_url: str, node: str) -> None:
        self.redis_url, self.node = redis_url, node
        self.app: Any = None

    def __call__(self) -> bool:
        if self.app is None:
            from workers.publish import publisher

            self.app = publisher(self.redis_url)
        try:
            return bool(self.app.control.ping(destination=[self.node], timeout=0.5))
        except Exception:  # the broker is not there yet
            return False

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
            self.app = None


def run(*, data_dir: Path, host: str, port: int, sandbox_port: int | None) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(data_dir)
    except DataDirectoryInUse as exc:
        say(f"oes-partner standalone: {exc}", error=True)
        return 1
    signals = Signals()
    signals.install()
    try:
        return _run(data_dir, host, port, sandbox_port, signals)
    finally:
        signals.restore()
        _unlock(lock)


def _run(data_dir: Path, host: str, port: int, sandbox_port: int | None, signals: Signals) -> int:
    servers: list[Owned] = []
    children: list[Child] = []
    ping: _WorkerPing | None = None
    try:
        from api.settings import Settings

        env, notes = _prepare(data_dir, servers, signals)
        Settings.from_env(env)  # refuse a bad setting with one clear line, before any child
        sandbox_url = f"http://{host}:{sandbox_port}"
        sandbox = sandbox_port is not None and _wire_sandbox(env, sandbox_url)
        env_file = _write_env(data_dir, env)
        node = f"standalone-{os.getpid()}@{socket.gethostname()}"
        ping = _WorkerPing(env["REDIS_URL"], node)
        api = ["cli.main", "serve", "--host", host, "--port", str(port), "--workers", "1"]
        children.append(Child("the API", api, _answers(f"http://{_local(host)}:{port}/readyz"), 3))
        # A warm shutdown finishes the task at hand; a few seconds, then it is killed.
        children.append(Child("the Celery worker", _worker_command(data_dir, node), ping, 5))
        if sandbox:
            command = ["cli.main", "sandbox", "--host", host, "--port", str(sandbox_port)]
            command += ["--gateway", f"http://{host}:{port}", "--data-dir", str(data_dir)]
            probe = _answers(f"http://{_local(host)}:{sandbox_port}/sandbox/faults")
            children.append(Child("the BitGo sandbox", command, probe, 3))
        failed = start_up(children, env, signals)
        if failed is not None:
            return failed
        ping.close()
        say("oes-partner standalone")
        for note in notes:
            say(f"  {note}")
        say(f"  settings for the command line: set -a; . {env_file}; set +a")
        say(f"  API listening on http://{host}:{port}  (OpenAPI at /openapi.json)")
        say("  Celery worker with beat: hooks, settlement, remediation")
        if sandbox:
            say(f"  BitGo sandbox on {sandbox_url}, wired to the gateway and the workers")
            say("  try: oes-partner sandbox connect --partners-client-id alice")
            say("       oes-partner sandbox allocate --connection alice --quantity 100000")
        say("  Ctrl-C stops everything")
        watch(children, env, signals)
        return 0
    except Stopped:
        return 0
    finally:
        if signals.received:
            name = signal.Signals(signals.received[0]).name
            say(f"oes-partner standalone: {name}: stopping everything", error=True)
        stop_children(children, signals)
        if ping is not None:
            ping.close()
        _stop_servers(servers)

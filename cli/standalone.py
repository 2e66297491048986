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
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli.embedded import Owned

LOCK_FILE = "standalone.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BACKOFF = 1.0  # seconds before the first restart of a child that died
BACKOFF_MAX = 30.0  # the longest wait between restarts of a child that keeps dying
STABLE_AFTER = 30.0  # a child that ran this long starts its back-off afresh when it dies
POLL = 0.1

# Runs each child: asks the kernel for SIGTERM should we die (Linux), then becomes the
# child's command, ``python -m …``. Arguments: our pid, then the module and its arguments.
# Its process group is not the terminal's foreground one, so it ignores SIGTTOU (kept
# across exec): its logs reach the terminal even under ``stty tostop``.
_LAUNCH = """\
import os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
if sys.platform == "linux":
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        os._exit(0)  # the parent died before we asked to follow it
os.execv(sys.executable, [sys.executable, "-m", *sys.argv[2:]])
"""


class DataDirectoryInUse(Exception):
    pass


class _Stopped(Exception):
    """A stop signal arrived while starting."""


def _say(line: str, *, error: bool = False) -> None:
    """One line for the person at the terminal, which may be gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr if error else sys.stdout, flush=True)


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


# --- signals ------------------------------------------------------------------------------


class _Signals:
    """SIGINT, SIGTERM and SIGHUP, noted rather than acted on where they land."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored on purpose: SIGHUP under nohup, SIGINT in a background job
            self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if signum == signal.SIGHUP:
            _leave_terminal()

    def check(self) -> None:
        if self.received:
            raise _Stopped


def _leave_terminal() -> None:
    """The terminal hung up: writing to it would fail, so write to nowhere instead."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(null, fd)
    os.close(null)


# --- children -----------------------------------------------------------------------------


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Child:
    """A process we run, ``python -m <command>``, in a process group of its own."""

    name: str
    command: list[str]
    ready: Callable[[], bool]
    grace: float  # seconds from SIGTERM to SIGKILL
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        argv = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *self.command]
        # Our own interpreter and fixed arguments: nothing here comes from input.
        self.process = subprocess.Popen(  # noqa: S603
            argv, env=env, stdin=subprocess.DEVNULL, process_group=0
        )
        self.started = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def exited(self) -> int | None:
        """Its exit code once it has ended, else None.

        Whatever it left in its group (a worker's pool and beat) is killed first, while the
        unreaped child still holds its pid, so the group id cannot be anyone else's yet.
        """
        if self.process is None:
            return None
        if self.process.returncode is not None:
            return self.process.returncode
        if hasattr(os, "waitid"):  # not on macOS: there, the group is swept just after
            try:
                ended = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                ended = None
            if ended is None:
                return None
            self.signal_group(signal.SIGKILL)
            return self.process.wait()
        code = self.process.poll()
        if code is not None:
            self.signal_group(signal.SIGKILL)
        return code

    def running(self) -> bool:
        return self.process is not None and self.exited() is None

    def signal_group(self, sig: int) -> None:
        """``sig`` to the child's whole group: a worker's pool and beat processes too."""
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def died(self) -> float:
        """Note its death; the seconds to wait before starting it again."""
        quick = time.monotonic() - self.started < STABLE_AFTER
        self.failures = self.failures + 1 if quick else 1
        delay = min(BACKOFF_MAX, BACKOFF * 2.0 ** (self.failures - 1))
        self.restart_at = time.monotonic() + delay
        return delay


def _stop_children(children: list[_Child], signals: _Signals) -> None:
    """All at once: SIGTERM, then SIGKILL to the group of each still there after its grace.

    A second stop signal while waiting cuts the grace short.
    """
    now = time.monotonic()
    waiting: dict[int, float] = {}
    for i, child in enumerate(children):
        if child.running() and child.process is not None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            waiting[i] = now + child.grace
    impatient = len(signals.received)
    while waiting:
        hurry = len(signals.received) > impatient
        for i, deadline in list(waiting.items()):
            child = children[i]
            if not child.running():
                del waiting[i]
            elif hurry or time.monotonic() >= deadline:
                child.signal_group(signal.SIGKILL)  # it is still there: the group is its own
                if child.process is not None:
                    child.process.wait()
                del waiting[i]
        time.sleep(0.02)


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
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _prepare(
    data_dir: Path, servers: list[Owned], signals: _Signals
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


def _write_env(data_dir: Path, env: dict[str, str]) -> Path:
    """The settings the command line needs to reach these servers: ``set -a; . <file>``."""
    path = data_dir / "env"
    names = [n for n in (*_SHARED, *_SANDBOX) if env.get(n)]
    path.write_text("".join(f"{name}={shlex.quote(env[name])}\n" for name in names))
    path.chmod(0o600)
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


def _start_up(children: list[_Child], env: dict[str, str], signals: _Signals) -> int | None:
    """Start the children and wait until each is ready; an exit code if that failed."""
    for child in children:
        child.start(env)
    waiting = list(children)
    while waiting:
        signals.check()
        for child in list(waiting):
            if (code := child.exited()) is not None:
                _say(
                    f"oes-partner standalone: {child.name} {_describe(code)} while starting; "
                    "stopping everything",
                    error=True,
                )
                return 1
            if child.ready():
                waiting.remove(child)
        time.sleep(POLL)
    return None


def _watch(children: list[_Child], env: dict[str, str], signals: _Signals) -> None:
    """Until a stop signal: start again any child that died, with a growing back-off."""
    while not signals.received:
        for child in children:
            if child.restart_at is not None:
                if time.monotonic() >= child.restart_at:
                    child.start(env)
                    _say(
                        f"oes-partner standalone: restarted {child.name} (pid {child.pid})",
                        error=True,
                    )
            elif (code := child.exited()) is not None:
                delay = child.died()
                _say(
                    f"oes-partner standalone: {child.name} (pid {child.pid}) {_describe(code)}; "
                    f"restarting it in {delay:g} s",
                    error=True,
                )
        time.sleep(POLL)


def run(*, data_dir: Path, host: str, port: int, sandbox_port: int | None) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(data_dir)
    except DataDirectoryInUse as exc:
        _say(f"oes-partner standalone: {exc}", error=True)
        return 1
    signals = _Signals()
    signals.install()
    try:
        return _run(data_dir, host, port, sandbox_port, signals)
    finally:
        signals.restore()
        _unlock(lock)


def _run(data_dir: Path, host: str, port: int, sandbox_port: int | None, signals: _Signals) -> int:
    servers: list[Owned] = []
    children: list[_Child] = []
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
        children.append(_Child("the API", api, _answers(f"http://{_local(host)}:{port}/readyz"), 3))
        # A warm shutdown finishes the task at hand; a few seconds, then it is killed.
        children.append(_Child("the Celery worker", _worker_command(data_dir, node), ping, 5))
        if sandbox:
            command = ["cli.main", "sandbox", "--host", host, "--port", str(sandbox_port)]
            command += ["--gateway", f"http://{host}:{port}", "--data-dir", str(data_dir)]
            probe = _answers(f"http://{_local(host)}:{sandbox_port}/sandbox/faults")
            children.append(_Child("the BitGo sandbox", command, probe, 3))
        failed = _start_up(children, env, signals)
        if failed is not None:
            return failed
        ping.close()
        _say("oes-partner standalone")
        for note in notes:
            _say(f"  {note}")
        _say(f"  settings for the command line: set -a; . {env_file}; set +a")
        _say(f"  API listening on http://{host}:{port}  (OpenAPI at /openapi.json)")
        _say("  Celery worker with beat: hooks, settlement, remediation")
        if sandbox:
            _say(f"  BitGo sandbox on {sandbox_url}, wired to the gateway and the workers")
            _say("  try: oes-partner sandbox connect --partners-client-id alice")
            _say("       oes-partner sandbox allocate --connection alice --quantity 100000")
        _say("  Ctrl-C stops everything")
        _watch(children, env, signals)
        return 0
    except _Stopped:
        return 0
    finally:
        if signals.received:
            name = signal.Signals(signals.received[0]).name
            _say(f"oes-partner standalone: {name}: stopping everything", error=True)
        _stop_children(children, signals)
        if ping is not None:
            ping.close()
        _stop_servers(servers)

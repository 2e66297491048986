"""README's first command: ``oes-partner standalone`` on a machine with no servers configured.

Real processes throughout. What one instance starts is read from ``/proc`` while it runs
(its descendants, the postmaster of its data directory, its Redis server), so a test can
say afterwards that none of it survived.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from cli.main import main
from cli.standalone import DataDirectoryInUse, _lock, _unlock
from cli.supervisor import Child
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE
from tests.conftest import BitGo, free_port, scratch_dir
from tests.workers.conftest import eventually

UNSET = ("DATABASE_URL", "REDIS_URL", "BITGO_PUBLIC_KEYS", "OES_INTERNAL_TOKEN")
READY = "Ctrl-C stops everything"  # the banner's last line, printed once everything listens


# --- processes, as /proc shows them --------------------------------------------------------


def alive(pid: int) -> bool:
    """A live process (a zombie waiting to be reaped is gone already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def postmaster_pid(data: Path) -> int:
    return int((data / "postgres" / "postmaster.pid").read_text().split()[0])


def redis_pid(data: Path) -> int:
    registry = json.loads((data / "redis" / "redis.rdb.settings").read_text())
    return int(Path(registry["pidfile"]).read_text())


def _end_strays(pids: set[int]) -> None:
    """After a failed test: stop what it left (the postmaster gently, so its data survives)."""
    for pid in pids:
        if alive(pid):
            is_postmaster = "postgres -D" in command_line(pid)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT if is_postmaster else signal.SIGKILL)


# --- one instance -------------------------------------------------------------------------


@dataclass(frozen=True)
class Standalone:
    url: str
    sandbox_port: int
    data: Path
    process: subprocess.Popen[bytes]
    log: Path
    offset: int  # where this run's output starts in the log

    def output(self) -> str:
        return self.log.read_bytes()[self.offset :].decode(errors="replace")

    def wait_for(self, text: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"standalone never said {text!r}:\n{self.output()[-5000:]}")
            time.sleep(0.1)

    def everything(self) -> set[int]:
        """Every process it runs: its descendants, PostgreSQL's postmaster, the Redis server."""
        return descendants(self.process.pid) | {postmaster_pid(self.data), redis_pid(self.data)}

    def child(self, word: str) -> int:
        """Its child process whose command line has ``word``."""
        found = [
            pid
            for pid, parent in _parents().items()
            if parent == self.process.pid and word in command_line(pid)
        ]
        assert len(found) == 1, (word, found)
        return found[0]

    @contextmanager
    def bitgo(self) -> Iterator[BitGo]:
        """BitGo signing with the dev key, the exchange using the generated token."""
        with httpx.Client(base_url=self.url, timeout=10) as http:
            bitgo = BitGo(http, (self.data / "bitgo-dev-private.pem").read_bytes())
            internal = (self.data / "internal-token").read_text().strip()
            bitgo.internal = lambda: {"Authorization": f"Bearer {internal}"}  # type: ignore[method-assign]
            yield bitgo

    def settings(self) -> dict[str, str]:
        """The ``env`` file it wrote; it is for a shell, so read it the way a shell would."""
        return dict(
            line.split("=", 1)
            for line in shlex.split((self.data / "env").read_text(), comments=True)
        )

    def sandbox_balances(self) -> dict[str, object]:
        answer = httpx.get(
            f"http://127.0.0.1:{self.sandbox_port}/api/network/v1/enterprises/"
            f"{SANDBOX_ENTERPRISE}/partners/balances",
            headers={"Authorization": f"Bearer {SANDBOX_ACCESS_TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        balances: dict[str, object] = answer.json()["networkBalances"]
        return balances

    def stop(self, sig: int = signal.SIGINT, *, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _command(data: Path, port: int, sandbox_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.main",
        "standalone",
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--sandbox-port",
        str(sandbox_port),
    ]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in UNSET}


def start_standalone(data: Path, log: Path) -> Standalone:
    """``oes-partner standalone`` as a job of its own (a process group, as a shell makes)."""
    port, sandbox_port = free_port(), free_port()
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        process = subprocess.Popen(
            _command(data, port, sandbox_port),
            env=_environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    instance = Standalone(f"http://127.0.0.1:{port}", sandbox_port, data, process, log, offset)
    instance.wait_for(READY, timeout=90)
    return instance


@contextmanager
def running_standalone() -> Iterator[Standalone]:
    """``oes-partner standalone`` in its own process, data directory and ports."""
    with scratch_dir("oes-standalone-") as root:
        instance = start_standalone(root / "data", root / "standalone.log")
        started = instance.everything()
        try:
            yield instance
        finally:
            instance.stop()
            _end_strays(started)


@pytest.fixture(scope="module")
def standalone() -> Iterator[Standalone]:
    """One instance shared by the tests that leave it running."""
    with running_standalone() as instance:
        yield instance


def test_standalone_creates_a_dev_key_and_token(standalone: Standalone) -> None:
    data = standalone.data
    assert (data / "bitgo-dev-private.pem").exists()
    assert (data / "bitgo-dev-public.pem").exists()
    assert len((data / "internal-token").read_text().strip()) >= 16
    # Secrets are ours alone, and were from their first byte (no copies left beside them).
    for secret in ("internal-token", "env", "bitgo-dev-private.pem"):
        assert (data / secret).stat().st_mode & 0o777 == 0o600, secret
    assert not list(data.glob(".internal-token.*")) + list(data.glob(".env.*"))


def test_standalone_takes_an_allocation_end_to_end(
    standalone: Standalone, capsys: pytest.CaptureFixture[str]
) -> None:
    with standalone.bitgo() as bitgo:
        link = bitgo.link()
        transfer_id = str(uuid.uuid4())
        assert bitgo.reserve("allocation", link, transfer_id, "250").json()["status"] == "reserved"
        assert bitgo.put("allocation", transfer_id, "clear").json()["status"] == "cleared"
        assert bitgo.balances(link) == (250, 0, 0)

        # README: `oes-partner dev-jwt --key .oes-data/bitgo-dev-private.pem` signs what the
        # standalone gateway trusts, and each of its tokens is good for exactly one request.
        key = str(standalone.data / "bitgo-dev-private.pem")
        assert main(["dev-jwt", "--key", key]) == 0
        token = capsys.readouterr().out.strip()
        status = f"/bitgo/v1/allocation/{transfer_id}"
        answer = bitgo.http.get(status, headers={"X-BitGo-Signature": token})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cleared"
        assert bitgo.http.get(status, headers={"X-BitGo-Signature": token}).status_code == 401


def _wait_delivered_locally(standalone: Standalone, timeout: float = 30) -> None:
    """A new link's ``connection.linked`` event, marked delivered by the worker."""
    settings = standalone.settings()
    assert settings["DATABASE_URL"].startswith("postgresql://")
    with standalone.bitgo() as bitgo:
        link = bitgo.link()  # writes a connection.linked event

    def statuses() -> list[tuple[str, str]]:
        with psycopg.connect(settings["DATABASE_URL"]) as connection:
            rows = connection.execute(
                "SELECT topic, status FROM outbox WHERE payload->>'partnersConnectionId' = %s",
                (link.partners_connection_id,),
            ).fetchall()
        return [(str(topic), str(status)) for topic, status in rows]

    assert [topic for topic, _ in statuses()] == ["connection.linked"]
    deadline = time.monotonic() + timeout
    while statuses() != [("connection.linked", "delivered_locally")]:
        assert time.monotonic() < deadline, f"the standalone worker left {statuses()}"
        time.sleep(0.2)


def test_standalone_runs_a_worker_that_records_events(standalone: Standalone) -> None:
    """With no webhook configured the worker marks every event delivered locally."""
    _wait_delivered_locally(standalone)


def _sandbox_cli(standalone: Standalone, *command: str) -> str:
    common = [
        "--port",
        str(standalone.sandbox_port),
        "--gateway",
        standalone.url,
        "--data-dir",
        str(standalone.data),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "sandbox", *common, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_three_commands_take_a_first_allocation_through_the_sandbox(
    standalone: Standalone,
) -> None:
    """README: standalone, then ``sandbox connect`` and ``sandbox allocate``."""
    assert "HTTP 200" in _sandbox_cli(standalone, "connect", "--partners-client-id", "alice")
    out = _sandbox_cli(standalone, "allocate", "--connection", "alice", "--quantity", "100000")
    assert "HTTP 200" in out
    assert '"status": "cleared"' in out
    assert '"btc"' in _sandbox_cli(standalone, "balances")


def test_a_second_standalone_on_the_same_data_directory_refuses_at_once(
    standalone: Standalone,
) -> None:
    """One line and a non-zero exit, before it touches anything of the first."""
    began = time.monotonic()
    second = subprocess.run(
        _command(standalone.data, free_port(), free_port()),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    took = time.monotonic() - began
    assert second.returncode != 0
    assert (second.stdout + second.stderr).splitlines() == [
        f"oes-partner standalone: data directory {standalone.data.resolve()} "
        f"is in use by PID {standalone.process.pid}"
    ]
    assert took < 5, f"took {took:.1f} s to refuse"
    # The first goes on as before: the API is ready, its Redis and its worker work.
    assert httpx.get(f"{standalone.url}/readyz", timeout=5).status_code == 200
    with redis.Redis.from_url(standalone.settings()["REDIS_URL"]) as broker:
        assert broker.ping()
        key = f"oes-test-{uuid.uuid4().hex}"
        broker.set(key, "still here", ex=60)
        assert broker.get(key) == b"still here"
    _wait_delivered_locally(standalone)


def test_a_worker_or_sandbox_that_dies_is_started_again(standalone: Standalone) -> None:
    """Both are killed outright; each comes back, the log says so, and they work."""
    _sandbox_cli(standalone, "connect", "--partners-client-id", "carol")
    balances = standalone.sandbox_balances()
    worker, sandbox = standalone.child("celery"), standalone.child("sandbox")
    os.kill(worker, signal.SIGKILL)
    os.kill(sandbox, signal.SIGKILL)
    for name, pid in (("the Celery worker", worker), ("the BitGo sandbox", sandbox)):
        standalone.wait_for(f"{name} (pid {pid}) was killed by SIGKILL; restarting it", timeout=5)
        standalone.wait_for(f"restarted {name} (pid ", timeout=10)
    assert standalone.child("celery") != worker
    assert standalone.child("sandbox") != sandbox
    assert not alive(worker)
    assert not alive(sandbox)
    _wait_delivered_locally(standalone)  # the new worker takes the new event
    # The new sandbox listens, and remembers the connections made before (its state file).
    eventually(lambda: _answers(standalone), timeout=20, what="the restarted sandbox")
    assert standalone.sandbox_balances() == balances


def _answers(standalone: Standalone) -> bool:
    try:
        standalone.sandbox_balances()
    except (httpx.HTTPError, AssertionError):
        return False
    return True


@pytest.mark.parametrize(
    "how",
    ["SIGINT to its process group (Ctrl-C)", "SIGTERM (kill PID)", "SIGHUP (terminal closed)"],
)
def test_every_way_of_stopping_it_stops_everything_it_started(how: str) -> None:
    """Its own instance, so stopping it leaves the shared one to the other tests."""
    with running_standalone() as instance:
        output = instance.output()
        assert "API listening on" in output
        assert "development BitGo key pair" in output
        started = instance.everything()
        commands = [command_line(pid) for pid in started]
        for word in ("celery", "sandbox", "postgres -D", "redis-server"):
            assert any(word in command for command in commands), (word, commands)
        began = time.monotonic()
        if how.startswith("SIGINT"):
            os.killpg(instance.process.pid, signal.SIGINT)  # what Ctrl-C sends
        elif how.startswith("SIGTERM"):
            instance.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(instance.process.pid, signal.SIGHUP)  # what a closing terminal sends
        instance.process.wait(timeout=10)
        eventually(
            lambda: not {pid for pid in started if alive(pid)},
            timeout=max(0.1, 10 - (time.monotonic() - began)),
            what="everything to stop",
        )
        took = time.monotonic() - began
        survivors = [command_line(pid) for pid in started if alive(pid)]
        assert not survivors, survivors
        assert took < 10, f"{how}: {took:.1f} s"
        assert instance.process.returncode == 0, instance.output()
        assert not (instance.data / "postgres" / "postmaster.pid").exists()


def test_after_a_crash_a_restart_takes_over_and_stops_everything_later() -> None:
    """SIGKILL of standalone alone, as a crash or the OOM killer would do it."""
    with scratch_dir("oes-standalone-") as root:
        data, log = root / "data", root / "standalone.log"
        first = start_standalone(data, log)
        started = first.everything()
        second: Standalone | None = None
        try:
            _sandbox_cli(first, "connect", "--partners-client-id", "bob")
            _sandbox_cli(first, "allocate", "--connection", "bob", "--quantity", "700")
            balances = first.sandbox_balances()
            children = descendants(first.process.pid)
            postmaster, redis_server = postmaster_pid(data), redis_pid(data)

            first.process.kill()
            first.process.wait()
            # Its children follow it; PostgreSQL and Redis, daemons of their own, stay.
            eventually(
                lambda: not {pid for pid in children if alive(pid)},
                timeout=10,
                what="the orphans to go",
            )
            assert alive(postmaster)
            assert alive(redis_server)

            second = start_standalone(data, log)
            started |= second.everything()
            assert postmaster_pid(data) == postmaster  # taken over, not started afresh
            assert redis_pid(data) == redis_server
            assert httpx.get(f"{second.url}/readyz", timeout=5).status_code == 200
            # The sandbox still knows bob's connection and what was allocated on it.
            assert second.sandbox_balances() == balances
            assert "HTTP 200" in _sandbox_cli(
                second, "allocate", "--connection", "bob", "--quantity", "5"
            )

            second.process.send_signal(signal.SIGINT)
            second.process.wait(timeout=10)
            eventually(
                lambda: not {pid for pid in started if alive(pid)},
                timeout=10,
                what="everything to stop",
            )
            assert not alive(postmaster)
            assert not alive(redis_server)
            assert not (data / "postgres" / "postmaster.pid").exists()
            assert json.loads((data / "postgres" / ".handle_pids.json").read_text()) == []
        finally:
            for instance in (first, second):
                if instance is not None:
                    instance.stop()
            _end_strays(started)


def test_a_child_that_keeps_dying_waits_longer_each_time() -> None:
    """The back-off doubles while deaths come soon after starts, up to a ceiling, and
    starts afresh after a long run."""
    child = Child("the Celery worker", ["celery"], lambda: True, grace=1)
    delays = []
    for _ in range(8):
        child.started = time.monotonic()  # it had just started
        delays.append(child.died())
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    child.started = time.monotonic() - 60  # it ran for a minute
    assert child.died() == 1


def test_the_data_directory_is_held_by_one_process(tmp_path: Path) -> None:
    held = _lock(tmp_path)
    try:
        with pytest.raises(DataDirectoryInUse) as refused:
            _lock(tmp_path)  # flock: a second open file is refused, even in this process
        assert str(refused.value) == f"data directory {tmp_path} is in use by PID {os.getpid()}"
    finally:
        _unlock(held)
    _unlock(_lock(tmp_path))  # free again


def test_a_child_that_never_becomes_ready_stops_the_start_in_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.supervisor import Signals, start_up, stop_children

    stuck = Child("the stuck one", ["http.server", "--bind", "127.0.0.1", "0"], lambda: False, 1)
    signals = Signals()
    started = time.monotonic()
    try:
        assert start_up([stuck], dict(os.environ), signals, within=1.0) == 1
    finally:
        stop_children([stuck], signals)
    assert time.monotonic() - started < 5
    assert "the stuck one not ready after 1 s; stopping everything" in capsys.readouterr().err
    assert not stuck.running()

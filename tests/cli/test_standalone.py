"""README's first command: ``oes-partner standalone`` on a machine with no servers configured."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from cli.main import main
from tests.conftest import BitGo, free_port, scratch_dir, wait_ready

UNSET = ("DATABASE_URL", "REDIS_URL", "BITGO_PUBLIC_KEYS", "OES_INTERNAL_TOKEN")


@dataclass(frozen=True)
class Standalone:
    url: str
    sandbox_port: int
    data: Path
    process: subprocess.Popen[str]

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


@contextmanager
def running_standalone() -> Iterator[Standalone]:
    """``oes-partner standalone`` in its own process, data directory and ports."""
    with scratch_dir("oes-standalone-") as data:
        port, sandbox_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        process = subprocess.Popen(
            [
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
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, timeout=90, output=lambda: process.communicate()[0])
            yield Standalone(url, sandbox_port, data, process)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # lets it stop its embedded servers
                try:
                    process.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()


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


def test_standalone_runs_a_worker_that_records_events(standalone: Standalone) -> None:
    """With no webhook configured the worker marks every event delivered locally."""
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
    deadline = time.monotonic() + 30
    while statuses() != [("connection.linked", "delivered_locally")]:
        assert time.monotonic() < deadline, f"the standalone worker left {statuses()}"
        time.sleep(0.2)


def test_three_commands_take_a_first_allocation_through_the_sandbox(
    standalone: Standalone,
) -> None:
    """README: standalone, then ``sandbox connect`` and ``sandbox allocate``."""
    common = [
        "--port",
        str(standalone.sandbox_port),
        "--gateway",
        standalone.url,
        "--data-dir",
        str(standalone.data),
    ]

    def cli(*command: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "sandbox", *common, *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "HTTP 200" in cli("connect", "--partners-client-id", "alice")
    out = cli("allocate", "--connection", "alice", "--quantity", "100000")
    assert "HTTP 200" in out
    assert '"status": "cleared"' in out
    assert '"btc"' in cli("balances")


def test_standalone_stops_cleanly_on_interrupt() -> None:
    """Its own instance, so stopping it leaves the shared one to the other tests."""
    with running_standalone() as instance:
        instance.process.send_signal(signal.SIGINT)
        output, _ = instance.process.communicate(timeout=30)
        assert instance.process.returncode == 0, output
        assert "API listening on" in output
        assert "development BitGo key pair" in output
        assert not (instance.data / "postgres" / "postmaster.pid").exists()

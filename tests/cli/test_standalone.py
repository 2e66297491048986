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
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import BitGo, free_port, scratch_dir, wait_ready

UNSET = ("DATABASE_URL", "REDIS_URL", "BITGO_PUBLIC_KEYS", "OES_INTERNAL_TOKEN")
Standalone = tuple[str, Path, subprocess.Popen[str]]
SANDBOX_PORT: list[int] = []


@pytest.fixture(scope="module")
def standalone() -> Iterator[Standalone]:
    with scratch_dir("oes-standalone-") as data:
        port = free_port()
        SANDBOX_PORT.append(free_port())
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
                str(SANDBOX_PORT[-1]),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, timeout=90, output=lambda: process.communicate()[0])
        yield url, data, process
        if process.poll() is None:
            process.kill()
            process.wait()


def test_standalone_creates_a_dev_key_and_token(
    standalone: Standalone,
) -> None:
    _, data, _ = standalone
    assert (data / "bitgo-dev-private.pem").exists()
    assert (data / "bitgo-dev-public.pem").exists()
    assert len((data / "internal-token").read_text().strip()) >= 16


def test_standalone_takes_an_allocation_end_to_end(
    standalone: Standalone,
) -> None:
    url, data, _ = standalone
    import cli.devkeys  # noqa: F401 - the module the README's dev-jwt uses

    bitgo = BitGo(
        httpx.Client(base_url=url, timeout=10), (data / "bitgo-dev-private.pem").read_bytes()
    )
    internal = (data / "internal-token").read_text().strip()
    bitgo.internal = lambda: {"Authorization": f"Bearer {internal}"}  # type: ignore[method-assign]
    link = bitgo.link()
    transfer_id = str(uuid.uuid4())
    assert bitgo.reserve("allocation", link, transfer_id, "250").json()["status"] == "reserved"
    assert bitgo.put("allocation", transfer_id, "clear").json()["status"] == "cleared"
    assert bitgo.balances(link) == (250, 0, 0)


def test_standalone_runs_a_worker_that_records_events(standalone: Standalone) -> None:
    """With no webhook configured the worker marks every event delivered locally."""
    _, data, _ = standalone
    # The file is for a shell (values are shell-quoted); read it the way a shell would.
    settings = dict(
        line.split("=", 1) for line in shlex.split((data / "env").read_text(), comments=True)
    )
    assert settings["DATABASE_URL"].startswith("postgresql://")

    def undelivered() -> int:
        with psycopg.connect(settings["DATABASE_URL"]) as connection:
            row = connection.execute(
                "SELECT count(*) FILTER (WHERE status = 'pending'),"
                " count(*) FILTER (WHERE status = 'delivered_locally') FROM outbox"
            ).fetchone()
        assert row is not None
        pending, recorded = row
        return -1 if recorded == 0 else int(pending)

    deadline = time.monotonic() + 30
    while undelivered() != 0:
        assert time.monotonic() < deadline, "the standalone worker left events pending"
        time.sleep(0.2)


def test_three_commands_take_a_first_allocation_through_the_sandbox(
    standalone: Standalone,
) -> None:
    """README: standalone, then ``sandbox connect`` and ``sandbox allocate``."""
    url, data, _ = standalone
    common = ["--port", str(SANDBOX_PORT[-1]), "--gateway", url, "--data-dir", str(data)]

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


def test_standalone_stops_cleanly_on_interrupt(
    standalone: Standalone,
) -> None:
    _, data, process = standalone
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "API listening on" in output
    assert "development BitGo key pair" in output
    assert not (data / "postgres" / "postmaster.pid").exists()

"""The whole system on one machine: the sandbox playing BitGo, the gateway (``oes-partner
serve``) and a Celery worker, each its own process, wired as standalone wires them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from cli.devkeys import ensure_key_pair
from models.db import session_factory, sync_engine
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE, SANDBOX_WALLET
from sandbox.store import hmac_hex
from tests.conftest import INTERNAL_TOKEN, free_port, fresh_database, wait_ready
from tests.workers.conftest import Worker, eventually, spare_redis_db

PARTNER = f"/api/network/v1/enterprises/{SANDBOX_ENTERPRISE}/partners"


@dataclass
class Client:
    """A BitGo client of the sandbox: its enterprise, the key it signs with, its calls."""

    http: httpx.Client
    gateway: httpx.Client
    enterprise: str
    key: str

    def connect(self, partners_client_id: str) -> dict[str, Any]:
        token = self.gateway.post(
            "/internal/v1/connection-tokens",
            json={"partnersClientId": partners_client_id},
            headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
        ).json()["connectionToken"]
        answer = self.http.post(
            f"/api/network/v1/enterprises/{self.enterprise}/clients/connections",
            json={"connectionToken": token},
        )
        assert answer.status_code == 200, answer.text
        connection: dict[str, Any] = answer.json()["connection"]
        return connection

    def transfer(
        self,
        kind: str,
        connection_id: str,
        quantity: int,
        *,
        currency: str = "btc",
        external_id: str | None = None,
        nonce: str | None = None,
        fault: str | None = None,
    ) -> httpx.Response:
        base = (
            f"/api/network/v1/enterprises/{self.enterprise}/clients/connections/"
            f"{connection_id}/{kind}s"
        )
        fields = {
            "amount": {"currency": currency, "quantity": str(quantity)},
            "clientExternalId": external_id or str(uuid.uuid4()),
            "nonce": nonce or uuid.uuid4().hex,
        }
        payload = self.http.post(f"{base}/signing", json=fields).json()["payload"]
        body = {**fields, "payload": payload, "signature": hmac_hex(self.key, payload)}
        headers = {"X-Sandbox-Fault": fault} if fault else {}
        return self.http.post(base, json=body, headers=headers)


@dataclass
class System:
    sandbox_url: str
    gateway_url: str
    env: dict[str, str]
    data: Path
    worker: Worker
    sessions: sessionmaker[Session]
    sandbox: httpx.Client
    gateway: httpx.Client

    def client(self) -> Client:
        registered = self.sandbox.post("/sandbox/clients", json={}).json()
        return Client(
            self.sandbox, self.gateway, registered["enterpriseId"], registered["clientKey"]
        )

    def partner(self, path: str) -> Any:
        answer = self.sandbox.get(
            f"{PARTNER}{path}", headers={"Authorization": f"Bearer {SANDBOX_ACCESS_TOKEN}"}
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def call(self, task: str, *args: Any) -> None:
        command = [sys.executable, "-m", "celery", "-A", "workers", "call", task]
        if args:
            command += ["--args", json.dumps(list(args))]
        subprocess.run(command, env={**os.environ, **self.env}, check=True, capture_output=True)

    def run(self, task: str, *args: Any) -> dict[str, Any]:
        """Run a task through the worker and wait for its summary."""
        before = len(self.runs(task))
        self.call(task, *args)
        return eventually(lambda: self.runs(task)[before:], timeout=30, what=task)[0]

    def runs(self, task: str) -> list[dict[str, Any]]:
        with self.sessions() as session:
            rows = session.execute(
                text("SELECT summary FROM task_runs WHERE task = :t ORDER BY id"), {"t": task}
            )
            return [r.summary for r in rows]

    def gateway_status(self, transfer_id: str) -> str | None:
        with self.sessions() as session:
            status = session.execute(
                text("SELECT status FROM transfers WHERE id = :id"), {"id": transfer_id}
            ).scalar_one_or_none()
        return None if status is None else str(status)

    def age(self, transfer_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                text("UPDATE transfers SET updated_at = now() - interval '1 hour' WHERE id = :id"),
                {"id": transfer_id},
            )

    def assert_agree(self) -> None:
        """Every id has the same outcome on both sides, and every balance matches."""
        for record in self.partner("/allocations?pageSize=10000")["allocations"]:
            ours = self.gateway_status(record["id"])
            theirs = record["status"]
            if theirs == "released":
                assert ours in (None, "released", "rejected"), (record, ours)
            else:
                assert ours == theirs, (record, ours)
        summary = self.run("workers.remediation.reconcile_balances")
        assert summary["drifts"] == 0, self.worker.log.read_text()[-3000:]


def _process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", *command],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="session")
def system(
    server_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    data = tmp_path_factory.mktemp("e2e")
    _, public = ensure_key_pair(data)
    sandbox_port, gateway_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    with fresh_database(server_database_url) as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": spare_redis_db(redis_url),
            "BITGO_PUBLIC_KEYS": str(public),
            "OES_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "OES_CURRENCIES": "btc,eth,usdc",
            "BITGO_API_URL": sandbox_url,
            "BITGO_EXPRESS_URL": sandbox_url,
            "BITGO_ACCESS_TOKEN": SANDBOX_ACCESS_TOKEN,
            "BITGO_ENTERPRISE_ID": SANDBOX_ENTERPRISE,
            "BITGO_WALLET_ID": SANDBOX_WALLET,
            "OES_SETTLEMENT_RETRY": "0.3",
        }
        gateway = _process(
            ["serve", "--host", "127.0.0.1", "--port", str(gateway_port)], env, data / "gw.log"
        )
        sandbox = _process(
            [
                "sandbox",
                "--port",
                str(sandbox_port),
                "--gateway",
                gateway_url,
                "--data-dir",
                str(data),
            ],
            env,
            data / "sandbox.log",
        )
        engine = sync_engine(database_url)
        worker = Worker(env, data / "worker.log")
        try:
            wait_ready(gateway_url, gateway, timeout=30, output=(data / "gw.log").read_text)
            eventually(
                lambda: _answers(f"{sandbox_url}/sandbox/faults"), timeout=30, what="the sandbox"
            )
            worker.start()
            with (
                httpx.Client(base_url=sandbox_url, timeout=60) as sandbox_http,
                httpx.Client(base_url=gateway_url, timeout=30) as gateway_http,
            ):
                yield System(
                    sandbox_url,
                    gateway_url,
                    env,
                    data,
                    worker,
                    session_factory(engine),
                    sandbox_http,
                    gateway_http,
                )
        finally:
            worker.stop()
            for process in (sandbox, gateway):
                process.terminate()
                process.wait(timeout=10)
            engine.dispose()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real
``oes-partner serve`` and a real Celery worker: log in, find a stale reservation, re-drive a
dead letter until it is delivered, resolve a conflict, read the reconcile's drifts.

Every page is saved as a screenshot in the test's temporary directory; any answer of 500 or
more, to a navigation or to anything the page loads, fails the test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright
from playwright.sync_api import Response as PageResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_factory, sync_engine
from tests.api.test_dashboard import (
    TOKEN,
    apply_trade,
    bitgo_api,
    plant_conflict,
    plant_dead_letter,
    scalar,
)
from tests.conftest import (
    INTERNAL_TOKEN,
    BitGo,
    Keys,
    Link,
    free_port,
    fresh_database,
    wait_ready,
)
from tests.stubs import Seen, serving
from tests.workers.conftest import Worker, eventually, spare_redis_db
from workers.publish import QUEUES, publisher

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RECONCILE = "workers.remediation.reconcile_balances"
SERVE = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no Chromium at /usr/bin/chromium")


def bitgo_answers(seen: Seen) -> tuple[int, Any]:
    """BitGo: every allocation still reserved, and no balance at all (so reconcile drifts)."""
    if seen.path.endswith("/partners/balances"):
        return 200, {"networkBalances": {}}
    return bitgo_api(seen)


@dataclass(frozen=True)
class Stack:
    url: str
    sessions: sessionmaker[Session]
    gateway: BitGo
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(
    server_database_url: str, redis_url: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """``oes-partner serve`` with the dashboard on, and a worker on a broker of their own."""
    logs = tmp_path_factory.mktemp("dashboard-live")
    port = free_port()
    with fresh_database(server_database_url) as database_url, serving(bitgo_answers) as bitgo_stub:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": spare_redis_db(redis_url),
            "BITGO_PUBLIC_KEYS": str(keys.public),
            "OES_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "OES_CURRENCIES": "btc,eth,usdc",
            "OES_DASHBOARD_TOKEN": TOKEN,
            "OES_STALE_AFTER": "30",
            "OES_CURRENCY_DECIMALS": "btc:8,usdc:6",
            "BITGO_API_URL": bitgo_stub.url,
            "BITGO_ACCESS_TOKEN": "dashboard-test-access-token",
            "BITGO_ENTERPRISE_ID": "enterprise-1",
        }
        tasks = publisher(env["REDIS_URL"])
        with tasks.connection_for_write() as connection:
            for queue in QUEUES:
                connection.default_channel.queue_purge(queue)
        with (logs / "serve.log").open("wb") as out:
            server = subprocess.Popen(
                [*SERVE, "--port", str(port)],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        worker = Worker(env, logs / "worker.log")
        engine = sync_engine(database_url)
        try:
            wait_ready(url, server, timeout=30, output=(logs / "serve.log").read_text)
            worker.start()
            with httpx.Client(base_url=url, timeout=30) as http:
                yield Stack(url, session_factory(engine), BitGo(http, keys.private), env)
        finally:
            worker.stop()
            server.terminate()
            server.wait(timeout=10)
            tasks.close()
            engine.dispose()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    yield launched
    launched.close()


@dataclass
class Operator:
    """A browser tab on the dashboard that refuses to see a server error."""

    page: Page
    url: str
    shots: Path
    failures: list[str] = field(default_factory=list)

    def watch(self, response: PageResponse) -> None:
        if response.status >= 500:
            self.failures.append(f"{response.status} {response.request.method} {response.url}")

    def visit(self, path: str) -> None:
        response = self.page.goto(self.url + path)
        assert response is not None
        assert response.ok, f"{response.status} at {response.url}"

    def submit(self, button: str) -> None:
        """Click a form's button and check the answer the browser ends up showing."""
        with self.page.expect_navigation() as navigation:
            self.page.get_by_role("button", name=button).click()
        response = navigation.value
        assert response is not None
        assert response.ok, f"{response.status} at {response.url}"

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path

    def log_in(self) -> None:
        self.visit("/dashboard")
        assert self.page.url == f"{self.url}/dashboard/login"
        self.page.get_by_label("Dashboard token").fill(TOKEN)
        self.submit("Log in")
        assert self.page.url == f"{self.url}/dashboard"


@pytest.fixture
def operator(stack: Stack, browser: Browser, tmp_path: Path) -> Iterator[Operator]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    tab = Operator(page, stack.url, tmp_path)
    page.on("response", tab.watch)
    try:
        yield tab
    finally:
        context.close()
    assert tab.failures == [], tab.failures


def funded_link(stack: Stack, quantity: int) -> Link:
    link = stack.gateway.link()
    stack.gateway.fund(link, quantity)
    return link


def test_login_keeps_a_secure_strict_cookie_and_logout_ends_it(
    operator: Operator, stack: Stack
) -> None:
    link = funded_link(stack, 150_000_000)
    operator.visit("/dashboard/login")
    operator.page.get_by_label("Dashboard token").fill("not-the-dashboard-token")
    with operator.page.expect_navigation() as refused:
        operator.page.get_by_role("button", name="Log in").click()
    assert refused.value is not None
    assert refused.value.status == 401
    assert operator.page.get_by_role("alert").inner_text() == "That token is not right."
    operator.shot("login-refused")

    operator.log_in()
    (cookie,) = operator.page.context.cookies()
    assert cookie["name"] == "oes_dashboard"
    assert cookie["secure"]
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    overview = operator.page.locator("table.overview")
    assert link.partners_client_id in overview.inner_text()
    assert "1.5 BTC" in overview.inner_text()
    operator.shot("overview")

    operator.submit("Log out")
    assert operator.page.url == f"{stack.url}/dashboard/login"
    operator.visit("/dashboard/tasks")
    assert operator.page.url == f"{stack.url}/dashboard/login"


def test_a_stale_reservation_is_highlighted_and_looked_up_at_bitgo(
    operator: Operator, stack: Stack
) -> None:
    link = stack.gateway.link()
    stale_id, fresh_id = str(uuid.uuid4()), str(uuid.uuid4())
    for transfer_id in (stale_id, fresh_id):
        answer = stack.gateway.reserve("allocation", link, transfer_id, "100000")
        assert answer.json()["status"] == "reserved"
    with stack.sessions() as session, session.begin():
        session.execute(
            text("UPDATE transfers SET updated_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": stale_id},
        )
    operator.log_in()
    operator.visit("/dashboard/reservations")
    stale = operator.page.locator(f'tr[data-transfer-id="{stale_id}"]')
    fresh = operator.page.locator(f'tr[data-transfer-id="{fresh_id}"]')
    assert stale.get_attribute("class") == "stale"
    assert fresh.get_attribute("class") == "fresh"
    shade = "getComputedStyle(e.querySelector('td')).backgroundColor"
    assert stale.evaluate(f"e => {shade}") != fresh.evaluate(f"e => {shade}")
    assert "0.001 BTC" in stale.inner_text()
    operator.shot("reservations")

    with operator.page.expect_navigation() as lookup:
        stale.get_by_role("link", name="what BitGo says").click()
    assert lookup.value is not None
    assert lookup.value.ok
    assert operator.page.locator("dd.bitgo-status").inner_text() == "reserved"
    operator.shot("reservation-at-bitgo")


def test_a_dead_letter_is_redriven_and_delivered(operator: Operator, stack: Stack) -> None:
    event_id = plant_dead_letter(stack.sessions, error="HTTP 400 from platform: bad payload")
    operator.log_in()
    operator.visit("/dashboard/outbox")
    row = operator.page.locator(f'table.dead-letters tr[data-event-id="{event_id}"]')
    assert "HTTP 400 from platform: bad payload" in row.inner_text()
    operator.shot("outbox-dead-letter")

    with operator.page.expect_navigation():
        row.get_by_role("link", name="Re-drive…").click()
    assert event_id in operator.page.locator("table.dead-letters").inner_text()
    operator.shot("outbox-redrive-confirm")
    operator.submit("Re-drive 1 dead letter(s)")
    assert operator.page.url == f"{stack.url}/dashboard/outbox?redriven=1"
    assert "Re-driven 1 dead letter(s)" in operator.page.get_by_role("status").inner_text()

    # The real worker takes the queued delivery; with no webhook it records it.
    eventually(
        lambda: (
            scalar(stack.sessions, "SELECT status FROM outbox WHERE id = :id", id=event_id)
            == "delivered_locally"
        ),
        what="the re-driven event to be delivered",
    )
    operator.visit("/dashboard/outbox")
    assert row.count() == 0
    status = operator.page.locator(f'table.recent tr[data-event-id="{event_id}"] .event-status')
    assert status.inner_text() == "delivered_locally"
    operator.shot("outbox-delivered")


def test_a_conflicted_settlement_is_resolved(operator: Operator, stack: Stack) -> None:
    link = stack.gateway.link()
    trades = [apply_trade(stack.gateway, link, {"btc": "2500"}) for _ in range(2)]
    settlement_id, external_id = plant_conflict(stack.sessions, link, trades, {"btc": "5000"})
    operator.log_in()
    operator.visit("/dashboard/settlements")
    row = operator.page.locator(f'tr[data-settlement-id="{settlement_id}"]')
    assert "flagged" in (row.get_attribute("class") or "")
    assert all(trade in row.inner_text() for trade in trades)
    operator.shot("settlements-conflict")

    with operator.page.expect_navigation():
        row.get_by_role("link", name="Resolve…").click()
    operator.page.get_by_label("BitGo settled it").check()
    operator.page.get_by_label("What BitGo said").fill("BitGo confirms it settled (ticket 4711)")
    operator.shot("settlement-resolve-confirm")
    operator.submit("Resolve this settlement")
    assert operator.page.url == f"{stack.url}/dashboard/settlements?resolved={settlement_id}"
    assert external_id in operator.page.get_by_role("status").inner_text()
    assert row.locator(".settlement-status").inner_text() == "completed"
    operator.shot("settlements-resolved")

    assert scalar(
        stack.sessions, "SELECT status FROM settlements WHERE id = :id", id=settlement_id
    ) == ("completed")
    assert (
        scalar(
            stack.sessions,
            "SELECT count(*) FROM trades WHERE settlement_id = :id AND settled_at IS NOT NULL",
            id=settlement_id,
        )
        == 2
    )


def test_the_reconcile_s_drifts_and_the_task_runs_are_shown(
    operator: Operator, stack: Stack
) -> None:
    link = funded_link(stack, 42_000_000)
    before = scalar(
        stack.sessions, "SELECT count(*) FROM task_runs WHERE task = :task", task=RECONCILE
    )
    tasks = publisher(stack.env["REDIS_URL"])
    try:
        tasks.send_task(RECONCILE)
    finally:
        tasks.close()
    eventually(
        lambda: (
            scalar(
                stack.sessions, "SELECT count(*) FROM task_runs WHERE task = :task", task=RECONCILE
            )
            > before
        ),
        timeout=60,
        what="the reconcile to run",
    )
    operator.log_in()
    operator.visit("/dashboard/reconciliation")
    drifts = operator.page.locator("table.drifts")
    line = drifts.locator("tr.drift", has_text=link.connection_id)
    assert "0.42 BTC" in line.inner_text()
    operator.shot("reconciliation")

    operator.visit("/dashboard/tasks")
    run = operator.page.locator(f'tr[data-task="{RECONCILE}"]')
    assert run.locator(".outcome").inner_text() == "ok"
    assert "drifts=" in run.inner_text()
    operator.shot("tasks")

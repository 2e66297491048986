"""The operator dashboard over plain HTTP: off without its token, a login of its own, CSRF on
every form, and the two actions doing what the command line does."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.dashboard_format import whole_units
from api.settings import Settings
from config.settings import SettingsError
from tests.conftest import BitGo, Keys, Link
from tests.stubs import Seen, serving
from workers.publish import QUEUES

TOKEN = "dashboard-token-0123456789abcdef"
RECONCILE = "workers.remediation.reconcile_balances"
PAGES = [
    "/dashboard",
    "/dashboard/reservations",
    f"/dashboard/reservations/{uuid.uuid4()}/bitgo",
    "/dashboard/outbox",
    "/dashboard/outbox/redrive",
    "/dashboard/settlements",
    f"/dashboard/settlements/{uuid.uuid4()}/resolve",
    "/dashboard/reconciliation",
    "/dashboard/tasks",
]
FORMS = [
    "/dashboard/logout",
    "/dashboard/outbox/redrive",
    f"/dashboard/settlements/{uuid.uuid4()}/resolve",
]


# --- planting what the dashboard shows (shared with the browser tests) -------------------


def plant_dead_letter(
    sessions: sessionmaker[Session], error: str = "HTTP 400 from platform"
) -> str:
    """A dead outbox event, as the deliverer leaves one after a refusal."""
    event_id = str(uuid.uuid4())
    payload = {"id": str(uuid.uuid4()), "kind": "allocation", "status": "cleared"}
    with sessions() as session, session.begin():
        session.execute(
            text(
                "INSERT INTO outbox (id, topic, payload, status, attempts, last_error)"
                " VALUES (:id, 'allocation.cleared', CAST(:payload AS jsonb), 'dead', 15, :error)"
            ),
            {"id": event_id, "payload": json.dumps(payload), "error": error},
        )
    return event_id


def apply_trade(bitgo: BitGo, link: Link, deltas: dict[str, str]) -> str:
    external_id = f"fill-{uuid.uuid4().hex[:12]}"
    answer = bitgo.http.post(
        "/internal/v1/trades",
        json={
            "externalId": external_id,
            "partnersConnectionId": link.partners_connection_id,
            "deltas": deltas,
        },
        headers=bitgo.internal(),
    )
    assert answer.status_code == 200, answer.text
    return external_id


def plant_conflict(
    sessions: sessionmaker[Session], link: Link, trade_ids: list[str], amounts: dict[str, str]
) -> tuple[str, str]:
    """A settlement BitGo answered 409, holding ``trade_ids``: (its id, its externalId)."""
    settlement_id = str(uuid.uuid4())
    external_id = f"oes-settlement-planted-{uuid.uuid4().hex[:16]}"
    body = {"externalId": external_id, "settlementAmounts": {link.connection_id: amounts}}
    with sessions() as session, session.begin():
        session.execute(
            text(
                "INSERT INTO settlements (id, external_id, status, amounts, body, attempts, reason,"
                " finalized_at) VALUES (:id, :external_id, 'conflict', CAST(:amounts AS jsonb),"
                " CAST(:body AS jsonb), 1, 'BitGo answered 409: externalId exists', now())"
            ),
            {
                "id": settlement_id,
                "external_id": external_id,
                "amounts": json.dumps({link.connection_id: amounts}),
                "body": json.dumps(body),
            },
        )
        session.execute(
            text("UPDATE trades SET settlement_id = :id WHERE external_id = ANY(:trades)"),
            {"id": settlement_id, "trades": trade_ids},
        )
    return settlement_id, external_id


def scalar(sessions: sessionmaker[Session], query: str, **params: Any) -> Any:
    with sessions() as session:
        return session.execute(text(query), params).scalar_one()


# --- fixtures ------------------------------------------------------------------------


def bitgo_api(seen: Seen) -> tuple[int, Any]:
    """BitGo's allocation lookup: everything is still reserved there."""
    ident = seen.path.rsplit("/", 1)[-1]
    if "/partners/allocations/" in seen.path:
        return 200, {"id": ident, "status": "reserved", "quantity": "100000"}
    return 404, {"error": "not found"}


@pytest.fixture(scope="module")
def bitgo_stub() -> Iterator[str]:
    with serving(bitgo_api) as stub:
        yield stub.url


@pytest.fixture(scope="module")
def dashboard_settings(env: dict[str, str], bitgo_stub: str) -> Settings:
    return Settings.from_env(
        {
            **env,
            "OES_DASHBOARD_TOKEN": TOKEN,
            "OES_CURRENCY_DECIMALS": "btc:8,usdc:6",
            "OES_STALE_AFTER": "60",
            "BITGO_API_URL": bitgo_stub,
            "BITGO_ACCESS_TOKEN": "dashboard-test-access-token",
            "BITGO_ENTERPRISE_ID": "enterprise-1",
        }
    )


@pytest.fixture(scope="module")
def app_client(dashboard_settings: Settings) -> Iterator[TestClient]:
    """The gateway with its dashboard on; https, as the cookie is Secure."""
    app = create_app(dashboard_settings)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as test_client:
        yield test_client
    with redis.Redis.from_url(dashboard_settings.redis_url) as broker:
        broker.delete(*QUEUES)


@pytest.fixture
def anonymous(app_client: TestClient) -> TestClient:
    app_client.cookies.clear()
    return app_client


def log_in(http: TestClient) -> str:
    """Log ``http`` in; the CSRF token of its new session."""
    http.cookies.clear()
    answer = http.post("/dashboard/login", data={"token": TOKEN})
    assert answer.status_code == 303, answer.text
    return csrf_of(http.get("/dashboard"))


def csrf_of(page: httpx2.Response) -> str:
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert found, page.text
    return found[1]


@pytest.fixture
def operator(app_client: TestClient) -> tuple[TestClient, str]:
    """A logged-in client and its CSRF token."""
    return app_client, log_in(app_client)


@pytest.fixture
def gateway(app_client: TestClient, keys: Keys) -> BitGo:
    return BitGo(app_client, keys.private)


# --- off unless configured -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/login", *PAGES])
def test_the_dashboard_is_not_served_without_its_token(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404
    assert client.post("/dashboard/login", data={"token": TOKEN}).status_code == 404


def test_a_short_dashboard_token_is_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="OES_DASHBOARD_TOKEN"):
        Settings.from_env({**env, "OES_DASHBOARD_TOKEN": "too-short"})


@pytest.mark.parametrize("value", ["btc", "btc:eight", "btc:8,btc:6", "btc:99", ":8"])
def test_malformed_currency_decimals_are_refused_at_start(env: dict[str, str], value: str) -> None:
    with pytest.raises(SettingsError, match="OES_CURRENCY_DECIMALS"):
        Settings.from_env({**env, "OES_CURRENCY_DECIMALS": value})


# --- login ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_sends_a_stranger_to_the_login(anonymous: TestClient, path: str) -> None:
    answer = anonymous.get(path)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/login"


@pytest.mark.parametrize("path", FORMS)
def test_every_form_sends_a_stranger_to_the_login(anonymous: TestClient, path: str) -> None:
    answer = anonymous.post(path, data={"csrf": "0" * 64, "confirm": "yes"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/login"


def test_a_wrong_token_is_refused_at_login(anonymous: TestClient) -> None:
    answer = anonymous.post("/dashboard/login", data={"token": TOKEN + "x"})
    assert answer.status_code == 401
    assert "That token is not right." in answer.text
    assert "set-cookie" not in answer.headers
    assert anonymous.get("/dashboard").status_code == 303


def test_login_sets_a_secure_http_only_strict_cookie(anonymous: TestClient) -> None:
    answer = anonymous.post("/dashboard/login", data={"token": TOKEN})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("oes_dashboard=")
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/dashboard"} <= attributes
    assert anonymous.get("/dashboard").status_code == 200


def test_a_cookie_not_signed_with_the_token_is_refused(anonymous: TestClient) -> None:
    log_in(anonymous)
    session_id, _, mac = anonymous.cookies["oes_dashboard"].partition(".")
    anonymous.cookies.clear()
    for forged in (f"{session_id}.{'0' * len(mac)}", session_id, f"{session_id}.", "."):
        answer = anonymous.get("/dashboard", headers={"Cookie": f"oes_dashboard={forged}"})
        assert answer.status_code == 303, forged
    genuine = f"{session_id}.{mac}"
    assert anonymous.get(
        "/dashboard", headers={"Cookie": f"oes_dashboard={genuine}"}
    ).status_code == (200)


def test_logging_out_ends_the_session_on_the_server(operator: tuple[TestClient, str]) -> None:
    http, csrf = operator
    cookie = http.cookies["oes_dashboard"]
    answer = http.post("/dashboard/logout", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/login"
    assert 'oes_dashboard=""' in answer.headers["set-cookie"]
    http.cookies.clear()
    # The old cookie, kept by someone, no longer opens anything.
    assert http.get("/dashboard", headers={"Cookie": f"oes_dashboard={cookie}"}).status_code == 303


def test_pages_forbid_framing_scripts_and_caching(operator: tuple[TestClient, str]) -> None:
    http, _ = operator
    headers = http.get("/dashboard").headers
    assert "script-src" not in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"


# --- CSRF ----------------------------------------------------------------------------


def test_a_redrive_without_the_csrf_token_is_403_and_changes_nothing(
    operator: tuple[TestClient, str], sessions: sessionmaker[Session]
) -> None:
    http, _ = operator
    event_id = plant_dead_letter(sessions)
    answer = http.post("/dashboard/outbox/redrive", data={"confirm": "yes", "event": event_id})
    assert answer.status_code == 403
    assert scalar(sessions, "SELECT status FROM outbox WHERE id = :id", id=event_id) == "dead"


def test_a_csrf_token_of_another_session_is_403(
    app_client: TestClient, sessions: sessionmaker[Session]
) -> None:
    earlier = log_in(app_client)
    log_in(app_client)
    event_id = plant_dead_letter(sessions)
    answer = app_client.post(
        "/dashboard/outbox/redrive", data={"csrf": earlier, "confirm": "yes", "event": event_id}
    )
    assert answer.status_code == 403
    assert scalar(sessions, "SELECT status FROM outbox WHERE id = :id", id=event_id) == "dead"


def test_a_resolve_without_the_csrf_token_is_403_and_changes_nothing(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, _ = operator
    link = gateway.link()
    trade = apply_trade(gateway, link, {"btc": "2500"})
    settlement_id, _ = plant_conflict(sessions, link, [trade], {"btc": "2500"})
    answer = http.post(
        f"/dashboard/settlements/{settlement_id}/resolve",
        data={"confirm": "yes", "resolution": "release_trades", "note": "BitGo has none"},
    )
    assert answer.status_code == 403
    assert (
        scalar(sessions, "SELECT status FROM settlements WHERE id = :id", id=settlement_id)
        == "conflict"
    )


def test_a_logout_without_the_csrf_token_is_403(operator: tuple[TestClient, str]) -> None:
    http, _ = operator
    assert http.post("/dashboard/logout", data={}).status_code == 403
    assert http.get("/dashboard").status_code == 200


# --- the actions ---------------------------------------------------------------------


def test_a_confirmed_redrive_sends_the_dead_letter_back(
    operator: tuple[TestClient, str], sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    event_id = plant_dead_letter(sessions, error="HTTP 410 from platform")
    outbox = http.get("/dashboard/outbox")
    assert event_id in outbox.text
    assert "HTTP 410 from platform" in outbox.text
    confirm = http.get("/dashboard/outbox/redrive", params={"event": event_id})
    assert confirm.status_code == 200
    assert event_id in confirm.text
    assert scalar(sessions, "SELECT status FROM outbox WHERE id = :id", id=event_id) == "dead"

    answer = http.post(
        "/dashboard/outbox/redrive", data={"csrf": csrf, "confirm": "yes", "event": event_id}
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/outbox?redriven=1"
    assert scalar(
        sessions, "SELECT status || ' ' || attempts FROM outbox WHERE id = :id", id=event_id
    ) == ("pending 0")
    assert "Re-driven 1 dead letter(s)" in http.get(answer.headers["location"]).text


def test_a_redrive_needs_its_confirmation(
    operator: tuple[TestClient, str], sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    event_id = plant_dead_letter(sessions)
    answer = http.post("/dashboard/outbox/redrive", data={"csrf": csrf, "event": event_id})
    assert answer.status_code == 400
    assert scalar(sessions, "SELECT status FROM outbox WHERE id = :id", id=event_id) == "dead"


def test_resolving_a_conflict_releases_its_trades(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    link = gateway.link()
    trade = apply_trade(gateway, link, {"btc": "2500"})
    settlement_id, external_id = plant_conflict(sessions, link, [trade], {"btc": "2500"})
    page = http.get(f"/dashboard/settlements/{settlement_id}/resolve")
    assert page.status_code == 200
    assert trade in page.text

    answer = http.post(
        f"/dashboard/settlements/{settlement_id}/resolve",
        data={
            "csrf": csrf,
            "confirm": "yes",
            "resolution": "release_trades",
            "note": "BitGo holds no settlement under this externalId",
        },
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/dashboard/settlements?resolved={settlement_id}"
    assert (
        scalar(sessions, "SELECT status FROM settlements WHERE id = :id", id=settlement_id)
        == "rejected"
    )
    assert scalar(
        sessions, "SELECT settlement_id IS NULL FROM trades WHERE external_id = :id", id=trade
    )
    assert scalar(
        sessions,
        "SELECT payload->>'resolution' FROM outbox WHERE topic = 'settlement.resolved'"
        " AND payload->>'id' = :id",
        id=settlement_id,
    ) == ("release_trades")
    listing = http.get(answer.headers["location"]).text
    assert f"Settlement <code>{external_id}</code> resolved" in listing


def test_a_resolve_needs_a_note(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    link = gateway.link()
    trade = apply_trade(gateway, link, {"btc": "10"})
    settlement_id, _ = plant_conflict(sessions, link, [trade], {"btc": "10"})
    answer = http.post(
        f"/dashboard/settlements/{settlement_id}/resolve",
        data={"csrf": csrf, "confirm": "yes", "resolution": "mark_completed", "note": " "},
    )
    assert answer.status_code == 400
    assert (
        scalar(sessions, "SELECT status FROM settlements WHERE id = :id", id=settlement_id)
        == "conflict"
    )
    http.post(  # leave nothing in conflict for other tests to meet
        f"/dashboard/settlements/{settlement_id}/resolve",
        data={"csrf": csrf, "confirm": "yes", "resolution": "release_trades", "note": "tidy"},
    )


def test_resolving_a_settlement_that_is_no_conflict_is_409(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    link = gateway.link()
    trade = apply_trade(gateway, link, {"btc": "10"})
    settlement_id, _ = plant_conflict(sessions, link, [trade], {"btc": "10"})
    form = {"csrf": csrf, "confirm": "yes", "resolution": "release_trades", "note": "none"}
    assert http.post(f"/dashboard/settlements/{settlement_id}/resolve", data=form).status_code == (
        303
    )
    again = http.post(f"/dashboard/settlements/{settlement_id}/resolve", data=form)
    assert again.status_code == 409
    assert "only a conflict is resolved" in again.text


# --- the pages -----------------------------------------------------------------------


def test_the_overview_gives_balances_in_base_and_whole_units(
    operator: tuple[TestClient, str], gateway: BitGo
) -> None:
    http, _ = operator
    link = gateway.link()
    gateway.fund(link, 123_450_000)
    page = http.get("/dashboard").text
    assert link.partners_client_id in page
    assert "123450000" in page
    assert "1.2345 BTC" in page


def test_stale_reservations_are_marked_and_linked_to_bitgo(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, _ = operator
    link = gateway.link()
    stale_id, fresh_id = str(uuid.uuid4()), str(uuid.uuid4())
    for transfer_id in (stale_id, fresh_id):
        assert gateway.reserve("allocation", link, transfer_id, "5000").status_code == 200
    with sessions() as session, session.begin():
        session.execute(
            text("UPDATE transfers SET updated_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": stale_id},
        )
    page = http.get("/dashboard/reservations").text
    assert re.search(rf'<tr class="stale" data-transfer-id="{stale_id}">', page)
    assert re.search(rf'<tr class="fresh" data-transfer-id="{fresh_id}">', page)
    assert f'href="/dashboard/reservations/{stale_id}/bitgo"' in page

    at_bitgo = http.get(f"/dashboard/reservations/{stale_id}/bitgo")
    assert at_bitgo.status_code == 200
    assert '<dd class="bitgo-status">reserved</dd>' in at_bitgo.text
    for transfer_id in (stale_id, fresh_id):
        assert gateway.put("allocation", transfer_id, "release").status_code == 200


def test_without_bitgo_settings_the_lookup_says_so(
    dashboard_settings: Settings, gateway: BitGo
) -> None:
    link = gateway.link()
    transfer_id = str(uuid.uuid4())
    assert gateway.reserve("allocation", link, transfer_id, "7").status_code == 200
    unconfigured = dataclasses.replace(dashboard_settings, bitgo_access_token=None)
    with TestClient(
        create_app(unconfigured), base_url="https://testserver", follow_redirects=False
    ) as http:
        log_in(http)
        page = http.get(f"/dashboard/reservations/{transfer_id}/bitgo")
    assert page.status_code == 200
    assert "BitGo not configured" in page.text
    assert gateway.put("allocation", transfer_id, "release").status_code == 200


def test_an_unknown_transfer_or_settlement_is_404(operator: tuple[TestClient, str]) -> None:
    http, _ = operator
    assert http.get(f"/dashboard/reservations/{uuid.uuid4()}/bitgo").status_code == 404
    assert http.get("/dashboard/reservations/not-a-uuid/bitgo").status_code == 404
    assert http.get(f"/dashboard/settlements/{uuid.uuid4()}/resolve").status_code == 404


def test_the_reconciliation_page_shows_the_last_run_s_drifts(
    operator: tuple[TestClient, str], sessions: sessionmaker[Session]
) -> None:
    http, _ = operator
    connection = str(uuid.uuid4())
    summary = {
        "accounts": 3,
        "drifts": 1,
        "drift_lines": [
            {
                "connection_id": connection,
                "currency": "btc",
                "expected": "150000000",
                "reported": "100000000",
                "line": f"connection {connection} btc: expected 150000000 at BitGo, ...",
            }
        ],
    }
    with sessions() as session, session.begin():
        session.execute(
            text(
                "INSERT INTO task_runs (task, task_id, summary, finished_at)"
                " VALUES (:task, 'planted', CAST(:summary AS jsonb), now() + interval '1 minute')"
            ),
            {"task": RECONCILE, "summary": json.dumps(summary)},
        )
    page = http.get("/dashboard/reconciliation").text
    assert connection in page
    assert "1.5 BTC" in page
    assert "150000000" in page
    tasks = http.get("/dashboard/tasks").text
    assert RECONCILE in tasks
    assert "accounts=3" in tasks
    assert "drifts=1" in tasks


def test_the_settlements_page_flags_conflicts_with_their_trades(
    operator: tuple[TestClient, str], gateway: BitGo, sessions: sessionmaker[Session]
) -> None:
    http, csrf = operator
    link = gateway.link()
    gateway.fund(link, 1, currency="usdc")
    trade = apply_trade(gateway, link, {"btc": "250000000", "usdc": "-1"})
    settlement_id, external_id = plant_conflict(
        sessions, link, [trade], {"btc": "250000000", "usdc": "-1"}
    )
    page = http.get("/dashboard/settlements").text
    row = re.search(
        rf'<tr class="settlement status-conflict flagged" data-settlement-id="{settlement_id}">'
        r"(.*?)</tr>",
        page,
        re.S,
    )
    assert row, page
    assert external_id in row[1]
    assert trade in row[1]
    assert "2.5 BTC" in row[1]
    assert "-0.000001 USDC" in row[1]
    assert f"/dashboard/settlements/{settlement_id}/resolve" in row[1]
    http.post(
        f"/dashboard/settlements/{settlement_id}/resolve",
        data={"csrf": csrf, "confirm": "yes", "resolution": "release_trades", "note": "tidy"},
    )


@pytest.mark.parametrize(
    ("value", "decimals", "written"),
    [
        (0, 8, "0"),
        (100_000, 8, "0.001"),
        (123_456_789, 8, "1.23456789"),
        (-25_000, 8, "-0.00025"),
        (5, 0, "5"),
        (10**78 - 1, 18, f"{'9' * 60}.{'9' * 18}"),
        (1, 77, "0." + "0" * 76 + "1"),
    ],
)
def test_whole_units_are_exact(value: int, decimals: int, written: str) -> None:
    assert whole_units(value, decimals) == written

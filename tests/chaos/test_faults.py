"""Faults under load: BitGo-like clients keep reserving, clearing and releasing while the
API, PostgreSQL, Redis and the worker are killed or restarted under them. Afterwards the
money, the answers the clients were given, and the platform's events must all agree.

The short form runs in the normal suite; ``OES_CHAOS=long`` runs the long one (more
clients, longer load, more faults).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.devkeys import sign
from tests.chaos.conftest import LONG, Chaos
from tests.conftest import INTERNAL_TOKEN, BitGo, Link

pytestmark = pytest.mark.chaos

THREADS = 16 if LONG else 6
LEAD_IN = 3.0  # seconds of load before the first fault
GAP = 4.0 if LONG else 3.0  # seconds of load between one fault's recovery and the next
TAIL = 8.0 if LONG else 5.0  # seconds of load after the last fault
RECOVERY_BOUND = 30.0
DRAIN_TIMEOUT = 300.0 if LONG else 170.0  # a relayed delivery lost in a fault waits 120 s
OPERATION_DEADLINE = 60.0  # a client gives up retrying one operation after this long
FUNDING = 10**12
FINAL = ("cleared", "released")


@dataclass
class Record:
    """Everything the clients did and were told."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[tuple[float, float, int | None]] = field(default_factory=list)
    answers: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    meta: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # kind, pcid, qty
    bad: list[str] = field(default_factory=list)  # 5xx other than 503 with Retry-After
    gave_up: list[str] = field(default_factory=list)

    def attempt(self, start: float, end: float, code: int | None) -> None:
        with self.lock:
            self.attempts.append((start, end, code))

    def answer(self, transfer_id: str, op: str, code: int, status: str) -> None:
        with self.lock:
            self.answers.setdefault(transfer_id, []).append((op, code, status))

    def first_success_after(self, moment: float) -> float | None:
        with self.lock:
            ends = [e for s, e, c in self.attempts if s >= moment and c is not None and c < 300]
        return min(ends) if ends else None


class Client:
    """Plays BitGo: a fresh token per attempt; retries connection errors, 503 and a busy
    lock with a short sleep, as BitGo does."""

    def __init__(self, url: str, private: bytes, record: Record) -> None:
        self.http = httpx.Client(base_url=url, timeout=15)
        self.private = private
        self.record = record

    def close(self) -> None:
        self.http.close()

    def call(
        self, op: str, method: str, path: str, transfer_id: str, body: Any = None
    ) -> tuple[int, dict[str, Any]] | None:
        deadline = time.monotonic() + OPERATION_DEADLINE
        while True:
            start = time.monotonic()
            try:
                answer = self.http.request(
                    method, path, json=body, headers={"X-BitGo-Signature": sign(self.private)}
                )
            except httpx.TransportError:
                self.record.attempt(start, time.monotonic(), None)
            else:
                code = answer.status_code
                self.record.attempt(start, time.monotonic(), code)
                payload: dict[str, Any] = answer.json() if answer.content else {}
                if code >= 500:
                    if code != 503 or "retry-after" not in answer.headers:
                        with self.record.lock:
                            self.record.bad.append(f"{op} {transfer_id}: {code} {answer.text}")
                elif not (code == 409 and payload.get("error") == "Request in progress"):
                    status = str(payload.get("status") or payload.get("error"))
                    self.record.answer(transfer_id, op, code, status)
                    return code, payload
            if time.monotonic() > deadline:
                with self.record.lock:
                    self.record.gave_up.append(f"{op} {transfer_id}")
                return None
            time.sleep(0.05 + random.random() * 0.15)

    def reserve(self, kind: str, link: Link, transfer_id: str, quantity: int) -> str | None:
        with self.record.lock:
            self.record.meta[transfer_id] = (kind, link.partners_connection_id, quantity)
        body = link.body(kind, transfer_id, str(quantity))
        got = self.call("reserve", "POST", f"/bitgo/v1/{kind}s", transfer_id, body)
        return str(got[1].get("status")) if got else None

    def settle(self, kind: str, transfer_id: str, action: str) -> None:
        self.call(action, "PUT", f"/bitgo/v1/{kind}/{transfer_id}/{action}", transfer_id)


def at_once(*calls: Callable[[], object]) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def scenario(make_client: Callable[[], Client], client: Client, links: list[Link]) -> None:
    """One of: allocation, deallocation, duplicate reserves, a clear-vs-release race."""
    link = random.choice(links)
    kind = random.choice(("allocation", "deallocation"))
    transfer_id = str(uuid.uuid4())
    quantity = random.randint(1, 10_000)
    pick = random.random()
    if pick < 0.6:  # a plain reserve, then clear or release
        if client.reserve(kind, link, transfer_id, quantity) == "reserved":
            client.settle(kind, transfer_id, random.choice(("clear", "release")))
    elif pick < 0.8:  # the same reserve twice at once
        other = make_client()
        try:
            statuses: list[str | None] = []
            at_once(
                lambda: statuses.append(client.reserve(kind, link, transfer_id, quantity)),
                lambda: statuses.append(other.reserve(kind, link, transfer_id, quantity)),
            )
        finally:
            other.close()
        if "reserved" in statuses:
            client.settle(kind, transfer_id, "clear")
    elif client.reserve(kind, link, transfer_id, quantity) == "reserved":  # clear vs release
        other = make_client()
        try:
            at_once(
                lambda: client.settle(kind, transfer_id, "clear"),
                lambda: other.settle(kind, transfer_id, "release"),
            )
        finally:
            other.close()


@dataclass
class Fault:
    name: str
    at: float  # monotonic, when it was injected
    landed: float = 0.0  # when it had surely taken effect
    recovery: float | None = None


def faults_plan() -> list[str]:
    if LONG:
        plan = ["worker"] * 10 + ["api"] * 4 + ["pg fast", "pg immediate"] * 2 + ["redis"] * 2
        random.Random(7).shuffle(plan)
        return plan
    return [
        "worker",
        "api",
        "pg fast",
        "worker",
        "redis",
        "api",
        "pg immediate",
        "worker",
    ]


def inject(chaos: Chaos, name: str) -> float:
    """Inject the fault and repair it; returns when the fault had surely landed (the kill
    done, or pg_ctl back), so that only requests started after it measure recovery."""
    if name == "api":
        chaos.api.kill()
        landed = time.monotonic()
        chaos.api.start()
    elif name == "worker":
        chaos.worker.kill()
        landed = time.monotonic()
        chaos.restart_worker()
    elif name == "redis":
        chaos.redis.kill()
        landed = time.monotonic()
        chaos.redis.start()
    else:
        chaos.postgres.restart(name.split()[1])
        landed = time.monotonic()
    return landed


LABELS = {
    "api": "API SIGKILL + restart",
    "worker": "worker SIGKILL + restart",
    "redis": "Redis SIGKILL + restart",
    "pg fast": "pg_ctl restart -m fast",
    "pg immediate": "pg_ctl restart -m immediate",
}


def belief(answers: list[tuple[str, int, str]]) -> set[str]:
    """The final states the client was told of (a 200 naming it, or a 409 refusing the
    other final state because of it), plus reserved/rejected from reserves."""
    told: set[str] = set()
    for _op, code, status in answers:
        if code == 200:
            told.add(status)
        elif code == 409 and status.endswith((" is cleared", " is released")):
            told.add(status.rsplit(" ", 1)[1])
    return told


def expected_balances(states: dict[str, str], meta: dict[str, tuple[str, str, int]]) -> Any:
    """(available, pending_in, held) per partnersConnectionId implied by final states."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for transfer_id, status in states.items():
        kind, pcid, quantity = meta[transfer_id]
        b = out[pcid]
        if kind == "allocation":
            if status == "cleared":
                b[0] += quantity
            elif status == "reserved":
                b[1] += quantity
        elif status == "cleared":
            b[0] -= quantity
        elif status == "reserved":
            b[0] -= quantity
            b[2] += quantity
    return {pcid: tuple(v) for pcid, v in out.items()}


@pytest.mark.timeout(900 if LONG else 420)
def test_money_answers_and_events_survive_faults_under_load(chaos: Chaos, tmp_path: Path) -> None:
    began = time.monotonic()
    record = Record()
    private = chaos.keys.private

    def make_client() -> Client:
        return Client(chaos.url, private, record)

    with httpx.Client(base_url=chaos.url, timeout=15) as http:
        setup = BitGo(http, private)
        links = [setup.link() for _ in range(3)]
    funder = make_client()
    for link in links:
        fund_id = str(uuid.uuid4())
        assert funder.reserve("allocation", link, fund_id, FUNDING) == "reserved"
        funder.settle("allocation", fund_id, "clear")
    funder.close()

    stop = threading.Event()
    operations = Counter[str]()

    def load() -> None:
        client = make_client()
        try:
            while not stop.is_set():
                scenario(make_client, client, links)
                with record.lock:
                    operations["scenarios"] += 1
        finally:
            client.close()

    clients = [threading.Thread(target=load, daemon=True) for _ in range(THREADS)]
    load_began = time.monotonic()
    for t in clients:
        t.start()
    faults: list[Fault] = []
    try:
        time.sleep(LEAD_IN)
        for name in faults_plan():
            fault = Fault(name, time.monotonic())
            faults.append(fault)
            fault.landed = inject(chaos, name)
            time.sleep(GAP)
        time.sleep(TAIL)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=OPERATION_DEADLINE * 3)
    load_seconds = time.monotonic() - load_began

    for fault in faults:
        back = (
            chaos.receiver.first_delivery_after(fault.landed)
            if fault.name == "worker"
            else record.first_success_after(fault.landed)
        )
        fault.recovery = None if back is None else back - fault.at

    # Quiet: wait for the outbox to drain.
    drain_began = time.monotonic()
    while chaos.query("SELECT count(*) FROM outbox WHERE status = 'pending'")[0][0]:
        assert time.monotonic() - drain_began < DRAIN_TIMEOUT, "the outbox did not drain"
        time.sleep(0.5)
    drain_seconds = time.monotonic() - drain_began

    ledger = chaos.oes("ledger", "check")
    stored = {
        str(r[0]): (str(r[1]), str(r[2]), int(r[3]), str(r[4]))
        for r in chaos.query(
            "SELECT id, kind, partners_connection_id, quantity, status FROM transfers"
        )
    }
    outbox_rows = chaos.query("SELECT id, status FROM outbox")
    with httpx.Client(base_url=chaos.url, timeout=15) as http:
        api_balances: dict[str, tuple[int, int, int]] = {}
        for link in links:
            answer = http.get(
                f"/internal/v1/accounts/{link.partners_connection_id}",
                headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
            )
            assert answer.status_code == 200, answer.text
            btc = answer.json()["balances"]["btc"]
            api_balances[link.partners_connection_id] = (
                int(btc["available"]),
                int(btc["pendingIn"]),
                int(btc["held"]),
            )

    # What the clients were told, against what is stored.
    contradictions, broken_promises, unknown = [], [], 0
    client_states: dict[str, str] = {}
    for transfer_id, answers in record.answers.items():
        told = belief(answers)
        finals = told & set(FINAL)
        if len(finals) > 1:
            contradictions.append(f"{transfer_id}: {answers}")
        db = stored.get(transfer_id)
        if finals:
            final = finals.pop()
            client_states[transfer_id] = final
            if db is None or db[3] != final:
                broken_promises.append(f"{transfer_id}: told {final}, stored {db}")
        elif "rejected" in told:
            client_states[transfer_id] = "rejected"
            if db is None or db[3] != "rejected":
                broken_promises.append(f"{transfer_id}: told rejected, stored {db}")
        elif "reserved" in told:
            client_states[transfer_id] = "reserved"
            if db is None:
                broken_promises.append(f"{transfer_id}: told reserved, nothing stored")
    for transfer_id, (kind, pcid, quantity, status) in stored.items():
        if transfer_id not in client_states:  # the client gave up before any answer
            unknown += 1
            client_states[transfer_id] = status
        if transfer_id not in record.meta:
            broken_promises.append(f"{transfer_id}: stored but never requested")
            record.meta[transfer_id] = (kind, pcid, quantity)
    from_db = expected_balances({i: s[3] for i, s in stored.items()}, record.meta)
    from_clients = expected_balances(client_states, record.meta)

    # Events: each final state's event reached the platform once, none was applied twice.
    receiver = chaos.receiver
    by_subject: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event_id, event in receiver.events.items():
        data = event["data"]
        by_subject[(event["type"], str(data.get("id") or data.get("connectionId")))].add(event_id)
    missing_events = [
        f"{kind}.{status} {i}"
        for i, (kind, _p, _q, status) in stored.items()
        if status in FINAL and len(by_subject.get((f"{kind}.{status}", i), ())) == 0
    ]
    applied_twice = {k: v for k, v in by_subject.items() if len(v) > 1}
    undelivered = [str(i) for i, s in outbox_rows if s != "delivered"]
    not_received = {str(i) for i, _s in outbox_rows} - set(receiver.events)

    # Figures.
    codes = Counter("connection error" if c is None else str(c) for _s, _e, c in record.attempts)
    finals_count = Counter(s[3] for s in stored.values())
    deliveries = sum(receiver.received.values())
    lines = [
        f"oes-partner chaos run ({'long' if LONG else 'short'} form): "
        f"{THREADS} client threads, {load_seconds:.0f} s of load",
        f"{'HTTP requests (attempts)':<34}{len(record.attempts):>8}",
        *(f"  {code:<32}{n:>8}" for code, n in sorted(codes.items())),
        f"{'scenarios completed':<34}{operations['scenarios']:>8}",
        f"{'transfer ids stored':<34}{len(stored):>8}  "
        + ", ".join(f"{k} {v}" for k, v in sorted(finals_count.items())),
        f"{'operations given up (60 s)':<34}{len(record.gave_up):>8}",
        "faults (recovery: from the fault to the next success; worker: next delivery)",
        *(
            f"  +{f.at - load_began:5.1f} s  {LABELS[f.name]:<30}"
            + ("no recovery" if f.recovery is None else f"{f.recovery:6.2f} s")
            for f in faults
        ),
        f"{'events delivered (distinct)':<34}{len(receiver.events):>8}",
        f"{'deliveries (repeats deduplicated)':<34}{deliveries:>8}  "
        f"({deliveries - len(receiver.events)} repeats)",
        f"{'outbox drained after the load in':<34}{drain_seconds:>7.1f} s",
        f"{'ledger check':<34}{'ok' if ledger.returncode == 0 else 'FAILED':>8}",
        f"{'duration (whole test)':<34}{time.monotonic() - began:>7.1f} s",
    ]
    table = "\n".join(lines)
    figures = tmp_path / "chaos-figures.txt"
    figures.write_text(table + "\n")
    print(f"\n{table}\nfigures written to {figures}")

    assert not record.bad, record.bad[:10]
    assert ledger.returncode == 0, ledger.stdout + ledger.stderr
    assert not contradictions, contradictions[:10]
    assert not broken_promises, broken_promises[:10]
    assert not record.gave_up, record.gave_up[:10]
    assert codes.get("401", 0) == 0, "a fresh token was refused"
    for link in links:
        pcid = link.partners_connection_id
        implied = from_db[pcid]  # the funding is a cleared allocation among the transfers
        assert api_balances[pcid] == implied, (pcid, api_balances[pcid], implied)
        assert from_clients[pcid] == implied, (pcid, from_clients[pcid], implied)
    assert unknown == 0, f"{unknown} stored transfers the clients never heard an answer for"
    assert not missing_events, missing_events[:10]
    assert not applied_twice, list(applied_twice.items())[:10]
    assert not undelivered, undelivered[:10]
    assert not not_received, sorted(not_received)[:10]
    assert receiver.bad_signatures == 0
    for fault in faults:
        assert fault.recovery is not None, f"no recovery after {fault.name}"
        assert fault.recovery < RECOVERY_BOUND, (fault.name, fault.recovery)

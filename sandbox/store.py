"""The sandbox's memory of BitGo's side: clients, connections, allocations, balances,
settlements and fault rules.

One process keeps it all in memory and, given a file, writes every change through to
SQLite as it is made (each change one transaction) and reads it all back when it starts
again, so a restart forgets nothing BitGo would remember. Fault rules and locks live in
memory only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FAULT_MODES = ("timeout", "duplicate", "delay", "no_clear", "release")
_SECONDS = re.compile(r"[0-9]{1,4}(\.[0-9]{1,3})?")


def requested_fault(text: str) -> Fault | None:
    """A per-call fault, ``mode`` or ``delay:SECONDS``; None if it is not one."""
    mode, colon, seconds = text.partition(":")
    if mode not in FAULT_MODES or (colon and not _SECONDS.fullmatch(seconds)):
        return None
    return Fault(mode=mode, seconds=float(seconds or 0))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hmac_hex(key: str, payload: str) -> str:
    return hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()


@dataclass
class Connection:
    id: str
    enterprise_id: str
    client_id: str
    partners_client_id: str
    partners_connection_id: str
    created_at: str = field(default_factory=now)

    def render(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "enterpriseId": self.enterprise_id,
            "clientId": self.client_id,
            "partnersClientId": self.partners_client_id,
            "partnersConnectionId": self.partners_connection_id,
            "createdAt": self.created_at,
        }


@dataclass
class Allocation:
    """An allocation or deallocation, as BitGo records it (seed 000's fields)."""

    id: str
    type: str
    currency: str
    quantity: int
    connection_id: str
    enterprise_id: str
    client_external_id: str
    initiated_by: str
    notes: str | None
    request: dict[str, Any]  # the client's fields, to recognise an identical re-send
    status: str = "reserved"
    reason: str | None = None
    retriable: bool = False
    partner_external_id: str | None = None
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    def render(self, *, with_type: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "amount": {"currency": self.currency, "quantity": str(self.quantity)},
            "connectionId": self.connection_id,
            "clientExternalId": self.client_external_id,
            "partnerExternalId": self.partner_external_id,
            "initiatedBy": self.initiated_by,
            "notes": self.notes,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "retriable": self.retriable,
            "status": self.status,
            "reason": self.reason,
        }
        if with_type:
            out["type"] = self.type
        return _present(out)


def _present(record: dict[str, Any]) -> dict[str, Any]:
    """BitGo leaves an optional field out rather than sending null."""
    return {name: value for name, value in record.items() if value is not None}


@dataclass
class Settlement:
    id: str
    external_id: str
    body: dict[str, Any]
    status: str
    reason: str | None = None
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    finalized_at: str | None = None

    def render(self, partner_id: str) -> dict[str, Any]:
        return _present(
            {
                "id": self.id,
                "partnerId": partner_id,
                "externalId": self.external_id,
                "status": self.status,
                "reason": self.reason,
                "createdAt": self.created_at,
                "updatedAt": self.updated_at,
                "finalizedAt": self.finalized_at,
            }
        )


@dataclass
class Fault:
    """A misbehaviour: once per matching call while ``times`` lasts (None: standing rule)."""

    mode: str
    seconds: float = 0.0
    times: int | None = 1
    kinds: tuple[str, ...] = ("allocation", "deallocation")

    def render(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seconds": self.seconds,
            "times": self.times,
            "kinds": list(self.kinds),
        }


SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    enterprise_id TEXT PRIMARY KEY, client_key TEXT NOT NULL, client_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY, enterprise_id TEXT NOT NULL, client_id TEXT NOT NULL,
    partners_client_id TEXT NOT NULL, partners_connection_id TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, currency TEXT NOT NULL, quantity TEXT NOT NULL,
    connection_id TEXT NOT NULL, enterprise_id TEXT NOT NULL, client_external_id TEXT NOT NULL,
    initiated_by TEXT NOT NULL, notes TEXT, request TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, retriable INTEGER NOT NULL, partner_external_id TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    UNIQUE (enterprise_id, type, client_external_id));
CREATE TABLE IF NOT EXISTS nonces (
    enterprise_id TEXT NOT NULL, nonce TEXT NOT NULL, owner TEXT NOT NULL,
    PRIMARY KEY (enterprise_id, nonce));
CREATE TABLE IF NOT EXISTS balances (
    connection_id TEXT NOT NULL, currency TEXT NOT NULL,
    available TEXT NOT NULL, held TEXT NOT NULL,  -- integers of up to 78 digits
    PRIMARY KEY (connection_id, currency));
CREATE TABLE IF NOT EXISTS settlements (
    external_id TEXT PRIMARY KEY, id TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, finalized_at TEXT);
"""
_ALLOCATION_COLUMNS = (
    "id, type, currency, quantity, connection_id, enterprise_id, client_external_id, "
    "initiated_by, notes, request, status, reason, retriable, partner_external_id, "
    "created_at, updated_at"
)
INTERRUPTED = "The sandbox stopped during this call; send the identical request again"
Write = tuple[str, tuple[Any, ...]]


class StateError(Exception):
    """The state file is not one this sandbox can read."""


@dataclass
class Store:
    partner_enterprise_id: str
    access_token: str
    partner_key: str = field(default_factory=lambda: secrets.token_hex(16))
    client_keys: dict[str, str] = field(default_factory=dict)  # enterpriseId -> key
    client_ids: dict[str, str] = field(default_factory=dict)  # enterpriseId -> clientId
    connections: dict[str, Connection] = field(default_factory=dict)
    allocations: dict[str, Allocation] = field(default_factory=dict)
    by_external: dict[tuple[str, str, str], str] = field(default_factory=dict)
    nonces: dict[tuple[str, str], str] = field(default_factory=dict)  # -> clientExternalId
    # connectionId -> currency -> [available, held] as BitGo sees them.
    balances: defaultdict[str, defaultdict[str, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    settlements: dict[str, Settlement] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    db: sqlite3.Connection | None = field(default=None, repr=False)  # None: memory only

    @classmethod
    def open(cls, path: Path, *, partner_enterprise_id: str, access_token: str) -> Store:
        """The store kept in the SQLite file ``path``, made on first use."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # One event loop thread uses it; the connection is made before that thread runs.
        db = sqlite3.connect(path, check_same_thread=False)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StateError(f"{path} holds sandbox state of version {version}")
            db.execute("PRAGMA journal_mode=WAL")  # a crash loses no committed change
            db.execute("PRAGMA synchronous=NORMAL")  # and only a power cut the last ones
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StateError(f"{path} is not sandbox state: {exc}") from None
        except StateError:
            db.close()
            raise
        store = cls(partner_enterprise_id=partner_enterprise_id, access_token=access_token, db=db)
        store._load()
        return store

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def _load(self) -> None:
        assert self.db is not None
        q = self.db.execute
        row = q("SELECT value FROM meta WHERE name = 'partner_key'").fetchone()
        if row is None:
            self._write(("INSERT INTO meta VALUES ('partner_key', ?)", (self.partner_key,)))
        else:
            self.partner_key = row[0]
        for enterprise, key, client_id in q(
            "SELECT enterprise_id, client_key, client_id FROM clients ORDER BY rowid"
        ):
            self.client_keys[enterprise], self.client_ids[enterprise] = key, client_id
        for r in q(
            "SELECT id, enterprise_id, client_id, partners_client_id, partners_connection_id, "
            "created_at FROM connections ORDER BY rowid"
        ):
            self.connections[r[0]] = Connection(*r)
        interrupted = []
        for r in q(f"SELECT {_ALLOCATION_COLUMNS} FROM allocations ORDER BY rowid"):  # noqa: S608
            a = Allocation(
                id=r[0],
                type=r[1],
                currency=r[2],
                quantity=int(r[3]),
                connection_id=r[4],
                enterprise_id=r[5],
                client_external_id=r[6],
                initiated_by=r[7],
                notes=r[8],
                request=json.loads(r[9]),
                status=r[10],
                reason=r[11],
                retriable=bool(r[12]),
                partner_external_id=r[13],
                created_at=r[14],
                updated_at=r[15],
            )
            self.allocations[a.id] = a
            self.by_external[(a.enterprise_id, a.type, a.client_external_id)] = a.id
            if a.status == "reserved" and not a.retriable:  # stopped in the middle of a call
                a.retriable, a.reason = True, INTERRUPTED
                interrupted.append(self._allocation_row(a))
        self._write(*interrupted)
        for enterprise, nonce, owner in q("SELECT enterprise_id, nonce, owner FROM nonces"):
            self.nonces[(enterprise, nonce)] = owner
        for connection_id, currency, available, held in q(
            "SELECT connection_id, currency, available, held FROM balances ORDER BY rowid"
        ):
            self.balances[connection_id][currency] = [int(available), int(held)]
        for r in q(
            "SELECT id, external_id, body, status, reason, created_at, updated_at, finalized_at "
            "FROM settlements ORDER BY rowid"
        ):
            self.settlements[r[1]] = Settlement(
                id=r[0],
                external_id=r[1],
                body=json.loads(r[2]),
                status=r[3],
                reason=r[4],
                created_at=r[5],
                updated_at=r[6],
                finalized_at=r[7],
            )

    def _write(self, *writes: Write) -> None:
        """Statements in one transaction; nothing when the store lives in memory only."""
        if self.db is None or not writes:
            return
        with self.db:
            for statement, parameters in writes:
                self.db.execute(statement, parameters)

    @staticmethod
    def _allocation_row(a: Allocation) -> Write:
        return (
            # Only the constant column names are spliced in; every value is a parameter.
            f"INSERT INTO allocations ({_ALLOCATION_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "reason = excluded.reason, retriable = excluded.retriable, "
            "partner_external_id = excluded.partner_external_id, "
            "updated_at = excluded.updated_at",
            (
                a.id,
                a.type,
                a.currency,
                str(a.quantity),
                a.connection_id,
                a.enterprise_id,
                a.client_external_id,
                a.initiated_by,
                a.notes,
                json.dumps(a.request),
                a.status,
                a.reason,
                int(a.retriable),
                a.partner_external_id,
                a.created_at,
                a.updated_at,
            ),
        )

    def _balance_row(self, connection_id: str, currency: str) -> Write:
        available, held = self.balances[connection_id][currency]
        return (
            "INSERT INTO balances VALUES (?, ?, ?, ?) ON CONFLICT (connection_id, currency) "
            "DO UPDATE SET available = excluded.available, held = excluded.held",
            (connection_id, currency, str(available), str(held)),
        )

    def register_client(self, enterprise_id: str | None = None) -> tuple[str, str]:
        """A client enterprise and the key it signs allocation payloads with."""
        enterprise = enterprise_id or f"client-{uuid.uuid4().hex[:12]}"
        if enterprise not in self.client_keys:
            self.client_keys[enterprise] = secrets.token_hex(16)
            self.client_ids[enterprise] = str(uuid.uuid4())
            self._write(
                (
                    "INSERT INTO clients VALUES (?, ?, ?)",
                    (enterprise, self.client_keys[enterprise], self.client_ids[enterprise]),
                )
            )
        return enterprise, self.client_keys[enterprise]

    def add_connection(self, connection: Connection) -> Connection:
        self.connections[connection.id] = connection
        c = connection
        self._write(
            (
                "INSERT INTO connections VALUES (?, ?, ?, ?, ?, ?)",
                (
                    c.id,
                    c.enterprise_id,
                    c.client_id,
                    c.partners_client_id,
                    c.partners_connection_id,
                    c.created_at,
                ),
            )
        )
        return connection

    def add_allocation(self, allocation: Allocation, nonce: str) -> None:
        """A new allocation (or deallocation), reserved, and the nonce it spent."""
        a = allocation
        owner = f"{a.type}:{a.client_external_id}"
        self.allocations[a.id] = a
        self.by_external[(a.enterprise_id, a.type, a.client_external_id)] = a.id
        self.nonces[(a.enterprise_id, nonce)] = owner
        spent = ("INSERT INTO nonces VALUES (?, ?, ?)", (a.enterprise_id, nonce, owner))
        self.move(a, "reserved", also=(spent,))

    def save(self, allocation: Allocation) -> None:
        """Keep what changed on ``allocation`` besides its state."""
        allocation.updated_at = now()
        self._write(self._allocation_row(allocation))

    def record_settlement(self, settlement: Settlement, moved: list[tuple[str, str]]) -> None:
        """Keep ``settlement`` and the balances (connectionId, currency) it moved."""
        s = settlement
        self.settlements[s.external_id] = s
        row = (
            "INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (external_id) "
            "DO UPDATE SET status = excluded.status, reason = excluded.reason, "
            "updated_at = excluded.updated_at, finalized_at = excluded.finalized_at",
            (
                s.external_id,
                s.id,
                json.dumps(s.body),
                s.status,
                s.reason,
                s.created_at,
                s.updated_at,
                s.finalized_at,
            ),
        )
        self._write(row, *(self._balance_row(c, currency) for c, currency in moved))

    def take_fault(self, kind: str, requested: Fault | None = None) -> Fault | None:
        """The fault for this call: one named on the request, else the first rule matching."""
        if requested is not None:
            return requested
        for rule in self.faults:
            if kind in rule.kinds:
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.faults.remove(rule)
                return rule
        return None

    def move(
        self,
        allocation: Allocation,
        to: str,
        *,
        retriable: bool = False,
        reason: str | None = None,
        also: tuple[Write, ...] = (),
    ) -> None:
        """Change BitGo's balances for ``allocation`` entering state ``to``, and keep both."""
        b = self.balances[allocation.connection_id][allocation.currency]
        q = allocation.quantity
        moves = {
            ("allocation", "reserved"): (0, q),  # locked at BitGo, on its way
            ("allocation", "cleared"): (q, -q),
            ("allocation", "released"): (0, -q),
            ("deallocation", "reserved"): (-q, q),
            ("deallocation", "cleared"): (0, -q),
            ("deallocation", "released"): (q, -q),
        }
        d_available, d_held = moves[(allocation.type, to)]
        b[0] += d_available
        b[1] += d_held
        allocation.status = to
        allocation.retriable, allocation.reason = retriable, reason
        allocation.updated_at = now()
        self._write(
            *also,
            self._allocation_row(allocation),
            self._balance_row(allocation.connection_id, allocation.currency),
        )

"""The sandbox's memory of BitGo's side: clients, connections, allocations, balances,
settlements and fault rules. One process, in memory; restart and it is empty."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
        return out


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
        return {
            "id": self.id,
            "partnerId": partner_id,
            "externalId": self.external_id,
            "status": self.status,
            "reason": self.reason,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "finalizedAt": self.finalized_at,
        }


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

    def register_client(self, enterprise_id: str | None = None) -> tuple[str, str]:
        """A client enterprise and the key it signs allocation payloads with."""
        enterprise = enterprise_id or f"client-{uuid.uuid4().hex[:12]}"
        key = self.client_keys.setdefault(enterprise, secrets.token_hex(16))
        self.client_ids.setdefault(enterprise, str(uuid.uuid4()))
        return enterprise, key

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

    def move(self, allocation: Allocation, to: str) -> None:
        """Change BitGo's balances for ``allocation`` entering state ``to``."""
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
        allocation.updated_at = now()

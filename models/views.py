"""What the operator dashboard shows: read-only queries returning frozen records.

Each function takes a ``Session``, only reads, and never commits; the caller's
transaction helper owns the transaction.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.outbox import OutboxEvent
from models.rows import as_record
from models.settlements import SettlementRecord, SettlementStatus
from models.states import Kind, Status

RECONCILE_TASK = "workers.remediation.reconcile_balances"
_AMOUNT = re.compile(r"-?[0-9]{1,78}")


# --- overview ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountLine:
    """One connection's balances in one currency; ``currency`` None: nothing booked yet."""

    connection_id: uuid.UUID
    partners_connection_id: str
    partners_client_id: str
    active: bool
    currency: str | None
    available: int
    pending_in: int
    held: int
    last_activity: datetime


_OVERVIEW = text(
    """
    SELECT c.connection_id, c.partners_connection_id, c.partners_client_id, c.active,
           a.currency, coalesce(a.available, 0) AS available,
           coalesce(a.pending_in, 0) AS pending_in, coalesce(a.held, 0) AS held,
           greatest(c.updated_at, a.updated_at,
                    (SELECT max(t.updated_at) FROM transfers t
                      WHERE t.connection_id = c.connection_id AND t.currency = a.currency)
           ) AS last_activity
    FROM connections c LEFT JOIN accounts a ON a.connection_pk = c.id
    ORDER BY c.partners_client_id, c.id, a.currency
    LIMIT :limit
    """
)


def overview(session: Session, *, limit: int = 500) -> list[AccountLine]:
    """Every connection's balances per currency, by partner client."""
    return [as_record(AccountLine, r) for r in session.execute(_OVERVIEW, {"limit": limit})]


# --- reservations --------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """A transfer still ``reserved``; stale once unchanged for ``OES_STALE_AFTER``."""

    transfer_id: uuid.UUID
    kind: Kind
    currency: str
    quantity: int
    connection_id: uuid.UUID
    partners_connection_id: str
    partners_client_id: str
    created_at: datetime
    updated_at: datetime
    age_seconds: int
    stale: bool


@dataclass(frozen=True)
class Reservations:
    lines: list[Reservation]  # oldest first, at most the limit
    total: int
    stale: int


_RESERVED = text(
    """
    SELECT id AS transfer_id, kind, currency, quantity, connection_id, partners_connection_id,
           partners_client_id, created_at, updated_at,
           floor(extract(epoch FROM now() - updated_at))::bigint AS age_seconds,
           updated_at < now() - make_interval(secs => :stale_after) AS stale
    FROM transfers WHERE status = 'reserved'
    ORDER BY updated_at, id
    LIMIT :limit
    """
)
_RESERVED_COUNTS = text(
    """
    SELECT count(*) AS total,
           count(*) FILTER (WHERE updated_at < now() - make_interval(secs => :stale_after))
    FROM transfers WHERE status = 'reserved'
    """
)


def reservations(session: Session, *, stale_after: int, limit: int = 500) -> Reservations:
    """Reserved transfers by age, oldest first, each marked stale or not."""
    params = {"stale_after": stale_after, "limit": limit}
    lines = [as_record(Reservation, r) for r in session.execute(_RESERVED, params)]
    total, stale = session.execute(_RESERVED_COUNTS, params).one()
    return Reservations(lines=lines, total=int(total), stale=int(stale))


@dataclass(frozen=True)
class ReservationDetail:
    """Any transfer, by BitGo's id, for the page that shows what BitGo says of it."""

    transfer_id: uuid.UUID
    kind: Kind
    status: Status
    currency: str
    quantity: int
    partners_connection_id: str
    updated_at: datetime


def transfer(session: Session, transfer_id: uuid.UUID) -> ReservationDetail | None:
    row = session.execute(
        text(
            "SELECT id AS transfer_id, kind, status, currency, quantity, partners_connection_id,"
            " updated_at FROM transfers WHERE id = :id"
        ),
        {"id": transfer_id},
    ).one_or_none()
    return None if row is None else as_record(ReservationDetail, row)


# --- outbox --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxView:
    backlog: int  # pending
    dead: int
    dead_letters: list[OutboxEvent]  # oldest first, at most the limit
    recent: list[OutboxEvent]  # newest first


_OUTBOX_COUNTS = text(
    "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead')"
    " FROM outbox WHERE status IN ('pending', 'dead')"
)


def outbox(session: Session, *, limit: int = 200, recent: int = 20) -> OutboxView:
    """The backlog, the dead letters with their last error, and the latest events."""
    backlog, dead = session.execute(_OUTBOX_COUNTS).one()
    return OutboxView(
        backlog=int(backlog),
        dead=int(dead),
        dead_letters=dead_letters(session, limit=limit),
        recent=[
            as_record(OutboxEvent, r)
            for r in session.execute(
                text("SELECT * FROM outbox ORDER BY created_at DESC, id LIMIT :limit"),
                {"limit": recent},
            )
        ],
    )


def dead_letters(
    session: Session, *, ids: list[uuid.UUID] | None = None, limit: int = 200
) -> list[OutboxEvent]:
    """Dead letters (all, or those of ``ids``), oldest first."""
    rows = session.execute(
        text(
            "SELECT * FROM outbox WHERE status = 'dead'"
            " AND (CAST(:ids AS uuid[]) IS NULL OR id = ANY(CAST(:ids AS uuid[])))"
            " ORDER BY created_at, id LIMIT :limit"
        ),
        {"ids": ids, "limit": limit},
    )
    return [as_record(OutboxEvent, r) for r in rows]


# --- settlements ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoveredTrade:
    external_id: str
    partners_connection_id: str
    deltas: dict[str, str]
    settled_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class SettlementLine:
    settlement: SettlementRecord
    trades: list[CoveredTrade]  # the first few, oldest first
    trade_count: int

    @property
    def flagged(self) -> bool:
        """A conflict or a rejection: an operator should look."""
        return self.settlement.status in (SettlementStatus.CONFLICT, SettlementStatus.REJECTED)


_COVERED = text(
    """
    SELECT * FROM (
        SELECT settlement_id, external_id, partners_connection_id, deltas, settled_at, created_at,
               row_number() OVER (PARTITION BY settlement_id ORDER BY created_at, external_id) AS n,
               count(*) OVER (PARTITION BY settlement_id) AS total
        FROM trades WHERE settlement_id = ANY(CAST(:ids AS uuid[]))
    ) AS covered
    WHERE n <= :per_settlement
    ORDER BY settlement_id, n
    """
)


def settlements(
    session: Session,
    *,
    limit: int = 50,
    trades_each: int = 20,
    only: uuid.UUID | None = None,
) -> list[SettlementLine]:
    """The latest settlements (or the one ``only``), each with the trades it covers."""
    rows = session.execute(
        text(
            "SELECT * FROM settlements WHERE CAST(:only AS uuid) IS NULL OR id = :only"
            " ORDER BY seq DESC LIMIT :limit"
        ),
        {"only": only, "limit": limit},
    )
    records = [as_record(SettlementRecord, r) for r in rows]
    covered: dict[uuid.UUID, list[CoveredTrade]] = {}
    counts: dict[uuid.UUID, int] = {}
    for row in session.execute(
        _COVERED, {"ids": [r.id for r in records], "per_settlement": trades_each}
    ):
        covered.setdefault(row.settlement_id, []).append(as_record(CoveredTrade, row))
        counts[row.settlement_id] = int(row.total)
    return [SettlementLine(r, covered.get(r.id, []), counts.get(r.id, 0)) for r in records]


# --- task runs -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRun:
    task: str
    task_id: str | None
    summary: dict[str, Any]
    finished_at: datetime

    @property
    def outcome(self) -> str:
        """``skipped``, ``failed``, the summary's own ``outcome``, or ``ok``."""
        if "skipped" in self.summary:
            return "skipped"
        if "error" in self.summary:
            return "failed"
        return str(self.summary.get("outcome") or "ok")

    @property
    def line(self) -> str:
        """The summary as the worker logs it, ``key=value`` pairs, without the drift lines."""
        return " ".join(f"{k}={v}" for k, v in self.summary.items() if k != "drift_lines")


def last_runs(session: Session) -> list[TaskRun]:
    """Each task's latest run, by task name."""
    rows = session.execute(
        text(
            "SELECT DISTINCT ON (task) task, task_id, summary, finished_at FROM task_runs"
            " ORDER BY task, finished_at DESC, id DESC"
        )
    )
    return [as_record(TaskRun, r) for r in rows]


def runs_of(session: Session, task: str, *, limit: int = 10) -> list[TaskRun]:
    """``task``'s latest runs, newest first."""
    rows = session.execute(
        text(
            "SELECT task, task_id, summary, finished_at FROM task_runs WHERE task = :task"
            " ORDER BY finished_at DESC, id DESC LIMIT :limit"
        ),
        {"task": task, "limit": limit},
    )
    return [as_record(TaskRun, r) for r in rows]


@dataclass(frozen=True)
class DriftLine:
    connection_id: str
    currency: str
    expected: int
    reported: int | None  # None: BitGo's figure was missing or unreadable
    line: str


def drift_lines(run: TaskRun) -> list[DriftLine]:
    """The drifts a reconcile run kept in its summary; entries it cannot read are skipped."""
    entries = run.summary.get("drift_lines")
    out = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        expected, reported = entry.get("expected"), entry.get("reported")
        if not isinstance(expected, str) or not _AMOUNT.fullmatch(expected):
            continue
        out.append(
            DriftLine(
                connection_id=str(entry.get("connection_id", "")),
                currency=str(entry.get("currency", "")),
                expected=int(expected),
                reported=int(reported)
                if isinstance(reported, str) and _AMOUNT.fullmatch(reported)
                else None,
                line=str(entry.get("line", "")),
            )
        )
    return out

"""Remediation sweeps: converge stale reservations, re-send the outbox, compare balances."""

from __future__ import annotations

from collections import Counter
from typing import Any

import structlog

from models import outbox, reconciliation, runs, transfers
from models.errors import DomainError
from models.states import stale_verdict
from workers.bitgo_client import BitGoClient, BitGoError, BitGoNotFoundError
from workers.celery import app
from workers.process import NOT_CONFIGURED, bitgo, report, transaction
from workers.settings import settings

log = structlog.get_logger(__name__)

# A relayed event is not relayed again for this long, so that a sweep every few
# seconds does not queue the same delivery over and over while workers are busy.
RELAY_LEASE = 120.0
# task_runs rows (one per run; the relay alone runs every 15 s) are kept this long.
RUNS_KEPT_DAYS = 14
# Drifts kept in a reconcile's summary (for the dashboard); the log has every one.
DRIFT_LINES_KEPT = 100


def _converge(client: BitGoClient, record: transfers.TransferRecord) -> str:
    """Bring one stale reservation in line with BitGo; what happened, as a summary key."""
    ident = str(record.transfer_id)
    try:
        remote: dict[str, Any] | None = client.allocation(ident)
    except BitGoNotFoundError:
        remote = None
    except BitGoError as exc:
        log.warning("stale_lookup_failed", transfer_id=ident, error=exc.message)
        return "errors"
    verdict = stale_verdict(record.kind, remote)
    action = verdict.action
    if action is None:
        return verdict.value
    try:
        with transaction() as session:
            result = transfers.settle(
                session, kind=record.kind, transfer_id=record.transfer_id, action=action
            )
    except DomainError as exc:  # it moved on since we looked: BitGo got there first
        log.info("stale_changed_meanwhile", transfer_id=ident, error=exc.message)
        return "changed_meanwhile"
    log.info(
        "stale_converged",
        transfer_id=ident,
        kind=record.kind.value,
        bitgo_status=remote.get("status") if remote else "unknown",
        status=result.status.value,
    )
    return result.status.value


@app.task(name="workers.remediation.sweep_stale_transfers", bind=True)
def sweep_stale_transfers(self: Any, batch: int = 500, max_batches: int = 20) -> dict[str, Any]:
    """Converge reservations older than OES_STALE_AFTER with BitGo's view of them."""
    client = bitgo()
    if client is None:
        return report(self, NOT_CONFIGURED)
    counts: Counter[str] = Counter()
    examined = 0
    after = None
    with client:
        for _ in range(max_batches):
            with transaction() as session:
                page = transfers.stale(
                    session, older_than=settings().stale_after, limit=batch, after=after
                )
            for record in page:
                counts[_converge(client, record)] += 1
            examined += len(page)
            if len(page) < batch:
                break
            after = (page[-1].updated_at, page[-1].transfer_id)
    return report(self, {"examined": examined, **dict(sorted(counts.items()))})


@app.task(name="workers.remediation.relay_outbox", bind=True)
def relay_outbox(self: Any, batch: int = 500, max_batches: int = 20) -> dict[str, Any]:
    """Publish outbox events still pending past OES_OUTBOX_GRACE (their process died)."""
    relayed = 0
    for _ in range(max_batches):
        with transaction() as session:
            due = outbox.relay_due(
                session, grace=settings().outbox_grace, lease=RELAY_LEASE, limit=batch
            )
        relayed += due
        if due < batch:
            break
    with transaction() as session:
        pruned = runs.prune(session, keep_days=RUNS_KEPT_DAYS)
    return report(self, {"relayed": relayed, "runs_pruned": pruned})


@app.task(name="workers.remediation.reconcile_balances", bind=True)
def reconcile_balances(self: Any) -> dict[str, Any]:
    """Compare every connection's balances with BitGo's; report drift, change nothing."""
    client = bitgo()
    if client is None:
        return report(self, NOT_CONFIGURED)
    try:
        with client:
            network = client.balances()
    except BitGoError as exc:
        log.warning("reconcile_failed", error=exc.message)
        return report(self, {"outcome": "BitGo unavailable", "error": exc.message})
    with transaction() as session:
        ours = reconciliation.expected(session)
    theirs = reconciliation.reported(network)
    drifts = reconciliation.compare(ours, theirs)
    for drift in drifts:
        log.warning(
            "balance_drift",
            connection_id=drift.connection_id,
            currency=drift.currency,
            expected=str(drift.expected),
            reported=None if drift.reported is None else str(drift.reported),
            line=drift.line(),
        )
    summary: dict[str, Any] = {"accounts": len(set(ours) | set(theirs)), "drifts": len(drifts)}
    if drifts:
        summary["drift_lines"] = [
            {
                "connection_id": d.connection_id,
                "currency": d.currency,
                "expected": str(d.expected),
                "reported": None if d.reported is None else str(d.reported),
                "line": d.line(),
            }
            for d in drifts[:DRIFT_LINES_KEPT]
        ]
    return report(self, summary)

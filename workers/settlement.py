"""Settlement with BitGo: net unsettled trades, sign through Express, post until final."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from models import settlements
from models.errors import InvariantError
from models.settlements import SettlementRecord, SettlementStatus
from workers.bitgo_client import BitGoClient, BitGoConflictError, BitGoError
from workers.celery import app
from workers.process import NOT_CONFIGURED, bitgo, report, transaction
from workers.settings import MAX_COUNTDOWN, settings

log = structlog.get_logger(__name__)


def _signed(client: BitGoClient, record: SettlementRecord) -> SettlementRecord:
    """Sign the body through Express and store it; from then on it never changes."""
    payload, signature = client.sign_payload(record.payload())
    with transaction() as session:
        return settlements.store_body(session, record.id, record.signed_body(payload, signature))


def _retry_later(record: SettlementRecord) -> float:
    # ``attempts`` already counts the attempt that just failed.
    exponent = min(max(record.attempts - 1, 0), 10)
    delay = min(MAX_COUNTDOWN, settings().settlement_retry * 2.0**exponent)
    post_settlement.apply_async((str(record.id),), countdown=delay)
    return delay


def _post(client: BitGoClient, record: SettlementRecord) -> dict[str, Any]:
    """Post the stored body once and record what BitGo said."""
    if record.body is None:  # the schema's CHECK keeps a posted settlement's body
        raise InvariantError(f"settlement {record.id} has no body to post")
    try:
        answer = client.post_settlement(record.body)
    except BitGoConflictError as exc:
        with transaction() as session:
            settlements.finish(
                session, record.id, SettlementStatus.CONFLICT, reason=f"BitGo 409: {exc.message}"
            )
        log.error(
            "settlement_conflict",
            external_id=record.external_id,
            error=exc.message,
            action="stopped: BitGo holds this externalId with a different body",
        )
        return {"settlement": record.external_id, "outcome": "conflict", "error": exc.message}
    except BitGoError as exc:
        with transaction() as session:
            updated = settlements.attempted(session, record.id, reason=exc.message)
        outcome: dict[str, Any] = {"settlement": record.external_id, "outcome": "error"}
        if updated is not None:
            outcome["retry_in"] = round(_retry_later(updated), 3)
        log.warning("settlement_post_failed", external_id=record.external_id, error=exc.message)
        return outcome | {"error": exc.message}
    read = settlements.verdict(answer)
    with transaction() as session:
        if read.status is SettlementStatus.PENDING:
            updated = settlements.attempted(
                session, record.id, reason=read.reason or "", bitgo_status=read.bitgo_status
            )
        else:
            updated = settlements.finish(
                session,
                record.id,
                read.status,
                reason=read.reason,
                bitgo_id=read.bitgo_id,
                bitgo_status=read.bitgo_status,
            )
    outcome = {"settlement": record.external_id, "outcome": read.bitgo_status or "unknown"}
    if read.status is SettlementStatus.PENDING and updated is not None:
        outcome["retry_in"] = round(_retry_later(updated), 3)
    return outcome


@app.task(name="workers.settlement.post_settlement", bind=True)
def post_settlement(self: Any, settlement_id: str) -> dict[str, Any]:
    """Post a pending settlement's stored body again; quiet once it is final."""
    client = bitgo()
    if client is None:
        return report(self, NOT_CONFIGURED)
    with transaction() as session:
        record = settlements.get(session, uuid.UUID(settlement_id))
    if record.status is not SettlementStatus.PENDING:
        return {"settlement": record.external_id, "outcome": f"already {record.status.value}"}
    with client:
        return report(self, _post(client, record))


# Settlements one run may make; each ends (completed or rejected) before the next starts.
MAX_PER_RUN = 100
_FINAL = ("completed", "rejected", "net zero, not posted")


def _settle_next(client: BitGoClient, refused: set[str]) -> dict[str, Any] | None:
    """Resume the settlement in flight or start the next; its summary, None if none is due.

    A settlement of only connections BitGo ``refused`` in this run is left for the next.
    """
    with transaction() as session:
        record = settlements.open_or_start(session)
    if record is None:
        return None
    if record.status is SettlementStatus.COMPLETED:
        return {"settlement": record.external_id, "outcome": "net zero, not posted"}
    if record.status is SettlementStatus.PREPARING:
        if record.amounts and set(record.amounts) <= refused:
            return None
        try:
            record = _signed(client, record)
        except BitGoError as exc:
            log.warning("settlement_signing_failed", error=exc.message)
            return {
                "settlement": record.external_id,
                "outcome": "signing failed",
                "error": exc.message,
            }
    if record.status is not SettlementStatus.PENDING:
        return {"settlement": record.external_id, "outcome": record.status.value}
    outcome = _post(client, record)
    if outcome.get("outcome") == "rejected":
        refused.update(record.amounts)
    return outcome


@app.task(name="workers.settlement.run_settlement", bind=True)
def run_settlement(self: Any) -> dict[str, Any]:
    """Settle every unsettled trade: one settlement after another while each ends.

    A rejection returns its trades to be settled one connection at a time, so the run
    goes on with the others; what BitGo has not finished waits for its retry.
    """
    client = bitgo()
    if client is None:
        return report(self, NOT_CONFIGURED)
    if settings().bitgo_express_url is None or settings().bitgo_wallet_id is None:
        client.close()
        return report(self, {"skipped": "BITGO_EXPRESS_URL or BITGO_WALLET_ID not set"})
    done: list[dict[str, Any]] = []
    refused: set[str] = set()
    with client:
        for _ in range(MAX_PER_RUN):
            outcome = _settle_next(client, refused)
            if outcome is None:
                break
            done.append(outcome)
            if outcome["outcome"] not in _FINAL:
                break
    if not done:
        return report(self, {"outcome": "nothing to settle"})
    if len(done) == 1:
        return report(self, done[0])
    outcomes = ",".join(str(d["outcome"]) for d in done)
    return report(self, {**done[-1], "settlements": len(done), "outcomes": outcomes})

"""Platform hooks: each outbox event POSTed to PLATFORM_WEBHOOK_URL, signed, with backoff."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from sqlalchemy.exc import InterfaceError, OperationalError

from models import outbox
from models.moments import iso
from models.outbox import EventStatus, OutboxEvent
from workers.celery import app
from workers.process import report, transaction
from workers.settings import settings

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-OES-Signature"
TIMESTAMP_HEADER = "X-OES-Timestamp"
EVENT_HEADER = "X-OES-Event-Id"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def body(event: OutboxEvent) -> bytes:
    """What the platform receives: the event's id, type and time around its payload."""
    return json.dumps(
        {
            "id": str(event.id),
            "type": event.topic,
            "createdAt": iso(event.created_at),
            "data": event.payload,
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class Attempt:
    ok: bool
    retriable: bool
    error: str | None = None


def post(url: str, secret: str, timeout: float, event: OutboxEvent) -> Attempt:
    """POST one event; network errors, timeouts, 408, 429 and 5xx are worth retrying."""
    raw = body(event)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "oes-partner",
        EVENT_HEADER: str(event.id),
        "Idempotency-Key": str(event.id),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, raw),
    }
    try:
        answer = httpx.post(url, content=raw, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Attempt(ok=False, retriable=True, error=f"{type(exc).__name__}: {exc}")
    if answer.is_success:
        return Attempt(ok=True, retriable=False)
    error = f"HTTP {answer.status_code}: {answer.text[:200]}"
    retriable = answer.status_code >= 500 or answer.status_code in (408, 429)
    return Attempt(ok=False, retriable=retriable, error=error)


# PostgreSQL restarting or unreachable: the task itself comes back with a growing delay,
# rather than leaving the event to the relay sweep.
DATABASE_DOWN = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 10,
}


@app.task(name="workers.hooks.deliver", **DATABASE_DOWN)
def deliver(event_id: str) -> str:
    """Deliver one outbox event; quiet when it is already delivered or in other hands."""
    s = settings()
    ident = uuid.UUID(event_id)
    with transaction() as session:
        event = outbox.claim(session, ident)
        if event is None:
            log.info("hook_skipped", event_id=event_id, why="not pending or being delivered")
            return "skipped"
        if s.hook_url is None or s.hook_secret is None:
            outbox.delivered(session, ident, locally=True)
            return "delivered_locally"
        attempt = post(s.hook_url, s.hook_secret.value, s.hook_timeout, event)
        if attempt.ok:
            outbox.delivered(session, ident)
            log.info("hook_delivered", event_id=event_id, topic=event.topic)
            return "delivered"
        failure = outbox.failed(
            session,
            event,
            error=attempt.error or "",
            retriable=attempt.retriable,
            policy=outbox.RetryPolicy(
                max_attempts=s.hook_max_attempts, base=s.hook_backoff, cap=s.hook_backoff_max
            ),
        )
        log.warning(
            "hook_failed",
            event_id=event_id,
            attempt=failure.attempt,
            error=attempt.error,
            status=failure.status.value,
            retry_in=failure.retry_in,
        )
    if failure.retry_in is not None:
        deliver.apply_async((event_id,), countdown=failure.retry_in)
    return failure.status.value


@app.task(name="workers.hooks.deliver_many", **DATABASE_DOWN)
def deliver_many(event_ids: list[str]) -> str:
    """Deliver a batch: recorded at once when no webhook is set, else one task per event."""
    if settings().hook_url is None:
        with transaction() as session:
            done = outbox.delivered_locally(session, [uuid.UUID(i) for i in event_ids])
        return f"{done} delivered_locally"
    for event_id in event_ids:
        deliver.delay(event_id)
    return f"{len(event_ids)} queued"


@app.task(name="workers.hooks.redrive_dead", bind=True, **DATABASE_DOWN)
def redrive_dead(self: Any, event_ids: list[str] | None = None) -> dict[str, Any]:
    """Send dead letters (all, or the given ids) back for delivery."""
    ids = [uuid.UUID(i) for i in event_ids] if event_ids else None
    with transaction() as session:
        revived = outbox.redrive(session, ids)
    return report(self, {"redriven": len(revived)})


__all__ = ["EventStatus", "deliver", "deliver_many", "redrive_dead", "signature"]

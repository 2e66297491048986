"""Prometheus metrics and the middleware that logs and counts every request."""

from __future__ import annotations

import time
import uuid

import structlog
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "oes_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
LATENCY = Histogram(
    "oes_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LOCK_WAIT_SECONDS = Histogram(
    "oes_lock_wait_seconds",
    "Time spent waiting for per-id locks",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
LOCK_TIMEOUTS = Counter("oes_lock_timeouts_total", "Requests refused because a lock stayed busy")
REPLAYS_REFUSED = Counter("oes_jwt_replays_refused_total", "Tokens refused because jti was seen")
TOKENS_REFUSED = Counter("oes_jwt_refused_total", "Tokens refused for any reason", ["reason"])
READY = Gauge(
    "oes_ready", "1 when the dependency answered at the last scrape or /readyz", ["dependency"]
)
INVARIANT_VIOLATIONS = Counter(
    "oes_invariant_violations_total", "Requests stopped because stored state broke an invariant"
)
TRANSFERS = Gauge("oes_transfers", "Transfers by kind and state", ["kind", "status"])
OUTBOX_BACKLOG = Gauge("oes_outbox_backlog", "Outbox events not yet delivered")
STALE_RESERVATIONS = Gauge(
    "oes_stale_reservations", "Reserved transfers older than OES_STALE_AFTER"
)
DEAD_LETTERS = Gauge("oes_outbox_dead_letters", "Outbox events given up on, awaiting a re-drive")
TASK_LAST_RUN = Gauge(
    "oes_task_last_run_timestamp_seconds", "When each worker task last finished", ["task"]
)
BALANCE_DRIFTS = Gauge(
    "oes_balance_drifts", "Accounts whose balance differed from BitGo's at the last reconcile"
)
OPEN_SETTLEMENTS = Gauge("oes_settlements_open", "Settlements not yet completed or rejected")
SETTLEMENT_CONFLICTS = Gauge(
    "oes_settlement_conflicts", "Settlements stopped by a 409 from BitGo, for an operator"
)


log = structlog.get_logger("oes.http")


class ObservabilityMiddleware:
    """Gives each request an id, logs one line for it and records its metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_of(scope)
            method = scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(elapsed)
            log.info(
                "request",
                method=method,
                path=scope["path"],
                route=route,
                status=status,
                ms=round(elapsed * 1000, 2),
            )


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"

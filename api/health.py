"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.observability import (
    BALANCE_DRIFTS,
    DEAD_LETTERS,
    OPEN_SETTLEMENTS,
    OUTBOX_BACKLOG,
    READY,
    SETTLEMENT_CONFLICTS,
    STALE_RESERVATIONS,
    TASK_LAST_RUN,
    TRANSFERS,
)
from api.resources import resources
from models.states import Kind, Status

log = structlog.get_logger(__name__)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _checks(request: Request) -> dict[str, str]:
    """Whether PostgreSQL and Redis answer, each "ok" or why not; kept in ``oes_ready`` too."""
    rt = resources(request)
    checks: dict[str, str] = {}
    try:
        async with rt.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready, whatever its type
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        await rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure means not ready, whatever its type
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    for dependency, outcome in checks.items():
        READY.labels(dependency).set(1 if outcome == "ok" else 0)
    return checks


async def readyz(request: Request) -> Response:
    checks = await _checks(request)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


_GAUGES = text(
    """
    SELECT 'transfers' AS what, kind, status, count(*) FROM transfers GROUP BY kind, status
    UNION ALL
    SELECT 'outbox', status, NULL, count(*) FROM outbox
     WHERE status IN ('pending', 'dead') GROUP BY status
    UNION ALL
    SELECT 'settlements', status, NULL, count(*) FROM settlements
     WHERE status IN ('preparing', 'pending', 'conflict') GROUP BY status
    UNION ALL
    SELECT 'task', task, summary->>'drifts', extract(epoch FROM finished_at)::bigint
      FROM (SELECT DISTINCT ON (task) task, summary, finished_at FROM task_runs
            ORDER BY task, finished_at DESC) AS last
    UNION ALL
    SELECT 'stale', NULL, NULL, count(*) FROM transfers
     WHERE status = 'reserved' AND updated_at < now() - make_interval(secs => :stale_after)
    """
)


async def metrics(request: Request) -> Response:
    """Prometheus text; readiness and the state gauges are read at scrape time."""
    rt = resources(request)
    if (await _checks(request))["database"] != "ok":
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    try:
        async with rt.engine.connect() as conn:
            rows: list[Any] = list(
                await conn.execute(_GAUGES, {"stale_after": rt.settings.stale_after})
            )
    except Exception as exc:  # the process metrics matter most when the database is down
        log.warning("metrics_state_unavailable", error=type(exc).__name__)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    counts = {(k, s): 0 for k in Kind for s in Status}
    outbox = {"pending": 0, "dead": 0}
    settlements = {"preparing": 0, "pending": 0, "conflict": 0}
    for what, name, detail, count in rows:
        if what == "transfers":
            counts[(Kind(name), Status(detail))] = count
        elif what == "outbox":
            outbox[name] = count
        elif what == "settlements":
            settlements[name] = count
        elif what == "task":
            TASK_LAST_RUN.labels(name).set(count)
            if name == "workers.remediation.reconcile_balances" and detail is not None:
                BALANCE_DRIFTS.set(int(detail))
        else:
            STALE_RESERVATIONS.set(count)
    OUTBOX_BACKLOG.set(outbox["pending"])
    DEAD_LETTERS.set(outbox["dead"])
    OPEN_SETTLEMENTS.set(settlements["preparing"] + settlements["pending"])
    SETTLEMENT_CONFLICTS.set(settlements["conflict"])
    for (kind, status), count in counts.items():
        TRANSFERS.labels(kind.value, status.value).set(count)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

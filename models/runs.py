"""What each periodic task did last: its one-line summary, kept for operators and /metrics."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


def record(session: Session, *, task: str, task_id: str | None, summary: dict[str, Any]) -> None:
    session.execute(
        text(
            "INSERT INTO task_runs (task, task_id, summary) "
            "VALUES (:task, :task_id, CAST(:summary AS jsonb))"
        ),
        {"task": task, "task_id": task_id, "summary": json.dumps(summary, default=str)},
    )


def prune(session: Session, *, keep_days: int, limit: int = 10_000) -> int:
    """Forget runs older than ``keep_days``, a bounded batch at a time."""
    deleted = session.execute(
        text(
            "DELETE FROM task_runs WHERE id IN (SELECT id FROM task_runs"
            " WHERE finished_at < now() - make_interval(days => :days) LIMIT :limit)"
            " RETURNING id"
        ),
        {"days": keep_days, "limit": limit},
    )
    return len(deleted.all())

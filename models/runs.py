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

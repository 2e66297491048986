"""Times as the gateway writes them for others: ISO 8601, UTC, milliseconds, a Z."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, whatever time zone the database session uses."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

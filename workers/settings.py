"""The worker processes' settings, read once from the environment."""

from __future__ import annotations

import os


def broker_url() -> str:
    """Celery's broker: the same Redis as the web process (``REDIS_URL``)."""
    url = os.environ.get("REDIS_URL", "").strip() or "redis://127.0.0.1:6379/0"
    # Celery spells a unix-socket Redis differently from redis-py.
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://") :]
    return url

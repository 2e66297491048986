"""The OpenAPI document (placeholder until written out in full)."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route


def document(routes: list[Route]) -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "oes-partner", "version": "0.1.0"}, "paths": {}}

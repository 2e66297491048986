"""The dashboard's one look at BitGo: what BitGo holds for an allocation or deallocation id.

Read-only, one GET, no retries: an operator is watching and can ask again. The web
process builds no worker BitGo client (it imports nothing of ``workers`` but the
publisher), so this is the whole of it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from api.settings import Settings

TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_SHOWN = 20_000  # characters of BitGo's answer kept for the page


@dataclass(frozen=True)
class Lookup:
    """What BitGo answered, or why there is no answer."""

    configured: bool
    http_status: int | None = None
    status: str | None = None  # the allocation's own status field, when BitGo gave one
    body: str | None = None
    error: str | None = None


def configured(settings: Settings) -> bool:
    return settings.bitgo_access_token is not None and settings.bitgo_enterprise_id is not None


async def allocation(settings: Settings, transfer_id: uuid.UUID) -> Lookup:
    """``GET …/enterprises/{BITGO_ENTERPRISE_ID}/partners/allocations/{id}``, as the sweep asks."""
    if settings.bitgo_access_token is None or settings.bitgo_enterprise_id is None:
        return Lookup(configured=False)
    enterprise = quote(settings.bitgo_enterprise_id, safe="")
    url = (
        f"{settings.bitgo_api_url.rstrip('/')}/api/network/v1/enterprises/{enterprise}"
        f"/partners/allocations/{transfer_id}"
    )
    headers = {
        "Authorization": f"Bearer {settings.bitgo_access_token.value}",
        "Accept": "application/json",
        "User-Agent": "oes-partner dashboard",
    }
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            answer = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return Lookup(configured=True, error=f"BitGo could not be reached ({type(exc).__name__})")
    try:
        parsed = answer.json()
    except ValueError:
        return Lookup(configured=True, http_status=answer.status_code, body=answer.text[:MAX_SHOWN])
    record = parsed.get("allocation", parsed) if isinstance(parsed, dict) else parsed
    status = record.get("status") if isinstance(record, dict) else None
    return Lookup(
        configured=True,
        http_status=answer.status_code,
        status=str(status) if status is not None and answer.is_success else None,
        body=json.dumps(parsed, indent=2, sort_keys=True)[:MAX_SHOWN],
    )

"""Exchange-facing routes under /internal/v1, guarded by OES_INTERNAL_TOKEN."""

from __future__ import annotations

import hmac
import re
import uuid
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import bodies
from api.bitgo_routes import Endpoint
from api.errors import BadRequest, Unauthorized
from api.rendering import iso, render_transfer
from api.resources import resources
from models import connections, trades, transfers
from models.errors import NotFoundError
from models.states import Kind, Status

MAX_PAGE = 500
E = TypeVar("E", Status, Kind)


def internal(endpoint: Endpoint) -> Endpoint:
    """Refuse the call with 401 unless it carries ``Authorization: Bearer $OES_INTERNAL_TOKEN``."""

    @wraps(endpoint)
    async def checked(request: Request) -> Response:
        expected = resources(request).settings.internal_token.value
        given = ",".join(request.headers.getlist("authorization"))  # two headers never match
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            raise Unauthorized("Missing or wrong internal token")
        return await endpoint(request)

    return checked


@internal
async def issue_connection_token(request: Request) -> Response:
    body = bodies.json_object(await bodies.read_json(request))
    client = bodies.required_text(body, "partnersClientId", "partnerClientId")
    rt = resources(request)
    issued = await rt.run(
        connections.issue_token,
        partners_client_id=client,
        ttl=timedelta(seconds=rt.settings.connection_token_ttl),
    )
    return JSONResponse(
        {
            "connectionToken": issued.token,
            "partnersClientId": issued.partners_client_id,
            "expiresAt": iso(issued.expires_at),
        },
        headers={"Cache-Control": "no-store"},  # a secret: no cache may keep it
    )


@internal
async def get_account(request: Request) -> Response:
    ident = request.path_params["id"]
    if not bodies.storable(ident):
        raise NotFoundError("Account not found")
    view = await resources(request).run(connections.account, ident)
    record = view.connection
    return JSONResponse(
        {
            "partnersConnectionId": record.partners_connection_id,
            "partnersClientId": record.partners_client_id,
            "connectionId": str(record.connection_id),
            "clientId": str(record.client_id),
            "active": record.active,
            "balances": {
                currency: {
                    "available": str(b.available),
                    "pendingIn": str(b.pending_in),
                    "held": str(b.held),
                }
                for currency, b in view.balances.items()
            },
        }
    )


def _enum_param(request: Request, name: str, enum: type[E]) -> E | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return enum(raw)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise BadRequest(f"{name} must be one of {choices}") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


_CURSOR = re.compile(r"([0-9]{1,17})_([0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})")


def _cursor(raw: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (createdAt, id) a page ended at, from its URL-safe ``<microseconds>_<uuid>``."""
    if not raw:
        return None
    found = _CURSOR.fullmatch(raw)
    try:
        if found is None:
            raise ValueError(raw)
        return _EPOCH + int(found[1]) * _MICROSECOND, uuid.UUID(found[2])
    except (ValueError, OverflowError):
        raise BadRequest("cursor is malformed; pass back nextCursor as given") from None


def _cursor_of(record: transfers.TransferRecord) -> str:
    return f"{(record.created_at - _EPOCH) // _MICROSECOND}_{record.transfer_id}"


@internal
async def list_transfers(request: Request) -> Response:
    params = request.query_params
    connection_id = None
    if params.get("connectionId"):
        connection_id = bodies.path_uuid(params["connectionId"])
        if connection_id is None:
            raise BadRequest("connectionId must be a UUID")
    raw_limit = params.get("limit", "100")
    if not re.fullmatch(r"[0-9]{1,4}", raw_limit) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    limit = int(raw_limit)
    records = await resources(request).run(
        transfers.listing,
        status=_enum_param(request, "status", Status),
        kind=_enum_param(request, "kind", Kind),
        connection_id=connection_id,
        limit=limit,
        after=_cursor(params.get("cursor")),
    )
    page = [{"kind": r.kind.value, **render_transfer(r)} for r in records]
    next_cursor = _cursor_of(records[-1]) if len(records) == limit else None
    return JSONResponse({"transfers": page, "nextCursor": next_cursor})


@internal
async def apply_trade(request: Request) -> Response:
    parsed = bodies.trade_request(await bodies.read_json(request))
    record = await resources(request).locked(
        f"trade:{parsed.external_id}",
        trades.apply,
        request=parsed,
        rules=resources(request).rules,
    )
    return JSONResponse(
        {
            "externalId": record.external_id,
            "partnersConnectionId": record.partners_connection_id,
            "connectionId": str(record.connection_id),
            "deltas": {c: str(d) for c, d in sorted(record.deltas.items())},
            "settled": record.settled_at is not None,
            "createdAt": iso(record.created_at),
        }
    )


def routes() -> list[Route]:
    return [
        Route("/internal/v1/connection-tokens", issue_connection_token, methods=["POST"]),
        Route("/internal/v1/accounts/{id}", get_account, methods=["GET"]),
        Route("/internal/v1/transfers", list_transfers, methods=["GET"]),
        Route("/internal/v1/trades", apply_trade, methods=["POST"]),
    ]

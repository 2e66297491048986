"""The routes BitGo calls: connections, reserve, clear/release, status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import bodies, locks
from api.errors import Unauthorized
from api.observability import REPLAYS_REFUSED, TOKENS_REFUSED
from api.runtime import Runtime
from api.signatures import TokenRefused
from models import connections, transfers
from models.connections import ConnectionRecord
from models.errors import NotFound
from models.states import Action, Kind
from models.transfers import TransferRecord

Endpoint = Callable[[Request], Awaitable[Response]]


def runtime(request: Request) -> Runtime:
    value: Runtime = request.app.state.runtime
    return value


def signed(endpoint: Endpoint) -> Endpoint:
    """Refuse the call with 401 unless it carries a fresh, valid BitGo JWT."""

    @wraps(endpoint)
    async def checked(request: Request) -> Response:
        try:
            await runtime(request).verifier.verify(request.headers.get("x-bitgo-signature"))
        except TokenRefused as exc:
            reason = str(exc)
            if reason == "Token replayed":
                REPLAYS_REFUSED.inc()
            TOKENS_REFUSED.labels(reason.split(":")[0]).inc()
            raise Unauthorized(reason) from None
        return await endpoint(request)

    return checked


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, whatever time zone the database session uses."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_transfer(record: TransferRecord) -> dict[str, Any]:
    """The record as BitGo reads it (SPEC §3.5)."""
    out: dict[str, Any] = {
        record.kind.id_field: str(record.transfer_id),
        f"partners{record.kind.label}Id": str(record.partners_transfer_id),
        "amount": {"currency": record.currency, "quantity": str(record.quantity)},
        "clientId": str(record.client_id),
        "connectionId": str(record.connection_id),
        "partnersClientId": record.partners_client_id,
        "partnersConnectionId": record.partners_connection_id,
        "status": record.status.value,
        "createdAt": iso(record.created_at),
        "updatedAt": iso(record.updated_at),
    }
    if record.rejection_reason is not None:
        out["rejectionReason"] = record.rejection_reason
    return out


def render_connection(record: ConnectionRecord) -> dict[str, Any]:
    return {
        "clientId": str(record.client_id),
        "connectionId": str(record.connection_id),
        "partnersClientId": record.partners_client_id,
        "partnersConnectionId": record.partners_connection_id,
    }


async def locked(http: Request, key: str, action: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a domain action in one transaction while holding the Redis lock on ``key``."""
    rt = runtime(http)
    async with locks.held(rt.redis, key, wait=rt.settings.lock_wait, ttl=rt.settings.lock_ttl):
        return await rt.run(action, **kwargs)


@signed
async def link_connection(request: Request) -> Response:
    body = bodies.json_object(await bodies.read_json(request))
    connection_id = bodies.uuid_field(body, "connectionId")
    client_id = bodies.uuid_field(body, "clientId")
    token = bodies.required_text(body, "connectionToken")
    wallet = bodies.text_field(body, "clientWalletId")
    record = await locked(
        request,
        f"connection:{connection_id}",
        connections.link,
        connection_id=connection_id,
        client_id=client_id,
        token=token,
        client_wallet_id=wallet,
    )
    return JSONResponse(render_connection(record))


def _reserve(kind: Kind) -> Endpoint:
    @signed
    async def reserve(request: Request) -> Response:
        parsed = bodies.reserve_request(kind, await bodies.read_json(request))
        record = await locked(
            request,
            f"transfer:{parsed.transfer_id}",
            transfers.reserve,
            request=parsed,
            rules=runtime(request).rules,
        )
        return JSONResponse(render_transfer(record))

    reserve.__name__ = f"reserve_{kind.value}"
    return reserve


def _settle(kind: Kind, action: Action) -> Endpoint:
    @signed
    async def settle(request: Request) -> Response:
        transfer_id = bodies.path_uuid(request.path_params["id"])
        if transfer_id is None:
            raise NotFound(f"{kind.label} not found")
        record = await locked(
            request,
            f"transfer:{transfer_id}",
            transfers.settle,
            kind=kind,
            transfer_id=transfer_id,
            action=action,
        )
        return JSONResponse(render_transfer(record))

    settle.__name__ = f"{action.value}_{kind.value}"
    return settle


def _status(kind: Kind) -> Endpoint:
    @signed
    async def status(request: Request) -> Response:
        transfer_id = bodies.path_uuid(request.path_params["id"])
        if transfer_id is None:
            raise NotFound(f"{kind.label} not found")
        record = await runtime(request).run(transfers.get, kind=kind, transfer_id=transfer_id)
        return JSONResponse(render_transfer(record))

    status.__name__ = f"get_{kind.value}"
    return status


def routes() -> list[Route]:
    table = [Route("/bitgo/v1/connections", link_connection, methods=["POST"])]
    for kind in Kind:
        table.append(Route(f"/bitgo/v1/{kind.value}s", _reserve(kind), methods=["POST"]))
        for action in (Action.CLEAR, Action.RELEASE):
            table.append(
                Route(
                    f"/bitgo/v1/{kind.value}/{{id}}/{action.value}",
                    _settle(kind, action),
                    methods=["PUT"],
                )
            )
        table.append(Route(f"/bitgo/v1/{kind.value}/{{id}}", _status(kind), methods=["GET"]))
    return table

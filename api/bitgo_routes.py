"""The routes BitGo calls: connections, reserve, clear/release, status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import bodies
from api.errors import Unauthorized
from api.observability import REPLAYS_REFUSED, TOKENS_REFUSED
from api.rendering import render_connection, render_transfer
from api.resources import resources
from api.signatures import TokenRefusedError
from models import connections, transfers
from models.errors import NotFoundError
from models.states import Action, Kind

Endpoint = Callable[[Request], Awaitable[Response]]


def signed(endpoint: Endpoint) -> Endpoint:
    """Refuse the call with 401 unless it carries a fresh, valid BitGo JWT."""

    @wraps(endpoint)
    async def checked(request: Request) -> Response:
        try:
            tokens = request.headers.getlist("x-bitgo-signature")
            if len(tokens) > 1:
                raise TokenRefusedError("More than one X-BitGo-Signature header")
            await resources(request).verifier.verify(tokens[0] if tokens else None)
        except TokenRefusedError as exc:
            reason = str(exc)
            if reason == "Token replayed":
                REPLAYS_REFUSED.inc()
            TOKENS_REFUSED.labels(reason.split(":")[0]).inc()
            raise Unauthorized(reason) from None
        return await endpoint(request)

    return checked


@signed
async def link_connection(request: Request) -> Response:
    body = bodies.json_object(await bodies.read_json(request))
    connection_id = bodies.uuid_field(body, "connectionId")
    client_id = bodies.uuid_field(body, "clientId")
    token = bodies.required_text(body, "connectionToken")
    wallet = bodies.text_field(body, "clientWalletId")
    record = await resources(request).locked(
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
        record = await resources(request).locked(
            f"transfer:{parsed.transfer_id}",
            transfers.reserve,
            request=parsed,
            rules=resources(request).rules,
        )
        return JSONResponse(render_transfer(record))

    reserve.__name__ = f"reserve_{kind.value}"
    return reserve


def _settle(kind: Kind, action: Action) -> Endpoint:
    @signed
    async def settle(request: Request) -> Response:
        transfer_id = bodies.path_uuid(request.path_params["id"])
        if transfer_id is None:
            raise NotFoundError(f"{kind.label} not found")
        record = await resources(request).locked(
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
            raise NotFoundError(f"{kind.label} not found")
        record = await resources(request).run(transfers.get, kind=kind, transfer_id=transfer_id)
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
    for route in table:
        # Starlette answers HEAD for every GET; a HEAD would spend a token for nothing.
        (route.methods or set()).discard("HEAD")
    return table

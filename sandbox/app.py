"""The sandbox: an ASGI app that plays BitGo toward the gateway and toward a client."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.gateway import Gateway, NoAnswer
from sandbox.store import (
    FAULT_MODES,
    Allocation,
    Connection,
    Fault,
    Settlement,
    Store,
    hmac_hex,
    now,
    requested_fault,
)

CLIENT = "/api/network/v1/enterprises/{enterprise}/clients/connections"
PARTNER = "/api/network/v1/enterprises/{enterprise}/partners"
_QUANTITY = re.compile(r"[1-9][0-9]{0,77}")
_SIGNED = ("amount", "clientExternalId", "nonce", "notes")
# Well known on purpose, like stripe-mock's test keys: the sandbox guards nothing of value.
SANDBOX_ACCESS_TOKEN = "sandbox-access-token"  # noqa: S105
SANDBOX_ENTERPRISE = "sandbox-partner"
SANDBOX_WALLET = "sandbox-trading-wallet"


class Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise Refused(400, "Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "Body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise Refused(400, f"{name} must be a non-empty string")
    return value


def _amount(body: dict[str, Any]) -> tuple[str, int]:
    amount = body.get("amount")
    if not isinstance(amount, dict):
        raise Refused(400, "amount must be an object with currency and quantity")
    currency = _text(amount, "currency") or ""
    quantity = amount.get("quantity")
    if not isinstance(quantity, str) or not _QUANTITY.fullmatch(quantity):
        raise Refused(400, "amount.quantity must be a positive integer string in base units")
    return currency, int(quantity)


def _partner(request: Request) -> Store:
    """The partner routes: Bearer access token and the partner's own enterprise."""
    store = _store(request)
    if request.headers.get("authorization") != f"Bearer {store.access_token}":
        raise Refused(401, "Invalid access token")
    enterprise = request.path_params.get("enterprise")
    if enterprise is not None and enterprise != store.partner_enterprise_id:
        raise Refused(403, "Not your enterprise")
    return store


# --- client routes (seed 000) -------------------------------------------------------------


async def create_connection(request: Request) -> Response:
    store = _store(request)
    enterprise = request.path_params["enterprise"]
    if enterprise not in store.client_keys:
        raise Refused(401, "Unknown client enterprise; register it at POST /sandbox/clients")
    body = await _body(request)
    token = _text(body, "connectionToken") or ""
    connection_id = str(uuid.uuid4())
    client_id = store.client_ids[enterprise]
    try:
        status, answer = await _gateway(request).call(
            "POST",
            "/bitgo/v1/connections",
            {"clientId": client_id, "connectionId": connection_id, "connectionToken": token},
        )
    except NoAnswer as exc:
        raise Refused(502, f"Partner did not answer: {exc}") from None
    if status != 200:
        raise Refused(422, f"Partner refused the connection: {answer.get('error')}")
    connection = store.add_connection(
        Connection(
            id=connection_id,
            enterprise_id=enterprise,
            client_id=client_id,
            partners_client_id=str(answer["partnersClientId"]),
            partners_connection_id=str(answer["partnersConnectionId"]),
        )
    )
    return JSONResponse({"connection": connection.render()})


def _signed_fields(body: dict[str, Any], connection_id: str, enterprise: str) -> dict[str, Any]:
    fields = {k: body[k] for k in _SIGNED if body.get(k) is not None}
    return {**fields, "connectionId": connection_id, "enterpriseId": enterprise}


def _signing(kind: str) -> Any:
    async def signing(request: Request) -> Response:
        """The payload a client signs: its fields plus connectionId and enterpriseId."""
        body = await _body(request)
        _amount(body)
        _text(body, "clientExternalId")
        body.setdefault("nonce", uuid.uuid4().hex)
        p = request.path_params
        payload = json.dumps(
            _signed_fields(body, p["connection"], p["enterprise"]), separators=(",", ":")
        )
        return JSONResponse({"payload": payload, "nonce": body["nonce"]})

    signing.__name__ = f"sign_{kind}"
    return signing


def _transfer(kind: str) -> Any:
    async def transfer(request: Request) -> Response:
        store = _store(request)
        enterprise, connection_id = (
            request.path_params["enterprise"],
            request.path_params["connection"],
        )
        key = store.client_keys.get(enterprise)
        if key is None:
            raise Refused(401, "Unknown client enterprise")
        connection = store.connections.get(connection_id)
        if connection is None or connection.enterprise_id != enterprise:
            raise Refused(404, "Connection not found")
        body = await _body(request)
        currency, quantity = _amount(body)
        external = _text(body, "clientExternalId") or ""
        nonce = _text(body, "nonce") or ""
        notes = _text(body, "notes", required=False)
        payload = _text(body, "payload") or ""
        signature = _text(body, "signature") or ""
        try:
            signed = json.loads(payload)
        except ValueError:
            signed = None
        if signed != _signed_fields(body, connection_id, enterprise):
            raise Refused(400, "payload does not match the request")
        if signature != hmac_hex(key, payload):
            raise Refused(401, "Invalid signature")
        fields = {k: body.get(k) for k in _SIGNED}
        requested = None
        if "x-sandbox-fault" in request.headers:
            requested = requested_fault(request.headers["x-sandbox-fault"])
            if requested is None:
                raise Refused(
                    400, f"X-Sandbox-Fault must be one of {', '.join(FAULT_MODES)} (delay:SECONDS)"
                )
        async with store.locks[f"{enterprise}:{kind}:{external}"]:
            owner = store.nonces.get((enterprise, nonce))
            if owner is not None and owner != f"{kind}:{external}":
                raise Refused(400, "nonce already used")
            existing = store.by_external.get((enterprise, kind, external))
            if existing is not None:
                allocation = store.allocations[existing]
                if allocation.request != fields or allocation.connection_id != connection_id:
                    raise Refused(409, "clientExternalId already used with different parameters")
                if not (allocation.status == "reserved" and allocation.retriable):
                    return _answer(allocation)
            else:
                allocation = Allocation(
                    id=str(uuid.uuid4()),
                    type=kind,
                    currency=currency,
                    quantity=quantity,
                    connection_id=connection_id,
                    enterprise_id=enterprise,
                    client_external_id=external,
                    initiated_by=f"user-{enterprise}",
                    notes=notes,
                    request=fields,
                )
                store.add_allocation(allocation, nonce)
            fault = store.take_fault(kind, requested)
            await _drive(_gateway(request), store, allocation, fault)
            return _answer(allocation)

    transfer.__name__ = f"create_{kind}"
    return transfer


async def _drive(gateway: Gateway, store: Store, a: Allocation, fault: Fault | None) -> None:
    """Reserve at the gateway, then clear (or misbehave as ``fault`` says)."""
    connection = store.connections[a.connection_id]
    label = a.type.capitalize()
    reserve = {
        f"{a.type}Id": a.id,
        "amount": {"currency": a.currency, "quantity": str(a.quantity)},
        "clientId": connection.client_id,
        "connectionId": connection.id,
        "partnersClientId": connection.partners_client_id,
        "partnersConnectionId": connection.partners_connection_id,
    }
    try:
        status, answer = await gateway.call("POST", f"/bitgo/v1/{a.type}s", reserve, fault=fault)
        if status != 200:
            _release(store, a, f"Partner refused: {answer.get('error')}")
            return
        a.partner_external_id = answer.get(f"partners{label}Id")
        state = answer.get("status")
        if state == "rejected":
            _release(store, a, str(answer.get("rejectionReason") or "Rejected by partner"))
            return
        if state in ("cleared", "released"):  # a re-send after a lost answer: take its word
            store.move(a, state, reason=None if state == "cleared" else "Released by partner")
            return
        mode = fault.mode if fault else None
        if mode == "no_clear":  # BitGo settles on its side; the clear call is lost
            store.move(a, "cleared")
            return
        action = "release" if mode == "release" else "clear"
        status, answer = await gateway.call(
            "PUT", f"/bitgo/v1/{a.type}/{a.id}/{action}", fault=fault, first=False
        )
    except NoAnswer as exc:
        a.retriable, a.reason = True, f"Partner did not answer: {exc}"
        store.save(a)
        return
    if status == 200 and answer.get("status") == "cleared":
        store.move(a, "cleared")
    else:
        reason = (
            "Released by the sandbox (fault injection)"
            if action == "release"
            else (f"Partner answered {status}: {answer.get('error') or answer.get('status')}")
        )
        _release(store, a, reason)


def _release(store: Store, a: Allocation, reason: str) -> None:
    store.move(a, "released", reason=reason)


def _answer(a: Allocation) -> Response:
    """Seed 000's answers: 200 cleared, 422 released with an error, 500 reserved, retriable."""
    if a.status == "cleared":
        return JSONResponse({"allocation": a.render()})
    if a.status == "released":
        return JSONResponse({"allocation": a.render(), "error": a.reason}, status_code=422)
    return JSONResponse(
        {"allocation": a.render(), "error": a.reason or "Allocation did not complete"},
        status_code=500,
    )


# --- partner routes (BITGO.md) --------------------------------------------------------------


async def list_allocations(request: Request) -> Response:
    store = _partner(request)
    q = request.query_params
    filters = {
        name: set(q.getlist(name))
        for name in ("allocationIds", "types", "statuses", "currencies", "connectionIds")
    }
    fields = {
        "allocationIds": "id",
        "types": "type",
        "statuses": "status",
        "currencies": "currency",
        "connectionIds": "connection_id",
    }
    rows = [
        a
        for a in store.allocations.values()
        if all(not f or getattr(a, fields[n]) in f for n, f in filters.items())
    ]
    try:
        page, size = int(q.get("pageNumber", "0")), int(q.get("pageSize", "100"))
    except ValueError:
        raise Refused(400, "pageNumber and pageSize must be integers") from None
    if page < 0 or size < 1:
        raise Refused(400, "pageNumber must be >= 0 and pageSize >= 1")
    chosen = rows[page * size : (page + 1) * size]
    return JSONResponse({"allocations": [a.render(with_type=True) for a in chosen]})


async def get_allocation(request: Request) -> Response:
    store = _partner(request)
    allocation = store.allocations.get(request.path_params["id"])
    if allocation is None:
        raise Refused(404, "Allocation not found")
    return JSONResponse(allocation.render(with_type=True))


async def balances(request: Request) -> Response:
    store = _partner(request)
    network = {
        cid: {
            "clientId": c.client_id,
            "partnersConnectionId": c.partners_connection_id,
            "balances": {
                currency: {"available": str(b[0]), "held": str(b[1])}
                for currency, b in store.balances[cid].items()
            },
        }
        for cid, c in store.connections.items()
    }
    return JSONResponse({"networkBalances": network})


async def sign_payload(request: Request) -> Response:
    """BitGo Express: sign a payload with the partner's trading key (here, an HMAC key)."""
    store = _partner(request)
    body = await _body(request)
    _text(body, "walletId")
    payload = _text(body, "payload") or ""
    return JSONResponse({"payload": payload, "signature": hmac_hex(store.partner_key, payload)})


async def settle(request: Request) -> Response:
    store = _partner(request)
    body = await _body(request)
    external = _text(body, "externalId") or ""
    payload = _text(body, "payload") or ""
    if _text(body, "signature") != hmac_hex(store.partner_key, payload):
        raise Refused(401, "Invalid signature")
    try:
        signed = json.loads(payload)
    except ValueError:
        signed = None
    unsigned = {k: v for k, v in body.items() if k not in ("payload", "signature")}
    if signed != unsigned:
        raise Refused(400, "payload does not match the request")
    amounts = body.get("settlementAmounts")
    if not isinstance(amounts, dict):
        raise Refused(400, "settlementAmounts must be an object")
    existing = store.settlements.get(external)
    if existing is not None and existing.body != body:
        raise Refused(409, "externalId already used with a different body")
    if existing is not None and existing.status in ("completed", "rejected"):
        return JSONResponse({"settlement": existing.render(store.partner_enterprise_id)})
    settlement = existing or Settlement(
        id=str(uuid.uuid4()), external_id=external, body=body, status="pending"
    )
    settlement.status, settlement.reason, moved = _apply_settlement(store, amounts)
    settlement.updated_at = now()
    if settlement.status in ("completed", "rejected"):
        settlement.finalized_at = settlement.updated_at
    store.record_settlement(settlement, moved)
    return JSONResponse({"settlement": settlement.render(store.partner_enterprise_id)})


Moved = list[tuple[str, str]]  # the (connectionId, currency) balances a settlement changed


def _apply_settlement(store: Store, amounts: dict[str, Any]) -> tuple[str, str | None, Moved]:
    if store.take_fault("settlement", None) is not None:
        return "failed", "Failed by the sandbox (fault injection)", []
    changes: list[tuple[str, str, int]] = []
    for connection_id, per_currency in amounts.items():
        if connection_id not in store.connections or not isinstance(per_currency, dict):
            return "rejected", f"Unknown connection {connection_id}", []
        for currency, raw in per_currency.items():
            if not isinstance(raw, str) or not re.fullmatch(r"-?[0-9]{1,78}", raw):
                return "rejected", f"Bad amount for {connection_id}/{currency}", []
            if store.balances[connection_id][currency][0] + int(raw) < 0:
                return "failed", f"Insufficient balance on {connection_id}/{currency}", []
            changes.append((connection_id, currency, int(raw)))
    for connection_id, currency, delta in changes:
        store.balances[connection_id][currency][0] += delta
    return "completed", None, [(c, currency) for c, currency, _ in changes]


# --- control ------------------------------------------------------------------------------


async def register_client(request: Request) -> Response:
    body = await _body(request) if await request.body() else {}
    enterprise, key = _store(request).register_client(_text(body, "enterpriseId", required=False))
    return JSONResponse({"enterpriseId": enterprise, "clientKey": key})


async def faults(request: Request) -> Response:
    store = _store(request)
    if request.method == "POST":
        store.faults.append(_fault_rule(await _body(request)))
    elif request.method == "DELETE":
        store.faults.clear()
    return JSONResponse({"faults": [f.render() for f in store.faults]})


async def list_settlements(request: Request) -> Response:
    store = _store(request)
    return JSONResponse(
        {
            "settlements": [
                {
                    **s.render(store.partner_enterprise_id),
                    "settlementAmounts": s.body.get("settlementAmounts"),
                }
                for s in store.settlements.values()
            ]
        }
    )


def _fault_rule(body: dict[str, Any]) -> Fault:
    mode = body.get("mode")
    if mode not in (*FAULT_MODES, "fail"):
        raise Refused(400, f"mode must be one of {', '.join(FAULT_MODES)}, fail")
    times = body.get("times", 1)
    if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 0):
        raise Refused(400, "times must be a whole number (0 or null: a standing rule)")
    seconds = body.get("seconds", 0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds <= 600:
        raise Refused(400, "seconds must be a number from 0 to 600")
    known = ("settlement",) if mode == "fail" else ("allocation", "deallocation")
    kinds = body.get("kinds", list(known))
    if not isinstance(kinds, list) or not kinds or not set(kinds) <= set(known):
        raise Refused(400, f"kinds must be a list drawn from {', '.join(known)}")
    return Fault(mode=mode, seconds=float(seconds), times=times or None, kinds=tuple(kinds))


async def on_refused(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, Refused):  # Starlette routes only Refused here
        raise exc
    return JSONResponse({"error": exc.error}, status_code=exc.status)


def create_sandbox_app(
    *,
    gateway_url: str,
    private_key: Path,
    partner_enterprise_id: str = SANDBOX_ENTERPRISE,
    access_token: str = SANDBOX_ACCESS_TOKEN,
    standing: list[Fault] | None = None,
    state: Path | None = None,
) -> Starlette:
    """The sandbox; ``state``: the SQLite file its state is kept in (None: memory only)."""
    if state is None:
        store = Store(partner_enterprise_id=partner_enterprise_id, access_token=access_token)
    else:
        store = Store.open(
            state, partner_enterprise_id=partner_enterprise_id, access_token=access_token
        )
    store.faults.extend(standing or [])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.gateway = Gateway(gateway_url, private_key)
        try:
            yield
        finally:
            await app.state.gateway.close()

    routes = [
        Route(CLIENT, create_connection, methods=["POST"]),
        Route(f"{PARTNER}/allocations", list_allocations, methods=["GET"]),
        Route(f"{PARTNER}/allocations/{{id}}", get_allocation, methods=["GET"]),
        Route(f"{PARTNER}/balances", balances, methods=["GET"]),
        Route(f"{PARTNER}/settlements", settle, methods=["POST"]),
        Route("/api/v2/ofc/signPayload", sign_payload, methods=["POST"]),
        Route("/sandbox/clients", register_client, methods=["POST"]),
        Route("/sandbox/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/sandbox/settlements", list_settlements, methods=["GET"]),
    ]
    for kind in ("allocation", "deallocation"):
        base = f"{CLIENT}/{{connection}}/{kind}s"
        routes.append(Route(base, _transfer(kind), methods=["POST"]))
        routes.append(Route(f"{base}/signing", _signing(kind), methods=["POST"]))
    app = Starlette(routes=routes, exception_handlers={Refused: on_refused}, lifespan=lifespan)
    app.state.store = store
    return app

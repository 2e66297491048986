"""The OpenAPI 3.1 document served at ``/openapi.json`` (SPEC §2, §3, §5, §9).

Every operation is described as data in ``OPERATIONS``, keyed by (method, path). The
document's ``paths`` are built from the application's route list, so a route added
without a description here stops the app from being built (``KeyError``).
"""

from __future__ import annotations

import copy
from typing import Any

from starlette.routing import Route

from models.states import Kind, Status

Json = dict[str, Any]
Key = tuple[str, str]

OPENAPI_PATH = "/openapi.json"
STR: Json = {"type": "string"}
UUID: Json = {"type": "string", "format": "uuid"}
TIME: Json = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"}
PARTNER_IDS = ("partnersClientId", "partnerClientId", "partnersConnectionId", "partnerConnectionId")


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def text(description: str = "") -> Json:
    """A non-empty string of at most 256 characters, as ``api.bodies.text_field`` accepts."""
    schema: Json = {"type": "string", "minLength": 1, "maxLength": 256}
    return schema | {"description": description} if description else schema


def obj(properties: Json, *optional: str, **extra: Any) -> Json:
    """An object whose properties are all required except ``optional``."""
    required = [name for name in properties if name not in optional]
    return {"type": "object", "required": required, "properties": properties, **extra}


def either(*pairs: tuple[str, str]) -> Json:
    """For each pair of spellings, at least one must be present."""
    return {"allOf": [{"anyOf": [{"required": [a]}, {"required": [b]}]} for a, b in pairs]}


ALIASED = either(PARTNER_IDS[:2], PARTNER_IDS[2:])


def each(schema: Json, *names: str) -> Json:
    return {name: schema for name in names}


REASONS = "Unsupported currency, Unknown connection, Connection mismatch, Connection inactive, "
REASONS += "Insufficient funds"


def _record(kind: Kind) -> Json:
    props = {
        kind.id_field: UUID | {"description": f"BitGo's {kind.value} id"},
        f"partners{kind.label}Id": UUID | {"description": "The gateway's id for the record"},
        "amount": ref("Amount"),
        **each(UUID, "clientId", "connectionId"),
        **each(STR, "partnersClientId", "partnersConnectionId"),
        "status": ref("TransferStatus"),
        "rejectionReason": STR | {"description": f"Only when rejected: one of {REASONS}"},
        **each(TIME, "createdAt", "updatedAt"),
    }
    return obj(props, "rejectionReason", title=f"{kind.label} record")


def _request(kind: Kind) -> Json:
    props = {kind.id_field: UUID, "amount": ref("AmountInput")}
    props |= each(UUID, "clientId", "connectionId") | each(text(), *PARTNER_IDS)
    note = "Either spelling of each partner id (partners… wins when both are given)"
    return obj(props, *PARTNER_IDS, **ALIASED, description=f"{note}; at most 16 KiB.")


def _listed(kind: Kind) -> Json:
    return {"allOf": [ref(f"{kind.label}Record"), obj({"kind": {"const": kind.value}})]}


POSITIVE: Json = {"type": "integer", "minimum": 1, "description": "At most 78 digits"}
DELTA: Json = {
    "type": "string",
    "pattern": "^-?[1-9][0-9]{0,77}$",
    "description": "A non-zero signed integer in base units; negative debits available",
}
UNITS: Json = {"type": "string", "pattern": "^(0|[1-9][0-9]{0,77})$"}
QUANTITY = "A positive integer in the currency's base units: digits only, no sign, point, "
QUANTITY += "exponent, spaces or leading zeros, at most 78 digits"
SCHEMAS: Json = {
    "Error": obj({"error": STR}, examples=[{"error": "Allocation not found"}]),
    "Quantity": {"type": "string", "pattern": "^[1-9][0-9]{0,77}$", "description": QUANTITY},
    "Amount": obj({"currency": STR, "quantity": ref("Quantity")}),
    "AmountInput": obj(
        {"currency": text(), "quantity": {"oneOf": [ref("Quantity"), POSITIVE]}},
        description="An Amount whose quantity may also be a positive JSON integer, never a float",
    ),
    "TransferStatus": {"type": "string", "enum": [s.value for s in Status]},
    "TransferKind": {"type": "string", "enum": [k.value for k in Kind]},
    **{f"{k.label}Record": _record(k) for k in Kind},
    **{f"{k.label}Request": _request(k) for k in Kind},
    **{f"Listed{k.label}": _listed(k) for k in Kind},
    "ConnectionRequest": obj(
        each(UUID, "clientId", "connectionId")
        | {"connectionToken": text("From POST /internal/v1/connection-tokens")}
        | {"clientWalletId": text()},
        "clientWalletId",
    ),
    "ConnectionResponse": obj(
        each(UUID, "clientId", "connectionId")
        | each(STR, "partnersClientId", "partnersConnectionId")
    ),
    "ConnectionTokenRequest": obj(
        each(text(), *PARTNER_IDS[:2]), *PARTNER_IDS[:2], **either(PARTNER_IDS[:2])
    ),
    "ConnectionTokenResponse": obj(
        each(STR, "connectionToken", "partnersClientId") | {"expiresAt": TIME}
    ),
    "Balance": obj(each(UNITS, "available", "pendingIn", "held")),
    "Account": obj(
        each(STR, "partnersConnectionId", "partnersClientId")
        | each(UUID, "connectionId", "clientId")
        | {"active": {"type": "boolean"}}
        | {"balances": {"type": "object", "additionalProperties": ref("Balance")}}
    ),
    "TransferPage": obj(
        {
            "transfers": {
                "type": "array",
                "description": "Newest first",
                "items": {
                    "oneOf": [ref(f"Listed{k.label}") for k in Kind],
                    "discriminator": {
                        "propertyName": "kind",
                        "mapping": {k.value: ref(f"Listed{k.label}")["$ref"] for k in Kind},
                    },
                },
            },
            "nextCursor": {"type": ["string", "null"], "description": "null on the last page"},
        }
    ),
    "TradeRequest": obj(
        each(text(), "externalId", "partnersConnectionId")
        | {
            "deltas": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "oneOf": [DELTA, {"type": "integer", "not": {"const": 0}}]
                },
            }
        }
    ),
    "Trade": obj(
        each(STR, "externalId", "partnersConnectionId")
        | {"connectionId": UUID, "createdAt": TIME}
        | {"deltas": {"type": "object", "additionalProperties": DELTA}}
        | {"settled": {"type": "boolean"}}
    ),
    "Health": obj({"status": {"const": "ok"}}),
    "Readiness": obj(
        {
            "status": {"enum": ["ready", "not ready"]},
            "checks": {"type": "object", "properties": each(STR, "database", "redis")},
        }
    ),
}

SECURITY_SCHEMES: Json = {
    "bitgoSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-BitGo-Signature",
        "description": "A JWT from BitGo (a leading `Bearer ` is tolerated). RS256 only, "
        "verified against the configured BitGo public keys (`kid` selects one); `exp` "
        "required, lifetime at most OES_JWT_MAX_AGE (60 s) plus leeway; `iss`/`aud` checked "
        "when configured; `jti` required and single use: a replay is refused.",
    },
    "internalToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer $OES_INTERNAL_TOKEN`",
    },
}


def answer(schema: Json, description: str, media: str = "application/json") -> Json:
    return {"description": description, "content": {media: {"schema": schema}}}


def fail(description: str) -> Json:
    return answer(ref("Error"), description)


def op(operation_id: str, summary: str, responses: Json, body: str = "", **extra: Any) -> Json:
    """One operation; ``body`` names the schema of a JSON request body."""
    if body:
        extra["requestBody"] = {"required": True, "content": answer(ref(body), "")["content"]}
    return {"operationId": operation_id, "summary": summary, **extra, "responses": responses}


def param(name: str, where: str, schema: Json, description: str) -> Json:
    described = {"name": name, "in": where, "schema": schema, "description": description}
    return described | {"required": where == "path"}


UNAVAILABLE = fail("PostgreSQL or Redis unreachable; nothing changed (fail closed)") | {
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}
}
LIMIT: Json = {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}
BUSY = "or another request on the same id held its lock too long (`Request in progress`)"


def _guarded(ops: dict[Key, Json], tag: str, scheme: str, refused: str) -> dict[Key, Json]:
    """Tag and security, and the answers any guarded route gives: 401, 503; 400, 413 if a body."""
    for one in ops.values():
        one.update(tags=[tag], security=[{scheme: []}])
        one["responses"].update({"401": fail(refused), "503": UNAVAILABLE})
        if "requestBody" in one:
            one["responses"]["400"] = fail("Not a JSON object, or a field missing or malformed")
            one["responses"]["413"] = fail("Request body exceeds 16 KiB")
        one["responses"] = dict(sorted(one["responses"].items()))
    return ops


def _transfer_ops(kind: Kind) -> dict[Key, Json]:
    label, by_id = kind.label, f"/bitgo/v1/{kind.value}/{{id}}"
    record = ref(f"{label}Record")
    missing = fail(f"`{label} not found`: unknown, of the other kind, or rejected")
    ids = [param("id", "path", STR, f"BitGo's {kind.value} id; not a UUID: unknown (404)")]
    ops = {
        ("POST", f"/bitgo/v1/{kind.value}s"): op(
            f"reserve{label}",
            f"Reserve ({kind.value} phase one), idempotent on {kind.id_field}",
            {
                "200": answer(record, "Reserved; rejected (`rejectionReason`); or as stored"),
                "409": fail(f"Id already used with different parameters, {BUSY}"),
            },
            body=f"{label}Request",
        ),
        ("GET", by_id): op(
            f"get{label}",
            f"The {kind.value} record",
            {"200": answer(record, "The record"), "404": missing},
            parameters=ids,
        ),
    }
    for action, done, other in (
        ("clear", "cleared", "released"),
        ("release", "released", "cleared"),
    ):
        ops[("PUT", f"{by_id}/{action}")] = op(
            f"{action}{label}",
            f"reserved → {done}; already {done}: 200, no second effect; any body ignored",
            {
                "200": answer(record, f"The {done} record"),
                "404": missing,
                "409": fail(f"`{label} is {other}`, {BUSY}"),
            },
            parameters=ids,
        )
    return ops


def _bitgo() -> dict[Key, Json]:
    link = op(
        "linkConnection",
        "Link a BitGo connection to a new partner account; a retry answers the same",
        {
            "200": answer(ref("ConnectionResponse"), "The link"),
            "409": fail(f"Token used by another connection, connectionId linked otherwise, {BUSY}"),
            "422": fail("`Invalid connection token`: unknown or expired"),
        },
        body="ConnectionRequest",
    )
    ops = {("POST", "/bitgo/v1/connections"): link}
    for kind in Kind:
        ops.update(_transfer_ops(kind))
    refused = "JWT missing, invalid, expired, too long-lived or replayed; nothing changed"
    return _guarded(ops, "bitgo", "bitgoSignature", refused)


def _internal() -> dict[Key, Json]:
    listing = [
        param("status", "query", ref("TransferStatus"), "Only records in this state"),
        param("kind", "query", ref("TransferKind"), "Only this kind"),
        param("connectionId", "query", UUID, "Only this BitGo connection"),
        param("limit", "query", LIMIT, "Page size"),
        param("cursor", "query", STR, "Previous page's nextCursor, URL-encoded (holds a `+`)"),
    ]
    ops = {
        ("POST", "/internal/v1/connection-tokens"): op(
            "issueConnectionToken",
            "A single-use connection token for one of the exchange's users",
            {"200": answer(ref("ConnectionTokenResponse"), "The token")},
            body="ConnectionTokenRequest",
        ),
        ("GET", "/internal/v1/accounts/{id}"): op(
            "getAccount",
            "A partner account and its balances per currency",
            {"200": answer(ref("Account"), "The account"), "404": fail("`Account not found`")},
            parameters=[param("id", "path", STR, "The account's partnersConnectionId")],
        ),
        ("GET", "/internal/v1/transfers"): op(
            "listTransfers",
            "Allocations and deallocations, newest first, paged",
            {"200": answer(ref("TransferPage"), "One page"), "400": fail("A malformed parameter")},
            parameters=listing,
        ),
        # Described ahead of its route (SPEC §5): in the document once the app serves it.
        ("POST", "/internal/v1/trades"): op(
            "applyTrade",
            "Apply trading results to available balances, idempotent by externalId",
            {
                "200": answer(ref("Trade"), "Applied, or already applied"),
                "400": fail("Malformed body"),
                "404": fail("`Account not found`: unknown partnersConnectionId"),
                "409": fail("externalId already used with a different body"),
                "422": fail("A delta would make available negative; nothing applied"),
            },
            body="TradeRequest",
        ),
    }
    return _guarded(ops, "internal", "internalToken", "Missing or wrong internal token")


def _plain(operation_id: str, summary: str, responses: Json) -> Json:
    return op(operation_id, summary, responses, tags=["operations"], security=[])


OPERATIONS: dict[Key, Json] = {
    **_bitgo(),
    **_internal(),
    ("GET", "/healthz"): _plain("healthz", "Liveness", {"200": answer(ref("Health"), "Up")}),
    ("GET", "/readyz"): _plain(
        "readyz",
        "Readiness: PostgreSQL and Redis reachable",
        {
            "200": answer(ref("Readiness"), "Ready"),
            "503": answer(ref("Readiness"), "Not ready; `checks` says what failed"),
        },
    ),
    ("GET", "/metrics"): _plain(
        "metrics",
        "Prometheus metrics",
        {"200": answer(STR, "Prometheus text format", "text/plain"), "503": UNAVAILABLE},
    ),
    ("GET", OPENAPI_PATH): _plain(
        "openapi", "This document", {"200": answer({"type": "object"}, "OpenAPI 3.1")}
    ),
}
INFO: Json = {
    "title": "oes-partner",
    "version": "0.1.0",
    "description": "Exchange-side gateway for BitGo's Go Network off-exchange settlement. "
    'Error bodies are always `{"error": "<text>"}`.',
}
TAGS = [
    {"name": "bitgo", "description": "Called by BitGo; every call JWT-verified"},
    {"name": "internal", "description": "Called by the exchange's own systems"},
    {"name": "operations", "description": "Health, metrics and this document"},
]


def document(routes: list[Route]) -> Json:
    """The OpenAPI document for ``routes`` plus ``/openapi.json`` itself.

    Raises ``KeyError`` for a route method with no entry in ``OPERATIONS``, and
    ``ValueError`` when an entry's path parameters differ from the route's.
    """
    served = [
        (method, route.path_format, set(route.param_convertors))
        for route in routes
        for method in sorted((route.methods or {"GET"}) - {"HEAD"})
    ]
    paths: Json = {}
    for method, path, params in [*served, ("GET", OPENAPI_PATH, set())]:
        if (method, path) not in OPERATIONS:
            raise KeyError(f"{method} {path} has no entry in api.openapi.OPERATIONS")
        operation = copy.deepcopy(OPERATIONS[(method, path)])
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        if declared != params:
            raise ValueError(f"{method} {path}: path parameters {declared}, route has {params}")
        paths.setdefault(path, {})[method.lower()] = operation
    components = {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES}
    return copy.deepcopy(
        {"openapi": "3.1.0", "info": INFO, "tags": TAGS, "paths": dict(sorted(paths.items()))}
        | {"components": components}
    )

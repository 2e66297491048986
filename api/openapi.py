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


# What str.isspace() (so str.strip()) counts as white space, spelled for any regex dialect.
_SPACE = r"\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# At least one character that is not white space, and no NUL anywhere.
TEXT_PATTERN = rf"^[^\u0000]*[^\u0000{_SPACE}][^\u0000]*$"


def text(description: str = "", *, nullable: bool = False) -> Json:
    """A string as ``api.bodies.text_field`` accepts: 1 to 256 characters, not only white
    space, no NUL (a lone surrogate, which no pattern can name portably, is refused too);
    ``nullable``: null is accepted and reads as absent."""
    schema: Json = {
        "type": ["string", "null"] if nullable else "string",
        "minLength": 1,
        "maxLength": 256,
        "pattern": TEXT_PATTERN,
    }
    return schema | {"description": description} if description else schema


def obj(properties: Json, *optional: str, **extra: Any) -> Json:
    """An object whose properties are all required except ``optional``."""
    required = [name for name in properties if name not in optional]
    return {"type": "object", "required": required, "properties": properties, **extra}


def _given(name: str) -> Json:
    """``name`` is present and not null."""
    return {"required": [name], "properties": {name: {"type": "string"}}}


def aliased(properties: Json, *pairs: tuple[str, str], **extra: Any) -> Json:
    """``obj`` of ``properties`` and partner ids with two spellings, as ``api.bodies`` reads them.

    For each pair (``partners…``, ``partner…``) the first spelling that is present and not
    null is read and must be text; the other is then never looked at, whatever it holds. So
    one of the two must be given, and ``partner…`` is checked only when ``partners…`` is not.
    """
    partners: Json = {}
    rules: list[Json] = []
    for primary, alternate in pairs:
        partners[primary] = text(nullable=True)
        partners[alternate] = {
            "description": f"Another spelling of {primary}: read (as text, null meaning absent) "
            f"only when {primary} is absent or null, and ignored otherwise"
        }
        rules.append({"anyOf": [_given(primary), _given(alternate)]})
        rules.append(
            {"if": _given(primary), "else": {"properties": {alternate: text(nullable=True)}}}
        )
    spellings = [name for pair in pairs for name in pair]
    return obj(properties | partners, *spellings, allOf=rules, **extra)


CLIENT_IDS = (PARTNER_IDS[0], PARTNER_IDS[1])
CONNECTION_IDS = (PARTNER_IDS[2], PARTNER_IDS[3])


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
    props |= each(UUID, "clientId", "connectionId")
    note = "Either spelling of each partner id (partners… wins when both are given)"
    return aliased(props, CLIENT_IDS, CONNECTION_IDS, description=f"{note}; at most 16 KiB.")


def _listed(kind: Kind) -> Json:
    return {"allOf": [ref(f"{kind.label}Record"), obj({"kind": {"const": kind.value}})]}


MAX_UNITS = 10**78 - 1  # 78 digits
INTEGRAL = "A JSON integer written as one (`494`; `494.0` or `4.94e2` is refused: 400)"
POSITIVE: Json = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_UNITS,
    "description": f"{INTEGRAL}, at most 78 digits",
}
NONZERO: Json = {
    "type": "integer",
    "minimum": -MAX_UNITS,
    "maximum": MAX_UNITS,
    "not": {"const": 0},
    "description": f"{INTEGRAL}, non-zero, at most 78 digits",
}
DELTA: Json = {
    "type": "string",
    "pattern": "^-?[1-9][0-9]{0,77}$",
    "description": "A non-zero signed integer in base units; negative debits available",
}
UNITS: Json = {"type": "string", "pattern": "^(0|[1-9][0-9]{0,77})$"}
_HEX = "[0-9a-fA-F]"
# A page's end as nextCursor spells it. The digits stop at 17 (year 5138): more can overflow.
_CURSOR = rf"[0-9]{{1,17}}_{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
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
        | {"clientWalletId": text(nullable=True)},
        "clientWalletId",
    ),
    "ConnectionResponse": obj(
        each(UUID, "clientId", "connectionId")
        | each(STR, "partnersClientId", "partnersConnectionId")
    ),
    "ConnectionTokenRequest": aliased({}, CLIENT_IDS),
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
            "nextCursor": {
                "type": ["string", "null"],
                "pattern": f"^{_CURSOR}$",
                "description": "`<microseconds>_<uuid>` of the page's last record when the page "
                "is full; null on the last page",
            },
        }
    ),
    "TradeRequest": aliased(
        {"externalId": text()}
        | {
            "deltas": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 64,
                "propertyNames": text() | {"description": "A currency code"},
                "additionalProperties": {"oneOf": [DELTA, NONZERO]},
            }
        },
        CONNECTION_IDS,
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


def or_empty(schema: Json) -> Json:
    """A filter that an empty value turns off, as if it were absent."""
    return {"anyOf": [schema, {"const": ""}], "description": "Empty: no filter"}


CURSOR: Json = {
    "type": "string",
    "pattern": f"^({_CURSOR})?$",
    "description": "`<microseconds since 1970>_<uuid>`, as nextCursor gives it; empty: first page",
}
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
        param("status", "query", or_empty(ref("TransferStatus")), "Only records in this state"),
        param("kind", "query", or_empty(ref("TransferKind")), "Only this kind"),
        param("connectionId", "query", or_empty(UUID), "Only this BitGo connection"),
        param("limit", "query", LIMIT, "Page size"),
        param("cursor", "query", CURSOR, "The previous page's nextCursor, unchanged"),
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

"""Strict parsing of request bodies: anything malformed is a 400 that names the field."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.requests import Request

from api.errors import BadRequest, PayloadTooLarge
from models.states import Kind
from models.trades import TradeRequest
from models.transfers import ReserveRequest

MAX_BODY = 16 * 1024
MAX_DIGITS = 78
_QUANTITY = re.compile(r"[1-9][0-9]{0,77}")
_DELTA = re.compile(r"-?[1-9][0-9]{0,77}")
MAX_DELTAS = 64
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MAX_TEXT = 256


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> Any:
    """The body as JSON, at most 16 KiB; floats and NaN are kept out of reach of amounts."""
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]{1,20}", declared) and int(declared) > MAX_BODY:
        raise PayloadTooLarge("Request body exceeds 16 KiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise PayloadTooLarge("Request body exceeds 16 KiB")
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest("Body is not valid JSON") from None


def json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest("Body must be a JSON object")
    return value


def storable(value: str) -> bool:
    """Whether PostgreSQL can store ``value`` as text: UTF-8 encodable, with no NUL."""
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return "\x00" not in value


def _text(body: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if (
                not isinstance(value, str)
                or not value.strip()
                or len(value) > _MAX_TEXT
                or not storable(value)
            ):
                raise BadRequest(f"{name} must be a non-empty string of at most {_MAX_TEXT}")
            return value
    return None


def text_field(body: dict[str, Any], *names: str) -> str | None:
    """A non-empty string under the first of ``names`` present, or None."""
    return _text(body, names)


def required_text(body: dict[str, Any], *names: str) -> str:
    """A non-empty string under the first of ``names`` present; 400 when none is."""
    value = _text(body, names)
    if value is None:
        raise BadRequest(f"{names[0]} is required")
    return value


def uuid_field(body: dict[str, Any], name: str) -> uuid.UUID:
    value = body.get(name)
    if value is None:
        raise BadRequest(f"{name} is required")
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise BadRequest(f"{name} must be a UUID")
    return uuid.UUID(value)


def path_uuid(value: str) -> uuid.UUID | None:
    """A UUID from a path segment, or None: an id that is not a UUID is simply unknown."""
    return uuid.UUID(value) if _UUID.fullmatch(value) else None


def quantity(value: Any, name: str = "amount.quantity") -> int:
    """A positive integer in base units: canonical digits (or a JSON integer), <= 78 digits."""
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a positive integer string")
    if isinstance(value, int):
        if value <= 0 or len(str(value)) > MAX_DIGITS:
            raise BadRequest(f"{name} must be a positive integer of at most {MAX_DIGITS} digits")
        return value
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise BadRequest(
            f"{name} must be a positive integer in base units: digits only, "
            f"no sign, point, exponent, spaces or leading zeros, at most {MAX_DIGITS} digits"
        )
    return int(value)


def amount(body: dict[str, Any]) -> tuple[str, int]:
    value = body.get("amount")
    if value is None:
        raise BadRequest("amount is required")
    if not isinstance(value, dict):
        raise BadRequest("amount must be an object with currency and quantity")
    currency = required_text(value, "currency")
    if "quantity" not in value or value["quantity"] is None:
        raise BadRequest("amount.quantity is required")
    return currency, quantity(value["quantity"])


def reserve_request(kind: Kind, body: Any) -> ReserveRequest:
    """A reserve body for ``kind``, accepting both spellings of the partner ids."""
    body = json_object(body)
    transfer_id = uuid_field(body, kind.id_field)
    currency, amount_quantity = amount(body)
    return ReserveRequest(
        kind=kind,
        transfer_id=transfer_id,
        currency=currency,
        quantity=amount_quantity,
        client_id=uuid_field(body, "clientId"),
        connection_id=uuid_field(body, "connectionId"),
        partners_client_id=required_text(body, "partnersClientId", "partnerClientId"),
        partners_connection_id=required_text(body, "partnersConnectionId", "partnerConnectionId"),
    )


def delta(value: Any, name: str) -> int:
    """A non-zero signed integer in base units: a canonical digit string or a JSON integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 0 or len(str(abs(value))) > MAX_DIGITS:
            raise BadRequest(f"{name} must be a non-zero integer of at most {MAX_DIGITS} digits")
        return value
    if not isinstance(value, str) or not _DELTA.fullmatch(value):
        raise BadRequest(
            f"{name} must be a non-zero signed integer in base units: an optional '-', "
            f"digits only, no leading zeros, at most {MAX_DIGITS} digits"
        )
    return int(value)


def trade_request(body: Any) -> TradeRequest:
    body = json_object(body)
    external_id = required_text(body, "externalId")
    partners_connection_id = required_text(body, "partnersConnectionId", "partnerConnectionId")
    deltas = body.get("deltas")
    if not isinstance(deltas, dict) or not deltas:
        raise BadRequest("deltas must be a non-empty object of currency to signed amount")
    if len(deltas) > MAX_DELTAS:
        raise BadRequest(f"deltas may name at most {MAX_DELTAS} currencies")
    parsed: dict[str, int] = {}
    for currency, value in deltas.items():
        if not currency.strip() or len(currency) > _MAX_TEXT or not storable(currency):
            raise BadRequest(f"deltas keys must be currency codes of at most {_MAX_TEXT}")
        parsed[currency] = delta(value, f"deltas.{currency}")
    return TradeRequest(
        external_id=external_id,
        partners_connection_id=partners_connection_id,
        deltas=parsed,
    )

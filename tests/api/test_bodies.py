"""SPEC §3: request bodies, amounts and ids. Anything malformed is 400 (413 when too big) with
an ``error`` string, and changes nothing; well-formed edge values pass and round-trip exactly."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import BitGo, Link, Response, row_count

KINDS = ["allocation", "deallocation"]
QUANTITY = 1000
FUNDS = 10 * QUANTITY
MAX_BODY = 16 * 1024
BIG = "9" * 78  # the largest quantity NUMERIC(78,0) holds
ID = "ID"  # stands for allocationId / deallocationId in the tables below
LITERAL = "__LITERAL__"


def new_id() -> str:
    return str(uuid.uuid4())


def field(kind: str, path: str) -> list[str]:
    return [f"{kind}Id" if part == ID else part for part in path.split(".")]


def set_path(body: dict[str, Any], kind: str, path: str, value: Any) -> dict[str, Any]:
    *parents, last = field(kind, path)
    target = body
    for name in parents:
        target = target[name]
    target[last] = value
    return body


def drop_path(body: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    *parents, last = field(kind, path)
    target = body
    for name in parents:
        target = target[name]
    del target[last]
    return body


def with_literal(body: dict[str, Any], kind: str, path: str, literal: str) -> bytes:
    """The body as JSON text with ``literal`` (raw JSON, e.g. ``1e3`` or ``NaN``) at ``path``."""
    text = json.dumps(set_path(body, kind, path, LITERAL))
    assert text.count(f'"{LITERAL}"') == 1
    return text.replace(f'"{LITERAL}"', literal).encode()


@dataclass
class Scene:
    """One linked account ready for ``kind`` (funded for deallocations) and its BitGo."""

    bitgo: BitGo
    link: Link
    sessions: sessionmaker[Session]
    kind: str
    transfer_id: str

    def body(self, quantity: Any = str(QUANTITY)) -> dict[str, Any]:
        return self.link.body(self.kind, self.transfer_id, quantity)

    def post(self, body: Any) -> Response:
        return self.bitgo.http.post(
            f"/bitgo/v1/{self.kind}s", json=body, headers=self.bitgo.headers()
        )

    def post_raw(self, content: Any, **headers: str) -> Response:
        return self.bitgo.http.post(
            f"/bitgo/v1/{self.kind}s",
            content=content,
            headers={**self.bitgo.headers(), "Content-Type": "application/json", **headers},
        )

    def snapshot(self) -> tuple[int, tuple[int, int, int]]:
        return row_count(self.sessions, "transfers"), self.bitgo.balances(self.link)

    def stored(self, transfer_id: str | None = None) -> int:
        return row_count(self.sessions, "transfers", "id = :id", id=transfer_id or self.transfer_id)


@pytest.fixture
def scene(bitgo: BitGo, link: Link, sessions: sessionmaker[Session], kind: str) -> Scene:
    if kind == "deallocation":
        bitgo.fund(link, FUNDS)
    return Scene(bitgo, link, sessions, kind, new_id())


@pytest.fixture
def unchanged(scene: Scene) -> Iterator[None]:
    """After the test: no transfer row for the request's id, none at all, balances as before."""
    before = scene.snapshot()
    yield
    assert scene.stored() == 0
    assert scene.snapshot() == before


def assert_error(answer: Response, status: int = 400) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    message: str = body["error"]
    return message


kinds = pytest.mark.parametrize("kind", KINDS)


# --- required fields ---------------------------------------------------------------------------

REQUIRED = [
    ID,
    "amount",
    "amount.currency",
    "amount.quantity",
    "clientId",
    "connectionId",
    "partnersConnectionId",
    "partnersClientId",
]


@kinds
@pytest.mark.parametrize("path", REQUIRED)
@pytest.mark.usefixtures("unchanged")
def test_missing_required_field_is_400(scene: Scene, path: str) -> None:
    assert_error(scene.post(drop_path(scene.body(), scene.kind, path)))


@kinds
@pytest.mark.parametrize("path", REQUIRED)
@pytest.mark.usefixtures("unchanged")
def test_null_required_field_is_400(scene: Scene, path: str) -> None:
    assert_error(scene.post(set_path(scene.body(), scene.kind, path, None)))


# --- wrong types -------------------------------------------------------------------------------

WRONG_TYPES = [
    (ID, 12345, "number"),
    (ID, {"id": "x"}, "object"),
    (ID, [str(uuid.UUID(int=1))], "array"),
    (ID, True, "boolean"),
    ("amount", "1000", "string"),
    ("amount", 1000, "number"),
    ("amount", ["btc", "1000"], "array"),
    ("amount.currency", 1, "number"),
    ("amount.currency", {"code": "btc"}, "object"),
    ("amount.currency", ["btc"], "array"),
    ("amount.currency", "", "empty_string"),
    ("amount.quantity", {"value": "1000"}, "object"),
    ("amount.quantity", ["1000"], "array"),
    ("clientId", 1, "number"),
    ("clientId", {}, "object"),
    ("connectionId", 1, "number"),
    ("connectionId", [], "array"),
    ("partnersClientId", 1, "number"),
    ("partnersClientId", {}, "object"),
    ("partnersClientId", "", "empty_string"),
    ("partnersConnectionId", 1, "number"),
    ("partnersConnectionId", [], "array"),
    ("partnersConnectionId", True, "boolean"),
]


@kinds
@pytest.mark.parametrize(
    ("path", "value"),
    [pytest.param(p, v, id=f"{p}={name}") for p, v, name in WRONG_TYPES],
)
@pytest.mark.usefixtures("unchanged")
def test_field_of_wrong_type_is_400(scene: Scene, path: str, value: Any) -> None:
    assert_error(scene.post(set_path(scene.body(), scene.kind, path, value)))


# --- ids that are not UUIDs --------------------------------------------------------------------

A_UUID = uuid.UUID("0f5c6b0e-3a51-4d43-9f0e-2c9a7d1e8b44")
NOT_UUIDS = [
    (ID, "abc"),
    (ID, "1234"),
    (ID, A_UUID.hex),
    (ID, "{" + str(A_UUID) + "}"),
    (ID, A_UUID.urn),
    (ID, f" {A_UUID}"),
    (ID, str(A_UUID) + "0"),
    ("clientId", "abc"),
    ("clientId", A_UUID.hex),
    ("connectionId", "abc"),
    ("connectionId", A_UUID.hex),
]


@kinds
@pytest.mark.parametrize(
    ("path", "value"), [pytest.param(p, v, id=f"{p}={v!r}") for p, v in NOT_UUIDS]
)
@pytest.mark.usefixtures("unchanged")
def test_id_that_is_not_a_uuid_is_400(scene: Scene, path: str, value: str) -> None:
    assert_error(scene.post(set_path(scene.body(), scene.kind, path, value)))


# --- quantities --------------------------------------------------------------------------------

# Raw JSON text put in amount.quantity; every one of them must be refused.
BAD_QUANTITIES = [
    '"-1"',
    "-1",
    '"0"',
    "0",
    "-0",
    '"1.5"',
    '"1.0"',
    '"1e3"',
    '"1E3"',
    '" 1"',
    '"1 "',
    '"1\\n"',
    '"01"',
    '"00"',
    '"+1"',
    '"0x10"',
    '"1_000"',
    '"1,000"',
    '"\\u0661"',  # ARABIC-INDIC DIGIT ONE: int() takes it, the contract does not
    '"\\uff11"',  # FULLWIDTH DIGIT ONE
    '"' + "1" * 79 + '"',
    "1" * 79,
    "1.0",
    "1.5",
    "1e3",
    "1E3",
    "true",
    "false",
    '""',
    '"abc"',
]


@kinds
@pytest.mark.parametrize("literal", BAD_QUANTITIES, ids=lambda s: s if len(s) < 20 else "79_digits")
@pytest.mark.usefixtures("unchanged")
def test_quantity_that_is_not_a_canonical_positive_integer_is_400(
    scene: Scene, literal: str
) -> None:
    assert_error(scene.post_raw(with_literal(scene.body(), scene.kind, "amount.quantity", literal)))


@kinds
def test_78_digit_quantity_is_reserved_and_echoed_exactly(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    answer = reserve_big(bitgo, link, kind, transfer_id := new_id())
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "reserved"
    assert answer.json()[f"{kind}Id"] == transfer_id
    assert answer.json()["amount"] == {"currency": "btc", "quantity": BIG}


@kinds
def test_78_digit_quantity_is_returned_exactly_by_status(
    bitgo: BitGo, link: Link, kind: str
) -> None:
    transfer_id = new_id()
    assert reserve_big(bitgo, link, kind, transfer_id).status_code == 200
    answer = bitgo.status(kind, transfer_id)
    assert answer.status_code == 200, answer.text
    assert answer.json()["amount"]["quantity"] == BIG


@kinds
def test_78_digit_quantity_shows_exactly_in_balances_and_database(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session], kind: str
) -> None:
    transfer_id = new_id()
    assert reserve_big(bitgo, link, kind, transfer_id).status_code == 200
    account = bitgo.http.get(
        f"/internal/v1/accounts/{link.partners_connection_id}", headers=bitgo.internal()
    ).json()
    if kind == "allocation":
        assert account["balances"]["btc"] == {"available": "0", "pendingIn": BIG, "held": "0"}
    else:
        assert account["balances"]["btc"] == {"available": "0", "pendingIn": "0", "held": BIG}
    exact = "id = :id AND quantity = CAST(:q AS NUMERIC(78,0))"
    assert row_count(sessions, "transfers", exact, id=transfer_id, q=BIG) == 1


def reserve_big(bitgo: BitGo, link: Link, kind: str, transfer_id: str) -> Response:
    if kind == "deallocation":
        bitgo.fund(link, int(BIG))
    return bitgo.reserve(kind, link, transfer_id, BIG)


@kinds
def test_json_integer_quantity_is_accepted_and_answered_as_string(scene: Scene) -> None:
    answer = scene.post(scene.body(quantity=QUANTITY))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "reserved"
    assert answer.json()["amount"] == {"currency": "btc", "quantity": str(QUANTITY)}
    assert scene.stored() == 1


# --- the body as a whole -----------------------------------------------------------------------

NOT_OBJECTS = [
    pytest.param(b"not json", id="not_json"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"allocationId": ', id="truncated"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"null", id="null"),
    pytest.param(b'"a string"', id="string"),
    pytest.param(b"1000", id="number"),
    pytest.param(b'{"a": "\xff"}', id="invalid_utf8"),
]


@kinds
@pytest.mark.parametrize("content", NOT_OBJECTS)
@pytest.mark.usefixtures("unchanged")
def test_body_that_is_not_a_json_object_is_400(scene: Scene, content: bytes) -> None:
    assert_error(scene.post_raw(content))


@kinds
@pytest.mark.usefixtures("unchanged")
def test_valid_body_wrapped_in_an_array_is_400(scene: Scene) -> None:
    assert_error(scene.post([scene.body()]))


@kinds
@pytest.mark.parametrize(
    ("path", "literal"),
    [
        ("amount.quantity", "NaN"),
        ("amount.quantity", "Infinity"),
        ("amount.quantity", "-Infinity"),
        ("note", "NaN"),
    ],
    ids=["quantity_NaN", "quantity_Infinity", "quantity_minus_Infinity", "extra_field_NaN"],
)
@pytest.mark.usefixtures("unchanged")
def test_body_with_non_standard_json_constant_is_400(scene: Scene, path: str, literal: str) -> None:
    assert_error(scene.post_raw(with_literal(scene.body(), scene.kind, path, literal)))


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON text of exactly ``size`` bytes, grown by an unknown field."""
    base = json.dumps({**body, "padding": ""}).encode()
    text = json.dumps({**body, "padding": "x" * (size - len(base))}).encode()
    assert len(text) == size
    return text


@kinds
@pytest.mark.usefixtures("unchanged")
def test_body_over_16_kib_is_413(scene: Scene) -> None:
    assert_error(scene.post_raw(padded(scene.body(), MAX_BODY + 1)), status=413)


@kinds
@pytest.mark.usefixtures("unchanged")
def test_body_over_16_kib_without_content_length_is_413(scene: Scene) -> None:
    content = padded(scene.body(), 4 * MAX_BODY)
    chunks = iter([content[i : i + 4096] for i in range(0, len(content), 4096)])
    assert_error(scene.post_raw(chunks), status=413)


@kinds
def test_body_of_exactly_16_kib_is_accepted(scene: Scene) -> None:
    answer = scene.post_raw(padded(scene.body(), MAX_BODY))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "reserved"


# --- spellings and extra fields ----------------------------------------------------------------


@kinds
@pytest.mark.parametrize(
    "singular",
    [["partnersClientId"], ["partnersConnectionId"], ["partnersClientId", "partnersConnectionId"]],
    ids=["partnerClientId", "partnerConnectionId", "both"],
)
def test_partner_singular_spellings_are_accepted_and_answered_as_partners(
    scene: Scene, singular: list[str]
) -> None:
    body = scene.body()
    for name in singular:
        body[name.replace("partners", "partner")] = body.pop(name)
    answer = scene.post(body)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["status"] == "reserved"
    assert record["partnersClientId"] == scene.link.partners_client_id
    assert record["partnersConnectionId"] == scene.link.partners_connection_id
    assert "partnerClientId" not in record
    assert "partnerConnectionId" not in record


@kinds
def test_unknown_extra_fields_are_ignored(scene: Scene) -> None:
    body = scene.body()
    body.update({"note": "hi", "nested": {"x": [1, 2.5, None]}, "status": "cleared"})
    body["amount"]["decimals"] = 8
    answer = scene.post(body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "reserved"
    assert "note" not in answer.json()
    assert answer.json()["amount"] == {"currency": "btc", "quantity": str(QUANTITY)}


# --- ids in the path ---------------------------------------------------------------------------

PATH_IDS = ["abc", "1234", A_UUID.hex, A_UUID.urn]


@kinds
@pytest.mark.parametrize("method_action", ["PUT clear", "PUT release", "GET"])
@pytest.mark.parametrize("path_id", PATH_IDS)
def test_non_uuid_path_id_is_404_not_found(
    bitgo: BitGo, kind: str, method_action: str, path_id: str
) -> None:
    method, _, action = method_action.partition(" ")
    url = f"/bitgo/v1/{kind}/{path_id}" + (f"/{action}" if action else "")
    answer = bitgo.http.request(method, url, headers=bitgo.headers())
    assert assert_error(answer, status=404) == f"{kind.capitalize()} not found"


@kinds
@pytest.mark.parametrize("action", ["clear", "release"])
def test_hyphenless_path_id_of_a_reserved_transfer_is_404_and_changes_nothing(
    scene: Scene, action: str
) -> None:
    """The same 128 bits written without hyphens is not a UUID here, so not that transfer."""
    assert scene.post(scene.body()).status_code == 200
    before = scene.snapshot()
    answer = scene.bitgo.put(scene.kind, uuid.UUID(scene.transfer_id).hex, action)
    assert assert_error(answer, status=404) == f"{scene.kind.capitalize()} not found"
    assert scene.bitgo.status(scene.kind, scene.transfer_id).json()["status"] == "reserved"
    assert scene.snapshot() == before


# --- connections -------------------------------------------------------------------------------


def connection_body(bitgo: BitGo) -> dict[str, Any]:
    return {
        "clientId": new_id(),
        "connectionId": new_id(),
        "connectionToken": bitgo.token(f"user-{uuid.uuid4().hex[:8]}"),
    }


CONNECTION_BAD = [
    pytest.param(lambda b: b.pop("clientId"), id="missing_clientId"),
    pytest.param(lambda b: b.pop("connectionId"), id="missing_connectionId"),
    pytest.param(lambda b: b.pop("connectionToken"), id="missing_connectionToken"),
    pytest.param(lambda b: b.update(clientId=None), id="null_clientId"),
    pytest.param(lambda b: b.update(clientId="abc"), id="clientId_not_uuid"),
    pytest.param(lambda b: b.update(clientId=123), id="clientId_number"),
    pytest.param(lambda b: b.update(connectionId=A_UUID.hex), id="connectionId_hyphenless"),
    pytest.param(lambda b: b.update(connectionId={}), id="connectionId_object"),
    pytest.param(lambda b: b.update(connectionToken=123), id="connectionToken_number"),
    pytest.param(lambda b: b.update(connectionToken=""), id="connectionToken_empty"),
    pytest.param(lambda b: b.update(clientWalletId=123), id="clientWalletId_number"),
    pytest.param(lambda b: b.update(clientWalletId=["w"]), id="clientWalletId_array"),
]


@pytest.mark.parametrize("spoil", CONNECTION_BAD)
def test_connection_with_missing_or_invalid_field_is_400_and_links_nothing(
    bitgo: BitGo, sessions: sessionmaker[Session], spoil: Any
) -> None:
    body = connection_body(bitgo)
    spoil(body)
    before = row_count(sessions, "connections")
    assert_error(bitgo.http.post("/bitgo/v1/connections", json=body, headers=bitgo.headers()))
    assert row_count(sessions, "connections") == before


@pytest.mark.parametrize("content", [b"[]", b"null", b"not json", b'{"clientId": NaN}'], ids=str)
def test_connection_body_that_is_not_a_json_object_is_400(
    bitgo: BitGo, sessions: sessionmaker[Session], content: bytes
) -> None:
    before = row_count(sessions, "connections")
    answer = bitgo.http.post(
        "/bitgo/v1/connections",
        content=content,
        headers={**bitgo.headers(), "Content-Type": "application/json"},
    )
    assert_error(answer)
    assert row_count(sessions, "connections") == before


def test_connection_token_survives_a_400_and_links_afterwards(bitgo: BitGo) -> None:
    body = connection_body(bitgo)
    spoiled = {**body, "clientId": "abc"}
    headers = bitgo.headers
    assert_error(bitgo.http.post("/bitgo/v1/connections", json=spoiled, headers=headers()))
    answer = bitgo.http.post("/bitgo/v1/connections", json=body, headers=headers())
    assert answer.status_code == 200, answer.text
    assert answer.json()["connectionId"] == body["connectionId"]


@pytest.mark.parametrize("bad", ["nul\u0000byte", "lone\ud800surrogate"])
@pytest.mark.parametrize("field", ["partnersClientId", "partnersConnectionId"])
def test_text_postgresql_cannot_store_is_a_400_not_a_500(
    bitgo: BitGo, link: Link, sessions: sessionmaker[Session], field: str, bad: str
) -> None:
    transfer_id = str(uuid.uuid4())
    body = link.body("allocation", transfer_id, "5")
    body[field] = bad
    answer = bitgo.http.post(
        "/bitgo/v1/allocations",
        content=json.dumps(body).encode(),
        headers={**bitgo.headers(), "content-type": "application/json"},
    )
    assert answer.status_code == 400
    assert field in answer.json()["error"]
    assert row_count(sessions, "transfers", "id = :id", id=transfer_id) == 0


def test_a_currency_postgresql_cannot_store_is_a_400(bitgo: BitGo, link: Link) -> None:
    answer = bitgo.http.post(
        "/bitgo/v1/allocations",
        content=json.dumps(link.body("allocation", str(uuid.uuid4()), "5", currency="b\u0000tc")),
        headers={**bitgo.headers(), "content-type": "application/json"},
    )
    assert answer.status_code == 400


def test_an_account_path_with_a_nul_is_not_found(bitgo: BitGo) -> None:
    answer = bitgo.http.get("/internal/v1/accounts/a%00b", headers=bitgo.internal())
    assert answer.status_code == 404

"""GET /openapi.json: every route described, valid OpenAPI 3.1, and true to what the app answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from api import openapi
from api.app import create_app
from api.settings import Settings
from tests.conftest import BitGo, Link
from tests.conftest import Response as Answer

# SPEC §2, §3, §5, §9: the answers each route can give (500 aside).
EXPECTED_CODES = {
    ("POST", "/bitgo/v1/connections"): {"200", "400", "401", "409", "413", "422", "503"},
    **{
        key: codes
        for kind in ("allocation", "deallocation")
        for key, codes in {
            ("POST", f"/bitgo/v1/{kind}s"): {"200", "400", "401", "409", "413", "503"},
            ("PUT", f"/bitgo/v1/{kind}/{{id}}/clear"): {"200", "401", "404", "409", "503"},
            ("PUT", f"/bitgo/v1/{kind}/{{id}}/release"): {"200", "401", "404", "409", "503"},
            ("GET", f"/bitgo/v1/{kind}/{{id}}"): {"200", "401", "404", "503"},
        }.items()
    },
    ("POST", "/internal/v1/connection-tokens"): {"200", "400", "401", "413", "503"},
    ("GET", "/internal/v1/accounts/{id}"): {"200", "401", "404", "503"},
    ("GET", "/internal/v1/transfers"): {"200", "400", "401", "503"},
    ("POST", "/internal/v1/trades"): {"200", "400", "401", "404", "409", "413", "422", "503"},
    ("GET", "/healthz"): {"200"},
    ("GET", "/readyz"): {"200", "503"},
    ("GET", "/metrics"): {"200", "503"},
    ("GET", "/openapi.json"): {"200"},
}


@pytest.fixture(scope="module")
def doc(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = answer.json()
    return body


def served(client: TestClient) -> set[tuple[str, str]]:
    routes = cast(Starlette, client.app).routes
    assert all(isinstance(r, Route) for r in routes), "a Mount or WebSocketRoute is undocumented"
    return {
        (method, route.path_format)
        for route in cast(list[Route], routes)
        for method in (route.methods or {"GET"}) - {"HEAD"}
    }


def test_document_is_openapi_31(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "oes-partner"


def test_document_passes_the_openapi_validator(doc: dict[str, Any]) -> None:
    validate(doc)


def test_every_served_route_and_method_is_described(
    client: TestClient, doc: dict[str, Any]
) -> None:
    routes = served(client)
    assert ("GET", "/openapi.json") in routes
    for method, path in routes:
        assert method.lower() in doc["paths"].get(path, {}), f"{method} {path} undocumented"
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes


def test_no_stale_descriptions(client: TestClient) -> None:
    """An entry whose route is gone is dead text."""
    assert set(openapi.OPERATIONS) == served(client)


def test_response_codes_follow_the_spec(doc: dict[str, Any]) -> None:
    for path, ops in doc["paths"].items():
        for method, operation in ops.items():
            codes = set(operation["responses"])
            assert codes == EXPECTED_CODES[(method.upper(), path)], f"{method} {path}"


def test_security_by_prefix(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bitgoSignature"] == schemes["bitgoSignature"] | {
        "type": "apiKey",
        "in": "header",
        "name": "X-BitGo-Signature",
    }
    description = schemes["bitgoSignature"]["description"]
    assert all(word in description for word in ("RS256", "`jti`", "`exp`", "replay"))
    assert schemes["internalToken"] == schemes["internalToken"] | {
        "type": "http",
        "scheme": "bearer",
    }
    for path, ops in doc["paths"].items():
        for operation in ops.values():
            expected: list[dict[str, list[str]]] = (
                [{"bitgoSignature": []}]
                if path.startswith("/bitgo/v1/")
                else [{"internalToken": []}]
                if path.startswith("/internal/v1/")
                else []
            )
            assert operation["security"] == expected, path


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key == "mapping" and isinstance(value, dict):
                yield from value.values()
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), pointer
        assert part in node, f"{pointer} does not resolve"
        node = node[part]
    return node


def test_every_ref_resolves_within_the_document(doc: dict[str, Any]) -> None:
    refs = set(_refs(doc))
    assert "#/components/schemas/Amount" in refs
    for pointer in refs:
        _resolve(doc, pointer)


def test_every_component_schema_is_used(doc: dict[str, Any]) -> None:
    used = {r.rsplit("/", 1)[1] for r in _refs(doc)}
    unused = set(doc["components"]["schemas"]) - used
    assert not unused


def test_amount_and_record_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["Quantity"]["pattern"] == "^[1-9][0-9]{0,77}$"
    record = schemas["AllocationRecord"]
    assert record["properties"]["status"] == {"$ref": "#/components/schemas/TransferStatus"}
    assert schemas["TransferStatus"]["enum"] == ["reserved", "rejected", "cleared", "released"]
    assert "rejectionReason" not in record["required"]
    assert {"allocationId", "partnersAllocationId", "createdAt", "updatedAt"} <= set(
        record["required"]
    )
    assert {"deallocationId", "partnersDeallocationId"} <= set(
        schemas["DeallocationRecord"]["required"]
    )
    listing = doc["paths"]["/internal/v1/transfers"]["get"]["parameters"]
    limit = next(p for p in listing if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 500)
    assert {p["name"] for p in listing} == {"status", "kind", "connectionId", "limit", "cursor"}


# --- document() itself ---------------------------------------------------------------


async def _endpoint(request: Request) -> Response:
    return Response()


def test_document_refuses_an_undescribed_route() -> None:
    with pytest.raises(KeyError, match="POST /bitgo/v1/nothing"):
        openapi.document([Route("/bitgo/v1/nothing", _endpoint, methods=["POST"])])


def test_document_refuses_an_undescribed_method_on_a_described_path() -> None:
    with pytest.raises(KeyError, match="DELETE /healthz"):
        openapi.document([Route("/healthz", _endpoint, methods=["GET", "DELETE"])])


def test_create_app_fails_on_an_undescribed_route(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(openapi.OPERATIONS, ("GET", "/metrics"))
    with pytest.raises(KeyError, match="GET /metrics"):
        create_app(settings)


def test_document_refuses_path_parameters_that_do_not_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(openapi.OPERATIONS, ("GET", "/things/{thing}"), {"responses": {}})
    with pytest.raises(ValueError, match="path parameters"):
        openapi.document([Route("/things/{thing}", _endpoint, methods=["GET"])])


def test_document_does_not_share_state_between_calls() -> None:
    first = openapi.document([])
    first["components"]["schemas"]["Amount"]["required"].append("mutated")
    assert "mutated" not in openapi.document([])["components"]["schemas"]["Amount"]["required"]
    assert set(first["paths"]) == {"/openapi.json"}


# --- the document against real answers --------------------------------------------------


def conforms(doc: dict[str, Any], method: str, path: str, answer: Answer) -> None:
    """``answer`` is one the document lists for the route, with a body matching its schema."""
    responses = doc["paths"][path][method]["responses"]
    code = str(answer.status_code)
    assert code in responses, f"{method.upper()} {path} answered undocumented {code}"
    content = responses[code]["content"]
    media = answer.headers["content-type"].split(";")[0]
    assert media in content, f"{media} not documented for {code}"
    if media != "application/json":
        return
    schema = {**content[media]["schema"], "components": doc["components"]}
    OAS31Validator(schema, format_checker=oas31_format_checker).validate(answer.json())


def test_answers_match_the_document(
    doc: dict[str, Any], client: TestClient, bitgo: BitGo, link: Link
) -> None:
    def check(method: str, path: str, answer: Answer, status: int = 200) -> None:
        assert answer.status_code == status, answer.text
        conforms(doc, method, path, answer)

    bitgo.fund(link, 100)  # so that the deallocation is reserved, not rejected
    for kind in ("allocation", "deallocation"):
        one = f"/bitgo/v1/{kind}/{{id}}"
        transfer_id = str(uuid.uuid4())
        check("post", f"/bitgo/v1/{kind}s", bitgo.reserve(kind, link, transfer_id, 10))
        check("get", one, bitgo.status(kind, transfer_id))
        check("put", f"{one}/release", bitgo.put(kind, transfer_id, "release"))
        check("put", f"{one}/clear", bitgo.put(kind, transfer_id, "clear"), 409)
        check("get", one, bitgo.status(kind, str(uuid.uuid4())), 404)
        check("put", f"{one}/clear", bitgo.put(kind, "not-a-uuid", "clear"), 404)
        check("post", f"/bitgo/v1/{kind}s", bitgo.reserve(kind, link, "nope", 10), 400)
    check(
        "get", "/bitgo/v1/allocation/{id}", client.get(f"/bitgo/v1/allocation/{uuid.uuid4()}"), 401
    )
    connection = {
        "clientId": str(uuid.uuid4()),
        "connectionId": str(uuid.uuid4()),
        "connectionToken": bitgo.token("openapi-user"),
    }
    linked = client.post("/bitgo/v1/connections", json=connection, headers=bitgo.headers())
    check("post", "/bitgo/v1/connections", linked)
    connection["connectionToken"] = "unknown"
    clash = client.post("/bitgo/v1/connections", json=connection, headers=bitgo.headers())
    check("post", "/bitgo/v1/connections", clash, 409)
    connection["connectionId"] = str(uuid.uuid4())
    refused = client.post("/bitgo/v1/connections", json=connection, headers=bitgo.headers())
    check("post", "/bitgo/v1/connections", refused, 422)

    internal = bitgo.internal()
    tokens = "/internal/v1/connection-tokens"
    check("post", tokens, client.post(tokens, json={"partnerClientId": "u"}, headers=internal))
    check("post", tokens, client.post(tokens, json={}, headers=internal), 400)
    check("post", tokens, client.post(tokens, json={"partnersClientId": "u"}), 401)
    account = f"/internal/v1/accounts/{link.partners_connection_id}"
    check("get", "/internal/v1/accounts/{id}", client.get(account, headers=internal))
    missing = client.get("/internal/v1/accounts/nobody", headers=internal)
    check("get", "/internal/v1/accounts/{id}", missing, 404)
    listing = "/internal/v1/transfers"
    check("get", listing, client.get(listing, params={"limit": 1}, headers=internal))
    check("get", listing, client.get(listing, params={"kind": "x"}, headers=internal), 400)

    check("get", "/healthz", client.get("/healthz"))
    check("get", "/readyz", client.get("/readyz"))
    check("get", "/metrics", client.get("/metrics"))
    check("get", "/openapi.json", client.get("/openapi.json"))

"""Answers Starlette itself would give, in the contract's shape: JSON errors, no redirects."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from cli.devkeys import sign
from tests.conftest import BitGo, Keys, Link, row_count


@pytest.mark.parametrize("path", ["/nope", "/bitgo/v1", "/bitgo/v1/allocation/x/clear/more"])
def test_an_unknown_path_is_a_json_404(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.json() == {"error": "Not Found"}


def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(client: TestClient) -> None:
    answer = client.delete("/bitgo/v1/allocations")
    assert answer.status_code == 405
    assert answer.json() == {"error": "Method Not Allowed"}
    assert answer.headers["allow"] == "POST"


def test_a_trailing_slash_is_not_found_never_a_redirect(bitgo: BitGo, link: Link) -> None:
    body = link.body("allocation", str(uuid.uuid4()), "5")
    answer = bitgo.http.post(
        "/bitgo/v1/allocations/", json=body, headers=bitgo.headers(), follow_redirects=False
    )
    assert answer.status_code == 404
    assert answer.json() == {"error": "Not Found"}


def test_two_signature_headers_are_refused_and_change_nothing(
    bitgo: BitGo, link: Link, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    transfer_id = str(uuid.uuid4())
    answer = bitgo.http.post(
        "/bitgo/v1/allocations",
        json=link.body("allocation", transfer_id, "5"),
        headers=[("X-BitGo-Signature", sign(keys.private)), ("X-BitGo-Signature", "junk")],
    )
    assert answer.status_code == 401
    assert answer.json() == {"error": "More than one X-BitGo-Signature header"}
    assert row_count(sessions, "transfers", "id = :id", id=transfer_id) == 0

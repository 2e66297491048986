"""Schemathesis against /openapi.json, loaded from the app: requests generated from the
document (valid ones and, in negative mode, invalid ones), each with a fresh BitGo JWT or
the internal token, on real PostgreSQL and Redis.

Every answer must be: no 5xx; a status code the operation documents, with the documented
media type, headers and body schema; a 2xx/401/404/409/413/422 for a request the document
calls valid (never a 400); and a 4xx for one it calls invalid. The seed is fixed
(derandomized); ``OES_HYPOTHESIS_EXAMPLES`` runs more examples than CI's 15 per operation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis import Case, HookContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from cli.devkeys import sign
from tests.conftest import INTERNAL_TOKEN, Keys

EXAMPLES = int(os.environ.get("OES_HYPOTHESIS_EXAMPLES", "15"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"with-security-parameters": False},
        "checks": {
            "positive_data_acceptance": {
                # A well-formed request may still be refused by the state it meets (422:
                # unknown connection token, unsupported currency, insufficient funds), or
                # exceed the 16 KiB body limit, which JSON Schema cannot state (413).
                "expected-statuses": ["2xx", "401", "404", "409", "413", "422"],
            },
        },
    }
)


def _fraction_written(body: object) -> bool:
    """Whether an amount's quantity or a trade's delta is a JSON number with a fraction (494.0)."""
    if not isinstance(body, dict):
        return False
    amount, deltas = body.get("amount"), body.get("deltas")
    quantities = [amount.get("quantity")] if isinstance(amount, dict) else []
    quantities += list(deltas.values()) if isinstance(deltas, dict) else []
    return any(isinstance(q, float) for q in quantities)


def filter_failure(
    context: HookContext, failure: Failure, case: Case[Any], response: Response
) -> bool:
    """Every failure counts but one the document cannot avoid.

    To JSON Schema 494.0 is an integer, so the document cannot refuse it; the contract
    (section 2) does: a quantity or delta written with a fraction is a 400 naming the field.
    """
    error = response.json().get("error", "") if response.status_code == 400 else ""
    return not (
        isinstance(failure, RejectedPositiveData)
        and error.startswith(("amount.quantity ", "deltas."))
        and _fraction_written(case.body)
    )


@pytest.fixture(scope="module")
def api_schema(settings: Settings, client: TestClient) -> Iterator[BaseSchema]:
    """The document as the app serves it, on an app of its own: Schemathesis runs the
    lifespan on its own event loop, while ``client``'s app keeps its engine and Redis on the
    TestClient's. ``client`` is asked for so that its teardown empties the broker's queues,
    which this app fills too."""
    app = create_app(settings)
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    loaded.hook(filter_failure)
    yield loaded
    shutdown_lifespans()  # every lifespan Schemathesis started: this app's


@pytest.fixture(scope="module")
def signing_key(keys: Keys) -> bytes:
    return keys.private


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis's lazy loader reads and restores ``node._nodeid``, gone in pytest 9.2."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def credentials(case: Case[Any], private: bytes) -> dict[str, str]:
    """A fresh BitGo JWT (single use) or the internal bearer token, as the path needs."""
    if case.path.startswith("/bitgo/"):
        return {"X-BitGo-Signature": sign(private)}
    if case.path.startswith("/internal/"):
        return {"Authorization": f"Bearer {INTERNAL_TOKEN}"}
    return {}


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_answers_as_documented(case: Case[Any], signing_key: bytes) -> None:
    headers = credentials(case, signing_key)
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS, headers=headers)

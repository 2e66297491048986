"""SPEC §2: every BitGo call carries a fresh RS256 JWT; anything else is 401 and changes nothing."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import RSAAlgorithm
from redis.asyncio import Redis
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from api.signatures import KeySet, TokenRefusedError, Verifier
from cli.devkeys import sign
from tests.conftest import BitGo, Keys, Link, row_count

ALLOCATIONS = "/bitgo/v1/allocations"
MISSING = object()  # a claim left out of the token


# --- token making -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def payload(**overrides: Any) -> dict[str, Any]:
    """Claims BitGo would send (fresh jti, 60 s lifetime), with ``overrides`` applied."""
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not MISSING}


def rs256(private: bytes, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(payload(**overrides), private, algorithm="RS256", headers=headers)


def alg_none(keys: Keys) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(payload())}."


def hs256_keyed_with_public_pem(keys: Keys) -> str:
    """The classic key-confusion attack: HMAC keyed with the RSA public key's PEM text."""
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(payload())}"
    mac = hmac.new(keys.public.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tampered_payload(keys: Keys) -> str:
    header, body, signature = sign(keys.private).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["jti"] = str(uuid.uuid4())
    return f"{header}.{segment(claims)}.{signature}"


def ago(seconds: int) -> int:
    return int(time.time()) - seconds


def ahead(seconds: int) -> int:
    return int(time.time()) + seconds


# Each builder returns the X-BitGo-Signature value to send, or None to send no header.
REFUSED: list[Any] = [
    pytest.param(alg_none, id="alg_none"),
    pytest.param(hs256_keyed_with_public_pem, id="hs256_keyed_with_public_key_pem"),
    pytest.param(
        lambda k: jwt.encode(payload(), k.private, algorithm="RS512"), id="rs512_trusted_key"
    ),
    pytest.param(lambda k: rs256(k.other_private), id="rs256_untrusted_key"),
    pytest.param(tampered_payload, id="payload_tampered_signature_kept"),
    pytest.param(lambda k: rs256(k.private, iat=ago(30), exp=ago(10)), id="expired_beyond_leeway"),
    pytest.param(
        lambda k: rs256(k.private, iat=ahead(30), exp=ahead(60)), id="iat_in_future_beyond_leeway"
    ),
    pytest.param(
        lambda k: rs256(k.private, iat=int(time.time()), exp=ahead(300)),
        id="lifetime_over_max_age",
    ),
    pytest.param(
        lambda k: rs256(k.private, iat=MISSING, exp=ahead(300)),
        id="lifetime_over_max_age_without_iat",
    ),
    pytest.param(lambda k: rs256(k.private, exp=MISSING), id="missing_exp"),
    pytest.param(lambda k: rs256(k.private, jti=MISSING), id="missing_jti"),
    pytest.param(lambda k: rs256(k.private, jti=""), id="empty_jti"),
    pytest.param(lambda k: rs256(k.private, jti="   "), id="blank_jti"),
    pytest.param(lambda k: rs256(k.private, exp=10**400), id="exp_out_of_range"),
    pytest.param(lambda k: rs256(k.private, exp=-(10**400)), id="exp_out_of_range_negative"),
    pytest.param(lambda k: rs256(k.private, iat=-(10**400)), id="iat_out_of_range"),
    pytest.param(lambda k: rs256(k.private, iat=10**400), id="iat_out_of_range_ahead"),
    pytest.param(lambda k: None, id="missing_header"),
    pytest.param(lambda k: "", id="empty_header"),
    pytest.param(lambda k: "abc", id="garbage_abc"),
    pytest.param(lambda k: "Bearer ", id="garbage_bearer_only"),
    pytest.param(lambda k: "a.b.c", id="garbage_three_segments"),
]


# --- helpers ------------------------------------------------------------------------------


def send(http: TestClient, link: Link, transfer_id: str, signature: str | None) -> Any:
    headers = {} if signature is None else {"X-BitGo-Signature": signature}
    return http.post(
        ALLOCATIONS, json=link.body("allocation", transfer_id, "1000"), headers=headers
    )


def assert_refused(answer: Any, status: int = 401) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]


def stored(sessions: sessionmaker[Session], transfer_id: str) -> int:
    return row_count(sessions, "transfers", "id = :id", id=transfer_id)


def private_key(pem: bytes) -> RSAPrivateKey:
    key = load_pem_private_key(pem, password=None)
    assert isinstance(key, RSAPrivateKey)
    return key


def write_jwks(path: Path, named: dict[str, bytes]) -> Path:
    """A JWKS file holding the public half of each private key under its kid."""
    entries = []
    for kid, private in named.items():
        jwk = RSAAlgorithm.to_jwk(private_key(private).public_key(), as_dict=True)
        entries.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture
def redis(redis_url: str) -> Redis:
    """Required by Verifier; ``claims`` never touches it (no connection is opened)."""
    return Redis.from_url(redis_url)


def verifier(keyset: KeySet, redis: Redis, **options: Any) -> Verifier:
    return Verifier(keys=keyset, redis=redis, **options)


# --- through the app ----------------------------------------------------------------------


@pytest.mark.parametrize("make", REFUSED)
def test_bad_token_is_401_and_stores_nothing(
    client: TestClient,
    bitgo: BitGo,
    link: Link,
    keys: Keys,
    sessions: sessionmaker[Session],
    make: Callable[[Keys], str | None],
) -> None:
    before = bitgo.balances(link)
    transfer_id = str(uuid.uuid4())
    assert_refused(send(client, link, transfer_id, make(keys)))
    assert stored(sessions, transfer_id) == 0
    assert bitgo.balances(link) == before


@pytest.mark.parametrize("prefix", ["Bearer ", "bearer "], ids=["Bearer", "lowercase_bearer"])
def test_bearer_prefix_on_valid_token_is_accepted(
    client: TestClient, link: Link, keys: Keys, sessions: sessionmaker[Session], prefix: str
) -> None:
    transfer_id = str(uuid.uuid4())
    answer = send(client, link, transfer_id, prefix + sign(keys.private))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "reserved"
    assert stored(sessions, transfer_id) == 1


def test_replayed_jti_is_401_and_second_call_stores_nothing(
    client: TestClient, bitgo: BitGo, link: Link, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    token = sign(keys.private)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert send(client, link, first, token).status_code == 200
    assert_refused(send(client, link, second, token))
    assert stored(sessions, first) == 1
    assert stored(sessions, second) == 0
    assert bitgo.balances(link) == (0, 1000, 0)


def test_replayed_jti_is_401_even_with_a_new_signature(
    client: TestClient, link: Link, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    """The jti is spent, not the token text: a re-signed token with the same jti is a replay."""
    jti = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert send(client, link, first, rs256(keys.private, jti=jti)).status_code == 200
    assert_refused(send(client, link, second, rs256(keys.private, jti=jti, exp=ahead(59))))
    assert stored(sessions, second) == 0


def test_kid_naming_no_configured_key_is_401_and_stores_nothing(
    settings: Settings,
    bitgo: BitGo,
    link: Link,
    keys: Keys,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """With keys that have ids (JWKS), a kid that names none of them is refused."""
    jwks = write_jwks(tmp_path / "bitgo.jwks.json", {"bitgo-1": keys.private})
    app = create_app(
        dataclasses.replace(settings, bitgo_public_keys=jwks, bitgo_keys=KeySet.load(jwks))
    )
    transfer_id = str(uuid.uuid4())
    with TestClient(app) as http:
        answer = send(http, link, transfer_id, rs256(keys.private, headers={"kid": "nope"}))
    assert_refused(answer)
    assert stored(sessions, transfer_id) == 0
    assert bitgo.balances(link) == (0, 0, 0)


def test_redis_unreachable_is_503_with_retry_after_and_stores_nothing(
    settings: Settings, bitgo: BitGo, link: Link, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    app = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0"))
    transfer_id = str(uuid.uuid4())
    with TestClient(app) as http:
        answer = send(http, link, transfer_id, sign(keys.private))
    assert_refused(answer, status=503)
    assert answer.headers["Retry-After"]
    assert stored(sessions, transfer_id) == 0
    assert bitgo.balances(link) == (0, 0, 0)


# --- KeySet.load ---------------------------------------------------------------------------


def test_pem_file_with_two_keys_verifies_a_token_from_the_second(
    keys: Keys, redis: Redis, tmp_path: Path
) -> None:
    pem = tmp_path / "two.pem"
    pem.write_bytes(keys.public.read_bytes() + keys.other_public.read_bytes())
    keyset = KeySet.load(pem)
    assert len(keyset.keys) == 2
    token = rs256(keys.other_private)
    assert verifier(keyset, redis).claims(token)["jti"]


def test_pem_file_keys_ignore_the_token_kid(keys: Keys, redis: Redis) -> None:
    """PEM keys have no ids, so a kid selects nothing and the signature alone decides."""
    token = rs256(keys.private, headers={"kid": "anything"})
    assert verifier(KeySet.load(keys.public), redis).claims(token)["jti"]


def test_jwks_file_kid_selects_the_key(keys: Keys, redis: Redis, tmp_path: Path) -> None:
    jwks = write_jwks(tmp_path / "k.json", {"a": keys.private, "b": keys.other_private})
    keyset = KeySet.load(jwks)
    assert sorted(k.kid or "" for k in keyset.keys) == ["a", "b"]
    token = rs256(keys.other_private, headers={"kid": "b"})
    assert verifier(keyset, redis).claims(token)["jti"]


def test_jwks_file_kid_naming_another_key_is_refused(
    keys: Keys, redis: Redis, tmp_path: Path
) -> None:
    """The kid picks the one key to try; a token signed by another listed key fails."""
    jwks = write_jwks(tmp_path / "k.json", {"a": keys.private, "b": keys.other_private})
    token = rs256(keys.other_private, headers={"kid": "a"})
    with pytest.raises(TokenRefusedError):
        verifier(KeySet.load(jwks), redis).claims(token)


def test_jwks_file_unknown_kid_is_refused(keys: Keys, redis: Redis, tmp_path: Path) -> None:
    jwks = write_jwks(tmp_path / "k.json", {"a": keys.private})
    token = rs256(keys.private, headers={"kid": "z"})
    with pytest.raises(TokenRefusedError):
        verifier(KeySet.load(jwks), redis).claims(token)


def test_jwks_file_token_without_kid_tries_every_key(
    keys: Keys, redis: Redis, tmp_path: Path
) -> None:
    """BitGo's own example (jsonwebtoken, RS256) sends no kid; keys with ids must still work."""
    jwks = write_jwks(tmp_path / "k.json", {"a": keys.other_private, "b": keys.private})
    token = rs256(keys.private)
    assert verifier(KeySet.load(jwks), redis).claims(token)["jti"]


# --- issuer and audience ---------------------------------------------------------------------

ISSUER, AUDIENCE = "bitgo", "exchange-partner"


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": "someone-else", "aud": AUDIENCE}, id="wrong_iss"),
        pytest.param({"aud": AUDIENCE}, id="missing_iss"),
        pytest.param({"iss": ISSUER, "aud": "another-partner"}, id="wrong_aud"),
        pytest.param({"iss": ISSUER}, id="missing_aud"),
    ],
)
def test_issuer_and_audience_are_enforced_when_set(
    keys: Keys, redis: Redis, claims: dict[str, Any]
) -> None:
    check = verifier(KeySet.load(keys.public), redis, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(TokenRefusedError):
        check.claims(rs256(keys.private, **claims))


@pytest.mark.parametrize(
    "aud", [AUDIENCE, ["other", AUDIENCE]], ids=["aud_string", "aud_list_containing_it"]
)
def test_matching_issuer_and_audience_are_accepted(
    keys: Keys, redis: Redis, aud: str | list[str]
) -> None:
    check = verifier(KeySet.load(keys.public), redis, issuer=ISSUER, audience=AUDIENCE)
    assert check.claims(rs256(keys.private, iss=ISSUER, aud=aud))["iss"] == ISSUER


def test_issuer_and_audience_are_not_checked_when_unset(keys: Keys, redis: Redis) -> None:
    check = verifier(KeySet.load(keys.public), redis)
    assert check.claims(rs256(keys.private, iss="anyone", aud="anything"))["aud"] == "anything"

"""Verification of BitGo's RS256 JWTs (``X-BitGo-Signature``) with PyJWT, and jti replay refusal."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from redis.asyncio import Redis

ALGORITHM = "RS256"
# SubjectPublicKeyInfo, PKCS#1 and certificates all carry an RSA public key.
_PEM_BLOCK = re.compile(
    r"-----BEGIN (PUBLIC KEY|RSA PUBLIC KEY|CERTIFICATE)-----.+?-----END \1-----", re.DOTALL
)
_MAX_JTI = 200


class TokenRefusedError(Exception):
    """The token must be refused with 401; the message is the reason given."""


@dataclass(frozen=True)
class PublicKey:
    key: RSAPublicKey
    kid: str | None


@dataclass(frozen=True)
class KeySet:
    """BitGo's public keys: from a PEM file (one or more keys) or a JWKS JSON file."""

    keys: tuple[PublicKey, ...]

    @classmethod
    def load(cls, path: Path) -> KeySet:
        raw = path.read_text()
        keys = _jwks_keys(raw) if raw.lstrip().startswith("{") else _pem_keys(raw)
        if not keys:
            raise ValueError(f"{path}: no RSA public keys found")
        for key in keys:
            if key.key.key_size < 2048:
                raise ValueError(f"{path}: RSA keys must be at least 2048 bits")
        return cls(keys=tuple(keys))

    def candidates(self, kid: object) -> tuple[PublicKey, ...]:
        """The keys to try for a token whose header names ``kid``."""
        if kid is None:
            # BitGo's tokens (jsonwebtoken, RS256) carry no kid: nothing selects, try them all.
            return self.keys
        if isinstance(kid, str) and any(k.kid is not None for k in self.keys):
            named = tuple(k for k in self.keys if k.kid == kid)
            if named:
                return named
        return tuple(k for k in self.keys if k.kid is None)


def _pem_keys(raw: str) -> list[PublicKey]:
    keys = []
    for match in _PEM_BLOCK.finditer(raw):
        block = match.group(0).encode()
        key: object
        if match.group(1) == "CERTIFICATE":
            key = load_pem_x509_certificate(block).public_key()
        else:
            key = load_pem_public_key(block)
        if not isinstance(key, RSAPublicKey):
            raise ValueError("only RSA public keys can verify RS256")
        keys.append(PublicKey(key=key, kid=None))
    return keys


def _jwks_keys(raw: str) -> list[PublicKey]:
    keys = []
    for jwk in jwt.PyJWKSet.from_dict(json.loads(raw)).keys:
        if isinstance(jwk.key, RSAPublicKey):
            keys.append(PublicKey(key=jwk.key, kid=jwk.key_id))
    return keys


# Seconds since 1970 either way of which a token's times must lie (about year 5138).
_TIME_RANGE = 10**11


def _is_time(value: object) -> bool:
    """A number usable as a Unix time: a huge integer would overflow float arithmetic."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return -_TIME_RANGE < value < _TIME_RANGE and (isinstance(value, int) or math.isfinite(value))


@dataclass(frozen=True)
class Verifier:
    """Checks a token in the order the spec gives; ``verify`` raises TokenRefusedError."""

    keys: KeySet
    redis: Redis
    max_age: int = 60
    leeway: int = 5
    issuer: str | None = None
    audience: str | None = None

    def claims(self, header_value: str | None, *, now: float | None = None) -> dict[str, Any]:
        """The verified claims of a token, replay aside."""
        if not header_value:
            raise TokenRefusedError("Missing X-BitGo-Signature")
        token = header_value.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRefusedError(f"Malformed token: {exc}") from None
        if header.get("alg") != ALGORITHM:
            raise TokenRefusedError("Token algorithm must be RS256")
        claims = self._decode(token, header.get("kid"))
        now = time.time() if now is None else now
        self._check_times(claims, now)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti.strip() or len(jti) > _MAX_JTI:
            raise TokenRefusedError("Token jti is required")
        return claims

    def _decode(self, token: str, kid: object) -> dict[str, Any]:
        candidates = self.keys.candidates(kid)
        if not candidates:
            raise TokenRefusedError("Unknown signing key")
        options = {
            "require": ["exp", "jti"],
            "verify_aud": self.audience is not None,
            "verify_iss": self.issuer is not None,
        }
        for candidate in candidates:
            try:
                return jwt.decode(
                    token,
                    key=candidate.key,
                    algorithms=[ALGORITHM],
                    options=options,  # type: ignore[arg-type]
                    leeway=self.leeway,
                    issuer=self.issuer,
                    audience=self.audience,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise TokenRefusedError("Token expired") from None
            except jwt.PyJWTError as exc:
                raise TokenRefusedError(f"Invalid token: {exc}") from None
            except (ValueError, TypeError, OverflowError):
                # A signed token with claims PyJWT cannot even read is refused all the same.
                raise TokenRefusedError("Invalid token: malformed claims") from None
        raise TokenRefusedError("Invalid token: signature verification failed")

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        exp = claims["exp"]
        if not _is_time(exp):
            raise TokenRefusedError("Token exp must be a number")
        iat = claims.get("iat")
        if iat is not None:
            if not _is_time(iat):
                raise TokenRefusedError("Token iat must be a number")
            if iat > now + self.leeway:
                raise TokenRefusedError("Token issued in the future")
        lifetime = exp - (iat if iat is not None else now)
        if lifetime > self.max_age + self.leeway:
            raise TokenRefusedError(f"Token lifetime exceeds {self.max_age} s")

    async def verify(self, header_value: str | None) -> dict[str, Any]:
        """Verify the token and spend its jti; a jti seen before is a replay."""
        claims = self.claims(header_value)
        # Keep the jti until well after the token could still be accepted.
        ttl = max(1, int(claims["exp"] + self.leeway - time.time()) + 1)
        fresh = await self.redis.set(f"oes:jti:{claims['jti']}", b"1", nx=True, ex=ttl)
        if not fresh:
            raise TokenRefusedError("Token replayed")
        return claims

"""Development BitGo key pairs and tokens signed with them (standalone, curl, tests, bench)."""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PRIVATE_NAME = "bitgo-dev-private.pem"
PUBLIC_NAME = "bitgo-dev-public.pem"


def ensure_key_pair(directory: Path) -> tuple[Path, Path]:
    """A 2048-bit RSA pair in ``directory``, made on first use; (private, public) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not private.exists() or not public.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private, public


@functools.lru_cache(maxsize=8)
def _private_key(private_pem: bytes) -> rsa.RSAPrivateKey:
    # Loading checks the key, which costs tens of milliseconds; do it once per key.
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the BitGo signing key must be an RSA private key")
    return key


def sign(private_pem: bytes, *, lifetime: int = 60, **claims: object) -> str:
    """An RS256 token as BitGo makes them: fresh jti, short expiry."""
    now = int(time.time())
    payload = {"iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, _private_key(private_pem), algorithm="RS256")

"""Synchronous client for the BitGo routes a partner calls and for BitGo Express's signPayload."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import structlog

log = structlog.get_logger(__name__)


class BitGoError(Exception):
    """Any failure talking to BitGo."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BitGoNotFoundError(BitGoError):
    """BitGo answered 404."""


class BitGoConflictError(BitGoError):
    """BitGo answered 409."""


class BitGoUnavailableError(BitGoError):
    """BitGo could not be reached, timed out or kept answering 5xx through every retry."""


@dataclass(frozen=True)
class BitGoConfig:
    """Where BitGo and BitGo Express are, how to authenticate, and how patiently to call."""

    api_url: str
    # Kept out of the repr so the token cannot reach a log line or a traceback.
    access_token: str = field(repr=False)
    enterprise_id: str
    express_url: str | None
    wallet_id: str | None
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5


class BitGoClient:
    """One connection pool to BitGo, with retries on transport errors and 5xx only."""

    def __init__(self, config: BitGoConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._config = config
        self._sleep = sleep
        self._api = config.api_url.rstrip("/")
        self._partners = (
            f"/api/network/v1/enterprises/{quote(config.enterprise_id, safe='')}/partners"
        )
        self._http = httpx.Client(
            timeout=httpx.Timeout(config.timeout, connect=min(config.timeout, 5)),
            headers={
                "Authorization": f"Bearer {config.access_token}",
                "Accept": "application/json",
                "User-Agent": "oes-partner",
            },
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> BitGoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocation(self, allocation_id: str) -> dict[str, Any]:
        """One allocation or deallocation record; BitGoNotFoundError when BitGo does not know it."""
        path = f"{self._partners}/allocations/{quote(allocation_id, safe='')}"
        body = _object(self._call("GET", self._api, path), "the allocation")
        return _unwrap(body, "allocation")

    def balances(self) -> dict[str, dict[str, Any]]:
        """The partner's network balances, keyed by connection id."""
        body = self._call("GET", self._api, f"{self._partners}/balances")
        balances = _object(body, "the balances").get("networkBalances")
        if not isinstance(balances, dict) or not all(
            isinstance(v, dict) for v in balances.values()
        ):
            raise BitGoError("BitGo answered without networkBalances")
        return balances

    def post_settlement(self, body: dict[str, Any]) -> dict[str, Any]:
        """Post a settlement; an equal dict always goes out as the same bytes."""
        # BitGo tells a retry from a conflicting reuse of externalId by comparing bodies.
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        answer = self._call("POST", self._api, f"{self._partners}/settlements", content=raw)
        return _unwrap(_object(answer, "the settlement"), "settlement")

    def sign_payload(self, payload: str) -> tuple[str, str]:
        """(payload, signature) from BitGo Express signing ``payload`` with the trading wallet."""
        if self._config.express_url is None:
            raise BitGoError("BITGO_EXPRESS_URL is not set")
        if self._config.wallet_id is None:
            raise BitGoError("BITGO_WALLET_ID is not set")
        raw = json.dumps({"walletId": self._config.wallet_id, "payload": payload}).encode()
        express = self._config.express_url.rstrip("/")
        answer = self._call("POST", express, "/api/v2/ofc/signPayload", content=raw)
        body = _object(answer, "signPayload")
        signed, signature = body.get("payload"), body.get("signature")
        # What was signed is the exact string Express returned; re-serializing would break it.
        if not isinstance(signed, str):
            raise BitGoError("Express returned no payload string")
        if not isinstance(signature, str):
            raise BitGoError("Express returned no signature string")
        return signed, signature

    def _call(
        self,
        method: str,
        base: str,
        path: str,
        *,
        params: httpx.QueryParams | None = None,
        content: bytes | None = None,
    ) -> Any:
        """Send one request, retrying transport errors and 5xx; the decoded JSON of a 2xx."""
        headers = {"Content-Type": "application/json"} if content is not None else None
        attempts = self._config.retries + 1
        last_status: int | None = None
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(
                    method, base + path, params=params, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 500:
                    return _decode(response)
                last_status = response.status_code
                reason = f"HTTP {last_status}"
            if attempt == attempts:
                raise BitGoUnavailableError(
                    f"{method} {path} failed after {attempts} attempts: {reason}",
                    status=last_status,
                )
            log.warning("bitgo_retry", method=method, path=path, attempt=attempt, reason=reason)
            self._sleep(self._config.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover


def _decode(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer, or the typed error a 3xx/4xx answer stands for."""
    status = response.status_code
    if not response.is_success:
        kind = {404: BitGoNotFoundError, 409: BitGoConflictError}.get(status, BitGoError)
        raise kind(_error_text(response), status=status)
    try:
        return response.json()
    except ValueError as exc:
        raise BitGoError(f"BitGo answered {status} with a non-JSON body", status=status) from exc


def _error_text(response: httpx.Response) -> str:
    """BitGo's ``{"error": ...}`` text when the body has one, else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]:
        return str(body["error"])
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _object(body: Any, what: str) -> dict[str, Any]:
    """``body`` when it is a JSON object; BitGoError otherwise."""
    if not isinstance(body, dict):
        raise BitGoError(f"BitGo answered {what} with JSON that is not an object")
    return body


def _unwrap(body: dict[str, Any], key: str) -> dict[str, Any]:
    """The record inside ``{key: {...}}``, or the body itself when it is not wrapped."""
    inner = body.get(key)
    return inner if isinstance(inner, dict) else body

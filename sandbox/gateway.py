"""The sandbox's calls to the gateway: signed as BitGo signs them, misbehaving on request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import structlog

from cli.devkeys import sign
from sandbox.store import Fault

log = structlog.get_logger(__name__)


class NoAnswer(Exception):
    """The gateway did not answer (or the sandbox dropped its answer on purpose)."""


class Gateway:
    """POSTs and PUTs to the gateway with a fresh RS256 JWT (new jti, 60 s expiry) each time."""

    def __init__(self, url: str, private_key: Path, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.private_pem = private_key.read_bytes()
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        headers = {"X-BitGo-Signature": sign(self.private_pem, lifetime=60)}
        try:
            return await self.http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("gateway_unreachable", path=path, error=str(exc))
            raise NoAnswer(str(exc)) from None

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        fault: Fault | None = None,
        first: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """Make one call; ``fault`` may delay it, send it twice, or drop its answer.

        A dropped answer (``timeout``) applies to the first call of a flow only: the
        gateway acted, BitGo never heard.
        """
        mode = fault.mode if fault else None
        if mode == "delay" and fault is not None:
            await asyncio.sleep(fault.seconds)
        if mode == "duplicate":
            answers = await asyncio.gather(
                self._send(method, path, body), self._send(method, path, body)
            )
            # Report the one that did the work, as BitGo would after a retry.
            answer = next((a for a in answers if a.status_code == 200), answers[0])
            log.info("sandbox_duplicated", path=path, statuses=[a.status_code for a in answers])
        else:
            answer = await self._send(method, path, body)
        if mode == "timeout" and first:
            log.info("sandbox_dropped_answer", path=path, status=answer.status_code)
            raise NoAnswer("answer dropped by fault injection")
        if answer.status_code >= 500:
            raise NoAnswer(f"gateway answered {answer.status_code}")
        try:
            parsed = answer.json()
        except ValueError:
            parsed = {"error": answer.text[:200]}
        return answer.status_code, parsed if isinstance(parsed, dict) else {}

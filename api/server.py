"""Running the web process under uvicorn, with its edges bounded.

uvicorn's httptools protocol buffers headers without limit and waits for a slow
client for ever; ``BoundedHttpToolsProtocol`` refuses headers past a size (431) and
drops a connection whose headers or body do not arrive in time (408 while no
request is being served), and answers past ``OES_HTTP_MAX_CONNECTIONS`` with a JSON
503 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import structlog
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.settings import Settings

log = structlog.get_logger(__name__)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_BODY_ALLOWANCE = 16 * 1024  # the largest body a route takes (api.bodies.MAX_BODY)


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer past OES_HTTP_MAX_CONNECTIONS."""
    await JSONResponse(
        {"error": "Too many requests in progress, retry later"},
        status_code=503,
        headers={"Retry-After": "1", "Connection": "close"},
    )(scope, receive, send)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools, with a cap on header bytes and deadlines for headers and body.

    An answer of its own (408, 431) is written only while no request of the connection
    is being served; otherwise the connection is closed once that answer has gone.
    """

    max_header_bytes = 16 * 1024
    header_timeout = 10.0
    body_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check answers in plain text; ours answers in the contract's shape.
        self._limit, self.limit_concurrency = self.limit_concurrency, None
        self._raw_header_bytes = 0  # bytes received while headers are awaited
        self._header_bytes = 0  # bytes of the request line and headers, as parsed
        self._awaiting_headers = True
        self._refused = False  # answered (or to be closed) by us: parse nothing more
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None

    def _serving(self) -> bool:
        """Whether a request of this connection is being answered, or queued to be."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers and not self._serving():
            # Counted before the parser buffers it, so a huge header is cut off early; the
            # allowance covers a body that arrives in the same packets as its headers.
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self.max_header_bytes + _BODY_ALLOWANCE:
                self._refuse(431, "Request headers too large")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._awaiting_headers = True
        # The deadline runs from the connection's start (or the last answer), not from the
        # first byte; while a request is served, on_response_complete arms it.
        if self._phase != "headers" and not self._serving():
            self._arm(self.header_timeout, "headers")

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            self._count(len(url))
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            self._count(len(name) + len(value))
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers = False
        self._raw_header_bytes = 0
        self._arm(self.body_timeout, "body")
        if self._limit is None or (
            len(self.connections) < self._limit and len(self.tasks) < self._limit
        ):
            super().on_headers_complete()
            return
        log.warning("http_concurrency_limit", limit=self._limit)
        app, self.app = self.app, _busy  # this one request only
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._awaiting_headers = True  # what comes next is the next request's
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving() and self._awaiting_headers:
            self._arm(self.header_timeout, "headers")

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, "Request headers too large")

    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(seconds, self._too_slow, phase)
        self._phase = phase

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _too_slow(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        log.info("http_client_too_slow", phase=phase, client=self.client)
        if phase == "body":
            # The app waits for this body, or has answered without it: drop the connection,
            # which ends the wait; never a second answer.
            self.transport.close()
            return
        if self._serving():
            return  # a pipelined request's headers: on_response_complete arms the deadline
        self._refuse(408, "Request not received in time")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close; parse nothing more on this connection.

        While a request is being answered, that answer goes first and the connection is
        closed after it instead.
        """
        self._disarm()
        self._refused = True
        if self.transport.is_closing():
            return
        if self._serving():
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


class EnvBoundedHttpToolsProtocol(BoundedHttpToolsProtocol):
    """The same, with the limits of the environment's settings (each uvicorn worker reads them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = _env_limits()
        self.max_header_bytes, self.header_timeout, self.body_timeout = limits


@functools.cache
def _env_limits() -> tuple[int, float, float]:
    s = Settings.from_env()
    return s.http_max_header_bytes, s.http_header_timeout, s.http_body_timeout


def run(settings: Settings, app: Any, *, host: str, port: int, workers: int = 1) -> None:
    """Serve ``app``: an ASGI app, or the import string of a factory (any number of workers).

    With an app object, ``settings`` gives the limits; worker processes read theirs
    from the environment, as the factory does.
    """
    protocol: type[BoundedHttpToolsProtocol] = EnvBoundedHttpToolsProtocol
    if not isinstance(app, str):
        protocol = type(
            "ConfiguredHttpToolsProtocol",
            (BoundedHttpToolsProtocol,),
            {
                "max_header_bytes": settings.http_max_header_bytes,
                "header_timeout": settings.http_header_timeout,
                "body_timeout": settings.http_body_timeout,
            },
        )
    uvicorn.run(
        app,
        factory=isinstance(app, str),
        host=host,
        port=port,
        workers=workers,
        http=protocol,
        limit_concurrency=settings.http_max_connections,
        access_log=False,
        log_config=None,
    )

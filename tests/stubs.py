"""Small HTTP servers on 127.0.0.1 standing in for what lies outside the machine:
BitGo's API, BitGo Express and the exchange's platform webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Seen:
    """One request as the stub received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# A handler answers (status, JSON body), or (status, bytes) sent as they are;
# returning None closes the connection unanswered.
Answer = tuple[int, Any] | None
Handler = Callable[[Seen], Answer]


@dataclass
class Stub:
    url: str
    seen: list[Seen] = field(default_factory=list)
    handler: Handler = lambda seen: (200, {})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, path_prefix: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(path_prefix)]


@contextmanager
def serving(handler: Handler | None = None) -> Iterator[Stub]:
    """Run a stub until the block ends; ``stub.handler`` may be swapped at any time."""
    stub = Stub(url="")
    if handler is not None:
        stub.handler = handler

    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            seen = Seen(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self.rfile.read(length),
            )
            with stub.lock:
                stub.seen.append(seen)
            answer = stub.handler(seen)
            if answer is None:
                self.close_connection = True
                return
            status, body = answer
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()

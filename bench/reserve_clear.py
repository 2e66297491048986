"""Benchmark: allocation reserve then clear, as BitGo calls them, against a live gateway.

One operation is two HTTP requests (reserve, clear); ``--requests`` counts requests.
Without ``--url`` the gateway is started here on a fresh database; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
from psycopg import sql

from cli.devkeys import ensure_key_pair, sign
from cli.embedded import start_postgres, start_redis
from models.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
QUANTITY = 1000
RESERVE = "/bitgo/v1/allocations"


@dataclass(frozen=True)
class Target:
    url: str
    private_pem: bytes
    internal_token: str
    currency: str
    token_lifetime: int
    pid: int | None = None  # the serve process, when the script started it
    database_url: str | None = None  # its database, likewise


@dataclass(frozen=True)
class Operation:
    allocation_id: str
    reserve_body: bytes
    reserve_token: str
    clear_token: str


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"reserve": [], "clear": []})
    errors: int = 0
    samples: list[str] = field(default_factory=list)

    def fail(self, route: str, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(f"{route}: {what}")


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server at ``server_url``; dropped afterwards."""
    name = f"oes_bench_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        info = psycopg.conninfo.conninfo_to_dict(server_url)
        params = {k: str(v) for k, v in info.items() if k != "dbname" and v}
        url = f"postgresql:///{name}?{urlencode(params)}"
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@contextmanager
def local_gateway(workers: int, token_lifetime: int) -> Iterator[Target]:
    """``oes-partner serve`` in a subprocess on a fresh database; everything removed after."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oes-bench-")))
        server_url = os.environ.get("DATABASE_URL")
        if not server_url:
            server_url, pg = start_postgres(tmp / "postgres")
            stack.callback(pg.cleanup)
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            redis_url, rd = start_redis(tmp / "redis")
            stack.callback(rd.shutdown)
        database_url = stack.enter_context(fresh_database(server_url))
        private, public = ensure_key_pair(tmp / "keys")
        token = f"bench-internal-{uuid.uuid4().hex}"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "BITGO_PUBLIC_KEYS": str(public),
            "OES_INTERNAL_TOKEN": token,
            "OES_CURRENCIES": "btc",
            "OES_JWT_MAX_AGE": str(token_lifetime),
        }
        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            port, log = int(probe.getsockname()[1]), tmp / "serve.log"
        command = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--workers", str(workers)]
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
        stack.callback(stop, process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        print(f"gateway: {url} ({workers} worker(s)), database {database_url.split('?')[0]}")
        yield Target(
            url, private.read_bytes(), token, "btc", token_lifetime, process.pid, database_url
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def link(http: httpx.Client, target: Target) -> dict[str, str]:
    """Issue a connection token and link it as BitGo would; the ids a reserve body carries."""
    issued = http.post(
        "/internal/v1/connection-tokens",
        json={"partnersClientId": "bench-user"},
        headers={"Authorization": f"Bearer {target.internal_token}"},
    )
    issued.raise_for_status()
    ids = {"clientId": str(uuid.uuid4()), "connectionId": str(uuid.uuid4())}
    linked = http.post(
        "/bitgo/v1/connections",
        json={**ids, "connectionToken": issued.json()["connectionToken"]},
        headers={"X-BitGo-Signature": sign(target.private_pem)},
    )
    linked.raise_for_status()
    answer = linked.json()
    return {**ids, **{k: answer[k] for k in ("partnersClientId", "partnersConnectionId")}}


def prepare(target: Target, fields: dict[str, str], count: int) -> list[Operation]:
    """Bodies and single-use tokens for ``count`` operations, so the timed loop does no crypto."""
    amount = {"currency": target.currency, "quantity": str(QUANTITY)}
    ops = []
    for allocation_id in (str(uuid.uuid4()) for _ in range(count)):
        body = json.dumps({"allocationId": allocation_id, "amount": amount, **fields}).encode()
        tokens = [sign(target.private_pem, lifetime=target.token_lifetime) for _ in range(2)]
        ops.append(Operation(allocation_id, body, *tokens))
    return ops


async def call(
    stats: Stats, route: str, sending: Coroutine[Any, Any, httpx.Response], expect: str
) -> bool:
    """Await one request (not yet started), timing it and checking its answer."""
    started = time.perf_counter()
    try:
        answer = await sending
    except httpx.HTTPError as exc:
        stats.fail(route, f"{type(exc).__name__}: {exc}")
        return False
    stats.latencies[route].append(time.perf_counter() - started)
    if answer.status_code != 200 or answer.json().get("status") != expect:
        stats.fail(route, f"{answer.status_code} {answer.text[:200]} (expected {expect})")
        return False
    return True


async def drive(client: httpx.AsyncClient, ops: list[Operation], tasks: int, stats: Stats) -> float:
    """Run ``ops`` with ``tasks`` concurrent tasks; the wall time."""
    pending = iter(ops)  # shared: each task takes the next operation

    async def worker() -> None:
        for op in pending:  # headers are plain dicts of pre-signed tokens: no crypto here
            headers = {"X-BitGo-Signature": op.reserve_token, "Content-Type": "application/json"}
            reserve = client.post(RESERVE, content=op.reserve_body, headers=headers)
            if await call(stats, "reserve", reserve, "reserved"):
                path = f"/bitgo/v1/allocation/{op.allocation_id}/clear"
                clear = client.put(path, headers={"X-BitGo-Signature": op.clear_token})
                await call(stats, "clear", clear, "cleared")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - started


async def benchmark(
    url: str, warm: list[Operation], timed: list[Operation], tasks: int
) -> tuple[Stats, Stats, float]:
    """Warm up, then the timed run, on one keep-alive client sized to the concurrency."""
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        warm_stats, stats = Stats(), Stats()
        await drive(client, warm, tasks, warm_stats)
        wall = await drive(client, timed, tasks, stats)
    return warm_stats, stats, wall


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted seconds, in ms."""
    return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)] * 1000 if ordered else math.nan


def report(stats: Stats, wall: float, ops: int) -> None:
    sent = sum(len(v) for v in stats.latencies.values())
    print(f"timed: {sent} requests ({ops} operations) in {wall:.2f} s")
    print(f"throughput: {sent / wall:.1f} requests/s, {ops / wall:.1f} operations/s")
    print(f"{'route':8} {'count':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}  (ms)")
    for route, values in stats.latencies.items():
        v = sorted(values)
        cells = " ".join(f"{percentile(v, p):8.1f}" for p in (50, 95, 99, 100))
        print(f"{route:8} {len(v):>6} {cells}")
    print(f"errors: {stats.errors}")
    for sample in stats.samples:
        print(f"  e.g. {sample}")


def run(target: Target, args: argparse.Namespace) -> int:
    with httpx.Client(base_url=target.url, timeout=30) as http:
        fields = link(http, target)
        warm_ops, timed_ops = args.warmup // 2, max(1, args.requests // 2)
        started = time.perf_counter()
        warm, timed = prepare(target, fields, warm_ops), prepare(target, fields, timed_ops)
        print(f"prepared {2 * (warm_ops + timed_ops)} signed requests in ", end="")
        print(f"{time.perf_counter() - started:.1f} s; concurrency {args.concurrency}")
        warm_stats, stats, wall = asyncio.run(benchmark(target.url, warm, timed, args.concurrency))
        print(f"warmup: {2 * warm_ops} requests, {warm_stats.errors} errors {warm_stats.samples}")
        report(stats, wall, timed_ops)
        if time.perf_counter() - started > target.token_lifetime:
            print("warning: the run outlived the tokens' lifetime (--token-lifetime)")

        answer = http.get(
            f"/internal/v1/accounts/{fields['partnersConnectionId']}",
            headers={"Authorization": f"Bearer {target.internal_token}"},
        )
        answer.raise_for_status()
    balance = answer.json()["balances"].get(target.currency, {})
    available, pending = int(balance.get("available", 0)), int(balance.get("pendingIn", 0))
    total = warm_ops + timed_ops
    ok = available == total * QUANTITY and pending == 0
    print(
        f"balance: available {available}, pendingIn {pending}; expected {total} allocations"
        f" x {QUANTITY} = {total * QUANTITY}: {'matches' if ok else 'DOES NOT MATCH'}"
    )
    return 0 if ok and not stats.errors and not warm_stats.errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--url", help="a running gateway; started here when omitted")
    add("--key", type=Path, help="BitGo private key PEM (with --url)")
    add("--internal-token", help="OES_INTERNAL_TOKEN (with --url)")
    add("--currency", default="btc", help="with --url: one of its OES_CURRENCIES")
    add("--concurrency", type=int, default=32, help="concurrent client tasks")
    add("--requests", type=int, default=2000, help="timed HTTP requests (2 per operation)")
    add("--warmup", type=int, default=200, help="HTTP requests run first, not counted")
    add("--workers", type=int, default=1, help="server processes (without --url)")
    add("--token-lifetime", type=int, help="JWT lifetime, s (600, as OES_JWT_MAX_AGE; --url: 60)")
    args = parser.parse_args()
    if not args.url:
        with local_gateway(args.workers, args.token_lifetime or 600) as target:
            return run(target, args)
    if not args.key or not args.internal_token:
        parser.error("--url needs --key and --internal-token")
    key, lifetime = args.key.read_bytes(), args.token_lifetime or 60
    target = Target(args.url.rstrip("/"), key, args.internal_token, args.currency, lifetime)
    return run(target, args)


if __name__ == "__main__":
    sys.exit(main())

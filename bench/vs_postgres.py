"""The gateway beside PostgreSQL itself, in one run: req/s as a share of pgbench's TPS.

    python bench/vs_postgres.py [--route reserve|clear] [--connections 64] [--duration 10]
                                [--workers 1] [--pgbench-clients 32]

Starts ``oes-partner serve`` on a fresh database (as bench/reserve_clear.py does), links
one connection, signs every token before the clock starts, and drives one route with
``wrk`` (Debian's package) from a Lua script that sends each pre-signed request once.
Then ``pgbench`` runs the equivalent transaction (insert a transfer row, update one
balance row, commit) on the same PostgreSQL for the same time. It prints both, their
ratio, and the gateway's CPU time per request (user + system of the serve process tree
over the run), the figures the performance issue asks to move.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil
from reserve_clear import QUANTITY, RESERVE, Target, link, local_gateway

from cli.devkeys import sign

# Each thread of wrk takes every n-th pre-signed request and sends it once; what it is
# answered is counted by status, so a replayed or refused request cannot hide.
LUA = r"""
-- Globals: each thread's script runs in a state of its own; done() reads them back.
lines, next_line, statuses = {}, 1, {}
thread_count, threads = 0, {}

function setup(thread)
  thread:set("id", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

function init(args)
  local path, count = args[1], tonumber(args[2])
  local i = 0
  for line in io.lines(path) do
    if i % count == id then
      local method, target, token, body = line:match("^(%S+)\t(%S+)\t(%S+)\t?(.*)$")
      local headers = {["X-BitGo-Signature"] = token}
      if body ~= "" then headers["Content-Type"] = "application/json" end
      table.insert(lines, wrk.format(method, target, headers, body ~= "" and body or nil))
    end
    i = i + 1
  end
end

function request()
  local r = lines[next_line] or lines[#lines]
  next_line = next_line + 1
  return r
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses") or {}) do
      totals[code] = (totals[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(totals) do table.insert(parts, code .. "=" .. n) end
  io.write(string.format("WRK requests=%d seconds=%.3f p50_ms=%.2f p99_ms=%.2f errors=%d %s\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, table.concat(parts, " ")))
end
"""

PGBENCH_SCHEMA = """
DROP TABLE IF EXISTS bench_transfers, bench_accounts;
CREATE TABLE bench_transfers (id uuid PRIMARY KEY, connection_pk bigint NOT NULL,
    quantity numeric(78,0) NOT NULL, status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_accounts (connection_pk bigint PRIMARY KEY,
    pending_in numeric(78,0) NOT NULL DEFAULT 0 CHECK (pending_in >= 0));
INSERT INTO bench_accounts VALUES (1, 0);
"""
PGBENCH_SCRIPT = """
BEGIN;
INSERT INTO bench_transfers (id, connection_pk, quantity, status)
  VALUES (gen_random_uuid(), 1, :quantity, 'reserved');
UPDATE bench_accounts SET pending_in = pending_in + :quantity WHERE connection_pk = 1;
COMMIT;
"""


def _sign_many(args: tuple[bytes, int, int]) -> list[str]:
    private, lifetime, count = args
    return [sign(private, lifetime=lifetime) for _ in range(count)]


def tokens(target: Target, count: int) -> list[str]:
    """``count`` fresh tokens, signed on every core."""
    cores = os.cpu_count() or 1
    share = [(target.private_pem, target.token_lifetime, -(-count // cores))] * cores
    with ProcessPoolExecutor(cores) as pool:
        return [t for batch in pool.map(_sign_many, share) for t in batch][:count]


def request_lines(
    route: str, target: Target, http: httpx.Client, fields: dict[str, str], count: int
) -> list[str]:
    """One tab-separated request per line: method, path, token, body."""
    amount = {"currency": target.currency, "quantity": str(QUANTITY)}
    ids = [str(uuid.uuid4()) for _ in range(count)]
    if route == "clear":  # reserved beforehand, untimed
        reserve_tokens = tokens(target, count)
        for allocation_id, token in zip(ids, reserve_tokens, strict=True):
            body = {"allocationId": allocation_id, "amount": amount, **fields}
            answer = http.post(RESERVE, json=body, headers={"X-BitGo-Signature": token})
            answer.raise_for_status()
    signed = tokens(target, count)
    lines = []
    for allocation_id, token in zip(ids, signed, strict=True):
        if route == "reserve":
            body = json.dumps({"allocationId": allocation_id, "amount": amount, **fields})
            lines.append(f"POST\t{RESERVE}\t{token}\t{body}")
        else:
            lines.append(f"PUT\t/bitgo/v1/allocation/{allocation_id}/clear\t{token}\t")
    return lines


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants so far."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def run_wrk(url: str, script: Path, lines: Path, args: argparse.Namespace) -> dict[str, str]:
    threads = min(args.connections, os.cpu_count() or 1)
    command = ["wrk", "-t", str(threads), "-c", str(args.connections), "-d", f"{args.duration}s"]
    command += ["--latency", "-s", str(script), url, "--", str(lines), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 120)
    found = re.search(r"^WRK (.*)$", done.stdout, re.MULTILINE)
    if found is None:
        raise SystemExit(f"wrk said:\n{done.stdout}\n{done.stderr}")
    return dict(item.split("=", 1) for item in found.group(1).split())


def run_pgbench(database_url: str, args: argparse.Namespace, tmp: Path) -> float:
    pgbench = shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None
    )
    if pgbench is None:
        raise SystemExit("pgbench not found: apt-get install postgresql-client")
    subprocess.run(["psql", database_url, "-q", "-c", PGBENCH_SCHEMA], check=True)
    script = tmp / "transfer.sql"
    script.write_text(PGBENCH_SCRIPT)
    command = [pgbench, "-n", "-c", str(args.pgbench_clients), "-j", str(os.cpu_count() or 1)]
    command += ["-T", str(args.duration), "-D", f"quantity={QUANTITY}", "-f", str(script)]
    command.append(database_url)
    done = subprocess.run(command, capture_output=True, text=True)
    tps = re.search(r"tps = ([0-9.]+)", done.stdout)
    if tps is None:
        raise SystemExit(f"pgbench said:\n{done.stdout}\n{done.stderr}")
    return float(tps.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=["reserve", "clear"], default="reserve")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each run")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    parser.add_argument("--pgbench-clients", type=int, default=32)
    parser.add_argument(
        "--budget", type=int, default=12000, help="pre-signed requests; more than wrk can send"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="oes-vs-pg-") as scratch:
        tmp = Path(scratch)
        with local_gateway(args.workers, token_lifetime=900) as target:
            if target.pid is None or target.database_url is None:
                raise SystemExit("the gateway must be started by this script")
            with httpx.Client(base_url=target.url, timeout=30) as http:
                fields = link(http, target)
                started = time.perf_counter()
                lines = request_lines(args.route, target, http, fields, args.budget)
            print(
                f"prepared {len(lines)} signed {args.route} requests in "
                f"{time.perf_counter() - started:.1f} s"
            )
            (tmp / "requests.tsv").write_text("\n".join(lines) + "\n")
            (tmp / "send.lua").write_text(LUA)
            cpu_before = cpu_seconds(target.pid)
            wrk = run_wrk(target.url, tmp / "send.lua", tmp / "requests.tsv", args)
            cpu = cpu_seconds(target.pid) - cpu_before
            tps = run_pgbench(target.database_url, args, tmp)
        sent = int(wrk["requests"])
        rate = sent / float(wrk["seconds"])
        statuses = " ".join(f"{k}={v}" for k, v in wrk.items() if k.isdigit())
        print(
            f"route {args.route}: {args.connections} connections, {args.duration} s, "
            f"{args.workers} uvicorn worker(s)"
        )
        print(
            f"gateway:  {rate:8.1f} req/s  p50 {wrk['p50_ms']} ms  p99 {wrk['p99_ms']} ms  "
            f"answers {statuses}  socket errors {wrk['errors']}"
        )
        print(
            f"gateway CPU: {cpu / max(sent, 1) * 1000:.2f} ms per request "
            f"(user+system of the serve process tree)"
        )
        print(f"pgbench:  {tps:8.1f} TPS  ({args.pgbench_clients} clients, insert + update)")
        print(f"ratio gateway/pgbench: {rate / tps:.3f}")
        if sent > args.budget:
            print(f"warning: wrk sent {sent} requests for {args.budget} tokens: raise --budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())

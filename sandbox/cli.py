"""``oes-partner sandbox``: run the sandbox, or act as a BitGo client against it."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from cli.settings import defaults
from sandbox.app import SANDBOX_ACCESS_TOKEN, SANDBOX_ENTERPRISE
from sandbox.store import FAULT_MODES, Fault, StateError, hmac_hex

CLIENT_FILE = "sandbox-client.json"
STATE_FILE = "sandbox.sqlite3"  # the sandbox's memory, in its data directory


def parse_fault(text: str) -> Fault:
    """``mode[:seconds][*times]``, e.g. ``timeout``, ``delay:2``, ``release*3``, ``duplicate*0``
    (``*0``: a standing rule)."""
    rule, _, times = text.partition("*")
    mode, _, seconds = rule.partition(":")
    if mode not in (*FAULT_MODES, "fail"):
        raise argparse.ArgumentTypeError(f"fault mode must be one of {', '.join(FAULT_MODES)}")
    count = int(times) if times else 1
    kinds = ("settlement",) if mode == "fail" else ("allocation", "deallocation")
    return Fault(mode=mode, seconds=float(seconds or 0), times=count or None, kinds=kinds)


def add_parser(sub: Any) -> None:
    cli_defaults = defaults()
    box = sub.add_parser(
        "sandbox", help="a local BitGo: run it (no subcommand), or call it as a client"
    )
    box.add_argument("--port", type=int, default=cli_defaults.sandbox_port)
    box.add_argument("--host", default="127.0.0.1")
    box.add_argument("--gateway", default=cli_defaults.gateway_url)
    box.add_argument("--data-dir", default=str(cli_defaults.data_dir))
    box.add_argument(
        "--fault",
        action="append",
        type=parse_fault,
        default=[],
        metavar="MODE[:SECONDS][*TIMES]",
        help=f"a standing fault rule ({', '.join(FAULT_MODES)}, fail); *0 never runs out",
    )
    box.set_defaults(func=serve)
    client = box.add_subparsers(dest="sandbox")
    connect = client.add_parser("connect", help="link a client account at the gateway")
    connect.add_argument("--partners-client-id", required=True)
    connect.add_argument("--token", help="a connection token (default: issue one)")
    connect.set_defaults(func=cmd_connect)
    for kind in ("allocate", "deallocate"):
        p = client.add_parser(kind, help=f"{kind} funds as a BitGo client")
        p.add_argument("--connection", required=True, help="connectionId or partnersClientId")
        p.add_argument("--currency", default="btc")
        p.add_argument("--quantity", required=True)
        p.add_argument("--client-external-id", default=None)
        p.add_argument("--notes", default=None)
        p.add_argument("--nonce", default=None, help="re-send a request: its nonce again")
        p.add_argument("--fault", default=None, help="misbehave on this call only")
        p.set_defaults(func=cmd_transfer, kind=kind[:-1] + "ion")
    client.add_parser("balances", help="BitGo's balances per connection").set_defaults(
        func=cmd_balances
    )
    client.add_parser("settlements", help="settlements BitGo received").set_defaults(
        func=cmd_settlements
    )


def _url(args: argparse.Namespace) -> str:
    return defaults().sandbox_url or f"http://{args.host}:{args.port}"


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cli.devkeys import ensure_key_pair
    from config.logs import configure_logging
    from sandbox.app import create_sandbox_app

    data_dir = Path(args.data_dir).resolve()
    private, public = ensure_key_pair(data_dir)
    state = data_dir / STATE_FILE
    print("oes-partner sandbox: a local BitGo")
    print(f"  gateway: {args.gateway}")
    print(f"  state (clients, connections, allocations, balances, settlements): {state}")
    print(f"  BitGo's public key, for the gateway's BITGO_PUBLIC_KEYS: {public}")
    print(f"  listening on {_url(args)}  (BITGO_API_URL and BITGO_EXPRESS_URL)")
    print(f"  BITGO_ACCESS_TOKEN={SANDBOX_ACCESS_TOKEN} BITGO_ENTERPRISE_ID={SANDBOX_ENTERPRISE}")
    for fault in args.fault:
        print(f"  standing fault: {fault.render()}")
    sys.stdout.flush()
    configure_logging()
    try:
        app = create_sandbox_app(
            gateway_url=args.gateway, private_key=private, standing=args.fault, state=state
        )
    except StateError as exc:
        print(f"oes-partner sandbox: {exc}; move it away to start afresh", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=None)
    return 0


def _client(args: argparse.Namespace, http: httpx.Client) -> dict[str, Any]:
    """This machine's sandbox client: its enterprise, key and connections, kept on disk."""
    path = Path(args.data_dir) / CLIENT_FILE
    if path.exists():
        state: dict[str, Any] = json.loads(path.read_text())
        if (
            http.post("/sandbox/clients", json={"enterpriseId": state["enterpriseId"]}).json()[
                "clientKey"
            ]
            == state["clientKey"]
        ):
            return state
    answer = http.post("/sandbox/clients", json={}).json()
    state = {**answer, "connections": {}}
    _save(args, state)
    return state


def _save(args: argparse.Namespace, state: dict[str, Any]) -> None:
    path = Path(args.data_dir) / CLIENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)


def _show(answer: httpx.Response) -> int:
    print(f"HTTP {answer.status_code}")
    try:
        print(json.dumps(answer.json(), indent=2))
    except ValueError:
        print(answer.text)
    return 0 if answer.is_success else 1


def _internal_token(args: argparse.Namespace) -> str:
    token = defaults().internal_token or ""
    path = Path(args.data_dir) / "internal-token"
    if not token and path.exists():
        token = path.read_text().strip()
    if not token:
        raise SystemExit("oes-partner sandbox: set OES_INTERNAL_TOKEN or pass --token")
    return token


def cmd_connect(args: argparse.Namespace) -> int:
    token = args.token
    if token is None:
        answer = httpx.post(
            f"{args.gateway}/internal/v1/connection-tokens",
            json={"partnersClientId": args.partners_client_id},
            headers={"Authorization": f"Bearer {_internal_token(args)}"},
            timeout=10,
        )
        if not answer.is_success:
            return _show(answer)
        token = answer.json()["connectionToken"]
    with httpx.Client(base_url=_url(args), timeout=30) as http:
        state = _client(args, http)
        answer = http.post(
            f"/api/network/v1/enterprises/{state['enterpriseId']}/clients/connections",
            json={"connectionToken": token},
        )
        if answer.is_success:
            state["connections"][args.partners_client_id] = answer.json()["connection"]["id"]
            _save(args, state)
        return _show(answer)


def cmd_transfer(args: argparse.Namespace) -> int:
    with httpx.Client(base_url=_url(args), timeout=60) as http:
        state = _client(args, http)
        connection = state["connections"].get(args.connection, args.connection)
        base = (
            f"/api/network/v1/enterprises/{state['enterpriseId']}/clients/connections/"
            f"{connection}/{args.kind}s"
        )
        fields: dict[str, Any] = {
            "amount": {"currency": args.currency, "quantity": str(args.quantity)},
            "clientExternalId": args.client_external_id or f"cli-{uuid.uuid4()}",
            "nonce": args.nonce or uuid.uuid4().hex,
        }
        if args.notes:
            fields["notes"] = args.notes
        signing = http.post(f"{base}/signing", json=fields)
        if not signing.is_success:
            return _show(signing)
        payload = signing.json()["payload"]
        headers = {"X-Sandbox-Fault": args.fault} if args.fault else {}
        body = {**fields, "payload": payload, "signature": hmac_hex(state["clientKey"], payload)}
        print(f"clientExternalId: {fields['clientExternalId']}  nonce: {fields['nonce']}")
        answer = http.post(base, json=body, headers=headers)
        code = _show(answer)
        answered = (
            answer.json()
            if answer.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        record = answered.get("allocation") or answered.get("deallocation") or {}
        if isinstance(record, dict) and record.get("retriable"):
            command = args.kind.removesuffix("ion") + "e"  # allocation -> allocate
            notes = f" --notes {shlex.quote(args.notes)}" if args.notes else ""
            print(
                f"retriable: re-send the identical request with\n  oes-partner sandbox {command}"
                f" --connection {args.connection} --quantity {args.quantity}"
                f" --currency {args.currency} --client-external-id {fields['clientExternalId']}"
                f" --nonce {fields['nonce']}{notes}"
            )
        return code


def _partner_get(args: argparse.Namespace, path: str) -> int:
    headers = {"Authorization": f"Bearer {SANDBOX_ACCESS_TOKEN}"}
    return _show(httpx.get(f"{_url(args)}{path}", headers=headers, timeout=10))


def cmd_balances(args: argparse.Namespace) -> int:
    return _partner_get(args, f"/api/network/v1/enterprises/{SANDBOX_ENTERPRISE}/partners/balances")


def cmd_settlements(args: argparse.Namespace) -> int:
    return _partner_get(args, "/sandbox/settlements")

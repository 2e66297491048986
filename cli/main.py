"""The ``oes-partner`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from cli import settings, tables
from cli.settings import SettingsError

T = TypeVar("T")


def _publish(event_ids: list[uuid.UUID]) -> None:
    """Queue deliveries of what a command's transaction wrote; without REDIS_URL the relay will."""
    from workers.publish import BATCH, publish, publisher

    redis_url = settings.redis_url()
    if redis_url is None:
        print(f"{len(event_ids)} event(s) left for the relay (REDIS_URL is unset)", file=sys.stderr)
        return
    app = publisher(redis_url)
    try:
        with tables.progress("queueing deliveries", len(event_ids)) as bar:
            for start in range(0, len(event_ids), BATCH):
                chunk = event_ids[start : start + BATCH]
                publish(app, chunk)
                bar.advance(bar.task_ids[0], len(chunk))
    finally:
        app.close()


def _in_session(action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a domain action in one transaction; its events are queued once it commits."""
    from models import outbox
    from models.db import session_factory, sync_engine

    engine = sync_engine(settings.database_url(), pool_size=1)
    try:
        with outbox.transaction(session_factory(engine), _publish) as session:
            return action(session, *args, **kwargs)
    finally:
        engine.dispose()


def cmd_serve(args: argparse.Namespace) -> int:
    from api import server
    from api.settings import Settings

    settings = Settings.from_env()  # refuse to start on a bad setting, with one clear line
    server.run(settings, "api.app:from_env", host=args.host, port=args.port, workers=args.workers)
    return 0


def cmd_standalone(args: argparse.Namespace) -> int:
    from cli.standalone import run

    return run(
        data_dir=Path(args.data_dir),
        host=args.host,
        port=args.port,
        sandbox_port=None if args.no_sandbox else args.sandbox_port,
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from models.migrate import upgrade

    upgrade(settings.database_url(), args.revision)
    print(f"database at {args.revision}")
    return 0


def cmd_issue_token(args: argparse.Namespace) -> int:
    from models import connections

    issued = _in_session(
        connections.issue_token,
        partners_client_id=args.partners_client_id,
        ttl=timedelta(seconds=args.ttl),
    )
    print(f"connectionToken: {issued.token}")
    print(f"partnersClientId: {issued.partners_client_id}")
    print(f"expiresAt: {issued.expires_at.isoformat()}")
    return 0


def cmd_connections_list(args: argparse.Namespace) -> int:
    from models import connections

    rows = _in_session(connections.listing)
    tables.show(
        "connections",
        ("connectionId", "partnersConnectionId", "partnersClientId", "active"),
        [(r.connection_id, r.partners_connection_id, r.partners_client_id, r.active) for r in rows],
        "connection",
    )
    return 0


def cmd_set_active(args: argparse.Namespace) -> int:
    from models import connections
    from models.errors import NotFoundError

    try:
        record = _in_session(connections.set_active, args.id, active=args.active)
    except NotFoundError as exc:
        print(f"oes-partner: {exc.message}: {args.id}", file=sys.stderr)
        return 1
    state = "active" if record.active else "inactive"
    print(f"connection {record.connection_id} ({record.partners_connection_id}) is {state}")
    return 0


def cmd_transfers_list(args: argparse.Namespace) -> int:
    from models import transfers
    from models.states import Kind, Status

    rows = _in_session(
        transfers.listing,
        status=Status(args.status) if args.status else None,
        kind=Kind(args.kind) if args.kind else None,
        limit=args.limit,
    )
    tables.show(
        "transfers, newest first",
        ("created (UTC)", "kind", "id", "status", "quantity", "currency", "account", "reason"),
        [
            (
                r.created_at.isoformat(timespec="seconds"),
                r.kind.value,
                r.transfer_id,
                r.status.value,
                r.quantity,
                r.currency,
                r.partners_connection_id,
                r.rejection_reason,
            )
            for r in rows
        ],
        "transfer",
    )
    return 0


def cmd_ledger_check(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from models import ledger

    def checked(session: Session) -> ledger.LedgerReport:
        with tables.progress("checking accounts", ledger.account_count(session)) as bar:
            return ledger.check(session, progress=lambda n: bar.advance(bar.task_ids[0], n))

    report = _in_session(checked)
    for problem in report.problems:
        print(f"DRIFT {problem}")
    if report.problem_count > len(report.problems):
        print(f"… and {report.problem_count - len(report.problems)} more")
    verdict = "ok" if report.ok else f"{report.problem_count} problem(s)"
    print(f"ledger check: {report.accounts} account(s), {report.entries} entries, {verdict}")
    return 0 if report.ok else 1


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from models import outbox

    status = outbox.EventStatus(args.status) if args.status else None
    rows = _in_session(outbox.listing, status=status, limit=args.limit)
    tables.show(
        "outbox events, newest first",
        ("created (UTC)", "id", "topic", "status", "attempts", "last error"),
        [
            (
                e.created_at.isoformat(timespec="seconds"),
                e.id,
                e.topic,
                e.status.value,
                e.attempts,
                e.last_error,
            )
            for e in rows
        ],
        "event",
    )
    return 0


def cmd_outbox_redrive(args: argparse.Namespace) -> int:
    from models import outbox

    if not args.all and not args.ids:
        print("oes-partner: name event ids to re-drive, or pass --all", file=sys.stderr)
        return 2
    try:
        ids = None if args.all else [uuid.UUID(i) for i in args.ids]
    except ValueError:
        print("oes-partner: event ids are UUIDs", file=sys.stderr)
        return 2
    revived = _in_session(outbox.redrive, ids)
    print(f"re-driven {len(revived)} dead letter(s)")
    return 0


def cmd_settlements_list(args: argparse.Namespace) -> int:
    from models import settlements

    rows = _in_session(settlements.listing, limit=args.limit)
    tables.show(
        "settlements, newest first",
        ("created (UTC)", "id", "externalId", "status", "attempts", "amounts", "reason"),
        [
            (
                r.created_at.isoformat(timespec="seconds"),
                r.id,
                r.external_id,
                r.status.value,
                r.attempts,
                json.dumps(r.amounts),
                r.reason,
            )
            for r in rows
        ],
        "settlement",
    )
    return 0


def cmd_settlements_resolve(args: argparse.Namespace) -> int:
    from models import settlements
    from models.errors import DomainError

    try:
        ident = uuid.UUID(args.id)
    except ValueError:
        print("oes-partner: a settlement id is a UUID (see settlements list)", file=sys.stderr)
        return 2
    resolution = (
        settlements.Resolution.MARK_COMPLETED
        if args.mark_completed
        else settlements.Resolution.RELEASE_TRADES
    )
    try:
        resolved = _in_session(settlements.resolve, ident, resolution, note=args.note)
    except DomainError as exc:
        print(f"oes-partner: {exc}", file=sys.stderr)
        return 1
    print(f"settlement {resolved.external_id} is {resolved.status.value} ({resolution.value})")
    return 0


def _worker_app() -> Any:
    """The worker application with its tasks loaded, its settings checked (exit 2 if bad)."""
    from workers.celery import app, checked
    from workers.settings import settings as worker_settings

    checked(worker_settings)
    app.loader.import_default_modules()
    return app


def cmd_tasks_list(args: argparse.Namespace) -> int:
    app = _worker_app()
    names = sorted(name for name in app.tasks if name.startswith("workers."))
    tables.show(
        "tasks (oes-partner tasks run NAME, or celery -A workers call NAME)",
        ("name", "queue", "what it does"),
        [
            (
                name,
                app.amqp.router.route({}, name)["queue"].name,
                (app.tasks[name].__doc__ or "").strip().splitlines()[0],
            )
            for name in names
        ],
        "task",
    )
    return 0


def cmd_tasks_run(args: argparse.Namespace) -> int:
    app = _worker_app()
    task = app.tasks.get(args.name)
    if task is None or not args.name.startswith("workers."):
        print(f"oes-partner: no task {args.name!r}; see oes-partner tasks list", file=sys.stderr)
        return 2
    try:
        arguments = json.loads(args.args)
    except ValueError:
        arguments = None
    if not isinstance(arguments, list):
        print("oes-partner: --args is a JSON list, e.g. '[\"<id>\"]'", file=sys.stderr)
        return 2
    outcome = task.apply(args=arguments)
    if outcome.failed():
        print(f"oes-partner: {args.name} failed: {outcome.result!r}", file=sys.stderr)
        return 1
    value = outcome.result
    if isinstance(value, dict):
        print(" ".join(f"{k}={v}" for k, v in value.items()))
    else:
        print(value)
    return 0


def cmd_dev_jwt(args: argparse.Namespace) -> int:
    from cli.devkeys import sign

    print(sign(Path(args.key).read_bytes(), lifetime=args.lifetime))
    return 0


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows the defaults of its options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def parser() -> argparse.ArgumentParser:
    defaults = settings.defaults()
    top = _Parser(
        prog="oes-partner",
        description="The exchange-side gateway for BitGo's Go Network settlement: run it, "
        "and operate it.",
    )
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the web process (settings from the environment)")
    serve.add_argument("--host", default=defaults.host, help="address to listen on (HOST)")
    serve.add_argument("--port", type=int, default=defaults.port, help="TCP port (PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        default=defaults.web_concurrency,
        help="uvicorn processes (WEB_CONCURRENCY)",
    )
    serve.set_defaults(func=cmd_serve)

    standalone = sub.add_parser("standalone", help="everything on one machine, no set-up")
    standalone.add_argument(
        "--data-dir",
        default=str(defaults.data_dir),
        help="embedded PostgreSQL and Redis data, dev keys, the token and the env file "
        "(OES_DATA_DIR)",
    )
    standalone.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    standalone.add_argument("--port", type=int, default=defaults.port, help="API port (PORT)")
    standalone.add_argument(
        "--sandbox-port",
        type=int,
        default=defaults.sandbox_port,
        help="BitGo sandbox port (OES_SANDBOX_PORT)",
    )
    standalone.add_argument(
        "--no-sandbox", action="store_true", help="do not run the BitGo sandbox beside it"
    )
    standalone.set_defaults(func=cmd_standalone)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    up = db.add_parser("upgrade", help="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    conns = sub.add_parser("connections", help="connection tokens and links")
    csub = conns.add_subparsers(dest="connections", required=True)
    issue = csub.add_parser("issue-token", help="issue a connection token for a user")
    issue.add_argument("--partners-client-id", required=True)
    issue.add_argument("--ttl", type=int, default=86400, help="seconds the token stays valid")
    issue.set_defaults(func=cmd_issue_token)
    csub.add_parser("list", help="list linked connections").set_defaults(func=cmd_connections_list)
    for name, active in (("deactivate", False), ("activate", True)):
        p = csub.add_parser(
            name, help=f"{name} a connection (connectionId or partnersConnectionId)"
        )
        p.add_argument("id")
        p.set_defaults(func=cmd_set_active, active=active)

    trans = sub.add_parser("transfers", help="allocations and deallocations")
    tsub = trans.add_subparsers(dest="transfers", required=True)
    tlist = tsub.add_parser("list", help="list transfers, newest first")
    tlist.add_argument("--status", choices=["reserved", "rejected", "cleared", "released"])
    tlist.add_argument("--kind", choices=["allocation", "deallocation"])
    tlist.add_argument("--limit", type=int, default=100)
    tlist.set_defaults(func=cmd_transfers_list)

    led = sub.add_parser("ledger", help="the ledger").add_subparsers(dest="ledger", required=True)
    led.add_parser("check", help="rebuild balances from entries and compare").set_defaults(
        func=cmd_ledger_check
    )

    box = sub.add_parser("outbox", help="platform hook events")
    bsub = box.add_subparsers(dest="outbox", required=True)
    blist = bsub.add_parser("list", help="list events, newest first")
    blist.add_argument("--status", choices=["pending", "delivered", "delivered_locally", "dead"])
    blist.add_argument("--limit", type=int, default=100)
    blist.set_defaults(func=cmd_outbox_list)
    redrive = bsub.add_parser("redrive", help="send dead letters back for delivery")
    redrive.add_argument("ids", nargs="*", metavar="EVENT_ID")
    redrive.add_argument("--all", action="store_true", help="every dead letter")
    redrive.set_defaults(func=cmd_outbox_redrive)

    sett = sub.add_parser("settlements", help="settlements with BitGo")
    ssub = sett.add_subparsers(dest="settlements", required=True)
    slist = ssub.add_parser("list", help="list settlements, newest first")
    slist.add_argument("--limit", type=int, default=50)
    slist.set_defaults(func=cmd_settlements_list)
    resolve = ssub.add_parser(
        "resolve",
        help="end a settlement stopped by a 409 from BitGo, after checking with BitGo",
    )
    resolve.add_argument("id", help="the settlement's id (settlements list)")
    choice = resolve.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--mark-completed", action="store_true", help="BitGo settled it: its trades are settled"
    )
    choice.add_argument(
        "--release-trades",
        action="store_true",
        help="BitGo did not: its trades go into the next settlement",
    )
    resolve.add_argument("--note", default="", help="what BitGo said, kept with the settlement")
    resolve.set_defaults(func=cmd_settlements_resolve)

    try:
        from sandbox.cli import add_parser as add_sandbox
    except ImportError:  # a production image carries no sandbox
        pass
    else:
        add_sandbox(sub)

    tasks_parser = sub.add_parser("tasks", help="the Celery tasks, run here in the foreground")
    tsub2 = tasks_parser.add_subparsers(dest="tasks", required=True)
    tsub2.add_parser("list", help="every task, its queue and what it does").set_defaults(
        func=cmd_tasks_list
    )
    run = tsub2.add_parser(
        "run",
        help="run a task now, in this process, with the worker's settings; print its summary",
    )
    run.add_argument("name", help="e.g. workers.remediation.sweep_stale_transfers")
    run.add_argument("--args", default="[]", help="the task's arguments, a JSON list")
    run.set_defaults(func=cmd_tasks_run)

    dev = sub.add_parser("dev-jwt", help="print a BitGo-style JWT signed with a development key")
    dev.add_argument("--key", default=str(defaults.data_dir / "bitgo-dev-private.pem"))
    dev.add_argument("--lifetime", type=int, default=60)
    dev.set_defaults(func=cmd_dev_jwt)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"oes-partner: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

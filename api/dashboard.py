"""The operator dashboard under /dashboard: server-rendered pages behind a login of their own.

Served only when ``OES_DASHBOARD_TOKEN`` is set (otherwise its paths are unknown: 404).
Pages read through ``models.views``; the two actions (re-drive dead letters, resolve a
settlement conflict) each show a confirmation page first, then run the same domain
function as the command line in the one transaction helper. Every POST carries the
session's CSRF token; the cookie is also ``SameSite=Strict``.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from api import dashboard_auth as auth
from api import dashboard_bitgo
from api.dashboard_format import environment
from api.resources import resources
from api.settings import Settings
from config.settings import Secret
from models import outbox, settlements, views
from models.errors import DomainError, NotFoundError

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_FORM = 16 * 1024
REDRIVE_MAX = 200  # dead letters one confirmation page names (and one form re-drives)
MAX_NOTE = 500
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Endpoint = Callable[[Request], Awaitable[Response]]
Form = dict[str, list[str]]
Session = auth.DashboardSession


async def _form(request: Request) -> Form | None:
    """A URL-encoded form body of at most 16 KiB, or None when it is anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return None
    try:
        return parse_qs(body.decode(), keep_blank_values=True, max_num_fields=REDRIVE_MAX + 10)
    except (UnicodeDecodeError, ValueError):
        return None


def _one(form: Form, name: str) -> str:
    values = form.get(name) or [""]
    return values[0]


def _uuids(raw: list[str]) -> list[uuid.UUID] | None:
    try:
        return [uuid.UUID(value) for value in raw]
    except ValueError:
        return None


def _redirect(path: str) -> Response:
    return RedirectResponse(path, status_code=303, headers=HEADERS)


class Dashboard:
    """The pages, for one process's settings."""

    def __init__(self, settings: Settings, token: Secret) -> None:
        self.settings = settings
        self.token = token
        self.templates = Jinja2Templates(env=environment(TEMPLATES, settings.currency_decimals))
        self.css = (TEMPLATES / "dashboard.css").read_bytes()

    # --- rendering and guards --------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        session: Session | None = getattr(request.state, "dashboard", None)
        base = {"session": session, "now": datetime.now(UTC), "page": name.removesuffix(".html")}
        response = self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status
        )
        response.headers.update(HEADERS)
        return response

    def message(self, request: Request, status: int, title: str, text: str) -> Response:
        return self.render(request, "message.html", status, title=title, text=text)

    def page(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Endpoint:
        """Only for a logged-in operator; anyone else is sent to the login page."""

        async def guarded(request: Request) -> Response:
            session = await auth.current(request, resources(request).redis, self.token)
            if session is None:
                return _redirect("/dashboard/login")
            request.state.dashboard = session
            return await endpoint(request)

        return guarded

    def action(self, endpoint: Callable[[Request, Session, Form], Awaitable[Response]]) -> Endpoint:
        """A form POST: a logged-in operator, a form body, and this session's CSRF token."""

        async def guarded(request: Request) -> Response:
            session = await auth.current(request, resources(request).redis, self.token)
            if session is None:
                return _redirect("/dashboard/login")
            request.state.dashboard = session
            # A body that is no readable form carries no CSRF token either.
            form = await _form(request) or {}
            if not auth.csrf_ok(session, _one(form, "csrf")):
                log.warning("dashboard_csrf_refused", path=request.url.path)
                return self.message(
                    request,
                    403,
                    "Form refused",
                    "This form did not come from this dashboard session; reload the page "
                    "and try again.",
                )
            return await endpoint(request, session, form)

        return guarded

    # --- login -----------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        redis = resources(request).redis
        if request.method == "GET":
            if await auth.current(request, redis, self.token) is not None:
                return _redirect("/dashboard")
            return self.render(request, "login.html", error=None)
        form = await _form(request)
        if form is None:
            return self.render(request, "login.html", 400, error="The form could not be read.")
        if not auth.token_matches(self.token, _one(form, "token")):
            log.warning("dashboard_login_refused", client=request.client and request.client.host)
            return self.render(request, "login.html", 401, error="That token is not right.")
        response = _redirect("/dashboard")
        await auth.start(redis, self.token, response)
        log.info("dashboard_login", client=request.client and request.client.host)
        return response

    async def logout(self, request: Request, session: Session, form: Form) -> Response:
        response = _redirect("/dashboard/login")
        await auth.end(resources(request).redis, session, response)
        log.info("dashboard_logout")
        return response

    async def stylesheet(self, request: Request) -> Response:
        return Response(self.css, media_type="text/css", headers={"Cache-Control": "no-cache"})

    # --- pages -----------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        lines = await resources(request).run(views.overview)
        connections = [
            list(group)
            for _, group in itertools.groupby(lines, key=lambda line: line.connection_id)
        ]
        return self.render(request, "overview.html", connections=connections, shown=len(lines))

    async def reservations(self, request: Request) -> Response:
        found = await resources(request).run(
            views.reservations, stale_after=self.settings.stale_after
        )
        return self.render(
            request, "reservations.html", found=found, stale_after=self.settings.stale_after
        )

    async def bitgo_view(self, request: Request) -> Response:
        ident = _uuids([request.path_params["id"]])
        record = await resources(request).run(views.transfer, ident[0]) if ident else None
        if record is None:
            return self.message(
                request, 404, "Not found", "No allocation or deallocation has this id."
            )
        lookup = await dashboard_bitgo.allocation(self.settings, record.transfer_id)
        return self.render(request, "bitgo.html", record=record, lookup=lookup)

    async def outbox_page(self, request: Request) -> Response:
        found = await resources(request).run(views.outbox)
        raw = request.query_params.get("redriven", "")
        redriven = int(raw) if raw.isdigit() and len(raw) < 7 else None
        return self.render(request, "outbox.html", found=found, redriven=redriven)

    async def redrive_confirm(self, request: Request) -> Response:
        ids = _uuids(request.query_params.getlist("event"))
        if ids is None:
            return self.message(request, 400, "Bad request", "Event ids are UUIDs.")
        letters = await resources(request).run(
            views.dead_letters, ids=ids or None, limit=REDRIVE_MAX
        )
        return self.render(request, "redrive.html", letters=letters, limit=REDRIVE_MAX)

    async def redrive(self, request: Request, session: Session, form: Form) -> Response:
        ids = _uuids(form.get("event", []))
        if _one(form, "confirm") != "yes" or not ids:
            return self.message(
                request, 400, "Bad request", "Confirm the dead letters to re-drive."
            )
        revived = await resources(request).run(outbox.redrive, ids[:REDRIVE_MAX])
        log.info("dashboard_redrive", asked=len(ids), redriven=len(revived))
        return _redirect(f"/dashboard/outbox?redriven={len(revived)}")

    async def settlements_page(self, request: Request) -> Response:
        lines = await resources(request).run(views.settlements)
        resolved = _uuids([request.query_params.get("resolved", "")])
        just_resolved = next(
            (line.settlement for line in lines if resolved and line.settlement.id == resolved[0]),
            None,
        )
        return self.render(request, "settlements.html", lines=lines, resolved=just_resolved)

    async def _resolve_page(
        self, request: Request, status: int = 200, error: str | None = None
    ) -> Response:
        ident = _uuids([request.path_params["id"]])
        lines = (
            await resources(request).run(views.settlements, only=ident[0], limit=1, trades_each=200)
            if ident
            else []
        )
        if not lines:
            return self.message(request, 404, "Not found", "No settlement has this id.")
        return self.render(
            request, "resolve.html", status, line=lines[0], error=error, max_note=MAX_NOTE
        )

    async def resolve_confirm(self, request: Request) -> Response:
        return await self._resolve_page(request)

    async def resolve(self, request: Request, session: Session, form: Form) -> Response:
        ident = _uuids([request.path_params["id"]])
        note = _one(form, "note").strip()
        try:
            resolution = settlements.Resolution(_one(form, "resolution"))
        except ValueError:
            return await self._resolve_page(request, 400, "Choose what BitGo did.")
        if _one(form, "confirm") != "yes" or not 0 < len(note) <= MAX_NOTE:
            return await self._resolve_page(
                request, 400, f"Write what BitGo said, in at most {MAX_NOTE} characters."
            )
        if not ident:
            return self.message(request, 404, "Not found", "No settlement has this id.")
        try:
            done = await resources(request).run(
                settlements.resolve, ident[0], resolution, note=note
            )
        except NotFoundError:
            return self.message(request, 404, "Not found", "No settlement has this id.")
        except DomainError as exc:
            return await self._resolve_page(request, 409, str(exc))
        log.info(
            "dashboard_settlement_resolved",
            settlement_id=str(done.id),
            external_id=done.external_id,
            resolution=resolution.value,
        )
        return _redirect(f"/dashboard/settlements?resolved={done.id}")

    async def reconciliation(self, request: Request) -> Response:
        recent = await resources(request).run(views.runs_of, views.RECONCILE_TASK)
        last = recent[0] if recent else None
        drifts = views.drift_lines(last) if last else []
        return self.render(request, "reconciliation.html", last=last, drifts=drifts, recent=recent)

    async def tasks(self, request: Request) -> Response:
        return self.render(
            request, "tasks.html", runs=await resources(request).run(views.last_runs)
        )


def _by_method(get: Endpoint, post: Endpoint) -> Endpoint:
    """One path: GET shows the confirmation, POST does what it confirms."""

    async def endpoint(request: Request) -> Response:
        return await (post if request.method == "POST" else get)(request)

    return endpoint


def routes(settings: Settings) -> list[Route]:
    """The dashboard's routes, or none at all when ``OES_DASHBOARD_TOKEN`` is unset."""
    if settings.dashboard_token is None:
        return []
    d = Dashboard(settings, settings.dashboard_token)
    return [
        Route("/dashboard", d.page(d.overview), methods=["GET"]),
        Route("/dashboard/login", d.login, methods=["GET", "POST"]),
        Route("/dashboard/logout", d.action(d.logout), methods=["POST"]),
        Route("/dashboard/dashboard.css", d.stylesheet, methods=["GET"]),
        Route("/dashboard/reservations", d.page(d.reservations), methods=["GET"]),
        Route("/dashboard/reservations/{id}/bitgo", d.page(d.bitgo_view), methods=["GET"]),
        Route("/dashboard/outbox", d.page(d.outbox_page), methods=["GET"]),
        Route(
            "/dashboard/outbox/redrive",
            _by_method(d.page(d.redrive_confirm), d.action(d.redrive)),
            methods=["GET", "POST"],
        ),
        Route("/dashboard/settlements", d.page(d.settlements_page), methods=["GET"]),
        Route(
            "/dashboard/settlements/{id}/resolve",
            _by_method(d.page(d.resolve_confirm), d.action(d.resolve)),
            methods=["GET", "POST"],
        ),
        Route("/dashboard/reconciliation", d.page(d.reconciliation), methods=["GET"]),
        Route("/dashboard/tasks", d.page(d.tasks), methods=["GET"]),
    ]

"""The Starlette application: routes, middleware, error mapping, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import bitgo_routes, dashboard, health, internal_routes, openapi
from api.errors import EXCEPTION_HANDLERS
from api.observability import ObservabilityMiddleware
from api.resources import Resources
from api.settings import Settings
from config.logs import configure_logging


def create_app(settings: Settings) -> Starlette:
    """The gateway for ``settings``; engines and Redis open in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        running = Resources.start(settings)
        app.state.resources = running
        try:
            yield
        finally:
            await running.stop()

    routes = [*bitgo_routes.routes(), *internal_routes.routes(), *health.routes()]
    document = openapi.document(routes)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    # HTML for operators, not part of the API the document describes; none when it is off.
    routes.extend(dashboard.routes(settings))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(ObservabilityMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # A trailing slash is another path, answered 404, never a redirect BitGo would follow.
    app.router.redirect_slashes = False
    return app


def from_env() -> Starlette:
    """Factory for ``uvicorn --factory``: settings from the environment."""
    configure_logging()
    return create_app(Settings.from_env())

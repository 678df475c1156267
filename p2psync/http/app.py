"""The ASGI application: the guard (Host, API key, body size), then the routes,
with every p2psync error as a JSON error."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from p2psync.errors import P2PSyncError
from p2psync.http import admin, feed, records
from p2psync.http.console import Console
from p2psync.http.errors import internal_error, p2psync_error, problem
from p2psync.http.events import Hub
from p2psync.http.guard import Access, Guard
from p2psync.http.openapi import document
from p2psync.http.site import Site


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {
        404: "no such path (GET /openapi.json lists them)",
        405: "this path does not take that method (GET /openapi.json lists them)",
    }
    return problem(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


def build(site: Site, hub: Hub, access: Access, console: Console | None = None) -> Starlette:
    async def openapi(_request: Request) -> Response:
        return JSONResponse(document())

    routes: list[BaseRoute] = [
        *admin.routes(site),
        *records.routes(site),
        *feed.routes(site, hub),
        Route("/openapi.json", openapi, methods=["GET"]),
        *(console.routes() if console is not None else []),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, access=access)],
        exception_handlers={
            P2PSyncError: p2psync_error,
            HTTPException: _http_error,
            Exception: internal_error,
        },
    )

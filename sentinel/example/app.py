"""The bundled example app: ``sentinel run sentinel.example.app:app``.

Routes: ``/`` (200), ``/items/{item_id}`` (200, 404 for negative ids), ``/boom`` (an
unhandled exception before the response), ``/stream`` (fails mid-stream), ``/background``
(a background task that fails after the response), ``/handled`` (an error the app catches
and answers 503), ``/locale`` (a handler that writes an environment variable: process-global
state every other request then sees), ``/export`` (a failure of its own type, the one a new
release brings) and ``/ws`` (a websocket echo). Every path under ``/reports/`` fails in a
middleware, before routing.

``staging_app`` is the same app as its staging build: it checks bearer tokens against
staging's signing key, so every request carrying a production token is answered 401. Served
to production traffic it is the deploy a 5xx SLO never sees (``sentinel demo`` plays it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The example's failure: a backend the handler depends on is not reachable."""


class QuotaStoreUnavailable(RuntimeError):
    """The report quota middleware could not reach its store (it fails before routing)."""


class ExportFormatError(ValueError):
    """An export the new release cannot render: the failure of a type never seen before."""


class ReportQuota:
    """A middleware that checks a quota for ``/reports/`` before the router runs, and whose
    store is down: the early failure no route handler sees."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/reports/"):
            raise QuotaStoreUnavailable("quota store did not answer")
        await self.app(scope, receive, send)


async def index(request: Request) -> Response:
    return PlainTextResponse("sentinel example: try /items/1, /boom, /stream, /background\n")


async def item(request: Request) -> Response:
    item_id = int(request.path_params["item_id"])
    if item_id < 0:
        return JSONResponse({"error": "not found"}, status_code=404)
    return JSONResponse({"id": item_id, "name": f"item {item_id}"})


async def boom(request: Request) -> Response:
    backend = request.query_params.get("backend", "primary")
    raise BackendUnavailable(f"backend {backend!r} did not answer")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        await asyncio.sleep(0)
        raise BackendUnavailable("stream source went away")

    return StreamingResponse(chunks(), media_type="text/plain")


def _refresh_cache() -> None:
    raise BackendUnavailable("cache refresh failed after the response")


async def background(request: Request) -> Response:
    return PlainTextResponse("accepted\n", background=BackgroundTask(_refresh_cache))


async def handled(request: Request) -> Response:
    try:
        raise BackendUnavailable("handled and logged by the app")
    except BackendUnavailable:
        logger.exception("backend call failed")
        return PlainTextResponse("backend unavailable\n", status_code=503)


async def locale(request: Request) -> Response:
    # The bug the mutation detector is for: one request's choice becomes every request's.
    os.environ["LC_ALL"] = request.query_params.get("lang", "C")
    return PlainTextResponse("locale set\n")


async def export(request: Request) -> Response:
    fmt = request.query_params.get("format", "xlsx")
    raise ExportFormatError(f"cannot render the export as {fmt!r}")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    if text == "boom":
        raise BackendUnavailable("websocket handler failed")
    await websocket.send_text(text)
    await websocket.close()


app = Starlette(
    routes=[
        Route("/", index),
        Route("/items/{item_id}", item),
        Route("/boom", boom),
        Route("/stream", stream),
        Route("/background", background),
        Route("/handled", handled),
        Route("/locale", locale),
        Route("/export", export),
        WebSocketRoute("/ws", echo),
    ],
    middleware=[Middleware(ReportQuota)],
)


class StagingAuth:
    """The staging build's token check: production tokens are signed with another key, so
    every request with an ``authorization`` header is refused with 401 before routing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            name == b"authorization" for name, _ in scope.get("headers", ())
        ):
            response = PlainTextResponse("invalid token\n", status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


staging_app = StagingAuth(app)

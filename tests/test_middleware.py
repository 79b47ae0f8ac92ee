"""The middleware: every request-side phase, transparency, context.

Behaviour of the middleware alone is driven in-process (``run_asgi``); what a real server
does (its 500, closing a connection, its error log line, lifespan, websockets) runs under a
real uvicorn (``serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from helpers import (
    asgi_get,
    clean_env,
    first_response,
    free_port,
    run_asgi,
    run_client,
    stop,
    wait_for,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from sentinel import SentinelMiddleware, _current, instrument, testing
from sentinel._routes import UNMATCHED_ROUTE
from sentinel._runtime import set_current
from sentinel.testing import Captured, capture_reports, serve
from sentinel.types import Message, Receive, Scope, Send


class Boom(Exception):
    """The app's own failure in these tests."""


class ExceptionRecorder:
    """An outer ASGI layer standing in for the server: records what propagates out."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[BaseException] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.seen.append(exc)
            raise


def unhandled_total(captured: Captured, route: str, exception_type: str, phase: str) -> float:
    return captured.metric(
        "sentinel_unhandled_exceptions_total",
        location="unknown",
        route=route,
        exception_type=exception_type,
        phase=phase,
    )


def written_report(captured: Captured) -> dict[str, Any]:
    """The one ``unhandled_exception`` line actually written, parsed; it must say what the
    sink's copy says."""
    [sink_copy] = captured.reports  # flushes the reporter first
    written = [json.loads(line) for line in captured.stream.getvalue().splitlines()]
    [line] = [record for record in written if record["event"] == "unhandled_exception"]
    for key in ("exception_type", "phase", "route", "message"):
        assert line[key] == sink_copy[key], key
    return line


async def fail(request: Request) -> Response:
    raise Boom(f"item {request.path_params.get('item_id')} failed")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def receive() -> dict[str, Any]:
    """An empty request body, as a server hands it to the app driven directly."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    """Where responses go when the app is driven directly."""


BOOM = f"{__name__}.Boom"


# -- phase "request": raised before the response started --------------------------------


def test_exception_before_response_gives_plain_500_and_one_report(captured: Captured) -> None:
    """Phase 1, wrapping: the client gets a bare 500, the server sees the app's exception."""
    recorder = ExceptionRecorder(
        instrument(Starlette(routes=[Route("/items/{item_id}", fail)]), sentinel=captured.sentinel)
    )
    with serve(recorder) as url:
        response = httpx.get(f"{url}/items/7?debug=1")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "Boom" not in response.text and "item 7" not in response.text
    assert [type(exc) for exc in recorder.seen] == [Boom]
    [report] = captured.reports
    assert report["exception_type"] == BOOM
    assert report["message"] == "item 7 failed"
    line = written_report(captured)
    assert (line["phase"], line["route"]) == ("request", "/items/{item_id}")
    assert report["phase"] == "request"
    assert report["route"] == "/items/{item_id}"
    assert report["path"] == "/items/7"
    assert report["method"] == "GET"
    assert report["query"] == {"debug": "1"}
    assert report["frames"][-1]["function"] == "fail"
    assert report["frames"][-1]["in_app"] is True
    assert unhandled_total(captured, "/items/{item_id}", BOOM, "request") == 1
    assert (
        captured.metric(
            "sentinel_http_requests_total",
            location="unknown",
            route="/items/{item_id}",
            method="GET",
            code="500",
        )
        == 1
    )


def test_add_middleware_leaves_the_error_response_to_starlette(captured: Captured) -> None:
    """Phase 1, add_middleware: the app's own 500 handler still answers; one report."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("custom error page", status_code=500)

    app = Starlette(
        routes=[Route("/fail", fail)],
        middleware=[Middleware(SentinelMiddleware, sentinel=captured.sentinel)],
        exception_handlers={500: on_error},
    )
    response = asgi_get(app, "/fail")
    assert response.status_code == 500
    assert response.text == "custom error page"
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["route"] == "/fail"
    assert unhandled_total(captured, "/fail", BOOM, "request") == 1


def test_error_middleware_inside_sentinel_that_already_sent_500_is_phase_request(
    captured: Captured,
) -> None:
    """An inner error middleware sent the 500 and re-raised: still phase "request"."""
    inner = Starlette(routes=[Route("/fail", fail)])  # ServerErrorMiddleware sends 500
    response = asgi_get(instrument(inner, sentinel=captured.sentinel), "/fail")
    assert response.status_code == 500
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["status"] == 500


@dataclasses.dataclass
class DataError(Exception):
    """An app exception that cannot be hashed: eq=True sets ``__hash__`` to None."""

    code: int


DATA_ERROR = f"{__name__}.DataError"


def test_unhashable_exception_reaches_the_server_unchanged_and_is_reported_once(
    captured: Captured,
) -> None:
    """An unhashable exception (a dataclass) propagates as itself, not as sentinel's
    TypeError: one report, count 1, and the client gets its 500."""

    async def load(request: Request) -> Response:
        raise DataError(7)

    recorder = ExceptionRecorder(
        instrument(Starlette(routes=[Route("/data", load)]), sentinel=captured.sentinel)
    )
    response = asgi_get(recorder, "/data")
    assert response.status_code == 500
    assert [type(exc) for exc in recorder.seen] == [DataError]
    assert recorder.seen[0] == DataError(7)
    [report] = captured.reports
    assert report["exception_type"] == DATA_ERROR
    assert report["phase"] == "request"
    assert report["route"] == "/data"
    assert unhandled_total(captured, "/data", DATA_ERROR, "request") == 1
    assert captured.metric("sentinel_internal_errors_total", component="reporter") == 0


class RequestIdLayer:
    """An outer layer that tags each response by appending to the start message's headers in
    place, as some ASGI middlewares do."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.served += 1
        number = self.served

        async def tagging_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", b"r%d" % number))
            await send(message)

        await self.app(scope, receive, tagging_send)


def test_the_server_answers_the_500_not_sentinel(captured: Captured) -> None:
    """Wrapped outermost, sentinel counts and reports the failure and re-raises; the response
    is the server's own (here TestClient's empty 500, as in Starlette's own
    test_force_500_response), never a body of sentinel's."""
    from starlette.testclient import TestClient

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise Boom("raw app failed")

    client = TestClient(
        instrument(raw_app, sentinel=captured.sentinel), raise_server_exceptions=False
    )
    response = client.get("/fail")
    assert response.status_code == 500
    assert response.content == b""
    [report] = captured.reports
    assert report["exception_type"] == BOOM
    assert (
        captured.metric(
            "sentinel_http_requests_total",
            location="unknown",
            route=UNMATCHED_ROUTE,
            method="GET",
            code="500",
        )
        == 1
    )


# -- phase "response": raised while streaming ------------------------------------------------


@pytest.mark.parametrize("mode", ["instrument", "add_middleware"])
def test_exception_mid_stream_is_phase_response(captured: Captured, mode: str) -> None:
    """Phase 2: the first chunk arrives, the connection is closed, phase is "response"."""

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.sleep(0.01)
            raise Boom("source went away")

        return StreamingResponse(chunks(), media_type="text/plain")

    if mode == "instrument":
        app: Any = instrument(
            Starlette(routes=[Route("/stream", stream)]), sentinel=captured.sentinel
        )
    else:
        app = Starlette(
            routes=[Route("/stream", stream)],
            middleware=[Middleware(SentinelMiddleware, sentinel=captured.sentinel)],
        )
    received = b""
    with (
        serve(app) as url,
        httpx.Client() as client,
        pytest.raises(httpx.HTTPError),
        client.stream("GET", f"{url}/stream") as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk
    assert received == b"first\n"
    [report] = captured.reports
    assert report["phase"] == "response"
    assert written_report(captured)["phase"] == "response"
    assert report["status"] == 200
    assert unhandled_total(captured, "/stream", BOOM, "response") == 1


# -- phase "request": raised by a middleware before routing ----------------------------------


class FailingMiddleware:
    """A user middleware that fails before the router runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/guarded":
            raise Boom("middleware failed before routing")
        await self.app(scope, receive, send)


def test_middleware_failure_before_routing_when_wrapping(captured: Captured) -> None:
    """Phase 3, wrapping: a user middleware's failure is reported with the route."""
    app = instrument(
        Starlette(routes=[Route("/guarded", ok)], middleware=[Middleware(FailingMiddleware)]),
        sentinel=captured.sentinel,
    )
    assert asgi_get(app, "/guarded").status_code == 500
    assert asgi_get(app, "/other").status_code == 404
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["route"] == "/guarded"
    assert report["message"] == "middleware failed before routing"


@pytest.mark.parametrize("order", ["inner", "outer"])
def test_middleware_failure_before_routing_with_add_middleware(
    captured: Captured, order: str
) -> None:
    """Phase 3, add_middleware: inside or outside sentinel, the failure is reported once."""
    app = Starlette(routes=[Route("/guarded", ok)])
    if order == "inner":
        app.add_middleware(FailingMiddleware)
        app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel)
    else:
        # Added later, so it runs outside sentinel: seen through the server's error log.
        app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel)
        app.add_middleware(FailingMiddleware)
    with serve(app) as url:
        assert httpx.get(f"{url}/guarded").status_code == 500
    assert wait_for(lambda: len(captured.reports) >= 1)
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["exception_type"] == BOOM
    assert (
        captured.metric(
            "sentinel_unhandled_exceptions_total",
            location="unknown",
            route=report["route"],
            exception_type=BOOM,
            phase="request",
        )
        == 1
    )


def test_group_around_one_exception_is_reported_as_that_exception(captured: Captured) -> None:
    """A task group's ExceptionGroup around one failure reports the failure inside it."""

    async def fan_out(request: Request) -> Response:
        async def lookup() -> None:
            raise Boom("shard 3 unavailable")

        async with asyncio.TaskGroup() as group:
            group.create_task(lookup())
        return PlainTextResponse("unreachable")

    app = Starlette(routes=[Route("/fan-out", fan_out)])
    assert asgi_get(instrument(app, sentinel=captured.sentinel), "/fan-out").status_code == 500
    [report] = captured.reports
    assert report["exception_type"] == BOOM
    assert report["wrapped_in"] == "ExceptionGroup"
    assert report["frames"][-1]["function"].endswith("lookup")
    assert unhandled_total(captured, "/fan-out", BOOM, "request") == 1


# -- phase "background" -----------------------------------------------------------------------


def test_background_task_failure_after_response(captured: Captured) -> None:
    """Starlette BackgroundTasks: the client got its 200; the failure is phase "background"."""

    def refresh() -> None:
        raise Boom("refresh failed")

    async def accepted(request: Request) -> Response:
        return PlainTextResponse("accepted", background=BackgroundTask(refresh))

    app = Starlette(routes=[Route("/accepted", accepted)])
    response = asgi_get(instrument(app, sentinel=captured.sentinel), "/accepted")
    assert response.status_code == 200
    assert response.text == "accepted"
    [report] = captured.reports
    assert report["phase"] == "background"
    assert report["route"] == "/accepted"
    line = written_report(captured)
    assert (line["phase"], line["route"]) == ("background", "/accepted")
    assert unhandled_total(captured, "/accepted", BOOM, "background") == 1


@pytest.mark.parametrize(
    ("final", "phase"),
    [
        ({"type": "http.response.pathsend", "path": "/etc/hostname"}, "background"),
        ({"type": "http.response.zerocopysend", "file": 0}, "background"),
        ({"type": "http.response.zerocopysend", "file": 0, "more_body": True}, "response"),
    ],
)
def test_a_response_ended_by_pathsend_or_zerocopy_is_complete(
    captured: Captured, final: Message, phase: str
) -> None:
    """``http.response.pathsend``, and ``http.response.zerocopysend`` without more to come, end
    the response as a last body does: an error logged after it is background work."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send(final)
        try:
            raise Boom("cleanup after the response failed")
        except Boom:
            logging.getLogger("tests.app").error("cleanup failed", exc_info=True)

    scope = {"type": "http", "method": "GET", "path": "/file", "headers": []}
    asyncio.run(instrument(app, sentinel=captured.sentinel)(scope, receive, send))
    [report] = captured.reports
    assert (report["message"], report["phase"]) == ("cleanup after the response failed", phase)


# -- phase "lifespan" -------------------------------------------------------------------------


def _run_until_exit(app: Any, timeout: float = 10.0) -> None:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "uvicorn did not stop after a failed startup"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_lifespan_startup_failure(captured: Captured) -> None:
    """Phase 4: a failing startup is reported with phase "lifespan" and the server exits."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise Boom("database unreachable at startup")
        yield

    _run_until_exit(instrument(Starlette(lifespan=lifespan), sentinel=captured.sentinel))
    [report] = captured.reports
    assert report["phase"] == "lifespan"
    assert report["message"] == "database unreachable at startup"
    line = written_report(captured)
    assert (line["phase"], line["route"]) == ("lifespan", "<none>")
    assert unhandled_total(captured, "<none>", BOOM, "lifespan") == 1


def test_lifespan_shutdown_failure(captured: Captured) -> None:
    """Phase 4: a failing shutdown is reported with phase "lifespan"."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise Boom("flush failed at shutdown")

    app = instrument(
        Starlette(routes=[Route("/", ok)], lifespan=lifespan), sentinel=captured.sentinel
    )
    with serve(app, lifespan="on") as url:
        assert httpx.get(f"{url}/").status_code == 200
    assert wait_for(lambda: len(captured.reports) == 1)
    [report] = captured.reports
    assert report["phase"] == "lifespan"
    assert report["message"] == "flush failed at shutdown"
    assert written_report(captured)["phase"] == "lifespan"
    assert unhandled_total(captured, "<none>", BOOM, "lifespan") == 1


def test_an_app_without_lifespan_is_not_reported(captured: Captured) -> None:
    """An app that raises on the lifespan scope before its first receive() does not support
    lifespan (the ASGI spec's way to say so; uvicorn's "auto" goes on without): re-raised to
    the server as it is, but no report at each start."""

    async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", "only http is supported"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(instrument(http_only, sentinel=captured.sentinel), lifespan="auto") as url:
        assert httpx.get(f"{url}/").text == "ok"
    assert captured.reports == []
    assert unhandled_total(captured, "<none>", "AssertionError", "lifespan") == 0
    assert requests_by_code(captured) == {"200": 1}


# -- websockets -------------------------------------------------------------------------------


def test_websocket_handler_failure(captured: Captured) -> None:
    """Phase 7: a websocket handler's failure is reported once; the server closes the socket."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        if message == "boom":
            raise Boom("websocket handler failed")
        await websocket.send_text(message)

    app = Starlette(routes=[WebSocketRoute("/ws/{room}", echo)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        ws_url = url.replace("http://", "ws://") + "/ws/lobby"
        with connect(ws_url) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
        with connect(ws_url) as ws:
            ws.send("boom")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1011  # as uvicorn closes it
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["route"] == "/ws/{room}"
    line = written_report(captured)
    assert (line["phase"], line["route"]) == ("request", "/ws/{room}")
    assert report["path"] == "/ws/lobby"
    assert unhandled_total(captured, "/ws/{room}", BOOM, "request") == 1


# -- transparency ---------------------------------------------------------------------------


async def echo_body(request: Request) -> Response:
    body = await request.body()
    return Response(
        body,
        status_code=201,
        headers={"x-length": str(len(body)), "x-query": request.url.query},
        media_type="application/octet-stream",
    )


async def count_stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(50):
            yield f"chunk {index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain", headers={"x-stream": "1"})


async def _exchange(client: httpx.AsyncClient) -> list[tuple[int, dict[str, str], bytes]]:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 65536):  # 16 request body messages
            yield payload[start : start + 65536]

    results = []
    for response in (
        await client.post("/echo?a=1&b=%20x", content=body()),
        await client.get("/stream"),
        await client.get("/missing"),
        await client.put("/echo", content=b""),
    ):
        results.append((response.status_code, dict(response.headers), response.content))
    return results


def test_app_behaves_exactly_as_without_sentinel(captured: Captured) -> None:
    """Request bodies, streaming responses, headers and status codes are untouched."""

    def make() -> Starlette:
        return Starlette(
            routes=[
                Route("/echo", echo_body, methods=["POST", "PUT"]),
                Route("/stream", count_stream),
            ]
        )

    bare = run_asgi(make(), _exchange)
    wrapped = run_asgi(instrument(make(), sentinel=captured.sentinel), _exchange)
    assert wrapped == bare
    assert bare[0][0] == 201 and len(bare[0][2]) == 1024 * 1024
    assert captured.reports == []


def test_scope_seen_by_the_app_is_unchanged(captured: Captured) -> None:
    """The app sees the same scope keys and values with and without sentinel."""
    seen: list[dict[str, Any]] = []

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append({k: v for k, v in scope.items() if k not in ("client", "state")})
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    asgi_get(raw_app, "/p?q=1", headers={"x-test": "1"})
    asgi_get(instrument(raw_app, sentinel=captured.sentinel), "/p?q=1", headers={"x-test": "1"})
    bare, wrapped = seen
    assert wrapped == bare


# -- request context ----------------------------------------------------------------------


def test_route_templates_never_raw_paths(captured: Captured) -> None:
    """Matched routes use their template (also through mounts); unmatched share one value."""
    api = Starlette(routes=[Route("/items/{item_id}", fail)])
    app = Starlette(routes=[Route("/ok", ok), Mount("/api", app=api)])

    async def exchange(client: httpx.AsyncClient) -> None:
        await client.get("/api/items/1")
        for index in range(5):
            await client.get(f"/random/{index}")
        await client.post("/ok")  # 405: the route still matched by path

    run_asgi(instrument(app, sentinel=captured.sentinel), exchange)
    routes = {
        sample.labels["route"]
        for metric in captured.registry.collect()
        if metric.name == "sentinel_http_requests"
        for sample in metric.samples
    }
    assert routes == {"/api/items/{item_id}", UNMATCHED_ROUTE, "/ok"}
    [report] = captured.reports
    assert report["route"] == "/api/items/{item_id}"


def test_a_finished_request_waits_for_its_batch_released_with_its_route_resolved() -> None:
    """A request waiting to be counted (one with a tenant: a batch is settled from the
    writer's thread too, at any moment) already has its route and holds none of the
    server's objects."""
    import collections

    seen: list[tuple[Any, set[str]]] = []

    class Watched(collections.deque):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:  # what another thread could settle from now on
            seen.append((item[1]._route, set(item[1].scope)))
            super().append(item)

    with capture_reports(tenant_header="x-tenant") as captured:
        captured.sentinel.metrics.settling = Watched()
        app = Starlette(routes=[Route("/items/{item_id}", ok)])
        asgi_get(
            instrument(app, sentinel=captured.sentinel),
            "/items/7?q=1",
            headers={"x-a": "1", "x-tenant": "acme"},
        )
        assert seen == [("/items/{item_id}", {"type", "path", "headers", "query_string"})]
        [(_, request, status, _)] = list(captured.sentinel.metrics.settling)
        assert status == 200
        assert request.query_string == b"q=1"
        assert (b"x-a", b"1") in request.raw_headers


def test_locations_from_a_trusted_header_are_bounded() -> None:
    """Valid header values are used; hostile ones and those past the bound become other."""

    async def exchange(client: httpx.AsyncClient) -> None:
        for location in ["us-east", "ap-south", "sa-east", "x" * 300, "bad value!"]:
            await client.get("/fail", headers={"x-location": location})
        await client.get("/fail")

    with capture_reports(location="eu-west", location_header="X-Location", max_locations=3) as cap:
        run_asgi(
            instrument(Starlette(routes=[Route("/fail", fail)]), sentinel=cap.sentinel), exchange
        )
        locations = [report["location"] for report in cap.reports]
    # eu-west (static) + two from the header fill the bound of 3.
    assert locations == ["us-east", "ap-south", "other", "other", "other", "eu-west"]


def test_location_allow_list() -> None:
    """With an allow-list only its values are used; anything else is other."""

    async def exchange(client: httpx.AsyncClient) -> None:
        for location in ["fra", "iad", "lhr"]:
            await client.get("/fail", headers={"x-location": location})

    with capture_reports(location_header="x-location", locations=("fra", "iad")) as cap:
        run_asgi(
            instrument(Starlette(routes=[Route("/fail", fail)]), sentinel=cap.sentinel), exchange
        )
        assert [report["location"] for report in cap.reports] == ["fra", "iad", "other"]


def test_request_id_from_trusted_header_or_generated() -> None:
    """A well-formed trusted request id is kept; a malformed one is replaced."""

    async def exchange(client: httpx.AsyncClient) -> None:
        await client.get("/fail", headers={"x-request-id": "req-123"})
        await client.get("/fail", headers={"x-request-id": "bad id \x01 with spaces"})
        await client.get("/fail")

    with capture_reports(request_id_header="x-request-id") as cap:
        run_asgi(
            instrument(Starlette(routes=[Route("/fail", fail)]), sentinel=cap.sentinel), exchange
        )
        ids = [report["request_id"] for report in cap.reports]
    assert ids[0] == "req-123"
    assert ids[1] != ids[2] and len(ids[1]) == 32 and len(ids[2]) == 32


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("token:hunter2-rid-q7", False),
        ("api_key:hunter2-rid-q7", False),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLXEz", False),  # a JWT
        ("62fdb9130ebd831c9ea4ace2539da4b6", True),  # 32 hex digits, as sentinel's own
        ("0b7a2f7e-6a43-4c39-9d47-4b8e3e1c2d10", True),  # a UUID
        ("01ARZ3NDEKTSV4RRFFQ69G5FAV", True),  # a ULID: random, as a key would be
        ("req-123.retry:2", True),
    ],
)
def test_a_request_id_with_a_credentials_shape_is_replaced(sent: str, kept: bool) -> None:
    """The trusted request id header is screened: one with a credential's shape (a
    ``name:value`` pair under a secret name, a JWT) is not written, a generated id stands
    in. Request ids are random by design, so a random token is kept."""

    async def exchange(client: httpx.AsyncClient) -> None:
        await client.get("/fail", headers={"x-request-id": sent})

    with capture_reports(request_id_header="x-request-id") as cap:
        run_asgi(
            instrument(Starlette(routes=[Route("/fail", fail)]), sentinel=cap.sentinel), exchange
        )
        [report] = cap.reports
        written = cap.stream.getvalue()
    assert (report["request_id"] == sent) is kept
    if not kept:
        assert sent not in written and len(report["request_id"]) == 32


def test_non_starlette_app_uses_route_template_callable(captured: Captured) -> None:
    """A plain ASGI app without a router gets one route value, or the user's template."""

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise Boom("raw app failed")

    asgi_get(instrument(raw_app, sentinel=captured.sentinel), "/a/1")
    templated = instrument(
        raw_app, sentinel=captured.sentinel, route_template=lambda scope: "/a/{n}"
    )
    asgi_get(templated, "/a/2")
    assert [report["route"] for report in captured.reports] == [UNMATCHED_ROUTE, "/a/{n}"]


# -- secrets ----------------------------------------------------------------------------------


CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"
"""A random token: value patterns alone must catch it, wherever it appears."""
LOW_CANARY = "hunter2-reset-pw"
"""A low-entropy secret no value pattern would catch: only its key gives it away."""


@dataclasses.dataclass
class CanaryRun:
    """What sentinel wrote, counted and exported for one request full of secrets."""

    report: dict[str, Any]
    written: str
    records: list[dict[str, Any]]
    exposition: str
    spans: list[Any]

    @property
    def exported(self) -> str:
        return "\n".join(span.to_json() for span in self.spans)


def serve_canary_request(log_format: str = "json") -> CanaryRun:
    """One failing request to /reset/{code} carrying the canaries, with a tracer provider."""

    async def reset(request: Request) -> Response:
        db_password = LOW_CANARY
        raise Boom(f"could not connect with password={db_password}")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with capture_reports(
        log_locals=True, log_format=log_format, locals_time_budget_seconds=5.0
    ) as cap:
        app = instrument(
            Starlette(routes=[Route("/reset/{code}", reset)]),
            sentinel=cap.sentinel,
            tracer_provider=provider,
        )
        with serve(app) as url:
            response = httpx.get(
                f"{url}/reset/{CANARY}?token={LOW_CANARY}&user=alice",
                headers={
                    "authorization": f"Bearer {LOW_CANARY}",
                    "cookie": f"session={LOW_CANARY}",
                    "baggage": f"tenant=acme,user.pin={LOW_CANARY},x-pass={LOW_CANARY}",
                },
            )
        assert response.status_code == 500
        [report] = cap.reports
        run = CanaryRun(
            report=report,
            written=cap.stream.getvalue(),
            records=cap.records,  # the copies the sink received
            exposition=generate_latest(cap.registry).decode(),
            spans=[],
        )
    provider.shutdown()
    run.spans = list(exporter.get_finished_spans())
    return run


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_canary_secrets_appear_nowhere_sentinel_writes_or_exports(log_format: str) -> None:
    """A low-entropy secret in ?token=, a Bearer header, a session cookie, baggage entries, a
    db_password local and "password=" in the message, and a random token in the path, reach
    no written line (JSON or the console view), sink record or metric, and the low-entropy
    one no exported span; the span's exception event carries the scrubbed message."""
    run = serve_canary_request(log_format)
    if log_format == "console":
        assert "\nculprit test_middleware.py:" in run.written
        assert "Traceback (most recent call last)" in run.written
    else:
        assert all(json.loads(line) for line in run.written.splitlines())
    report = run.report

    # Each secret really was there and was masked, not merely absent.
    assert "[scrubbed len=" in report["path"]
    assert report["query"]["user"] == "alice"
    assert report["query"]["token"].startswith("[scrubbed len=")
    assert report["headers"]["authorization"].startswith("[scrubbed len=")
    assert report["headers"]["cookie"].startswith("[scrubbed len=")
    baggage = report["headers"]["baggage"]
    assert baggage.startswith("tenant=acme,user.pin=[scrubbed len=")
    assert ",x-pass=[scrubbed len=" in baggage
    assert report["frames"][-1]["locals"]["db_password"].startswith("[scrubbed len=")
    assert report["message"].startswith("could not connect with password=[scrubbed len=")
    [server] = [span for span in run.spans if span.kind is SpanKind.SERVER]
    [event] = [event for event in server.events if event.name == "exception"]
    assert event.attributes["exception.type"] == BOOM
    assert event.attributes["exception.message"] == report["message"]

    # The console view may wrap long text inside its panels.
    unwrapped = re.sub(r"[\s\u2500-\u257f\u2771]+", "", run.written)
    for secret in (CANARY, LOW_CANARY):
        assert secret not in run.written and secret not in unwrapped
        assert secret not in json.dumps(run.records, default=str)
        assert secret not in run.exposition
    assert LOW_CANARY not in run.exported


def test_random_token_in_the_path_appears_in_no_exported_span() -> None:
    """A random token in the URL path is not exported in any span (name, attributes, events)."""
    run = serve_canary_request()
    assert CANARY not in run.exported


# -- event loops --------------------------------------------------------------------------


def test_middleware_runs_under_trio(captured: Captured) -> None:
    """The middleware is event-loop agnostic: it serves and reports under trio."""
    import trio

    app = instrument(
        Starlette(routes=[Route("/ok", ok), Route("/fail", fail)]), sentinel=captured.sentinel
    )

    async def main() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            good = await client.get("/ok")
            bad = await client.get("/fail")
        return good.status_code, bad.status_code

    assert trio.run(main) == (200, 500)
    [report] = captured.reports
    assert report["phase"] == "request"
    assert report["route"] == "/fail"


def test_every_event_loop_that_serves_the_app_is_hooked(captured: Captured) -> None:
    """The first request on an event loop hooks it (its task factory watches the tasks the
    app makes): a new loop in the same thread, and a loop in another thread while the loop
    hooked last is busy running a task of its own. A task the handler leaves failing is
    reported on each, promptly, though it stays referenced (never collected)."""
    keep: list[asyncio.Task[None]] = []
    entered, release = threading.Event(), threading.Event()

    async def fails(where: str) -> None:
        raise Boom(where)

    async def spawn(request: Request) -> Response:
        where = request.path_params["where"]
        keep.append(asyncio.get_running_loop().create_task(fails(where)))
        return PlainTextResponse(where)

    async def block(request: Request) -> Response:
        entered.set()
        release.wait(10)  # blocks its loop inside the task: that loop's task stays current
        return PlainTextResponse("released")

    app = instrument(
        Starlette(routes=[Route("/spawn/{where}", spawn), Route("/block", block)]),
        sentinel=captured.sentinel,
    )

    def get_on_a_new_loop(path: str) -> str:
        async def main() -> str:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                text = (await client.get(path)).text
            await asyncio.sleep(0.3)  # the task's grace period passes on this loop
            return text

        return asyncio.run(main())

    assert get_on_a_new_loop("/spawn/first") == "first"
    assert get_on_a_new_loop("/spawn/second") == "second"
    blocked: list[str] = []
    other = threading.Thread(target=lambda: blocked.append(get_on_a_new_loop("/block")))
    other.start()
    try:
        assert entered.wait(10)
        assert get_on_a_new_loop("/spawn/third") == "third"
    finally:
        release.set()
        other.join(10)
    assert blocked == ["released"]
    reports = captured.wait_for(3)
    assert sorted((r["message"], r["phase"], r["route"]) for r in reports) == [
        (where, "task", "/spawn/{where}") for where in ("first", "second", "third")
    ]
    assert len(keep) == 3


# -- request records (tail sampling) ------------------------------------------------------


def _record_app() -> Starlette:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return PlainTextResponse("ok")

    async def broken(request: Request) -> Response:
        return PlainTextResponse("down", status_code=503)

    return Starlette(
        routes=[Route("/items/{item_id}", ok), Route("/slow", slow), Route("/broken", broken)]
    )


def test_request_records_counts_and_every_error_kept(captured: Captured) -> None:
    """Every request is counted as seen; kept ones are written with their weight; every 5xx
    is kept."""

    async def exchange(client: httpx.AsyncClient) -> None:
        for index in range(40):
            await client.get(f"/items/{index}?token=Zq8vK2mX9pL4wR7tB1nC6yH3")
        for _ in range(5):
            await client.get("/broken")

    run_asgi(instrument(_record_app(), sentinel=captured.sentinel), exchange)
    records = captured.wait_for(1, event="request")
    ok_records = [r for r in records if r["status"] == 200]
    error_records = [r for r in records if r["status"] == 503]
    assert len(error_records) == 5
    assert all(r["level"] == "error" and r["route"] == "/broken" for r in error_records)
    assert 1 <= len(ok_records) < 40
    assert sum(r["sample_rate"] for r in ok_records) <= 40
    first = ok_records[0]
    assert first["reason"] == "new_key" and first["sample_rate"] == 1
    assert first["route"] == "/items/{item_id}" and first["method"] == "GET"
    assert first["path"] == "/items/0" and "token" not in json.dumps(records)
    assert set(first) >= {"duration_ms", "request_id", "trace_id", "location", "timestamp"}
    seen = captured.metric("sentinel_records_seen_total", location="unknown", status_class="2xx")
    kept = captured.metric("sentinel_records_kept_total", location="unknown", status_class="2xx")
    assert seen == 40 and kept == len(ok_records)
    assert captured.metric(
        "sentinel_records_kept_total", location="unknown", status_class="5xx"
    ) == captured.metric("sentinel_records_seen_total", location="unknown", status_class="5xx")


def test_keep_header_latency_and_hook_force_keep_or_drop() -> None:
    """A debug header or a slow response keeps a record the sampler would drop; the user
    hook can force keep or drop."""

    def hook(fields: dict[str, object]) -> bool | None:
        if fields["route"] == "/items/{item_id}" and fields["path"] == "/items/secret":
            return False
        return None

    async def exchange(client: httpx.AsyncClient) -> None:
        # The first four requests of a new key are kept, the 5th would be dropped.
        for _ in range(4):
            await client.get("/items/1")
        await client.get("/items/1", headers={"x-debug-trace": "1"})
        for _ in range(4):
            await client.get("/slow")
        await client.get("/slow?sleep=0.1")
        await client.get("/items/secret")

    with capture_reports(keep_header="X-Debug-Trace", keep_slower_than_seconds=0.05) as cap:
        run_asgi(instrument(_record_app(), sentinel=cap.sentinel, sampling_hook=hook), exchange)
        cap.flush()
        records = cap.events("request")
    reasons = [(r["path"], r["reason"]) for r in records]
    assert ("/items/1", "keep_header") in reasons
    assert ("/slow", "slow") in reasons
    assert all(path != "/items/secret" for path, _ in reasons)


def test_a_failing_sampling_hook_is_counted_and_records_still_written() -> None:
    """A hook that raises does not lose records: the sampler's decision stands."""

    def broken_hook(fields: dict[str, object]) -> bool | None:
        raise RuntimeError("user rule failed")

    async def exchange(client: httpx.AsyncClient) -> None:
        for _ in range(3):
            await client.get("/broken")

    with capture_reports() as cap:
        run_asgi(
            instrument(_record_app(), sentinel=cap.sentinel, sampling_hook=broken_hook), exchange
        )
        cap.flush()
        records = cap.events("request")
        errors = cap.metric("sentinel_internal_errors_total", component="sampling_hook")
        kept = cap.metric("sentinel_records_kept_total", location="unknown", status_class="5xx")
    assert len(records) == 3 and kept == 3
    assert errors == 3


def test_websocket_refused_before_accept_is_not_a_server_error(captured: Captured) -> None:
    """A websocket closed before accept is answered 403 by the server, not a 500."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    async def refuse(websocket: WebSocket) -> None:
        await websocket.close()

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as cap:
        app = instrument(Starlette(routes=[WebSocketRoute("/ws", refuse)]), sentinel=cap.sentinel)
        with serve(app) as url, pytest.raises(InvalidStatus):
            connect(url.replace("http://", "ws://") + "/ws")
    [span] = [s for s in exporter.get_finished_spans() if s.name.endswith("/ws")]
    assert (span.attributes or {})["http.response.status_code"] == 403
    assert "error.type" not in (span.attributes or {})


def test_a_websocket_denial_response_is_traced_with_its_own_status() -> None:
    """A handshake refused with a denial response (``websocket.http.response.start``) ends
    with that response's status, not a server error; an error logged after its body is
    background work."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    async def deny(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        status = 401 if scope["path"] == "/login" else 403
        await send({"type": "websocket.http.response.start", "status": status, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no"})
        try:
            raise Boom("audit write failed")
        except Boom:
            logging.getLogger("tests.app").error("audit failed", exc_info=True)

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as cap:
        with serve(instrument(deny, sentinel=cap.sentinel), lifespan="off") as url:
            for path, status in (("/ws", 403), ("/login", 401)):
                with pytest.raises(InvalidStatus) as refused:
                    connect(url.replace("http://", "ws://") + path)
                assert refused.value.response.status_code == status
        cap.flush()
        assert [report["phase"] for report in cap.reports] == ["background", "background"]
    spans = exporter.get_finished_spans()
    assert {(s.attributes or {})["http.response.status_code"] for s in spans} == {401, 403}
    assert not any("error.type" in (s.attributes or {}) for s in spans)


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
def test_websocket_handshakes_are_counted_with_the_status_the_client_got(traced: bool) -> None:
    """Every websocket handshake is a request (method GET), counted with what the client
    got: 101 accepted, 403 closed before accept, a denial response's own status, 500 when
    the app failed before answering. Its duration is the handshake's, not the
    connection's: a websocket held open does not reach the latency buckets."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    async def held(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()  # open until the client's message
        await websocket.close()

    async def refuse(websocket: WebSocket) -> None:
        await websocket.close()

    async def fail(websocket: WebSocket) -> None:
        raise Boom("before the handshake was answered")

    async def deny(websocket: WebSocket) -> None:
        await websocket.send_denial_response(PlainTextResponse("no", status_code=401))

    routes = [
        WebSocketRoute("/held", held),
        WebSocketRoute("/refuse", refuse),
        WebSocketRoute("/fail", fail),
        WebSocketRoute("/deny", deny),
    ]
    options: dict[str, Any] = {"span_exporter": InMemorySpanExporter()} if traced else {}
    with capture_reports(**options) as cap:
        app = instrument(Starlette(routes=routes), sentinel=cap.sentinel)
        with serve(app) as url:
            base = url.replace("http://", "ws://")
            with connect(base + "/held") as websocket:
                time.sleep(1.2)  # held open past the 1 s bucket
                websocket.send("bye")
            for path in ("/refuse", "/fail", "/deny"):
                with pytest.raises(InvalidStatus):
                    connect(base + path)
        cap.flush()
        by_route = {
            route: code
            for route, code in (
                ("/held", "101"),
                ("/refuse", "403"),
                ("/fail", "500"),
                ("/deny", "401"),
            )
            if cap.metric("sentinel_http_requests_total", route=route, method="GET", code=code) == 1
        }
        assert set(by_route) == {"/held", "/refuse", "/fail", "/deny"}
        held_fast = cap.metric(
            "sentinel_http_request_duration_seconds_bucket", route="/held", le="1.0"
        )
        assert held_fast == 1
        assert [report["route"] for report in cap.reports] == ["/fail"]


def test_a_websockets_trace_keeps_its_root_whatever_the_handshake_sampling() -> None:
    """A websocket's child spans leave while its connection is open, so its server span is
    kept although the handshake's record is sampled like any 101: 30 connections, 30 whole
    traces, no child without its root."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from websockets.sync.client import connect

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as cap:

        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            message = await websocket.receive_text()
            provider = cap.sentinel.tracer_provider
            assert provider is not None
            with provider.get_tracer("app").start_as_current_span("handle-message"):
                pass
            await websocket.send_text(message)
            await websocket.close()

        app = instrument(Starlette(routes=[WebSocketRoute("/ws", echo)]), sentinel=cap.sentinel)
        with serve(app) as url:
            for _ in range(30):
                with connect(url.replace("http://", "ws://") + "/ws") as websocket:
                    websocket.send("hi")
                    websocket.recv(timeout=5)
        cap.sentinel.flush(final=True)
        assert cap.metric("sentinel_http_requests_total", route="/ws", code="101") == 30
        assert len(cap.request_records) < 30  # the handshakes' records are sampled
    spans = exporter.get_finished_spans()
    roots = {s.context.trace_id for s in spans if s.kind == SpanKind.SERVER}
    children = [s for s in spans if s.name == "handle-message"]
    assert len(roots) == len(children) == 30
    assert all(child.context.trace_id in roots for child in children)


@pytest.mark.parametrize("flavour", ["asyncio", "trio"])
def test_an_http_start_sent_on_a_websocket_ends_as_the_app_does(flavour: str) -> None:
    """An app that sends http.response.start on a websocket (the server takes it, here) and
    returns: its call ends as it did, with no error of sentinel's own, and the request is
    counted with that status."""

    async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict[str, Any]) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    with capture_reports() as cap:
        app = instrument(http_only, sentinel=cap.sentinel)
        anyio.run(app, scope, receive, send, backend=flavour)
        cap.flush()
        assert cap.reports == []
        assert cap.metric("sentinel_internal_errors_total") == 0
        assert cap.metric("sentinel_http_requests_total", code="200") == 1


def test_requests_waiting_to_be_applied_outlive_the_middleware() -> None:
    """A middleware dropped (an app rebuilt on reload, say) with requests not yet in the
    metrics loses none of them: those waiting for their batch (with a tenant) carry their
    own accounting, and those counted at their end wait in lists the metrics hold."""
    import gc

    async def drive(app: Any, n: int, tenant: bytes | None) -> None:
        for _ in range(n):
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/ok",
                "headers": [(b"x-tenant", tenant)] if tenant else [],
                "query_string": b"",
            }
            await app(scope, receive, send)

    async def serve_then_drop(metrics: Any, sentinel: Any) -> None:
        app: Any = instrument(Starlette(routes=[Route("/ok", ok)]), sentinel=sentinel)
        # Held, so the writer's flush (twice a second) applies nothing meanwhile.
        with metrics.count_lock:
            await drive(app, 7, None)  # counted at their end
            assert not metrics.settling
            assert sum(len(live.durations) for live in metrics.ready) == 7  # not applied yet
            await drive(app, 10, b"acme")  # fewer than a batch
            assert len(metrics.settling) == 10
            del app
            gc.collect()

    with capture_reports(tenant_header="x-tenant") as captured:
        asyncio.run(serve_then_drop(captured.sentinel.metrics, captured.sentinel))
        labels = {"location": "unknown", "route": "/ok", "method": "GET", "code": "200"}
        assert captured.metric("sentinel_http_requests_total", **labels) == 17
        kept = captured.events("request")
        assert kept and {r["path"] for r in kept} == {"/ok"}  # the sampler decided them too
        assert {r.get("tenant") for r in kept} == {None, "acme"}


def test_a_request_without_a_tenant_says_so_rather_than_leaving_the_slot_unset() -> None:
    """Every finished request waiting for its batch (here, every request: a latency rule
    is configured) has its tenant set, None without one: the batch reads it for each
    request, and an unset slot made each read raise (and swallow) an AttributeError, seven
    times the cost of the store."""

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    async def drive(app: Any) -> None:
        for _ in range(3):
            scope = {"type": "http", "method": "GET", "path": "/ok", "headers": []}
            await app(scope, receive, send)

    with capture_reports(keep_slower_than_seconds=10) as captured:
        app = instrument(Starlette(routes=[Route("/ok", ok)]), sentinel=captured.sentinel)
        asyncio.run(drive(app))
        assert [item[1].tenant for item in captured.sentinel.metrics.settling] == [None] * 3


def test_a_finished_request_lets_go_of_the_servers_scope_and_channels() -> None:
    """A request waiting for its batch (here every request does: a latency rule is
    configured), or held by a handle the server scheduled as the response completed, keeps
    its own few fields, not the server's scope and channels; a message sent after the end
    fails as a server fails it."""
    import gc
    import weakref

    class Heavy:
        """Stands for what a framework and the server hang on the scope and channels."""

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    heavy_in_scope, heavy_in_send = Heavy(), Heavy()
    in_scope, in_send = weakref.ref(heavy_in_scope), weakref.ref(heavy_in_send)

    class Channel:
        def __init__(self, heavy: Heavy) -> None:
            self.heavy = heavy

        async def receive(self) -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(self, message: dict[str, Any]) -> None:
            return None

    with capture_reports(keep_slower_than_seconds=10) as captured:
        # The writer's periodic flush would settle the request before it is looked at (on a
        # loaded machine the looking takes longer than its period).
        captured.sentinel.writer._run_periodic = lambda: None  # type: ignore[method-assign]
        app: Any = instrument(Starlette(routes=[Route("/ok", ok)]), sentinel=captured.sentinel)
        channel = Channel(heavy_in_send)
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/ok",
            "headers": [(b"x-a", b"1")],
            "query_string": b"q=1",
            "heavy": heavy_in_scope,
        }
        asyncio.run(app(scope, channel.receive, channel.send))
        del heavy_in_scope, heavy_in_send, channel, scope
        gc.collect()
        [(_, request, status, _)] = list(captured.sentinel.metrics.settling)
        assert (in_scope(), in_send()) == (None, None)
        assert (request.route, request.path, status) == ("/ok", "/ok", 200)
        assert (request.raw_headers, request.query_string) == ([(b"x-a", b"1")], b"q=1")
        with pytest.raises(RuntimeError, match="after the request ended"):
            asyncio.run(request.send_wrapper({"type": "http.response.body", "body": b""}))
        assert asyncio.run(request.receive_wrapper()) == {"type": "http.disconnect"}
        labels = {"location": "unknown", "route": "/ok", "method": "GET", "code": "200"}
        assert captured.metric("sentinel_http_requests_total", **labels) == 1


# -- what the client got is what is counted ----------------------------------------------------


async def protocol_breaking_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Breaks the ASGI protocol in the ways a buggy app or framework does."""
    import sys

    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/text-status":
        await send({"type": "http.response.start", "status": "200", "headers": []})
    elif path == "/status-999":
        await send({"type": "http.response.start", "status": 999, "headers": []})
    elif path == "/started-twice":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.start", "status": 503, "headers": []})
    elif path == "/exit":
        sys.exit(3)
    elif path == "/interrupt":
        raise KeyboardInterrupt
    await send({"type": "http.response.body", "body": b"x"})


def requests_by_code(captured: Captured) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    text = generate_latest(captured.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sentinel_http_requests_total":
                code = sample.labels["code"]
                counts[code] = counts.get(code, 0) + sample.value
    return counts


@pytest.mark.parametrize(
    ("path", "code", "reported"),
    [
        ("/text-status", "invalid", "sentinel.AppProtocolError"),
        ("/status-999", "invalid", "sentinel.AppProtocolError"),
        ("/started-twice", "200", "RuntimeError"),
        ("/exit", "500", "SystemExit"),
        ("/interrupt", "500", "KeyboardInterrupt"),
    ],
)
def test_protocol_breaking_apps_are_counted_as_the_client_saw_them(
    captured: Captured, path: str, code: str, reported: str
) -> None:
    """Under real uvicorn: a status that is not an HTTP status is counted under the one
    bounded code "invalid" and reported once as the app's protocol error; a second response
    start is refused by the server, so the first one's status is what the client got; a
    handler's sys.exit() or KeyboardInterrupt is a 500 from the server and is reported."""
    with serve(
        instrument(protocol_breaking_app, sentinel=captured.sentinel), lifespan="off"
    ) as url:
        try:
            response: httpx.Response | None = httpx.get(f"{url}{path}", timeout=5)
        except httpx.TransportError:
            response = None  # the server gave up on the response: the client got nothing
    if code == "200":
        # uvicorn wrote the first start's "200 OK", then gave up on the body: httpx sees an
        # incomplete response (curl shows the status line).
        assert response is None or response.status_code == 200
    elif code == "500":
        assert response is not None and response.status_code == 500
    else:
        assert response is None
    assert requests_by_code(captured) == {code: 1}
    assert [report["exception_type"] for report in captured.reports] == [reported]
    assert captured.metric("sentinel_internal_errors_total", component="middleware") == 0


async def refused_start_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Starts responses that uvicorn's h11 refuses (its send raises): nothing reaches the
    client."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/crlf-header":  # a redirect built from input that carries a CR/LF
        headers = [(b"location", b"/next\r\nSet-Cookie: x=1")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
    elif path == "/early-hints":  # 103: h11 sends no informational response
        headers = [(b"link", b"</a.css>; rel=preload")]
        await send({"type": "http.response.start", "status": 103, "headers": headers})
        await send({"type": "http.response.start", "status": 200, "headers": []})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_start_the_server_refuses_counts_as_a_response_that_never_started(
    captured: Captured,
) -> None:
    """Under real uvicorn (h11): a response start the server refuses never reached the
    client, so the request is one whose response never started (500, the refusal reported
    in phase "request"), not the status the app asked for."""
    app = instrument(refused_start_app, sentinel=captured.sentinel)
    with serve(app, lifespan="off", http="h11") as url:
        for path in ("/crlf-header", "/early-hints"):
            with pytest.raises(httpx.RemoteProtocolError):  # the connection closed unanswered
                httpx.get(f"{url}{path}", timeout=5)
        assert httpx.get(f"{url}/fine", timeout=5).status_code == 200
    assert requests_by_code(captured) == {"500": 2, "200": 1}
    assert sorted((r["path"], r["phase"]) for r in captured.reports) == [
        ("/crlf-header", "request"),
        ("/early-hints", "request"),
    ]


class TimeoutLayer:
    """A request timeout outside sentinel: cancels the app, then answers 504 itself."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with anyio.move_on_after(self.seconds) as timeout:
            await self.app(scope, receive, send)
        if timeout.cancelled_caught:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timeout"})


def test_a_request_closed_outside_its_task_ends_as_the_bare_app_does(captured: Captured) -> None:
    """A loop stopped with a request pending (an abrupt worker exit) leaves its coroutine to
    the garbage collector, which closes it outside the task's context: sentinel's end of the
    request raises nothing of its own (no ValueError reported as the app's), and lets the
    request go."""
    import gc

    async def long_poll(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(100)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(100)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    app = instrument(long_poll, sentinel=captured.sentinel)
    scope = {"type": "http", "method": "GET", "path": "/poll", "headers": [], "query_string": b""}
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(app(scope, receive, send))
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    del task
    gc.collect()
    captured.flush()
    assert len(app._requests) == 0  # type: ignore[attr-defined]
    assert captured.reports == []
    assert captured.metric("sentinel_internal_errors_total") == 0


def test_a_cancellation_that_is_not_the_clients_is_not_counted_499(captured: Captured) -> None:
    """uvicorn never cancels an app whose client left: a request cancelled before its
    response started, while its client still waits (a timeout layer outside sentinel), is a
    server-side 5xx, counted 500, not the client's 499."""

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(10)

    app = TimeoutLayer(instrument(slow, sentinel=captured.sentinel), 0.2)
    with serve(app, lifespan="off") as url:
        assert httpx.get(f"{url}/slow", timeout=5).status_code == 504
    assert requests_by_code(captured) == {"500": 1}
    assert captured.reports == []


def test_a_request_cancelled_after_its_client_left_is_counted_499(captured: Captured) -> None:
    """The client's disconnect seen, then cancelled before a response: the client left."""

    async def gives_up(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise asyncio.CancelledError

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/slow", "headers": []}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(instrument(gives_up, sentinel=captured.sentinel)(scope, gone, send))
    assert requests_by_code(captured) == {"499": 1}
    assert captured.reports == []


UPLOAD_CUT_SHORT = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc"


async def read_the_upload(request: Request) -> Response:
    return PlainTextResponse(str(len(await request.body())))


async def answer_once_the_client_left(request: Request) -> Response:
    while not await request.is_disconnected():  # noqa: ASYNC110 (as apps poll it)
        await asyncio.sleep(0.01)
    return PlainTextResponse("too late")


@pytest.mark.parametrize(
    ("endpoint", "reported"),
    [
        pytest.param(read_the_upload, ["starlette.requests.ClientDisconnect"], id="error-page"),
        pytest.param(answer_once_the_client_left, [], id="handler-answers"),
    ],
)
def test_a_response_started_after_the_client_left_is_counted_499(
    captured: Captured, endpoint: Callable[[Request], Any], reported: list[str]
) -> None:
    """A client that sends half its upload and leaves: Starlette's error page (or the
    handler) starts a response the server no longer sends on (ASGI 2.3: send does nothing
    once the client left). The client got nothing: counted 499, not the status it never
    received."""
    app = Starlette(routes=[Route("/upload", endpoint, methods=["POST"])])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(UPLOAD_CUT_SHORT)
            time.sleep(0.2)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1000) == b""
        assert wait_for(lambda: requests_by_code(captured) or None, 5) == {"499": 1}
    assert [report["exception_type"] for report in captured.reports] == reported


def test_a_websocket_send_after_the_client_left_is_not_the_apps_error(
    captured: Captured,
) -> None:
    """Sending on a websocket whose client left raises the server's own OSError (ASGI: a
    server-specific subclass of OSError); uvicorn drops it without a word, as a disconnect,
    and so does sentinel: no report, no exception counted."""
    sent_after_leaving = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(0.3)  # the client leaves meanwhile, unread
        try:
            for _ in range(50):
                await send({"type": "websocket.send", "text": "late"})
                await asyncio.sleep(0.01)
        finally:
            sent_after_leaving.set()

    with serve(instrument(app, sentinel=captured.sentinel), ws="websockets-sansio") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert client.recv(1000).startswith(b"HTTP/1.1 101")
        assert sent_after_leaving.wait(5)
        time.sleep(0.2)
    assert captured.reports == []
    assert captured.metric("sentinel_unhandled_exceptions_total") == 0


def test_an_apps_return_value_reaches_the_server(captured: Captured) -> None:
    """The server is given what the app returned (uvicorn warns about anything but None and
    closes the connection): sentinel passes it on, as it passes every message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> Any:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return "not None"

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    wrapped = instrument(app, sentinel=captured.sentinel)
    assert asyncio.run(wrapped(scope, receive, send)) == "not None"


def test_a_requests_duration_ends_with_its_response_not_its_background_tasks() -> None:
    """Latency is what the client waits for: a background task Starlette runs after the
    last body (inside the app's call) does not count in the request's duration, the
    histograms or its record."""

    async def slow_cleanup() -> None:
        await asyncio.sleep(0.6)

    async def quick(request: Request) -> Response:
        return PlainTextResponse("done", background=BackgroundTask(slow_cleanup))

    app = Starlette(routes=[Route("/quick", quick)])
    with capture_reports(keep_slower_than_seconds=0.5) as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            started = time.monotonic()
            assert httpx.get(f"{url}/quick", timeout=5).text == "done"
            answered = time.monotonic() - started
            assert answered < 0.5, "the client waited for the background task"
            time.sleep(0.8)  # the task ends, then the request
        captured.flush()
        count = captured.metric
        assert count("sentinel_http_request_duration_seconds_count", route="/quick") == 1
        assert count("sentinel_http_request_duration_seconds_sum", route="/quick") < 0.5
        [record] = captured.events("request")
        assert record["duration_ms"] < 500
        assert record["reason"] != "slow"


def test_a_request_that_raises_after_its_response_started_keeps_its_record_and_trace(
    captured: Captured,
) -> None:
    """An exception after a 200 started (mid-stream, in a background task): its status alone
    would be sampled like any 200, but its report names the request and its trace, so both
    are kept ("exception")."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def fail_later() -> None:
        raise Boom("cleanup failed")

    async def answer(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(fail_later))

    app = Starlette(routes=[Route("/orders/{order_id}", answer)])
    wrapped = instrument(app, sentinel=captured.sentinel, tracer_provider=provider)
    with serve(wrapped) as url:
        for order_id in range(40):  # a connection each: uvicorn closes one after an error
            assert httpx.get(f"{url}/orders/{order_id}", timeout=5).text == "ok"
    captured.flush()
    provider.force_flush()
    reports = captured.reports  # the first of a fingerprint in full, the rest folded
    assert reports and captured.metric("sentinel_unhandled_exceptions_total") == 40
    kept = {record["request_id"]: record["reason"] for record in captured.events("request")}
    assert len(kept) == 40 and set(kept.values()) <= {"new_key", "exception"}
    traced = {span.context.trace_id for span in exporter.get_finished_spans()}
    for report in reports:
        assert int(report["trace_id"], 16) in traced


def test_invalid_status_report_names_the_value_and_the_servers_refusal(
    captured: Captured,
) -> None:
    """The protocol error's report shows the bad status and, as its cause, what the server
    raised; the server's own exception is not reported a second time."""
    with (
        serve(instrument(protocol_breaking_app, sentinel=captured.sentinel), lifespan="off") as url,
        contextlib.suppress(httpx.TransportError),
    ):
        httpx.get(f"{url}/text-status", timeout=5)
    [report] = captured.reports
    assert report["message"] == "http.response.start status must be an int from 100 to 599: '200'"
    assert [cause["relation"] for cause in report["causes"]] == ["cause"]
    assert report["phase"] == "request"


def test_an_http_status_enum_is_its_code(captured: Captured) -> None:
    """``HTTPStatus.GONE`` is a valid status (an int, as servers send it): counted 410, no
    protocol error; a stream started with ``HTTPStatus.OK`` that fails reports the app's
    exception in phase response, not an invalid status."""

    async def gone(request: Request) -> Response:
        return PlainTextResponse("gone", status_code=HTTPStatus.GONE)

    async def export(request: Request) -> Response:
        async def rows() -> AsyncIterator[bytes]:
            yield b"id,name\n"
            raise KeyError("customer_id")

        return StreamingResponse(rows(), status_code=HTTPStatus.OK)

    app = Starlette(routes=[Route("/gone", gone), Route("/export", export)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/gone").status_code == 410
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"{url}/export")
    captured.flush()
    assert requests_by_code(captured) == {"410": 1, "200": 1}
    [report] = captured.reports
    assert (report["exception_type"], report["phase"]) == ("KeyError", "response")


# -- one sentinel per app --------------------------------------------------------------------


def test_wrapping_twice_counts_once(captured: Captured) -> None:
    """instrument() of an instrumented app is that app; a Starlette app that added the
    middleware itself and is wrapped again from outside counts and reports each request
    once."""
    app = Starlette(routes=[Route("/ok", ok), Route("/items/{item_id}", fail)])
    app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel)
    once = instrument(app, sentinel=captured.sentinel)
    assert instrument(once) is once
    outermost = ExceptionRecorder(instrument(once))
    assert asgi_get(outermost, "/ok").status_code == 200
    assert asgi_get(outermost, "/items/3").status_code == 500
    assert requests_by_code(captured) == {"200": 1, "500": 1}
    assert len(captured.reports) == 1


class AddRequestId:
    """Copies the scope and rebuilds its header list, as request-id and proxy-header
    middleware do."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            scope["headers"] = [*scope["headers"], (b"x-request-id", b"abc")]
        await self.app(scope, receive, send)


def test_wrapping_twice_counts_once_through_a_middleware_that_copies_the_scope(
    captured: Captured,
) -> None:
    """Under real uvicorn: with a middleware between the two sentinels that copies the scope
    and rebuilds its headers, the inner one still knows the request for the outer's (the
    copy shares the server's ``state``), and each request is counted and reported once."""
    app = Starlette(routes=[Route("/ok", ok), Route("/items/{item_id}", fail)])
    app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel)
    app.add_middleware(AddRequestId)  # outside the added sentinel
    with serve(instrument(app, sentinel=captured.sentinel), lifespan="off") as url:
        assert httpx.get(f"{url}/ok").status_code == 200
        assert httpx.get(f"{url}/items/3").status_code == 500
    assert requests_by_code(captured) == {"200": 1, "500": 1}
    assert len(captured.reports) == 1


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_copied_scope_sharing_the_extensions_is_the_same_request(captured: Captured) -> None:
    """A server that gives no ``state`` but ``extensions``: a copy sharing them is the outer
    sentinel's request too."""
    inner = SentinelMiddleware(ok_app, sentinel=captured.sentinel)
    outer = instrument(AddRequestId(inner), sentinel=captured.sentinel)
    scope = {"type": "http", "method": "GET", "path": "/ok", "headers": [], "extensions": {}}
    asyncio.run(outer(scope, receive, send))
    assert requests_by_code(captured) == {"200": 1}


def test_an_app_calling_another_instrumented_app_in_process_counts_both(
    captured: Captured,
) -> None:
    """A handler that calls another instrumented app in-process (httpx.ASGITransport) makes
    a request of its own: both apps count theirs."""
    backend = instrument(Starlette(routes=[Route("/inner", ok)]), sentinel=captured.sentinel)

    async def proxy(request: Request) -> Response:
        transport = httpx.ASGITransport(app=backend)
        async with httpx.AsyncClient(transport=transport, base_url="http://backend") as client:
            inner = await client.get("/inner")
        return PlainTextResponse(inner.text)

    front = instrument(Starlette(routes=[Route("/proxy", proxy)]), sentinel=captured.sentinel)
    with serve(front, lifespan="off") as url:
        assert httpx.get(f"{url}/proxy").text == "ok"
    for route in ("/proxy", "/inner"):
        labels = {"location": "unknown", "route": route, "method": "GET", "code": "200"}
        assert captured.metric("sentinel_http_requests_total", **labels) == 1


@pytest.mark.parametrize("wrap", ["instrument", "SentinelMiddleware"])
def test_an_instrumented_app_mounted_in_starlette_shows_its_routes(
    captured: Captured, wrap: str
) -> None:
    """Starlette's Mount reads the routes of the app it mounts: through a sentinel layer,
    url_for across the mount still works and the outer sentinel still names the mounted
    route's template."""

    async def link(request: Request) -> Response:
        return PlainTextResponse(str(request.url_for("thing", tid=7)))

    sub = Starlette(routes=[Route("/things/{tid}", ok, name="thing")])
    mounted = (
        instrument(sub, sentinel=captured.sentinel)
        if wrap == "instrument"
        else SentinelMiddleware(sub, sentinel=captured.sentinel)
    )
    assert mounted.routes == sub.routes
    outer = Starlette(routes=[Mount("/api", app=mounted), Route("/link", link)])
    app = instrument(outer, sentinel=captured.sentinel)
    response = asgi_get(app, "/link")
    assert (response.status_code, response.text) == (200, "http://testserver/api/things/7")
    assert asgi_get(app, "/api/things/1").status_code == 200
    labels = {"location": "unknown", "method": "GET", "code": "200"}
    assert captured.metric("sentinel_http_requests_total", route="/link", **labels) == 1
    route = "/api/things/{tid}"
    assert captured.metric("sentinel_http_requests_total", route=route, **labels) == 1


# -- invalid configuration: refused at startup, never served half-configured -------------------


def test_invalid_configuration_refuses_to_start_the_server(tmp_path: Path) -> None:
    """With add_middleware (which Starlette builds inside the lifespan), a bad SENTINEL_*
    value fails the lifespan startup: uvicorn logs one clear error naming the variable and
    the value, and exits without serving a request."""
    (tmp_path / "misconfigured.py").write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            from sentinel import SentinelMiddleware

            async def ok(request):
                return PlainTextResponse("ok")

            app = Starlette(routes=[Route("/", ok)])
            app.add_middleware(SentinelMiddleware)
            """
        )
    )
    env = clean_env(PYTHONPATH=str(tmp_path), SENTINEL_MUTATION_MODE="loud")
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "misconfigured:app", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Application startup failed" in result.stderr
    assert "SENTINEL_MUTATION_MODE" in result.stderr and "'loud'" in result.stderr
    assert "Uvicorn running" not in result.stderr
    assert result.stderr.count("invalid configuration") == 1


def test_instrument_refuses_an_invalid_configuration_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """instrument() raises the ConfigError where the app is wrapped (at import, usually)."""
    from sentinel import ConfigError

    monkeypatch.setenv("SENTINEL_MUTATION_MODE", "loud")
    with pytest.raises(ConfigError, match="'loud'"):
        instrument(protocol_breaking_app)


def test_a_misspelt_keyword_is_refused_at_startup_naming_the_closest_setting(
    tmp_path: Path,
) -> None:
    """``add_middleware(SentinelMiddleware, locaton=...)`` under uvicorn: the lifespan
    startup fails with a ConfigError naming the keyword and the setting it comes close to,
    and the server exits, rather than starting and answering 500 to every request with
    nothing reported. instrument() raises the same error where the app is wrapped."""
    from sentinel import ConfigError

    (tmp_path / "typo.py").write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette

            from sentinel import SentinelMiddleware

            app = Starlette()
            app.add_middleware(SentinelMiddleware, locaton="fra", metrics_port=0)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "typo:app", "--port", str(free_port())],
        env=clean_env(PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Application startup failed" in result.stderr
    assert 'unknown setting "locaton" (did you mean "location"?)' in result.stderr
    assert "Uvicorn running" not in result.stderr
    with pytest.raises(ConfigError, match='"locaton" \\(did you mean "location"\\?\\)'):
        instrument(ok_app, locaton="fra", metrics_port=0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match='"regisrty" \\(did you mean "registry"\\?\\)'):
        instrument(ok_app, regisrty=CollectorRegistry())  # type: ignore[call-arg]


def _a_sink(record: dict[str, Any]) -> None:
    pass


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"registry": "x"}, "\"registry\" must be a prometheus_client CollectorRegistry: 'x'"),
        ({"stream": 42}, '"stream" must be a text stream (an object with write(), like'),
        ({"sinks": _a_sink}, '"sinks" must be a list of callables (sinks=[sink], not sinks=sink)'),
        ({"sinks": [42]}, '"sinks" must be a list of callables, each taking a record: 42'),
        ({"sinks": "print"}, '"sinks" must be a list of callables (sinks=[sink], not'),
        ({"config": {"location": "fra"}}, '"config" must be a sentinel.Config (or None for'),
        ({"sentinel": 5}, '"sentinel" must be a Sentinel (see sentinel.testing): 5'),
        ({"route_template": "x"}, "\"route_template\" must be a callable or None: 'x'"),
        ({"sampling_hook": 3}, '"sampling_hook" must be a callable or None: 3'),
        ({"span_exporter": 5}, '"span_exporter" must be an OpenTelemetry SpanExporter: 5'),
        ({"tracer_provider": "p"}, '"tracer_provider" must be an OpenTelemetry TracerProvider'),
    ],
)
def test_a_collaborator_of_the_wrong_kind_is_refused_naming_it(
    given: dict[str, Any], refused: str
) -> None:
    """A registry, stream, sink, config, sentinel, callable or exporter of the wrong kind
    was taken (an AttributeError later, or, for a stream or sink, every record dropped
    on the writer's thread): it is a ConfigError naming the argument and showing it."""
    from sentinel import ConfigError

    with pytest.raises(ConfigError) as error:
        instrument(ok_app, metrics_port=0, **given)
    assert str(error.value).startswith(refused), str(error.value)


def test_settings_beside_a_given_sentinel_are_refused_not_ignored(captured: Captured) -> None:
    """A sentinel given with ``sentinel=`` has its own configuration: a config, fields or
    the collaborators that build a sentinel given beside it would be ignored, so they are
    refused, each named (with add_middleware, at the lifespan's startup)."""
    from sentinel import Config, ConfigError

    with pytest.raises(ConfigError) as refused:
        instrument(ok_app, sentinel=captured.sentinel, location="fra", service="shop")
    assert str(refused.value).startswith(
        '"location", "service" cannot be given with "sentinel", which has its own'
    )
    with pytest.raises(ConfigError, match='"config", "registry" cannot be given'):
        instrument(ok_app, Config(), sentinel=captured.sentinel, registry=CollectorRegistry())
    with pytest.raises(ConfigError, match='"sinks" cannot be given'):
        instrument(ok_app, sentinel=captured.sentinel, sinks=[print])
    app = Starlette(routes=[Route("/ok", ok)])
    app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel, location="fra")
    with pytest.raises(RuntimeError, match='"location" cannot be given with'), testing.Client(app):
        pass
    # What belongs to this layer, not to the sentinel, is taken.
    templated = instrument(
        ok_app, sentinel=captured.sentinel, route_template=lambda scope: "/t", sampling_hook=None
    )
    assert asgi_get(templated, "/x").status_code == 200


def test_a_config_object_is_taken_as_it_is(
    monkeypatch: pytest.MonkeyPatch, own_sentinel: None
) -> None:
    """As documented: keywords alone are "these plus the environment"; a whole Config is
    taken as it is, no variable read (Config.from_env(...) gives the environment too)."""
    from sentinel import Config

    monkeypatch.setenv("SENTINEL_LOCATION", "sin")
    monkeypatch.setenv("SENTINEL_MUTATION_MODE", "raise")
    options: dict[str, Any] = {"registry": CollectorRegistry(), "stream": io.StringIO()}
    whole = instrument(Starlette(), Config(service="shop", metrics_port=0), **options)
    assert (whole.sentinel.config.location, whole.sentinel.config.mutation_mode) == (
        "unknown",
        "report",
    )
    merged = instrument(Starlette(), Config.from_env(service="shop", metrics_port=0), **options)
    assert (merged.sentinel.config.location, merged.sentinel.config.mutation_mode) == (
        "sin",
        "raise",
    )
    keywords = instrument(Starlette(), service="shop", metrics_port=0, **options)
    assert keywords.sentinel.config == merged.sentinel.config


USER_CODE = """\
from fastapi import FastAPI
from starlette.applications import Starlette

import sentinel

api = FastAPI()
api.add_middleware(sentinel.SentinelMiddleware)
api.add_middleware(
    sentinel.SentinelMiddleware, location="fra", metrics_port=0, locations=("fra", "iad")
)
plain = Starlette()
plain.add_middleware(sentinel.SentinelMiddleware, sentinel.Config(location="fra"))
wrapped: sentinel.SentinelMiddleware = sentinel.instrument(
    Starlette(), service="shop", mutation_mode="raise", registry=None
)
installed: sentinel.Sentinel = sentinel.install(location="fra", log_locals=True)
"""
USER_MISTAKES = """\
from fastapi import FastAPI

import sentinel

api = FastAPI()
api.add_middleware(sentinel.SentinelMiddleware, locaton="fra")
api.add_middleware(sentinel.SentinelMiddleware, metrics_port="9464")
sentinel.instrument(api, mutation_mod="raise")
"""


def _mypy(tmp_path: Path, name: str, code: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``code`` as a user's module, sentinel found in this checkout (an
    editable install's import hook is invisible to mypy, MYPYPATH is not)."""
    (tmp_path / f"{name}.py").write_text(code)
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file=",
            f"--cache-dir={tmp_path / '.mypy_cache'}",
            "--no-error-summary",
            f"{name}.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_users_code_that_wraps_an_app_type_checks_strictly(tmp_path: Path) -> None:
    """``app.add_middleware(sentinel.SentinelMiddleware, ...)`` and ``instrument(app, ...)``
    pass mypy --strict in a user's code (Starlette's add_middleware takes the middleware's
    signature as a ParamSpec, which ``**overrides: Any`` does not satisfy), and each keyword
    is checked against Config's fields: a typo or a wrong type is a type error."""
    checked = _mypy(tmp_path, "user_app", USER_CODE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    mistakes = _mypy(tmp_path, "user_mistakes", USER_MISTAKES)
    assert mistakes.returncode == 1, mistakes.stdout + mistakes.stderr
    errors = [line for line in mistakes.stdout.splitlines() if ": error: " in line]
    # Starlette types add_middleware's keywords by the middleware's own signature since
    # its middleware factory protocol (1.0); before it (0.40) only instrument's are checked.
    factory = "_MiddlewareFactory" in str(Starlette.add_middleware.__annotations__)
    assert len(errors) == (3 if factory else 1), mistakes.stdout
    if factory:
        assert 'Unexpected keyword argument "locaton"' in errors[0]
        assert 'did you mean "location"?' in errors[0]
        assert 'Argument "metrics_port"' in errors[1] and 'expected "int"' in errors[1]
    assert 'did you mean "mutation_mode"?' in errors[-1]


def test_the_final_flush_at_shutdown_runs_off_the_event_loop_and_never_raises(
    captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the lifespan's end sentinel writes what is pending before the server exits: on a
    worker thread (it waits for the queue, so on the loop it would block every task), and
    a failure there is counted while the shutdown still completes."""
    calls: list[tuple[bool, str]] = []

    def flush(timeout: float = 5.0, *, final: bool = False) -> bool:
        calls.append((final, threading.current_thread().name))
        raise RuntimeError("sink broke at shutdown")

    monkeypatch.setattr(captured.sentinel, "flush", flush)
    app = instrument(Starlette(), sentinel=captured.sentinel)
    sent: list[str] = []

    async def lifespan() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> Message:
            return next(messages)

        async def send(message: Message) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    loop_thread = run_client(_named(lifespan()))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    [(final, thread_name)] = calls
    assert final is True
    assert thread_name != loop_thread
    assert captured.metric("sentinel_internal_errors_total", component="writer") == 1


async def _named(coroutine: Any) -> str:
    await coroutine
    return threading.current_thread().name


# -- the default service name: the app's own module -----------------------------------------------

APP_VIEWS = """\
from starlette.responses import PlainTextResponse


async def hello(request):
    return PlainTextResponse("hi")
"""
APP_HEADER = """\
import io

from prometheus_client import CollectorRegistry

import sentinel

OPTIONS = {"registry": CollectorRegistry(), "stream": io.StringIO(), "metrics_port": 0}
"""
APP_BODIES = {
    ("starlette", "instrument"): """
from starlette.applications import Starlette
from starlette.routing import Route

from {package}.views import hello

app = sentinel.instrument(Starlette(routes=[Route("/", hello)]), **OPTIONS)
""",
    ("starlette", "add_middleware"): """
from starlette.applications import Starlette
from starlette.routing import Route

from {package}.views import hello

app = Starlette(routes=[Route("/", hello)])
app.add_middleware(sentinel.SentinelMiddleware, **OPTIONS)
""",
    ("fastapi", "instrument"): """
from fastapi import FastAPI

api = FastAPI()


@api.get("/")
async def hello():
    return "hi"


app = sentinel.instrument(api, **OPTIONS)
""",
    ("fastapi", "add_middleware"): """
from fastapi import FastAPI

app = FastAPI()
app.add_middleware(sentinel.SentinelMiddleware, **OPTIONS)


@app.get("/")
async def hello():
    return "hi"
""",
    ("starlette", "factory"): """
from starlette.applications import Starlette
from starlette.routing import Route

from {package}.views import hello


def create_app():
    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(sentinel.SentinelMiddleware, **OPTIONS)
    return app
""",
    ("starlette", "bare_factory"): """
from starlette.applications import Starlette


def create_app():
    app = Starlette()
    app.add_middleware(sentinel.SentinelMiddleware, **OPTIONS)
    return app
""",
}
_packages = itertools.count()


@pytest.fixture
def own_sentinel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test installs sentinels of its own (no service variable set): the one current
    before is current again afterwards, and the test's is closed."""
    for name in ("SENTINEL_SERVICE", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    previous = _current.current()
    try:
        yield
    finally:
        installed = set_current(previous)
        if installed is not None and installed is not previous:
            installed.close()


@pytest.fixture
def app_package(tmp_path: Path, restore_sys_path: None) -> Iterator[Callable[[str], Any]]:
    """Writes a package of the app's own (``views`` and ``main``) in a directory of its own
    and imports its ``main``; a fresh package name each time, forgotten afterwards."""
    sys.path.insert(0, str(tmp_path))
    packages: list[str] = []

    def load(body: str) -> Any:
        package = f"sentinel_svc{next(_packages)}"
        packages.append(package)
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "views.py").write_text(APP_VIEWS)
        (tmp_path / package / "main.py").write_text(APP_HEADER + body.format(package=package))
        return importlib.import_module(f"{package}.main")

    try:
        yield load
    finally:
        for name in [name for name in sys.modules if name.startswith(tuple(packages))]:
            del sys.modules[name]


def served_service(app: Any, stream: io.StringIO) -> str:
    """Serve one request with a real uvicorn; the service its request record names."""
    with serve(app) as url:
        assert httpx.get(f"{url}/").status_code in (200, 404)
    current = _current.current()
    assert current is not None
    current.flush()
    [record] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["event"] == "request"
    assert record["service"] == current.config.service
    return str(record["service"])


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
@pytest.mark.parametrize("style", ["instrument", "add_middleware"])
@pytest.mark.usefixtures("own_sentinel")
def test_the_default_service_is_the_apps_own_module(
    framework: str, style: str, app_package: Callable[[str], Any]
) -> None:
    """Wrapped with instrument() or add_middleware, a Starlette or FastAPI app is named after
    the module that made it (``mypkg.main``): not the framework's module (FastAPI's first
    routes are its own docs pages) nor the module of the first endpoint."""
    if framework == "fastapi":
        pytest.importorskip("fastapi")
    main = app_package(APP_BODIES[framework, style])
    assert served_service(main.app, main.OPTIONS["stream"]) == main.__name__


@pytest.mark.usefixtures("own_sentinel")
def test_an_app_from_a_factory_is_named_after_its_first_endpoint_or_nothing(
    app_package: Callable[[str], Any],
) -> None:
    """An app no module holds (made by a factory, as ``uvicorn --factory`` does) is named
    after the module of its first endpoint that is the app's code, else unknown_service."""
    main = app_package(APP_BODIES["starlette", "factory"])
    views = main.__name__.replace(".main", ".views")
    assert served_service(main.create_app(), main.OPTIONS["stream"]) == views
    bare = app_package(APP_BODIES["starlette", "bare_factory"])
    assert served_service(bare.create_app(), bare.OPTIONS["stream"]) == "unknown_service"


@pytest.mark.usefixtures("own_sentinel")
def test_an_explicit_service_name_always_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """service= and OTEL_SERVICE_NAME name the service, whatever module made the app;
    without them, the module that called instrument() does."""
    options = {"registry": CollectorRegistry(), "stream": io.StringIO(), "metrics_port": 0}
    assert instrument(Starlette(), **options).sentinel.config.service == __name__
    options["registry"] = CollectorRegistry()
    assert instrument(Starlette(), service="kv", **options).sentinel.config.service == "kv"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    options["registry"] = CollectorRegistry()
    assert instrument(Starlette(), **options).sentinel.config.service == "checkout"


SERVED_SCRIPT = """\
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import sentinel


async def hello(request):
    return PlainTextResponse("hi")


app = Starlette(routes=[Route("/", hello)])
app.add_middleware(sentinel.SentinelMiddleware)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@pytest.mark.parametrize("how", ["module", "script"])
def test_an_app_run_as_main_is_named_as_it_was_run(tmp_path: Path, how: str) -> None:
    """An app module run as ``python -m mypkg.serve`` is ``mypkg.serve``, and a script run as
    ``python serve.py`` is ``serve``, never ``__main__`` (a real uvicorn in a process)."""
    package = tmp_path / "svcmain"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "serve.py").write_text(SERVED_SCRIPT)
    port = free_port()
    target = ["-m", "svcmain.serve"] if how == "module" else [str(package / "serve.py")]
    process = subprocess.Popen(
        [sys.executable, *target, str(port)],
        cwd=tmp_path,
        env=clean_env(SENTINEL_METRICS_PORT="0", PYTHONPATH=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first_response(process, f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        stop(process)
    _, stderr = process.communicate(timeout=10)
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    services = {record["service"] for record in records if record["event"] == "request"}
    assert services == {"svcmain.serve" if how == "module" else "serve"}, stderr


# -- tenants -----------------------------------------------------------------------------------


async def _status_app(scope: Any, receive: Any, send: Any) -> None:
    status = 503 if scope.get("query_string") == b"fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _drive_tenants(app: Any, requests: list[tuple[list[tuple[bytes, bytes]], bytes]]) -> None:
    """Each (headers, query string) as one http request, straight through the ASGI app."""

    async def run() -> None:
        for headers, query in requests:
            scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
            scope["query_string"] = query
            await app(scope, receive, send)

    asyncio.run(run())


def _tenant_samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["tenant"], sample.labels["status_class"]): sample.value
        for family in registry.collect()
        if family.name == "sentinel_tenant_requests"
        for sample in family.samples
    }


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_tenant_header_counts_each_request_under_its_tenant_or_other() -> None:
    """The tenant header names the tenant; requests without one are other; the 5xx of a
    tracked tenant is kept in full with the tenant on its record."""
    with capture_reports(tenant_header="x-tenant") as captured:
        app = instrument(_status_app, sentinel=captured.sentinel)
        _check_tenant_header(app, captured)


def _check_tenant_header(app: Any, captured: Captured) -> None:
    registry = app.sentinel.registry
    uuid_tenant = b"550e8400-e29b-41d4-a716-446655440000"
    _drive_tenants(
        app,
        [
            ([(b"x-tenant", b"acme")], b""),
            ([(b"x-tenant", b"acme")], b"fail"),
            ([(b"x-tenant", uuid_tenant)], b""),
            ([], b""),
        ],
    )
    counts = _tenant_samples(registry)
    assert counts[("acme", "2xx")] == 1 and counts[("acme", "5xx")] == 1
    assert counts[(uuid_tenant.decode(), "2xx")] == 1
    assert counts[("other", "2xx")] == 1
    app.sentinel.flush()
    records = [r for r in captured.records if r["event"] == "request"]
    assert {r.get("tenant") for r in records} == {"acme", uuid_tenant.decode(), None}
    [error] = [r for r in records if r["status"] == 503]
    assert error["tenant"] == "acme" and error["sample_rate"] == 1.0


@pytest.mark.parametrize(
    "tenant",
    [
        b"550e8400e29b41d4a716446655440000",  # uuid4().hex
        b"01ARZ3NDEKTSV4RRFFQ69G5FAV",  # a ULID
        b"507f1f77bcf86cd799439011",  # a MongoDB ObjectId
        b"org_2NNEqL2nrIRdJ194ndJqAHwEfxC",  # a Clerk organisation
    ],
)
def test_a_random_customer_id_is_a_tenant_named_in_metrics_and_records(tenant: bytes) -> None:
    """Customer ids are often random, as keys are: a random id is counted under its name and
    written in its records as it is (these were all refused as ``secret``, so a failing
    customer with such an id could never be named)."""
    stream = io.StringIO()
    registry = CollectorRegistry()
    app = instrument(
        _status_app, registry=registry, stream=stream, metrics_port=0, tenant_header="x-tenant"
    )
    _drive_tenants(app, [([(b"x-tenant", tenant)], b"fail")])
    name = tenant.decode()
    assert _tenant_samples(registry)[(name, "5xx")] == 1
    assert _sample(registry, "sentinel_tenants_rejected_total", reason="secret") == 0
    app.sentinel.flush()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["tenant"] for r in records if r.get("event") == "request"] == [name]


def test_bad_tenant_values_are_counted_by_reason_and_go_to_other() -> None:
    """Empty, overlong, non-printable, invalid UTF-8, outside the alphabet, reserved and
    credential-looking values: no tenant, counted in sentinel_tenants_rejected_total by
    reason; the request is served and counted as other."""
    registry = CollectorRegistry()
    app = instrument(
        _status_app,
        registry=registry,
        stream=io.StringIO(),
        metrics_port=0,
        tenant_header="x-tenant",
    )
    bad = {
        "empty": b"",
        "too_long": b"a" * 65,
        "not_printable": b"acme\x7f",
        "not_utf8": b"\xff\xfeacme",
        "bad_character": b"acme corp",
        "reserved": b"other",
        "secret": b"sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    }
    _drive_tenants(app, [([(b"x-tenant", value)], b"") for value in bad.values()])
    for reason in bad:
        assert _sample(registry, "sentinel_tenants_rejected_total", reason=reason) == 1, reason
    assert _tenant_samples(registry) == {
        ("other", "2xx"): len(bad),
        ("other", "3xx"): 0,
        ("other", "4xx"): 0,
        ("other", "5xx"): 0,
    }


def test_tenant_callable_wins_and_its_failures_are_counted() -> None:
    """tenant(scope) names the tenant, or returns None to leave the header's; one that
    raises, returns a non-text value or is slower than its budget gives no tenant, not even
    the header's, and counts sentinel_internal_errors_total{tenant}; the request is served
    either way; after 5 slow calls in a row it is left alone, and each request that finds
    it paused has no tenant either and counts as one more failed call."""
    calls: list[str] = []

    def tenant_of(scope: Any) -> Any:
        mode = scope["path"]
        calls.append(mode)
        if mode == "/raise":
            raise RuntimeError("no tenant here")
        if mode == "/number":
            return 42
        if mode == "/none":
            return None
        if mode == "/slow":
            deadline = time.perf_counter() + 0.003
            while time.perf_counter() < deadline:
                pass
            return "slowcorp"
        return "fromcallable"

    registry = CollectorRegistry()
    app = instrument(
        _status_app,
        registry=registry,
        stream=io.StringIO(),
        metrics_port=0,
        tenant_header="x-tenant",
        tenant=tenant_of,
    )

    async def run(paths: list[str]) -> None:
        for path in paths:
            scope = {"type": "http", "method": "GET", "path": path, "query_string": b""}
            scope["headers"] = [(b"x-tenant", b"fromheader")]
            await app(scope, receive, send)

    asyncio.run(run(["/ok", "/none", "/raise", "/number", *["/slow"] * 8]))
    counts = _tenant_samples(registry)
    assert counts[("fromcallable", "2xx")] == 1
    # None says "not known here": the header's tenant stands. raise, number, slow and the
    # paused calls: no tenant at all, even with the header there.
    assert counts[("fromheader", "2xx")] == 1
    assert counts[("other", "2xx")] == 10
    assert ("slowcorp", "2xx") not in counts
    # raise, number, 5 slow calls, and the 3 requests that found it paused.
    assert _sample(registry, "sentinel_internal_errors_total", component="tenant") == 10
    assert calls.count("/slow") == 5  # the sixth request on found it paused
    assert (
        _sample(
            registry,
            "sentinel_http_requests_total",
            location="unknown",
            route="<unmatched>",
            method="GET",
            code="200",
        )
        == 12
    )


@pytest.mark.parametrize(
    "error",
    [BaseException("not an Exception"), asyncio.CancelledError()],
    ids=["BaseException", "CancelledError"],
)
def test_a_tenant_callable_raising_a_base_exception_fails_only_its_call(
    error: BaseException,
) -> None:
    """A BaseException out of the tenant callable (but KeyboardInterrupt and SystemExit) is
    the callable's failure, as an Exception is: the request is served and counted, with no
    tenant, and sentinel_internal_errors_total{tenant} counts it. A CancelledError too: a
    synchronous call is no place where a cancellation arrives."""

    def tenant_of(scope: Any) -> Any:
        raise error

    registry = CollectorRegistry()
    stream = io.StringIO()
    app = instrument(
        _status_app,
        registry=registry,
        stream=stream,
        metrics_port=0,
        tenant_header="x-tenant",
        tenant=tenant_of,
    )
    sent: list[dict[str, Any]] = []

    async def keep(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        scope = {"type": "http", "method": "GET", "path": "/", "query_string": b""}
        scope["headers"] = [(b"x-tenant", b"acme")]
        await app(scope, receive, keep)

    asyncio.run(run())
    assert [message.get("status") for message in sent][:1] == [200]
    assert _tenant_samples(registry)[("other", "2xx")] == 1
    assert _sample(registry, "sentinel_internal_errors_total", component="tenant") == 1
    labels = {"location": "unknown", "route": "<unmatched>", "method": "GET", "code": "200"}
    assert _sample(registry, "sentinel_http_requests_total", **labels) == 1
    app.sentinel.flush()
    assert "unhandled_exception" not in stream.getvalue()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_from_the_tenant_callable_go_on(
    error: type[BaseException],
) -> None:
    """Ctrl-C and an exit requested inside the tenant callable are no failed call: they go
    on, uncounted."""
    from sentinel import Config
    from sentinel._middleware import TenantCallable

    counted: list[str] = []

    class Metrics:
        def internal_error(self, component: str) -> None:
            counted.append(component)

    def tenant_of(scope: Any) -> Any:
        raise error

    guarded = TenantCallable(Config(tenant=tenant_of), Metrics())
    with pytest.raises(error):
        guarded({"type": "http"})
    assert counted == []


def test_a_bytearray_from_the_tenant_callable_is_a_tenant_as_bytes_are() -> None:
    """bytes and bytearray are both text to a tenant: a callable returning a bytearray
    names its tenant, with no internal error."""
    registry = CollectorRegistry()
    app = instrument(
        _status_app,
        registry=registry,
        stream=io.StringIO(),
        metrics_port=0,
        tenant=lambda scope: bytearray(b"ba-tenant"),
    )
    _drive_tenants(app, [([], b""), ([], b"fail")])
    counts = _tenant_samples(registry)
    assert counts[("ba-tenant", "2xx")] == 1 and counts[("ba-tenant", "5xx")] == 1
    assert _sample(registry, "sentinel_internal_errors_total", component="tenant") == 0


def test_a_report_names_the_tenant_of_its_request() -> None:
    """The unhandled exception of a request that named its tenant carries it (scrubbed like
    the path), beside the request record."""
    from sentinel.testing import Client, capture_reports

    async def fail(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("backend down")

    with capture_reports(tenant_header="x-tenant") as captured:
        client = Client(instrument(fail, sentinel=captured.sentinel))
        assert client.get("/", tenant="acme-logistics").status_code == 500
        [report] = captured.wait_for(1)
    assert report["tenant"] == "acme-logistics"


def test_served_on_two_threads_every_request_is_accounted_for_under_the_settle_lock() -> None:
    """A server running an event loop per thread (granian's threads, say) calls one app
    from two threads. Counting at the end decides through the sampler's cursors without a
    lock, so once a second thread serves, every middleware of the sentinel accounts for
    each request with its batch: counts stay exact and the kept records' weights plus the
    key's unspent credit add up to the requests exactly, with the threads taking turns
    every microsecond."""

    scope = {"type": "http", "method": "GET", "path": "/k", "headers": [], "query_string": b""}

    def serve(app: Any, count: int) -> None:
        async def requests() -> None:
            for _ in range(count):
                await app(dict(scope), receive, send)

        asyncio.run(requests())

    with capture_reports(sampling_window_seconds=600.0) as captured:
        app: Any = instrument(Starlette(routes=[Route("/k", ok)]), sentinel=captured.sentinel)
        other: Any = instrument(Starlette(routes=[Route("/k", ok)]), sentinel=captured.sentinel)
        serve(app, 100)
        serve(other, 1)
        assert app._account_now is not None and other._account_now is not None  # one thread
        helper = threading.Thread(target=serve, args=(app, 1))
        helper.start()
        helper.join()
        assert app._account_now is None and other._account_now is None
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=serve, args=(app, 3000)) for _ in range(2)]
            for thread in threads:
                thread.start()
            serve(other, 3000)
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        late: Any = instrument(Starlette(routes=[Route("/k", ok)]), sentinel=captured.sentinel)
        serve(late, 1)
        assert late._account_now is None  # built after the switch: batches from the start
        captured.sentinel.flush()
        labels = {"location": "unknown", "route": "/k", "method": "GET", "code": "200"}
        assert captured.metric("sentinel_http_requests_total", **labels) == 9_103
        entry = captured.sentinel.sampler._locations["unknown"].keys[(200, "GET", "/k")]
        weights = sum(record["sample_rate"] for record in captured.events("request"))
        assert weights + entry.credit == pytest.approx(9_103)


class UpstreamError(Exception):
    """A client library's error that answers any attribute from its payload."""

    def __init__(self, payload: dict[str, object]) -> None:
        super().__init__("upstream answered 502")
        self.payload = payload

    def __getattr__(self, name: str) -> object:
        return self.payload.get(name, "n/a")


def test_an_exception_answering_every_attribute_is_reported_and_counted(
    captured: Captured,
) -> None:
    """sentinel's "already reported" mark is read from the exception itself, not through
    the class's __getattr__ (which said "n/a", a true value, so the error was never
    reported, never counted, and the server's own line about it was left out too)."""

    async def call_upstream(request: Request) -> Response:
        raise UpstreamError({"status": 502})

    app = Starlette(routes=[Route("/upstream", call_upstream)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/upstream").status_code == 500
    [report] = captured.wait_for(1)
    assert report["exception_type"].endswith("UpstreamError")
    assert captured.metric("sentinel_unhandled_exceptions_total", route="/upstream") == 1


def test_a_cancellation_the_request_did_not_receive_is_the_apps_error(
    captured: Captured,
) -> None:
    """A handler awaiting a task that something else cancelled: the CancelledError escapes
    though neither the client left nor the request's own task was cancelled. The client
    gets a 500, which is counted and now reported (it had no report at all)."""

    async def awaits_a_cancelled_task(request: Request) -> Response:
        job = asyncio.create_task(asyncio.sleep(10))
        asyncio.get_running_loop().call_later(0.05, job.cancel)
        await job
        return Response("never")

    app = Starlette(routes=[Route("/job", awaits_a_cancelled_task)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/job").status_code == 500
    [report] = captured.wait_for(1)
    assert (report["exception_type"], report["phase"]) == (
        "asyncio.exceptions.CancelledError",
        "request",
    )
    assert requests_by_code(captured) == {"500": 1}

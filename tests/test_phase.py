"""One phase rule for every way sentinel sees an exception."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from helpers import request_context, run_client
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import sentinel
from sentinel import instrument
from sentinel._context import current_phase
from sentinel._phase import phase_of
from sentinel.testing import Captured


def test_request_response_and_error_middleware_cases() -> None:
    """Before the response: request; mid-stream: response; after a complete 500: request."""
    request = request_context()
    assert phase_of(request) == "request"
    request.response_started = True
    assert phase_of(request) == "response"
    request.body_complete = True
    request.status = 500
    assert phase_of(request) == "request"


def test_background_task_is_seen_in_the_traceback_or_after_a_good_response() -> None:
    """Propagated through a Starlette BackgroundTask, or logged after a successful
    response: background. Propagated after a successful response otherwise: response.
    Logged after a 500 was sent: request."""
    request = request_context()
    request.response_started = request.body_complete = True
    request.status = 200
    seen_inside: list[str] = []
    caught: list[BaseException] = []

    def job() -> None:
        seen_inside.append(phase_of(request))  # as a logged exception would be classified
        raise LookupError("job failed")

    async def run() -> None:
        try:
            await BackgroundTask(job)()
        except LookupError as exc:
            caught.append(exc)

    asyncio.run(run())
    assert seen_inside == ["background"]
    assert phase_of(request, caught[0], propagated=True) == "background"
    assert phase_of(request, ValueError("elsewhere"), propagated=True) == "response"
    request.status = 500
    assert phase_of(request) == "request"
    assert phase_of(request, ValueError("elsewhere"), propagated=True) == "request"


def test_outside_arequest_context() -> None:
    """An explicit phase (lifespan), else thread, task or process."""
    assert phase_of(None) == "process"
    token = current_phase.set("lifespan")
    try:
        assert phase_of(None) == "lifespan"
    finally:
        current_phase.reset(token)
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(phase_of(None)))
    thread.start()
    thread.join()

    async def in_task() -> str:
        return phase_of(None)

    assert seen == ["thread"]
    assert asyncio.run(in_task()) == "task"


class StreamBroke(Exception):
    """The app's stream failing after its first chunk went out."""


async def stream_that_breaks(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"first chunk"
        raise StreamBroke("after the first chunk")

    return StreamingResponse(body())


async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


async def stream_request(app: Any) -> tuple[list[dict[str, Any]], BaseException | None]:
    """GET /stream in-process: the messages the client got, and what reached the server."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(5)  # the client stays until the response is done
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except BaseException as exc:
        return sent, exc
    return sent, None


def test_stream_failing_behind_base_http_middleware_is_phase_response(
    captured: Captured,
) -> None:
    """Behind BaseHTTPMiddleware (what ``@app.middleware("http")`` adds; the decorator is gone
    from Starlette 1.0), a stream failing after its first chunk is phase response: the
    client already had the 200 and a chunk, though the middleware ends the body before it
    re-raises the app's exception."""
    app = Starlette(routes=[Route("/stream", stream_that_breaks)])
    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    sent, propagated = run_client(stream_request(instrument(app, sentinel=captured.sentinel)))
    assert isinstance(propagated, StreamBroke)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[1]["body"] == b"first chunk"
    [report] = captured.reports
    assert report["exception_type"] == f"{__name__}.StreamBroke"
    assert report["phase"] == "response"
    labels = {
        "location": "unknown",
        "route": "/stream",
        "exception_type": f"{__name__}.StreamBroke",
    }
    assert captured.metric("sentinel_unhandled_exceptions_total", phase="response", **labels) == 1
    assert captured.metric("sentinel_unhandled_exceptions_total", phase="request", **labels) == 0


def test_a_task_the_lifespan_started_is_a_task_while_requests_are_served(
    captured: Captured,
) -> None:
    """A worker task started at startup (a queue consumer, a refresher) inherits the
    lifespan's context: what it captures while requests are served is phase task; during
    startup and shutdown themselves it is lifespan. (The server's loop on the main thread,
    as a real server runs it.)"""
    phases: list[str] = []
    kick = asyncio.Event()
    done = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        phases.append(phase_of(None))  # startup

        async def worker() -> None:
            await kick.wait()
            phases.append(phase_of(None))
            try:
                raise ConnectionError("the worker's job failed while serving")
            except ConnectionError as error:
                sentinel.capture_exception(error)
            done.set()

        task = asyncio.create_task(worker())
        yield
        phases.append(phase_of(None))  # shutdown
        task.cancel()

    app = instrument(Starlette(lifespan=lifespan), sentinel=captured.sentinel)

    async def serve_lifespan() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        running = asyncio.create_task(app({"type": "lifespan"}, inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
        kick.set()  # serving: the worker's job fails now
        await asyncio.wait_for(done.wait(), 5)
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await running

    asyncio.run(serve_lifespan())
    assert phases == ["lifespan", "task", "lifespan"]
    [report] = captured.wait_for(1, "handled_exception")
    assert (report["exception_type"], report["phase"]) == ("ConnectionError", "task")

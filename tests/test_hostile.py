"""Hostile input and misbehaving peers: sentinel stays transparent, bounded and exact.

In-process (ASGI calls on one event loop): thousands of distinct location and request-id
values, every shape of path and method, and Hypothesis-generated misbehaving apps and
clients. Under a real uvicorn on 127.0.0.1, with raw sockets for what httpx refuses to send:
invalid UTF-8 and control characters in header names and values, 64 KiB headers, odd paths
and methods, each answered exactly as the same server answers the bare app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import instrument
from sentinel._config import Config
from sentinel._location import OTHER_LOCATION
from sentinel._metrics import STANDARD_METHODS
from sentinel._routes import UNMATCHED_ROUTE
from sentinel._runtime import Sentinel
from sentinel.testing import Captured, capture_reports, serve
from sentinel.types import Message, Receive, Scope, Send

MAX_LOCATIONS = 8
HEADERS = {
    "location_header": "x-location",
    "request_id_header": "x-request-id",
    "tenant_header": "x-tenant",
    "keep_header": "x-keep",
}
"""Every trusted header sentinel reads, switched on."""


class _Loop:
    """One event loop for a test's requests (asyncio.run in the main thread would install a
    SIGINT handler, a process-global write)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 10))


@pytest.fixture(scope="module")
def loop() -> Iterator[_Loop]:
    running = _Loop()
    yield running
    running.loop.close()


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    raw_path: bytes | None = None,
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }


async def exchange(app: Any, scope: Scope) -> list[Message]:
    """One request through ``app`` with an empty body; what the server was sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with contextlib.suppress(Exception):  # compared with the bare app's outcome
        await app(scope, receive, send)
    return sent


def samples(registry: CollectorRegistry, name: str) -> list[Any]:
    return [
        sample for metric in registry.collect() for sample in metric.samples if sample.name == name
    ]


def total(registry: CollectorRegistry, name: str) -> float:
    return sum(sample.value for sample in samples(registry, name))


def values(registry: CollectorRegistry, name: str, label: str) -> set[str]:
    return {sample.labels[label] for sample in samples(registry, name)}


async def item(request: Request) -> Response:
    return PlainTextResponse(f"item {request.path_params['item_id']}")


async def echo(request: Request) -> Response:
    return PlainTextResponse(f"{request.method} {request.url.path}")


def routed_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/", echo, methods=["GET", "POST", "get", "BREW", "X" * 300]),
        ]
    )


# -- thousands of distinct values: bounded labels, bounded memory --------------------------------


def test_thousands_of_distinct_locations_and_request_ids_stay_bounded(loop: _Loop) -> None:
    """4,000 requests, each with a location and a request id never seen before: the
    location label takes at most max_locations values plus other, every request is
    counted, nothing fails inside sentinel, and after a warm-up the memory traced over
    3,000 more requests grows by less than a tenth of what their values would take if they
    were kept. (Distinct tenants are bounded in test_tenants.py.)"""
    config = Config(metrics_port=0, max_locations=MAX_LOCATIONS, **HEADERS)

    async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with open(os.devnull, "w") as devnull:
        sentinel = Sentinel(config, registry=CollectorRegistry(), stream=devnull)
        try:
            app = instrument(plain_app, sentinel=sentinel, route_template=lambda _: "/items/{id}")

            async def burst(start: int, count: int) -> None:
                for number in range(start, start + count):
                    headers = [
                        (b"x-location", f"loc-{number}".encode()),
                        (b"x-request-id", f"req-{number:08d}-{'r' * 60}".encode()),
                    ]
                    messages = await exchange(app, http_scope(f"/items/{number}", "GET", headers))
                    assert messages[0]["status"] == 200

            tracemalloc.start()  # from the start: frees of untraced objects are not seen
            try:
                loop.run(burst(0, 1000))  # label children, sampler keys
                sentinel.flush()
                before = tracemalloc.take_snapshot()
                loop.run(burst(1000, 3000))
                sentinel.flush()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
            registry = sentinel.registry
            locations = values(registry, "sentinel_http_requests_total", "location")
            assert len(locations) <= MAX_LOCATIONS + 1
            assert OTHER_LOCATION in locations
            assert total(registry, "sentinel_http_requests_total") == 4000
            assert total(registry, "sentinel_internal_errors_total") == 0
            # Kept, the two values of a request would take about 200 bytes: 3,000 ~600 KB.
            assert growth < 60_000, after.compare_to(before, "lineno")[:10]
        finally:
            sentinel.close()


# -- every shape of path and method ------------------------------------------------------------

PATHS = [
    ("", None),
    ("*", None),
    ("http://example.com/items/1", None),  # absolute-form, as a proxy request carries it
    ("//", None),
    ("//items//1", None),
    ("/items/%00", b"/items/%00"),
    ("/items/\x00", b"/items/%00"),
    ("/" + "a" * 16_384, None),
    ("/items/\u00e9\u6f22", "/items/\u00e9\u6f22".encode()),
    ("/items/x", b"/items/\xff\xfe"),  # raw_path that is not UTF-8
    ("/items/../../etc/passwd", None),
    ("/items/1?x", None),
    ("/\udcff", None),  # what a server's surrogateescape decode leaves
]
METHODS = ["GET", "get", "POST", "BREW", "M-SEARCH", "X" * 300, "G\x00T", ""]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: repr(m[:12]))
def test_every_shape_of_path_and_method_is_answered_as_without_sentinel(
    loop: _Loop, method: str
) -> None:
    """Every odd path (empty, *, absolute-form, //, NUL, 16 KiB, non-ASCII, non-UTF-8
    raw_path) with each odd method: the wrapped app answers exactly as the bare app does,
    every request is counted once under a bounded route and method, and nothing fails
    inside sentinel."""
    with capture_reports(mutation_mode="off", **HEADERS) as captured:
        bare = routed_app()
        wrapped = instrument(routed_app(), sentinel=captured.sentinel)
        for path, raw_path in PATHS:
            scope = http_scope(path, method, raw_path=raw_path)
            expected = loop.run(exchange(bare, dict(scope)))
            got = loop.run(exchange(wrapped, dict(scope)))
            assert got == expected, (path, method)
        registry = captured.registry
        assert total(registry, "sentinel_http_requests_total") == len(PATHS)
        assert values(registry, "sentinel_http_requests_total", "route") <= {
            "/items/{item_id}",
            "/",
            UNMATCHED_ROUTE,
        }
        assert values(registry, "sentinel_http_requests_total", "method") <= {
            *STANDARD_METHODS,
            "OTHER",
        }
        assert total(registry, "sentinel_internal_errors_total") == 0


# -- a real uvicorn, raw sockets -------------------------------------------------------------


def raw_exchange(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is to the server at ``url``; its whole response (at most 1 MiB)
    without the Date header, or b"" when it closed the connection without one."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while len(received) < 1 << 20:
                chunk = connection.recv(65_536)
                if not chunk:
                    break
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body if received else b""


def request_bytes(
    head: bytes = b"GET /items/1 HTTP/1.1", headers: list[bytes] | None = None
) -> bytes:
    lines = [head, b"host: 127.0.0.1", *(headers or []), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


BIG = b"v" * 65_536
RAW_REQUESTS: dict[str, bytes] = {
    "invalid utf-8 in values": request_bytes(
        headers=[
            b"x-location: \xff\xfe\xc3\x28",
            b"x-request-id: \xe2\x28\xa1",
            b"x-tenant: \xf0\x28\x8c\xbc",
            b"x-keep: \xff",
            b"traceparent: 00-\xff" + b"a" * 31 + b"-" + b"b" * 16 + b"-01",
            b"baggage: k=\xff\xfe,\xc3=\x28",
        ]
    ),
    "control characters in values": request_bytes(
        headers=[
            b"x-location: fra\x01\x7f",
            b"x-request-id: req\x00id",
            b"x-tenant: acme\x1b[31m",
            b"traceparent: 00-\x00",
            b"baggage: k=\x07",
        ]
    ),
    "tab and obs-text in values": request_bytes(
        headers=[b"x-location: fra\tiad", b"x-request-id: \x80\x81", b"baggage: k=v\t"]
    ),
    "invalid utf-8 in a name": request_bytes(headers=[b"x-\xff\xfe: 1"]),
    "control character in a name": request_bytes(headers=[b"x-loc\x01ation: fra"]),
    "space before the colon": request_bytes(headers=[b"x-location : fra"]),
    "64 KiB location": request_bytes(headers=[b"x-location: " + BIG]),
    "64 KiB request id": request_bytes(headers=[b"x-request-id: " + BIG]),
    "64 KiB traceparent": request_bytes(headers=[b"traceparent: " + BIG]),
    "64 KiB baggage": request_bytes(headers=[b"baggage: k=" + BIG]),
    "64 KiB header name": request_bytes(headers=[b"x-" + BIG + b": 1"]),
    "many small headers": request_bytes(headers=[b"x-h%d: %d" % (n, n) for n in range(2000)]),
    "empty path": request_bytes(b"GET  HTTP/1.1"),
    "asterisk": request_bytes(b"OPTIONS * HTTP/1.1"),
    "absolute-form": request_bytes(b"GET http://example.com/items/1 HTTP/1.1"),
    "double slash": request_bytes(b"GET //items//1 HTTP/1.1"),
    "percent-encoded NUL": request_bytes(b"GET /items/%00 HTTP/1.1"),
    "16 KiB path": request_bytes(b"GET /" + b"a" * 16_384 + b" HTTP/1.1"),
    "non-ASCII raw path": request_bytes(b"GET /items/\xc3\xa9\xff HTTP/1.1"),
    "lowercase method": request_bytes(b"get /items/1 HTTP/1.1"),
    "unknown method": request_bytes(b"BREW /items/1 HTTP/1.1"),
    "very long method": request_bytes(b"X" * 8_000 + b" /items/1 HTTP/1.1"),
    "CONNECT": request_bytes(b"CONNECT 127.0.0.1:443 HTTP/1.1"),
}


@dataclasses.dataclass
class Served:
    bare: str
    wrapped: str
    captured: Captured


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with (
        capture_reports(
            max_locations=MAX_LOCATIONS,
            traces=True,
            span_exporter=InMemorySpanExporter(),
            **HEADERS,
        ) as captured,
        serve(routed_app(), lifespan="off") as bare,
        serve(instrument(routed_app(), sentinel=captured.sentinel), lifespan="off") as wrapped,
    ):
        yield Served(bare, wrapped, captured)


@pytest.mark.parametrize("name", list(RAW_REQUESTS))
def test_raw_hostile_requests_are_answered_as_without_sentinel(served: Served, name: str) -> None:
    """Under a real uvicorn: each hostile request gets the response the same server gives
    the bare app (its own 400 or 431 when it refuses one), whatever reached the app is
    counted once, nothing fails inside sentinel, and the server keeps serving."""
    registry = served.captured.registry
    before = total(registry, "sentinel_http_requests_total")
    request = RAW_REQUESTS[name]
    expected = raw_exchange(served.bare, request)
    got = raw_exchange(served.wrapped, request)
    assert got == expected
    served.captured.flush()
    counted = total(registry, "sentinel_http_requests_total") - before
    # The server either refused the request (never reaching the app) or served it once.
    assert counted in (0, 1)
    if counted == 0:
        assert got == b"" or got.split(b" ")[1].startswith(b"4")
    else:
        code = got.split(b" ")[1].decode()
        assert values(registry, "sentinel_http_requests_total", "code") >= {code}
    assert total(registry, "sentinel_internal_errors_total") == 0
    assert raw_exchange(served.wrapped, request_bytes()).startswith(b"HTTP/1.1 200 OK\r\n")
    locations = values(registry, "sentinel_http_requests_total", "location")
    assert len(locations) <= MAX_LOCATIONS + 1
    routes = values(registry, "sentinel_http_requests_total", "route")
    assert routes <= {"/items/{item_id}", "/", UNMATCHED_ROUTE}
    methods = values(registry, "sentinel_http_requests_total", "method")
    assert methods <= {*STANDARD_METHODS, "OTHER"}


# -- Hypothesis: misbehaving apps and clients ---------------------------------------------------


class AppError(Exception):
    """The app's own failure."""


class ServerRefusal(RuntimeError):
    """What the stand-in server raises from ``send`` for a message it refuses, as uvicorn
    raises RuntimeError."""


VALID_STATUSES = [200, 204, 301, 404, 500, 503]
INVALID_STATUSES: list[Any] = ["200", 999, 99, None, 200.0, True, -1]

app_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("start"),
            st.sampled_from(VALID_STATUSES + INVALID_STATUSES),
            st.sampled_from([0, 3, 5000]),
        ),
        st.tuples(st.just("body"), st.booleans(), st.integers(0, 70_000)),
        st.tuples(
            st.just("wrong"),
            st.sampled_from(
                [
                    "http.response.trailers",
                    "websocket.accept",
                    "lifespan.startup.complete",
                    "",
                    "no type",
                    "not a dict",
                    "http.response.zerocopysend",
                ]
            ),
            st.none(),
        ),
        st.tuples(st.just("receive"), st.none(), st.none()),
        st.tuples(st.just("raise"), st.sampled_from(["error", "cancel", "group"]), st.none()),
        st.tuples(st.just("swallow"), st.none(), st.none()),
        st.tuples(st.just("return"), st.none(), st.none()),
    ),
    max_size=8,
)
client_messages = st.lists(
    st.one_of(
        st.builds(
            lambda size, more: {"type": "http.request", "body": b"b" * size, "more_body": more},
            st.integers(0, 5000),
            st.booleans(),
        ),
        st.just({"type": "http.disconnect"}),
        st.sampled_from([{"type": "websocket.receive", "text": "x"}, {"type": "http.request"}, {}]),
    ),
    max_size=6,
)


@dataclasses.dataclass
class Run:
    """What happened in one generated exchange."""

    raised_by_app: list[BaseException] = dataclasses.field(default_factory=list)
    raised_by_server: list[BaseException] = dataclasses.field(default_factory=list)
    escaped: BaseException | None = None
    first_start_status: Any = None
    app_started: bool = False
    """The app sent a response start (the first one's status is above)."""
    started: bool = False
    """The server took a response start."""
    started_after_leaving: bool = False
    """The app's first start came after the client had left: the server ignored it."""


class StandInServer:
    """The server side of one exchange, strict as uvicorn is: refuses a message out of
    order (raising ServerRefusal), ignores sends once the client has gone, and hands out the
    client's scripted messages, then ``http.disconnect`` for ever."""

    def __init__(self, run: Run, script: list[Message]) -> None:
        self.run = run
        self.script = list(script)
        self.complete = False
        self.disconnected = False

    def refuse(self, why: str) -> None:
        error = ServerRefusal(why)
        self.run.raised_by_server.append(error)
        raise error

    async def receive(self) -> Message:
        if self.script and not self.disconnected:
            message = self.script.pop(0)
        else:
            message = {"type": "http.disconnect"}
        if message.get("type") == "http.disconnect":
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        first_start = (
            not self.run.app_started
            and isinstance(message, dict)
            and message.get("type") == "http.response.start"
        )
        if first_start:  # what the app sent first, whether the server takes it or not
            self.run.app_started = True
            self.run.first_start_status = message.get("status")
            self.run.started_after_leaving = self.disconnected
        if self.disconnected:
            return
        message_type = message.get("type") if isinstance(message, dict) else None
        if not isinstance(message_type, str):
            self.refuse(f"not an ASGI message: {message!r}")
        if not self.run.started:
            if message_type != "http.response.start":
                self.refuse(f"expected start: {message_type!r}")
            self.run.started = True
            status = message.get("status")
            if type(status) is not int or not 100 <= status <= 599:
                self.refuse(f"invalid status: {status!r}")
        elif self.complete:
            self.refuse(f"after the response: {message_type!r}")
        elif message_type != "http.response.body":
            self.refuse(f"expected body: {message_type!r}")
        elif not message.get("more_body", False):
            self.complete = True


def misbehaving_app(run: Run, steps: list[tuple[str, Any, Any]]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        swallow = False
        for kind, first, second in steps:
            try:
                if kind == "start":
                    headers = [(b"x-h", b"v")] * second
                    await send({"type": "http.response.start", "status": first, "headers": headers})
                elif kind == "body":
                    await send(
                        {"type": "http.response.body", "body": b"x" * second, "more_body": first}
                    )
                elif kind == "wrong":
                    message: Any = {"type": first}
                    if first == "no type":
                        message = {"body": b""}
                    elif first == "not a dict":
                        message = ("http.response.body", b"")
                    await send(message)
                elif kind == "receive":
                    await receive()
                elif kind == "raise":
                    error: BaseException
                    if first == "cancel":
                        error = asyncio.CancelledError()
                    elif first == "group":
                        error = ExceptionGroup("app", [AppError("in a group")])
                    else:
                        error = AppError("the app failed")
                    run.raised_by_app.append(error)
                    raise error
                elif kind == "swallow":
                    swallow = True
                    continue
                elif kind == "return":
                    return
            except ServerRefusal:
                if not swallow:
                    raise
            swallow = False

    return app


@pytest.fixture(scope="module")
def sentinels() -> Iterator[dict[str, Captured]]:
    """One sentinel without traces and one with them; folding off, so every report is
    written in full."""
    with (
        capture_reports(fold_full_reports=10**6, max_fingerprints=10**6) as plain,
        capture_reports(
            fold_full_reports=10**6,
            max_fingerprints=10**6,
            traces=True,
            span_exporter=InMemorySpanExporter(),
        ) as traced,
    ):
        yield {"plain": plain, "traced": traced}


def codes(captured: Captured) -> dict[str, float]:
    """Requests counted, by ``code``."""
    counted: dict[str, float] = {}
    for sample in samples(captured.registry, "sentinel_http_requests_total"):
        code = sample.labels["code"]
        counted[code] = counted.get(code, 0) + sample.value
    return counted


def unhandled(captured: Captured) -> float:
    return total(captured.registry, "sentinel_unhandled_exceptions_total")


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=app_steps, script=client_messages, which=st.sampled_from(["plain", "traced"]))
@example(steps=[("start", 200, 0), ("start", 503, 0)], script=[], which="plain")
@example(steps=[("body", False, 1)], script=[], which="plain")
@example(
    steps=[("start", 200, 0), ("body", False, 1), ("body", False, 1)], script=[], which="traced"
)
@example(
    steps=[("start", "200", 0), ("swallow", None, None), ("start", 200, 0)],
    script=[],
    which="plain",
)
@example(steps=[("swallow", None, None), ("wrong", "no type", None)], script=[], which="plain")
@example(steps=[("wrong", "not a dict", None)], script=[], which="traced")
@example(
    steps=[
        ("receive", None, None),
        ("receive", None, None),
        ("start", 200, 5000),
        ("raise", "error", None),
    ],
    script=[{"type": "http.disconnect"}],
    which="plain",
)
@example(steps=[("receive", None, None), ("start", None, 0)], script=[], which="plain")
@example(steps=[("start", None, 0), ("swallow", None, None)], script=[], which="traced")
@example(steps=[("receive", None, None)], script=[{}], which="plain")
@example(steps=[("return", None, None)], script=[], which="traced")
@example(
    steps=[("swallow", None, None), ("start", "200", 0), ("wrong", "websocket.accept", None)],
    script=[],
    which="plain",
)
@example(steps=[("start", 500, 0), ("wrong", "websocket.accept", None)], script=[], which="traced")
@example(steps=[("raise", "cancel", None)], script=[], which="plain")
def test_misbehaving_apps_and_clients(
    loop: _Loop,
    sentinels: dict[str, Captured],
    steps: list[tuple[str, Any, Any]],
    script: list[Message],
    which: str,
) -> None:
    """Whatever the app sends or raises and whatever the client sends: what escapes the
    middleware is the very object the app or the server raised (sentinel raises nothing of
    its own), each escaping error is reported exactly once (a status that is not an HTTP
    status, as one protocol error), and the request is counted exactly once, under the
    code the client got (499 when it left before the app started its response)."""
    captured = sentinels[which]
    run = Run()
    server = StandInServer(run, script)
    app = instrument(misbehaving_app(run, steps), sentinel=captured.sentinel)
    requests_before = total(captured.registry, "sentinel_http_requests_total")
    codes_before = codes(captured)
    unhandled_before = unhandled(captured)
    reports_before = len(captured.reports)

    async def serve_one() -> None:
        try:
            await app(http_scope("/items/1", "POST"), server.receive, server.send)
        except BaseException as error:
            run.escaped = error

    loop.run(serve_one())
    captured.flush()

    raised = run.raised_by_app + run.raised_by_server
    if run.escaped is not None:
        assert any(run.escaped is error for error in raised), repr(run.escaped)
    assert total(captured.registry, "sentinel_http_requests_total") == requests_before + 1
    status = run.first_start_status
    # A start after the client left reached no one (the server ignores it): not the app's
    # protocol error however bad, and the request is the client's, who left (499).
    answered = run.app_started and not run.started_after_leaving
    invalid_status = answered and not (type(status) is int and 100 <= status <= 599)
    cancelled = isinstance(run.escaped, asyncio.CancelledError)
    # A cancellation the app raised while its task was not cancelled and the client stayed
    # is the app's error (the client gets the server's 500); after a disconnect, the
    # client's leaving.
    escaped_error = run.escaped is not None and not (cancelled and server.disconnected)
    if answered:
        code = "invalid" if invalid_status else str(status)
    else:  # the server's own 500 (a cancellation too), or the app saw the client leave (499)
        code = "499" if server.disconnected else "500"
    assert codes(captured) == {**codes_before, code: codes_before.get(code, 0) + 1}
    expected_reports = 1 if escaped_error or invalid_status else 0
    reports = captured.reports[reports_before:]
    assert len(reports) == expected_reports, [r["exception_type"] for r in reports]
    assert unhandled(captured) == unhandled_before + expected_reports
    if invalid_status:
        assert reports[0]["exception_type"] == "sentinel.AppProtocolError"
    elif escaped_error:
        assert run.escaped is not None
        assert reports[0]["exception_type"].rsplit(".", 1)[-1] in (
            type(run.escaped).__qualname__,
            "AppError",  # a group around one error is reported as that error
        )
    assert total(captured.registry, "sentinel_internal_errors_total") == 0

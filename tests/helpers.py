"""Small helpers shared by the test modules (processes, ports, request contexts, polling,
in-process ASGI calls)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx

from sentinel._context import RequestContext

T = TypeVar("T")


_PORTS_PER_WORKER = 2000


def _worker_ports() -> list[int]:
    """This xdist worker's own slice of the ports just below the kernel's ephemeral range,
    in order from a random start: no outgoing connection and no ``bind(("", 0))`` ever takes
    one, and no other worker picks from the slice."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral_low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    top = ephemeral_low - (int(worker) if worker.isdigit() else 0) * _PORTS_PER_WORKER
    if top - _PORTS_PER_WORKER < 10000:
        return []
    slice_ = list(range(top - _PORTS_PER_WORKER, top))
    start = random.randrange(len(slice_))
    return slice_[start:] + slice_[:start]


_ports = itertools.cycle(_worker_ports() or [0])
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and stays free until the test binds it.

    The kernel's own choice (port 0) is not enough when a test starts its server seconds
    later: by then any connection on the machine may have taken the port as its local end.
    """
    for _ in range(_PORTS_PER_WORKER):
        with _ports_lock:
            port = next(_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    msg = f"no free port among {_PORTS_PER_WORKER} tried"
    raise RuntimeError(msg)


def stop(process: subprocess.Popen[str]) -> None:
    """Stop a server process as an operator would (SIGINT), killing it if it will not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SENTINEL_*, OTEL_* and multiprocess variables, plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SENTINEL_", "OTEL_", "PROMETHEUS_MULTIPROC"))
    }
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` seconds pass;
    returns its last value (falsy on a timeout), so ``assert wait_for(...)`` reads well."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.01)


def request_context(**changes: object) -> RequestContext:
    """A RequestContext for GET / in location fra, with ``changes`` applied."""
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    context = RequestContext(scope, "GET", "fra", 0.0)
    context.route = "/"
    for name, value in changes.items():
        setattr(context, name, value)
    return context


def run_client(coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """``asyncio.run(coroutine)`` in a thread of its own, bounded by ``timeout``: in the main
    thread asyncio.run installs and restores a SIGINT handler, a process-global write that a
    test watching for mutations would see (with the requests still in flight as suspects)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(asyncio.run(coroutine))
        except BaseException as error:  # handed to the caller
            errors.append(error)

    thread = threading.Thread(target=run, name="test-client", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        msg = f"the client did not finish within {timeout} s"
        raise AssertionError(msg)
    if errors:
        raise errors[0]
    return results[0]


def run_asgi(app: Any, exchange: Callable[[httpx.AsyncClient], Coroutine[Any, Any, T]]) -> T:
    """Run ``exchange`` with an httpx client that calls ``app`` in-process (no server, no
    socket), through ``run_client``. An exception escaping the app is a bare 500, as
    ``raise_app_exceptions=False`` makes it; what a real server answers needs ``serve``."""

    async def main() -> T:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await exchange(client)

    return run_client(main())


def asgi_get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    """``GET path`` from ``app`` in-process (see ``run_asgi``)."""

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(path, **kwargs)

    return run_asgi(app, get)


async def run_in_raw_thread(function: Callable[[], object]) -> None:
    """Run ``function`` in a thread started with threading.Thread, which carries no context
    (unlike the thread pool), and wait for it without blocking the loop."""
    thread = threading.Thread(target=function, name="test-raw-thread")
    thread.start()
    await asyncio.to_thread(thread.join, 10)


def run_in_request(captured: Any, action: Callable[[], object], path: str = "/act") -> object:
    """Run ``action`` inside one request (``GET path``) of a real uvicorn serving a Starlette
    app instrumented with ``captured``'s sentinel; the request must succeed. Returns what
    ``action`` returned."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sentinel import instrument
    from sentinel.testing import serve

    results: list[object] = []

    async def handler(request: Request) -> PlainTextResponse:
        results.append(action())
        return PlainTextResponse("ok")

    app = instrument(Starlette(routes=[Route(path, handler)]), sentinel=captured.sentinel)
    with serve(app) as url:
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 200, response.text
    return results[0]


def first_response(
    process: subprocess.Popen[str], url: str, timeout: float = 30.0, **request: Any
) -> Any:
    """GET ``url`` until the server ``process`` answers (bounded by ``timeout``); the first
    response. Fails with the process's stderr when it exits or never answers."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2, **request)
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.kill()
                _, stderr = process.communicate(timeout=10)
                msg = f"the server never answered {url}:\n{stderr}"
                raise AssertionError(msg) from None
            time.sleep(0.1)


def answer_otlp_export(handler: BaseHTTPRequestHandler, status: int = 200) -> None:
    """Answer an OTLP/HTTP trace export as a collector does: an empty protobuf response."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    answer = ExportTraceServiceResponse().SerializeToString()
    handler.send_response(status)
    handler.send_header("content-type", "application/x-protobuf")
    handler.send_header("content-length", str(len(answer)))
    handler.end_headers()
    handler.wfile.write(answer)


def start_http_server(
    handler: type[BaseHTTPRequestHandler], port: int = 0, poll_interval: float = 0.5
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """A threading HTTP server on 127.0.0.1 serving ``handler`` from a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    return server, thread


def record_calls(owner: Any, name: str) -> list[tuple[Any, ...]]:
    """Wrap ``owner.<name>`` so that each call is recorded (its positional arguments), then
    made as before; the list the calls are recorded in."""
    calls: list[tuple[Any, ...]] = []
    original = getattr(owner, name)

    def recording(*arguments: Any) -> Any:
        calls.append(arguments)
        return original(*arguments)

    setattr(owner, name, recording)
    return calls

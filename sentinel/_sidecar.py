"""The metrics endpoint: its own thread and port, answering even when the event loop is stuck.

Also measures event-loop lag from that side: a probe is scheduled on each watched loop and
the time until it runs is the lag; while a probe is still pending the lag keeps growing, so
a loop that is stuck right now shows up in the very next scrape.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from ._metrics import RecordsSeen

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, when this process writes to one."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or os.environ.get(MULTIPROC_DIR_VARIABLE.lower())


def merged_registry(path: str) -> CollectorRegistry:
    """A registry that reads every worker's metric files in ``path`` (multiprocess mode)."""
    registry = CollectorRegistry()
    merged = multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(RecordsSeen(merged.collect))
    return registry


class _IPv6Server(ThreadingWSGIServer):
    """wsgiref binds IPv4 only; an IPv6 address (``::1``, ``::``) needs its own family."""

    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` (text or OpenMetrics, as the scraper asks) and ``/healthz`` on a thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._metrics_app = make_wsgi_app(registry)
        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        self._server = make_server(
            host, port, self._app, server_class, handler_class=_SilentHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sentinel-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"sentinel serves /metrics and /healthz\n"]


class LoopLagMonitor:
    """Measures, from its own thread, how late each watched asyncio loop runs a callback."""

    def __init__(self, gauge: Gauge, interval: float = 0.25) -> None:
        self._gauge = gauge
        self._interval = interval
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loops.add(loop)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sentinel-loop-lag", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                loops = [loop for loop in self._loops if not loop.is_closed()]
            worst = 0.0
            for loop in loops:
                worst = max(worst, self._probe(loop))
            self._gauge.set(worst)
            self._stop.wait(self._interval)

    def _probe(self, loop: asyncio.AbstractEventLoop) -> float:
        ran = threading.Event()
        sent = time.perf_counter()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:
            return 0.0  # the loop closed meanwhile
        # Wait up to one interval; a stuck loop is reported as stuck while it still is.
        while not ran.wait(self._interval):
            if loop.is_closed() or self._stop.is_set():
                return 0.0
            self._gauge.set(time.perf_counter() - sent)
        return time.perf_counter() - sent

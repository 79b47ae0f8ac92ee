"""The metrics endpoint: its own thread and port, answering even when the event loop is stuck.

Also measures event-loop lag from that side: a probe is scheduled on each watched loop and
the time until it runs is the lag; while a probe is still pending the lag keeps growing, so
a loop that is stuck right now shows up in the very next scrape.
"""

from __future__ import annotations

import asyncio
import errno
import json
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

from ._metrics import RequestTotals, rejected_family, tenant_family
from ._tenants import TENANT_PROBLEMS, TenantFold, TenantTracker

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, when this process writes to one."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or os.environ.get(MULTIPROC_DIR_VARIABLE.lower())


def multiprocess_dir_problem() -> str | None:
    """Why the multiprocess directory cannot be served, as a sentence that names the
    variable, the directory and what to do; None when it can."""
    variable = MULTIPROC_DIR_VARIABLE
    if not os.environ.get(variable) and os.environ.get(variable.lower()):
        variable = variable.lower()
    path = os.environ.get(variable)
    if not path:
        return (
            f"{MULTIPROC_DIR_VARIABLE} is not set: set it to the directory the workers write "
            "their metrics to, the same value the workers have (e.g. "
            f"{MULTIPROC_DIR_VARIABLE}=/tmp/sentinel-metrics for both); `sentinel run "
            "--workers N` needs no sidecar"
        )
    if not os.path.exists(path):
        return (
            f"{variable} names {path!r}, which does not exist: create it (mkdir -p) before "
            "the workers start, or set the variable to the directory they write to"
        )
    if not os.path.isdir(path):
        return (
            f"{variable} names {path!r}, which is not a directory: set it to the directory "
            "the workers write their metrics to"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        return (
            f"{variable} names {path!r}, which this user (uid {os.getuid()}) cannot read: "
            "run the sidecar as the workers' user, or make the directory readable"
        )
    return None


def bind_failure_advice(
    error: OSError, host: str, port: int, *, host_option: str, port_option: str
) -> str:
    """``cannot bind HOST:PORT``, why, and what to do, naming the options that choose the
    address (``host_option``, ``port_option``: a flag or variable, or both)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno == errno.EADDRINUSE:
        advice = (
            "another process listens there (another sidecar, or a server with its own "
            f"/metrics): stop it, or choose a free port with {port_option}"
        )
    elif error.errno == errno.EACCES:
        advice = f"ports below 1024 need privileges: choose a higher one with {port_option}"
    elif error.errno == errno.EADDRNOTAVAIL:
        advice = (
            f"{host} is not an address of this host: choose 0.0.0.0 (every interface), "
            f"127.0.0.1 or one of its addresses with {host_option}"
        )
    elif error.errno == errno.EAFNOSUPPORT:
        advice = f"this host has no IPv6: choose an IPv4 address with {host_option}"
    else:
        advice = f"check the address ({host_option}) and the port ({port_option})"
    return f"cannot bind {address} ({reason}): {advice}"


def merged_registry(path: str, max_tenants: int | None = None) -> CollectorRegistry:
    """A registry that reads every worker's metric files in ``path`` (multiprocess mode),
    with the workers' tenant counts folded into one bounded set (``max_tenants``; by
    default the workers' own setting, from their files)."""
    registry = CollectorRegistry()
    merged = multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(RequestTotals(merged.collect))
    registry.register(TenantFiles(path, max_tenants))
    return registry


TENANT_FILE_PREFIX = "sentinel_tenants_"
"""Each worker's tenant counts: ``sentinel_tenants_<pid>_<token>.json`` in the
multiprocess directory (prometheus_client reads only ``*.db`` there)."""
MAX_TENANT_FILES = 4096
"""Worker files folded per scrape; more (a server that restarted workers thousands of
times without a fresh directory) are left out, oldest first."""


class TenantPublisher:
    """Writes this worker's tenant counts to its file, replaced atomically (the fold must
    never see ``other`` raised before the evicted tenant is gone), when they changed."""

    def __init__(self, path: str, metrics: Any) -> None:
        self._metrics = metrics
        process = f"{os.getpid()}_{time.time_ns()}"
        self._path = os.path.join(path, f"{TENANT_FILE_PREFIX}{process}.json")
        self._process = process
        self._last: object = None

    def publish(self) -> None:
        """Write the counts now (a no-op when nothing changed since the last write)."""
        metrics = self._metrics
        metrics.flush()
        with metrics.count_lock:
            metrics.apply()
            counts = metrics.tenant_counts()
            rejected = metrics.tenant_rejections()
        if (counts, rejected) == self._last:
            return
        document = {
            "process": self._process,
            "max_tenants": metrics.tenants.max_tenants,
            "counts": {label: list(values) for label, values in counts.items()},
            "rejected": rejected,
        }
        temporary = f"{self._path}.{threading.get_ident()}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(document, file, separators=(",", ":"))
        os.replace(temporary, self._path)
        self._last = (counts, rejected)


class TenantFiles:
    """``sentinel_tenant_requests_total`` and ``sentinel_tenants_rejected_total`` for the
    merged view: each worker's published counts folded (:class:`TenantFold`) into one set
    of at most ``max_tenants`` tenants plus ``other``, whose sums per status class are the
    workers' request totals as of their last publication (twice a second, and at exit)."""

    def __init__(self, path: str, max_tenants: int | None = None) -> None:
        self._path = path
        self._max_tenants = max_tenants
        self._fold: TenantFold | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._rejected: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return [tenant_family({}), rejected_family({})]

    def collect(self) -> Iterable[Any]:
        with self._lock:
            self._read()
            counts = self._fold.counts() if self._fold is not None else {}
            rejected: dict[str, int] = {
                reason: sum(by_reason.get(reason, 0) for by_reason in self._rejected.values())
                for reason in TENANT_PROBLEMS
            }
        return [tenant_family(counts), rejected_family(rejected)]

    def _read(self) -> None:
        try:
            names = [n for n in os.listdir(self._path) if n.startswith(TENANT_FILE_PREFIX)]
        except OSError:
            return
        files = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                stat = os.stat(os.path.join(self._path, name))
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, name))
        for mtime, size, name in sorted(files)[-MAX_TENANT_FILES:]:
            if self._seen.get(name) == (mtime, size):
                continue
            try:
                with open(os.path.join(self._path, name), encoding="utf-8") as file:
                    document = json.load(file)
                process = str(document["process"])
                counts = {str(k): [int(x) for x in v] for k, v in document["counts"].items()}
                rejected = {str(k): int(v) for k, v in document.get("rejected", {}).items()}
                if self._fold is None:
                    limit = self._max_tenants or int(document.get("max_tenants", 50))
                    self._fold = TenantFold(TenantTracker(max(1, limit)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # half-written by a foreign writer, or gone: read at the next scrape
            self._fold.update(process, counts)
            self._rejected[process] = rejected
            self._seen[name] = (mtime, size)


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

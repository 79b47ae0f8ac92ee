"""The process's sentinel: configuration and collaborators wired together once."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Literal, Protocol, Unpack

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from . import _current, _hooks
from ._config import Config, ConfigError, ConfigOptions, check_setting_names
from ._context import RequestContext, current_request
from ._current import current
from ._handover import handover
from ._location import LocationSet
from ._log_filter import install_log_scrubbing, log_scrubbing_installed, uninstall_log_scrubbing
from ._metrics import Metrics, metrics_for
from ._mutation import (
    MutationWatcher,
    default_watches_installed,
    install_default_watches,
    sync_environ,
    uninstall_default_watches,
)
from ._output import Emitter, Sink
from ._phase import phase_of
from ._reporter import Reporter
from ._sampling import Sampler
from ._scrub import Scrubber
from ._sidecar import (
    LoopLagMonitor,
    MetricsServer,
    TenantPublisher,
    bind_failure_advice,
    multiprocess_dir,
)
from ._tracing import (
    TailSamplingProcessor,
    build_tracer_provider,
    close_tracer_provider,
    flush_tracer_provider,
)
from ._vocabulary import Phase
from ._writer import Writer


@dataclass(frozen=True)
class Collaborators:
    """What a sentinel writes to and reads from, passed in (as in prometheus_client) so that
    tests use fresh ones: the metrics registry, the output stream and sinks, the tracing
    pipeline and the clock. Two setups with equal collaborators and configuration are one."""

    registry: CollectorRegistry | None = None
    stream: IO[str] | None = None
    sinks: tuple[Sink, ...] = ()
    tracer_provider: TracerProvider | None = None
    span_exporter: SpanExporter | None = None
    clock: Callable[[], float] = time.monotonic


class CountsAtEnd(Protocol):
    """A middleware that may count and decide requests at their end (see
    :meth:`Sentinel.serving`)."""

    def count_with_batches(self) -> None:
        """From now on, account for every request with its batch."""


class Sentinel:
    """Holds one configuration and everything built from it.

    Collaborators are parameters with defaults, as in prometheus_client: tests pass a fresh
    ``registry``, a ``stream`` to read what was written, ``sinks`` and a ``clock``.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        stream: IO[str] | None = None,
        sinks: Iterable[Sink] = (),
        clock: Callable[[], float] = time.monotonic,
        tracer_provider: TracerProvider | None = None,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.config = config
        self.collaborators = Collaborators(
            registry, stream, tuple(sinks), tracer_provider, span_exporter, clock
        )
        self._given_tracer_provider = tracer_provider
        self._span_exporter = span_exporter
        self._tracing: tuple[TracerProvider | None, TailSamplingProcessor | None] | None = None
        self.stream = stream
        self.sinks = tuple(sinks)
        self.clock = clock
        self.metrics: Metrics = metrics_for(registry, config.latency_buckets, config.max_series)
        self.registry: CollectorRegistry = self.metrics.registry
        """Where sentinel's metrics are registered (prometheus_client's default unless given)."""
        self.metrics.set_build_info(config.service, config.version, config.environment)
        self.loop_lag = LoopLagMonitor(self.metrics.event_loop_lag)
        self.requests: set[RequestContext] = set()
        """Requests and websockets the middleware is serving right now."""
        self._closed = False
        self._metrics_endpoint_failed = False

        self.scrubber = Scrubber(config.scrub_keys)
        self.locations = LocationSet(
            config.locations, config.max_locations, secret=self.scrubber.looks_secret
        )
        self.locations.add_static(config.location)
        # Screened by shape, not by randomness: customer ids are often random (UUIDs, ULIDs).
        self.tenants = self.metrics.use_tenants(
            config.max_tenants, self.scrubber.has_credential_shape
        )
        """Which tenants are counted by name (shared with the registry's request counter)."""
        self._tenant_publisher: TenantPublisher | None = None
        self._attached: tuple[Sink, ...] = ()
        self._attach_lock = threading.Lock()
        self.emitter = Emitter(
            service=config.service,
            environment=config.environment,
            location=config.location,
            metrics=self.metrics,
            stream=stream,
            sinks=(*self.sinks, self._to_attached),
            log_format=config.log_format,
        )
        self.writer = Writer(
            self.emitter,
            self.metrics,
            queue_size=config.report_queue_size,
            drop_warning_interval_seconds=config.drop_warning_interval_seconds,
            clock=clock,
        )
        self.reporter = Reporter(
            config, self.metrics, self.emitter, self.scrubber, self.writer, clock
        )
        self.sampler = Sampler(config)
        self.metrics.listen_for_overflow(self._series_budget_reached)
        # Requests are accounted for in batches; this keeps a quiet server's records prompt.
        self._periodic_started = False
        self._serving_lock = threading.Lock()
        self._serving_thread: int | None = None
        self._counting_at_end: weakref.WeakSet[CountsAtEnd] | None = weakref.WeakSet()
        """The middlewares that count requests at their end; None once requests have been
        served on two threads."""
        self.mutations = MutationWatcher(
            config, self.metrics, self.writer, self.scrubber, self.requests, clock
        )

    def _series_budget_reached(self, metric: str, max_series: int) -> None:
        # On the request path: queued for the writer, never written here (a stalled
        # stream would stall the event loop).
        detail = (
            f"{metric} has {max_series} series: new label sets are counted with route "
            "<other> (and method other), see sentinel_series_overflow_total; raise "
            "SENTINEL_MAX_SERIES to name more"
        )
        fields = {"metric": metric, "max_series": max_series, "detail": detail}
        self.writer.write("warning", "series_budget_reached", fields)

    def attach_sink(self, sink: Sink) -> Callable[[], None]:
        """Give ``sink`` every record written from now on (as the ``sinks`` given at
        construction get them), until the returned function is called: how
        :func:`sentinel.testing.observe` captures from the sentinel an app was wrapped with."""
        with self._attach_lock:
            self._attached = (*self._attached, sink)

        def detach() -> None:
            with self._attach_lock:
                self._attached = tuple(s for s in self._attached if s is not sink)

        return detach

    def _to_attached(self, record: dict[str, Any]) -> None:
        for sink in self._attached:
            try:
                sink(record)
            except Exception:
                self.metrics.internal_error("sink")

    @property
    def in_flight(self) -> int:
        """How many requests and websockets are being served right now."""
        return len(self.requests)

    def same_setup(self, config: Config, collaborators: Collaborators) -> bool:
        """Whether this sentinel is the one ``install(config, ...)`` with these would build."""
        return config == self.config and collaborators == self.collaborators

    @property
    def tracing(self) -> tuple[TracerProvider | None, TailSamplingProcessor | None]:
        """The provider server spans go to and its tail sampler: built once, to the span
        exporter given or to OTLP when the OTel variables ask; (None, None) when off.

        The provider is not made the global one: that would switch on every library's
        own instrumentation (recent FastAPI versions add a second server span per request).
        Apps that want their spans in the same tail-sampled traces take their tracers from
        :attr:`tracer_provider` (or make it global themselves).
        """
        if self._tracing is None:
            if self._given_tracer_provider is not None:
                self._tracing = (self._given_tracer_provider, None)
            elif self._span_exporter is not None or self.config.traces:
                try:
                    provider, tail = build_tracer_provider(
                        self.config, self.metrics, self._span_exporter, scrubber=self.scrubber
                    )
                except ConfigError:
                    raise  # an OTEL_* value sentinel refuses: named at startup
                except Exception as error:
                    # An exporter the OTel variables make fail (a bad OTLP timeout or
                    # compression for grpc, say) costs the traces, never the app.
                    self.metrics.internal_error("tracing")
                    # The error quotes the variable's value, which may hold a secret.
                    message = self.scrubber.text(f"{type(error).__name__}: {error}")
                    self.writer.write("warning", "traces_unavailable", {"error": message})
                    self._tracing = (None, None)
                else:
                    self._tracing = (provider, tail)
                    # Spans lost on the way are announced on stderr like dropped reports.
                    self.writer.add_summaries(tail.drops.due, "tracing")
            else:
                self._tracing = (None, None)
        return self._tracing

    def capture_exception(
        self,
        exc: BaseException,
        phase: Phase | None = None,
        *,
        route: str | None = None,
        sync: bool = False,
        handled: bool = False,
    ) -> bool:
        """Report ``exc`` unless something already did; the phase defaults from context.

        As unhandled (what escaped the app), or with ``handled`` as one the app caught and
        reports itself (what :func:`sentinel.capture_exception` does).
        """
        request = current_request.get()
        return self.reporter.report(
            exc, phase or phase_of(request, exc), request, route=route, sync=sync, handled=handled
        )

    def serving(self, middleware: CountsAtEnd) -> None:
        """``middleware`` serves a request on an event loop it had not served on: account
        for batches twice a second from now on; and once requests have been served on two
        threads (a server running an event loop per thread), have every middleware
        account for each request with its batch, under the settle lock. Counting at the
        end decides through the sampler's cursors without a lock, which is right on one
        thread only."""
        with self._serving_lock:
            thread = threading.get_ident()
            if self._serving_thread is None:
                self._serving_thread = thread
            at_end = self._counting_at_end
            if at_end is not None and thread != self._serving_thread:
                for counting in list(at_end):
                    counting.count_with_batches()
                self._counting_at_end = at_end = None
            if at_end is None:
                middleware.count_with_batches()
            else:
                at_end.add(middleware)
        if not self._periodic_started:
            self._periodic_started = True
            self.writer.add_periodic(self.metrics.flush, "metrics")
            path = multiprocess_dir()
            if path:
                # A worker of a multi-process server: its tenant counts go to a file the
                # sidecar folds (prometheus_client's files cannot drop an evicted label).
                self._tenant_publisher = TenantPublisher(path, self.metrics, self.locations)
                self.writer.add_periodic(self._tenant_publisher.publish, "tenant")

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Measure this loop's lag, when there is an endpoint to show it on."""
        if self.config.metrics_port or multiprocess_dir():
            self.loop_lag.watch(loop)

    def start_metrics_endpoint(self) -> MetricsServer | None:
        """Serve ``/metrics`` on ``metrics_port`` from a thread: one endpoint per process.

        An endpoint that serves another registry, or on another address, is stopped first
        (a sentinel installed in place of another rebinds it); one that already serves this
        registry there is kept. Not in multiprocess mode (workers would fight over the
        port; ``sentinel sidecar`` or ``sentinel run`` serves the merged view) and not with
        port 0. A port that is taken is reported and counted, never raised to the app.
        """
        if not self.config.metrics_port or multiprocess_dir():
            return None
        address = (self.config.metrics_host, self.config.metrics_port)
        with _endpoint_lock:
            if self._metrics_endpoint_failed:
                return None  # reported once already
            try:
                return serve_metrics(self.registry, *address)
            except OSError as error:
                self._metrics_endpoint_failed = True
                self.metrics.internal_error("sidecar")
                detail = "the metrics endpoint " + bind_failure_advice(
                    error,
                    self.config.metrics_host,
                    self.config.metrics_port,
                    host_option="metrics_host (SENTINEL_METRICS_HOST)",
                    port_option="metrics_port (SENTINEL_METRICS_PORT)",
                )
                if error.errno == errno.EADDRINUSE:
                    detail += (
                        "; when that is another worker of the same server (uvicorn --workers, "
                        "gunicorn), each worker counts only its own requests and one of them "
                        "answers the scrape: serve them with sentinel run --workers N, or set "
                        "PROMETHEUS_MULTIPROC_DIR and serve the merged metrics with sentinel "
                        "sidecar"
                    )
                fields = {"port": self.config.metrics_port, "error": str(error), "detail": detail}
                self.writer.write("warning", "metrics_endpoint_unavailable", fields)
                return None

    @property
    def tracer_provider(self) -> TracerProvider | None:
        """Where sentinel's server spans go; take the app's tracers from it to have the
        app's spans in the same (tail-sampled) traces. None when traces are off."""
        return self.tracing[0]

    def flush(self, timeout: float = 5.0, *, final: bool = False) -> bool:
        """Write what is pending, within about ``timeout`` seconds: requests not yet
        accounted for, queued reports and records, and the summaries that are due; True when
        everything queued was written in time.

        ``final``: the server is shutting down (the lifespan's end), where the process may
        be ended by a signal before ``close`` or ``atexit`` run: every summary is written
        now, whether its window closed or not, and the spans are exported, by the same
        deadline: those still queued then (a collector that hangs or is down) are counted as
        dropped and said in a last ``spans_dropped`` warning. Sentinel keeps working after.
        """
        deadline = time.monotonic() + timeout
        if final:
            _hooks.report_waiting()
        try:
            self.metrics.flush()
        except Exception:
            self.metrics.internal_error("metrics")
        self._publish_tenants()
        done = self.writer.flush(max(0.0, deadline - time.monotonic()), everything=final)
        if final and self._flush_spans(max(0.1, deadline - time.monotonic())):
            # What the spans' flush lost is said now, before a signal can end the process.
            done = self.writer.flush(max(0.0, deadline - time.monotonic()), everything=True)
        return done

    def _publish_tenants(self) -> None:
        if self._tenant_publisher is not None:
            try:
                self._tenant_publisher.publish()
            except Exception:
                self.metrics.internal_error("tenant")

    def _flush_spans(self, timeout: float) -> bool:
        """Export the spans queued, within ``timeout`` (see :func:`flush_tracer_provider`);
        whether there is a span pipeline of sentinel's, whose losses are to be said."""
        provider, tail = self._tracing or (None, None)
        if provider is None:
            return False
        try:
            flush_tracer_provider(provider, tail, timeout, self.metrics)
        except Exception:
            self.metrics.internal_error("tracing")
        return tail is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed sentinel writes inline, then stops)."""
        return self._closed

    def close(self) -> None:
        """Stop this sentinel: account for the requests not yet counted, write what is
        queued and every pending summary (within about 5 s, then what is left is dropped and
        counted), stop its threads and shut its span pipeline down (bounded, so a hanging
        collector cannot hold up shutdown).

        Called at exit, when :func:`install` replaces it with another setup, and at the end
        of a :func:`sentinel.testing.capture_reports` block; idempotent. Reports that reach
        it afterwards are written inline. The metrics endpoint is left to the next sentinel.
        """
        if self._closed:
            return
        self._closed = True
        self.loop_lag.stop()
        handover.drain()  # what finalizers handed over is this sentinel's to write, or lost
        try:
            self.metrics.flush()  # the requests not yet accounted for, and their records
        except Exception:
            self.metrics.internal_error("metrics")
        self._publish_tenants()
        self.writer.close()
        if self._tracing is not None and self._tracing[1] is not None:
            provider, tail = self._tracing
            # Bounded: a hanging collector must not hold up shutdown.
            close_tracer_provider(provider, tail)  # type: ignore[arg-type]
            # What the last flush lost is said now: the writer has closed.
            for level, event, fields in tail.drops.due(everything=True):  # type: ignore[union-attr]
                self.emitter.emit(level, event, **fields)

    def wait_closed(self, timeout: float = 2.0) -> bool:
        """After :meth:`close`, wait up to ``timeout`` seconds for this sentinel's threads
        (its writer's, its loop-lag monitor's) to end, for tests that check that nothing is
        left running; True when they have. A writer blocked on its stream is not waited
        for beyond ``timeout``."""
        deadline = time.monotonic() + timeout
        threads = [t for t in (self.writer.thread, self.loop_lag.thread) if t is not None]
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)


_metrics_server: MetricsServer | None = None
"""The process's metrics endpoint, if one is serving."""
_metrics_served: tuple[CollectorRegistry, str, int] | None = None
"""What :data:`_metrics_server` serves: the registry, and the host and port it binds."""
_endpoint_lock = threading.RLock()


def metrics_endpoint() -> tuple[CollectorRegistry, str, int] | None:
    """The registry the process's metrics endpoint serves and its address; None when none
    serves."""
    with _endpoint_lock:
        return _metrics_served if _metrics_server is not None else None


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Make the process's one metrics endpoint serve ``registry`` on ``host``:``port``: the
    one serving already is kept when it does exactly that, else it is stopped and a new one
    started. OSError when the port cannot be bound (then none serves)."""
    global _metrics_server, _metrics_served
    with _endpoint_lock:
        served = _metrics_served
        if _metrics_server is not None:
            if served is not None and served[0] is registry and served[1:] == (host, port):
                return _metrics_server
            stop_metrics_endpoint()
        _metrics_server = MetricsServer(registry, host, port).start()
        _metrics_served = (registry, host, port)
        return _metrics_server


def stop_metrics_endpoint(registry: CollectorRegistry | None = None) -> None:
    """Stop the process's metrics endpoint (only when it serves ``registry``, if given)."""
    global _metrics_server, _metrics_served
    with _endpoint_lock:
        server, served = _metrics_server, _metrics_served
        if server is None:
            return
        if registry is not None and (served is None or served[0] is not registry):
            return
        _metrics_server = _metrics_served = None
        server.stop()


ProcessWidePart = Literal["watches", "hooks", "log_scrubbing"]
PROCESS_WIDE_PARTS: tuple[ProcessWidePart, ...] = ("watches", "hooks", "log_scrubbing")


def install_process_wide() -> None:
    """The default mutation watches, the process-level exception hooks and the scrubbing of
    server and library log lines, all reporting to (and scrubbing with) whichever sentinel is
    current; once per process."""
    sentinel = current()
    install_default_watches(isolating=sentinel is not None and sentinel.mutations.mode == "isolate")
    _hooks.install_process_hooks()
    install_log_scrubbing(_current_scrubber, _log_scrubbing_failed)


def process_wide_installed() -> frozenset[ProcessWidePart]:
    """Which parts of :func:`install_process_wide` are in place now: the mutation watches
    (the environment's included), the exception hooks (sys, threading, unraisable,
    logging, atexit) and the log scrubbing filters."""
    parts: set[ProcessWidePart] = set()
    if default_watches_installed():
        parts.add("watches")
    if _hooks.process_hooks_installed():
        parts.add("hooks")
    if log_scrubbing_installed():
        parts.add("log_scrubbing")
    return frozenset(parts)


def uninstall_process_wide(parts: Collection[ProcessWidePart] = PROCESS_WIDE_PARTS) -> None:
    """Put back what :func:`install_process_wide` replaced (for tests): every part, or the
    ``parts`` named (what a test helper installed itself, leaving what was there before)."""
    if "watches" in parts:
        uninstall_default_watches()
    if "hooks" in parts:
        _hooks.uninstall_process_hooks()
    if "log_scrubbing" in parts:
        uninstall_log_scrubbing()


def _current_scrubber() -> Scrubber | None:
    sentinel = current()
    return sentinel.scrubber if sentinel is not None else None


def _log_scrubbing_failed() -> None:
    sentinel = current()
    if sentinel is not None:
        sentinel.metrics.internal_error("log_filter")


def set_current(sentinel: Sentinel | None) -> Sentinel | None:
    """Make ``sentinel`` the one the process-level hooks report to; returns the previous."""
    previous = _current.swap(sentinel)
    # Only isolate mode pays for reads that consult a request's overlay.
    sync_environ(sentinel is not None and sentinel.mutations.mode == "isolate")
    return previous


_capturing: list[Sentinel] = []
"""The sentinels of the :func:`sentinel.testing.capture_reports` blocks in force, innermost
last: while there is one, :func:`install` hands it back."""
_capturing_lock = threading.Lock()
_WHERE_METRICS_ARE_SERVED = frozenset({"metrics_port", "metrics_host"})
"""Settings a capture does not take from an app: where the app serves its metrics in
production (a capture serves on the port given to it, if any)."""


@contextmanager
def capturing(sentinel: Sentinel) -> Iterator[None]:
    """While the block runs, :func:`install` returns ``sentinel`` (a test capture's): an app
    wrapped or built in the block reports to it rather than to a sentinel of its own."""
    with _capturing_lock:
        _capturing.append(sentinel)
    try:
        yield
    finally:
        with _capturing_lock:
            _capturing.remove(sentinel)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _join_capture(
    capture: Sentinel,
    config: Config | None,
    overrides: dict[str, Any],
    given: Collaborators,
) -> Sentinel:
    """The capture's sentinel, for an :func:`install` made while a capture is in force;
    ConfigError when the settings or collaborators given are not the capture's."""
    check_setting_names(overrides)
    if config is None:
        wanted = Config(**overrides)  # validated, and never read from the environment
        named = set(overrides)
    else:
        wanted = config.replace(**overrides)
        # What a Config object holds beyond the defaults was given; the rest was not.
        default = Config()
        named = {
            field.name
            for field in dataclasses.fields(Config)
            if getattr(wanted, field.name) != getattr(default, field.name)
        } | set(overrides)
    differ = sorted(
        name
        for name in named - _WHERE_METRICS_ARE_SERVED
        if getattr(wanted, name) != getattr(capture.config, name)
    )
    defaults = Collaborators()
    theirs = capture.collaborators
    foreign = [
        field.name
        for field in dataclasses.fields(Collaborators)
        if getattr(given, field.name) != getattr(defaults, field.name)
        and getattr(given, field.name) != getattr(theirs, field.name)
    ]
    if not differ and not foreign:
        return capture
    problems = []
    if differ:
        shown = ", ".join(
            f'"{name}" {_shown(getattr(wanted, name))} '
            f"(the capture's: {_shown(getattr(capture.config, name))})"
            for name in differ
        )
        problems.append(
            f"the app's settings differ from the capture's: {shown}; give the capture the "
            f"same (capture_reports({', '.join(f'{name}=...' for name in differ)}))"
        )
    if foreign:
        problems.append(
            f"the capture's sentinel has its own {', '.join(foreign)}, so the app's "
            f"{', '.join(f'{name}=' for name in foreign)} would not be used"
        )
    msg = (
        "inside sentinel.testing.capture_reports() an app is wrapped with the capture's "
        f"sentinel, but {'; and '.join(problems)}; or capture from the app's own sentinel "
        "with sentinel.testing.observe(app), outside capture_reports()"
    )
    raise ConfigError(msg)


def _refuse(name: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(f'"{name}" must be {wanted}: {value!r}')


def check_collaborators(
    *,
    config: Any = None,
    registry: Any = None,
    stream: Any = None,
    sinks: Any = (),
    clock: Any = time.monotonic,
    tracer_provider: Any = None,
    span_exporter: Any = None,
) -> tuple[Sink, ...]:
    """The sinks as a tuple, once each collaborator is the kind of object it must be; else a
    :class:`ConfigError` naming it and showing the value (a wrong one would fail later, on
    a request or in the writer's thread, with every record lost)."""
    if config is not None and not isinstance(config, Config):
        raise _refuse("config", "a sentinel.Config (or None for the environment's)", config)
    if registry is not None and not callable(getattr(registry, "register", None)):
        raise _refuse("registry", "a prometheus_client CollectorRegistry", registry)
    if stream is not None and not callable(getattr(stream, "write", None)):
        raise _refuse("stream", "a text stream (an object with write(), like sys.stderr)", stream)
    if callable(sinks) or isinstance(sinks, str | bytes) or not hasattr(sinks, "__iter__"):
        raise _refuse("sinks", "a list of callables (sinks=[sink], not sinks=sink)", sinks)
    sink_tuple = tuple(sinks)
    for sink in sink_tuple:
        if not callable(sink):
            raise _refuse("sinks", "a list of callables, each taking a record", sink)
    if not callable(clock):
        raise _refuse("clock", "a callable returning seconds", clock)
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise _refuse("tracer_provider", "an OpenTelemetry TracerProvider", tracer_provider)
    if span_exporter is not None and not callable(getattr(span_exporter, "export", None)):
        raise _refuse("span_exporter", "an OpenTelemetry SpanExporter", span_exporter)
    return sink_tuple


def install(
    config: Config | None = None,
    *,
    registry: CollectorRegistry | None = None,
    stream: IO[str] | None = None,
    sinks: Iterable[Sink] = (),
    clock: Callable[[], float] = time.monotonic,
    service_fallback: str | None = None,
    tracer_provider: TracerProvider | None = None,
    span_exporter: SpanExporter | None = None,
    **overrides: Unpack[ConfigOptions],
) -> Sentinel:
    """Install sentinel's process-level hooks and make this configuration the current one.

    Idempotent: installing the same setup again returns the existing sentinel. The hooks
    (sys, threading, unraisable, logging, asyncio, atexit) are chained to whatever was there
    before and are installed once per process. Without ``config`` the configuration is
    read from the environment (keyword arguments win), with ``service_fallback`` as the
    service name of last resort; a ``config`` is taken as it is, no variable read (keyword
    arguments given beside it replace its fields). A keyword that is no setting is a
    :class:`ConfigError` naming the closest one.

    A sentinel installed in place of another one closes it, and the metrics endpoint is
    rebound to the new registry and port (stopped when the new one has port 0).

    Inside a :func:`sentinel.testing.capture_reports` block, the capture's sentinel is
    returned, so that an app wrapped or built there reports to the capture; settings and
    collaborators given that are not the capture's are a :class:`ConfigError` saying which
    (where the app serves its metrics, ``metrics_port`` and ``metrics_host``, excepted).
    """
    sink_tuple = check_collaborators(
        config=config,
        registry=registry,
        stream=stream,
        sinks=sinks,
        clock=clock,
        tracer_provider=tracer_provider,
        span_exporter=span_exporter,
    )
    wanted = Collaborators(registry, stream, sink_tuple, tracer_provider, span_exporter, clock)
    with _capturing_lock:
        capture = _capturing[-1] if _capturing else None
    if capture is not None:
        sentinel = _join_capture(capture, config, dict(overrides), wanted)
        install_process_wide()
        _hooks.hook_running_loop()
        return sentinel
    if config is None:
        config = Config.from_env(service_fallback=service_fallback, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    existing = current()
    if existing is not None and existing.same_setup(config, wanted):
        sentinel = existing
    else:
        sentinel = Sentinel(
            config,
            registry=registry,
            stream=stream,
            sinks=sink_tuple,
            clock=clock,
            tracer_provider=tracer_provider,
            span_exporter=span_exporter,
        )
        set_current(sentinel)
        if existing is not None:
            # Its queued reports and folded counts are written, its threads stop.
            existing.close()
            if not config.metrics_port:
                stop_metrics_endpoint(existing.registry)  # the new setup serves none

    install_process_wide()
    sentinel.start_metrics_endpoint()
    # Called from async code, the running loop is hooked now; otherwise the middleware
    # hooks each loop it first runs on.
    _hooks.hook_running_loop()
    return sentinel

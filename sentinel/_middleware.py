"""The pure ASGI middleware that wires sentinel into an app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import IO, Any, Unpack

import anyio.to_thread
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from ._accounting import RequestAccounting
from ._config import Config, ConfigError, ConfigOptions, check_setting_names
from ._context import RequestContext, current_phase, current_request
from ._exceptions import is_app_file, is_sentinel_file
from ._hooks import hook_running_loop
from ._log_filter import leave_out_once
from ._metrics import HTTP_STATUSES, INVALID_STATUS, STANDARD_METHODS
from ._mutation import GlobalStateMutated, compared, watch_app_state, watch_modes
from ._output import Sink
from ._phase import Lifespan, current_lifespan, phase_of
from ._reporter import REPORTED_ATTR
from ._routes import UNMATCHED_ROUTE, RouteResolver, find_router
from ._run_failure import note_startup_failure
from ._runtime import Sentinel, _capturing, _capturing_lock, check_collaborators, install
from ._sampling import KEEP_UNSAMPLED, SamplingHook
from ._tracing import RequestTracer
from ._vocabulary import Phase
from .types import ASGIApp, Message, Receive, Scope, Send

_running_loop = asyncio.events._get_running_loop
# The event loops with a task running right now (the keys of asyncio's current tasks, a live
# view): how a request tells it is on the loop it last saw without asking for the running
# loop, which on Python 3.11 is a getpid() system call each time. Empty where asyncio keeps
# no such dict: every request then asks.
_TASK_LOOPS = getattr(asyncio.tasks, "_current_tasks", {}).keys()
_now = time.perf_counter
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLIENT_CLOSED_STATUS = 499
"""The ``code`` counted for a request whose response never started because the client went
away (the app saw ``http.disconnect``, then returned, raised or was cancelled); nginx's
convention for "client closed request"."""


class SentinelMiddleware:
    """Reports every exception the app raises, counts every request, and stays transparent.

    Use as ``app.add_middleware(SentinelMiddleware, ...)`` or wrap any ASGI app with
    :func:`instrument`. Keyword arguments are :class:`Config` fields; those not given are
    read from the environment (:meth:`Config.from_env`). A whole ``config`` is taken as it
    is, with no variable read (keyword arguments beside it replace its fields; for "these
    plus the environment" pass ``Config.from_env(service=...)``). Besides the fields: the
    collaborators ``registry``, ``stream``, ``sinks``, ``route_template`` (a callable giving
    the route of a scope, for non-Starlette apps) and ``tracer_provider`` (server spans go
    there as they are, no tail sampling), ``span_exporter`` (sentinel builds the pipeline:
    tail-sampled spans to this exporter; default: OTLP when the OTel variables ask),
    ``sampling_hook`` (a callable given the request's fields: True keeps its record and
    trace, False drops them, None leaves it), or an already built ``sentinel`` (see
    :func:`sentinel.testing.capture_reports`), which brings its own configuration: a
    ``config``, fields, ``registry``, ``stream``, ``sinks`` or ``span_exporter`` given with
    it are refused.

    An invalid configuration, an unknown keyword (with the closest name suggested)
    included, is a :class:`ConfigError`: :func:`instrument` raises it, and an app built by
    ``add_middleware`` fails its lifespan startup with it, so the server refuses to start.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: Config | None = None,
        *,
        registry: CollectorRegistry | None = None,
        stream: IO[str] | None = None,
        sinks: Iterable[Sink] = (),
        route_template: Callable[[Scope], str | None] | None = None,
        tracer_provider: TracerProvider | None = None,
        span_exporter: SpanExporter | None = None,
        sampling_hook: SamplingHook | None = None,
        sentinel: Sentinel | None = None,
        **overrides: Unpack[ConfigOptions],
    ) -> None:
        self.app = app
        self.config_error: ConfigError | None = None
        """Set when the configuration is invalid: the app is then refused, never served."""
        module = app_module(app, sys._getframe(1))
        try:
            check_setting_names(overrides, also=_COLLABORATORS)
            sinks = check_collaborators(
                config=config,
                registry=registry,
                stream=stream,
                sinks=sinks,
                tracer_provider=tracer_provider,
                span_exporter=span_exporter,
            )
            for name, function in (
                ("route_template", route_template),
                ("sampling_hook", sampling_hook),
            ):
                if function is not None and not callable(function):
                    raise ConfigError(f'"{name}" must be a callable or None: {function!r}')
            if sentinel is not None:
                if not isinstance(sentinel, Sentinel):
                    msg = f'"sentinel" must be a Sentinel (see sentinel.testing): {sentinel!r}'
                    raise ConfigError(msg)
                _refuse_beside_sentinel(
                    config=config,
                    registry=registry,
                    stream=stream,
                    sinks=sinks,
                    span_exporter=span_exporter,
                    **overrides,
                )
            self.sentinel: Sentinel = sentinel or install(
                config,
                registry=registry,
                stream=stream,
                sinks=sinks,
                service_fallback=module,
                tracer_provider=tracer_provider,
                span_exporter=span_exporter,
                **overrides,
            )
        except ConfigError as error:
            # Starlette builds its middleware inside the first call (the lifespan's, usually),
            # where an exception reads to uvicorn as "lifespan unsupported" and every request
            # would fail: the error is kept and the lifespan startup fails with it instead.
            self.config_error = error
            return
        package = (module or "").partition(".")[0]
        if package and package not in ("sentinel", "starlette", "fastapi", "__main__"):
            self.sentinel.reporter.classifier.add_app_package(package)
        provider: TracerProvider | None
        if tracer_provider is not None:
            provider, tail = tracer_provider, None  # the caller owns that pipeline
        else:
            provider, tail = self.sentinel.tracing
        self._tracer = (
            RequestTracer(provider, self.sentinel.scrubber, tail) if provider is not None else None
        )
        self._accounting = RequestAccounting(
            self.sentinel.config,
            self.sentinel.metrics,
            self.sentinel.sampler,
            self.sentinel.writer,
            self.sentinel.emitter,
            self.sentinel.scrubber,
            sampling_hook,
        )
        keep_header = self.sentinel.config.keep_header
        self._keep_header = keep_header.encode("latin-1") if keep_header else None
        config = self.sentinel.config
        self._routes = RouteResolver(app, route_template)
        self._location_header = (
            config.location_header.encode("latin-1") if config.location_header else None
        )
        self._request_id_header = (
            config.request_id_header.encode("latin-1") if config.request_id_header else None
        )
        self._tenant_header = (
            config.tenant_header.encode("latin-1") if config.tenant_header else None
        )
        self._tenant_of = TenantCallable(config, self.sentinel.metrics) if config.tenant else None
        self._tenants = self.sentinel.tenants
        self._static_location = config.location
        self._locations = self.sentinel.locations
        self._scrubber = self.sentinel.scrubber
        self._metrics = self.sentinel.metrics
        self._account = self._accounting.account
        self._account_now = self._accounting.account_now
        self._settling = self._metrics.settling
        self._batch = self._metrics.batch
        self._apply_at_next_turn = self._metrics.apply_at_next_turn
        self._reporter = self.sentinel.reporter
        self._mutations = self.sentinel.mutations
        self._raise_mode = self._mutations.mode == "raise"
        self._probe_changed = (
            self._mutations.probe.changed if self._mutations.mode != "off" else _never
        )
        self._requests = self.sentinel.requests
        watch_app_state(app)
        self._last_loop: object = _NO_LOOP_YET  # under trio, asyncio's running loop is None
        self._only_last_loop: frozenset[object] = frozenset((_NO_LOOP_YET,))
        """What the running tasks' loops are when the last loop is the only one running a
        task: then this request's task is that loop's."""
        self._scan_headers = any(
            header is not None
            for header in (
                self._location_header,
                self._request_id_header,
                self._keep_header,
                self._tenant_header,
            )
        )
        self._reads_request = self._scan_headers or self._tenant_of is not None
        """Whether :meth:`_read_request` has anything to read."""

    @property
    def routes(self) -> list[Any]:
        """The wrapped app's routes, read as Starlette's ``Mount`` reads them from the app it
        mounts: ``url_for`` across the mount and an outer sentinel's route templates see
        through this layer."""
        routes: list[Any] = getattr(self.app, "routes", [])
        return routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        # What the app returns goes back to the server, as every message goes through:
        # uvicorn warns about anything but None and closes the connection.
        app: Callable[[Scope, Receive, Send], Awaitable[Any]] = self.app
        kind = scope["type"]
        if self.config_error is not None:
            await self._refuse(scope, receive, send)
            return None
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                return await self._lifespan(scope, receive, send)
            return await app(scope, receive, send)
        outer = current_request.get()
        if outer is not None and _same_request(outer.scope, scope):
            # An outer sentinel serves this very request: it is counted and reported once,
            # out there.
            return await app(scope, receive, send)
        # http and websocket are served here rather than in a helper coroutine: one
        # coroutine less per request is a measurable share of sentinel's cost. For the same
        # reason the request context is built inline.
        try:
            if self._only_last_loop != _TASK_LOOPS:  # another loop, or not in a task
                loop = _running_loop()
                if loop is not self._last_loop:
                    self._first_on_loop(scope, loop)
            method = scope.get("method", "GET")
            # Where it is safe, the route is resolved when first needed, usually at the
            # end, when the router has already recorded its match in the scope.
            resolve = self._routes.lazy_resolve
            request = TenantRequest(
                scope,
                method if method in STANDARD_METHODS else "OTHER",
                self._static_location,
                _now(),
                None,
                resolve,
            )
            # The wrappers the app is given are the request's own methods: no closures (and
            # their cells) to build per request. The tenant is set even when there is none:
            # the batch reads it for every request, and an unset slot costs each read an
            # AttributeError (seven times the store, timed).
            request.middleware, request.send, request.receive = self, send, receive
            request.tenant = None
            if resolve is None:
                request.route = self._routes.resolve(scope)  # mounts rewrite the scope
            if self._reads_request:
                self._read_request(request, scope)
        except Exception:
            # Whatever went wrong inside sentinel, the request is served as if it were absent.
            self._metrics.internal_error("middleware")
            return await app(scope, receive, send)

        token = current_request.set(request)
        requests = self._requests
        if not requests and (self._raise_mode or watch_modes):
            # raise mode: a request starting with none in flight must not be failed for
            # what changed before it (in report mode that costs a probe per request, and
            # the next request is named the suspect instead).
            try:
                self._mutations.idle_check()
            except Exception:
                self._metrics.internal_error("mutations")
        requests.add(request)
        failed: BaseException | None = None
        span = span_token = None
        if self._tracer is not None:
            try:
                span, span_token, parent_sampled = self._tracer.start_request(scope, request)
                if parent_sampled and request.forced is None:
                    request.forced = "parent_sampled"
            except Exception:
                self._metrics.internal_error("tracing")
        result = None
        try:
            result = await app(scope, request.receive_wrapper, request.send_wrapper)
        except BaseException as exc:
            # Counted and reported, then re-raised: the server answers the client (its own
            # 500 when no response started), exactly as it would without sentinel.
            failed = exc
            status = request.status
            if (
                request.response_started
                and type(status) is int
                and 100 <= status <= 599
                and _start_refused(request, exc)
            ):
                # The server refused the start (a CR/LF in a header value, a 1xx it does not
                # send): the client got no response, as if the app had sent none.
                request.response_started = False
                request.status = status = None
            if not (type(status) is int and 100 <= status <= 599) and request.response_started:
                self._report_invalid_status(request, exc)
            elif isinstance(exc, OSError) and _raised_by_send_safely(request, exc):
                # The server's word that the client is gone (ASGI: send on a closed
                # connection raises a subclass of OSError); uvicorn drops it unsaid.
                request.disconnected = True
            elif (
                self._reporter.report(
                    exc,
                    _safe_phase(request, exc),
                    request,
                    error=not request.disconnected and _cancelled_from_inside(exc),
                )
                and request.forced is None
                and request.response_started
                and type(status) is int
                and status < 500
            ):
                # Its status alone (a 200 started before the error) would be sampled as
                # any success: the report names this request and its trace, so both are
                # kept. A 5xx is sampled as the errors it is (bounded in a storm).
                request.forced = "exception"
            raise
        finally:
            try:  # noqa: SIM105 -- no context manager built per request
                current_request.reset(token)
            except ValueError:
                # The coroutine is closed outside its task's context (the garbage collector
                # finalizing a request a stopped loop left pending): that context is gone.
                pass
            try:
                # The probe inline: it runs for every request.
                if self._mutations.changed() if compared else self._probe_changed():
                    self._mutations.report_changes(request)
            except Exception:
                self._metrics.internal_error("mutations")
            requests.discard(request)
            # The client's wait ends with the last body; background work after it (run
            # inside the app's call) is not the request's latency.
            end = request.completed_at if request.body_complete else _now()
            if kind != "http" and request.status is not None:
                # A websocket's request is its handshake: it ends at the accept, the close
                # before it or the denial response, not with the connection (an http start
                # the app sent on it has no end of its own: the request's end stands).
                end = getattr(request, "completed_at", end)
            status = request.status
            if type(status) is not int or status not in HTTP_STATUSES:
                if status is None and not request.response_started:
                    status = self._final_status(request)
                else:  # a status that is not one, or a start without one
                    if failed is None:  # the server sent it on: still the app's protocol error
                        self._report_invalid_status(request, None)
                    status = INVALID_STATUS
            if span is not None:
                self._finish_traced(request, kind, status, failed, span, span_token, end)
            else:
                # Released first: the route is resolved while the router's match is in the
                # scope, and the server's objects are let go.
                try:
                    request.release()
                except Exception:  # a route_template that raises, say: counted
                    self._metrics.internal_error("middleware")
                settling = self._settling
                account_now = self._account_now
                if (
                    account_now is not None
                    and request.forced is None
                    and request.tenant is None
                    and not settling
                ):
                    # Counted and decided now, while the request is in the caches.
                    account_now(request, status, end)
                else:
                    # With its batch (RequestAccounting.finish, inline), in order behind
                    # the requests already waiting; settled from any thread.
                    settling.append((self._account, request, status, end))
                    if len(settling) >= self._batch:
                        self._metrics.settle()
                if self._apply_at_next_turn:
                    self._settle_soon()
        return result

    def _finish_traced(
        self,
        request: TenantRequest,
        kind: str,
        status: int,
        failed: BaseException | None,
        span: Any,
        span_token: Any,
        end: float,
    ) -> None:
        """The end of a request with a span: accounted for at once (the trace's keep/drop
        decision is needed before the span ends), then the span finished, then released."""
        decision = self._accounting.account(request, status, end, span)
        if kind != "http":
            # A websocket's spans leave while its connection is open (its children are
            # exported before it ends): its server span is kept whatever the handshake's
            # record sampling decided, or the trace would lose its root.
            decision = KEEP_UNSAMPLED
        if self._apply_at_next_turn:
            self._settle_soon()
        if self._tracer is not None:
            try:
                # The span ends with the last body, as the duration does (OpenTelemetry's
                # ASGI instrumentation ends it there too); one that failed after it lasts
                # until the failure, which it records.
                end_time = None
                if request.body_complete and failed is None:
                    end_time = time.time_ns() - int((_now() - end) * 1e9)
                self._tracer.finish(
                    span,
                    span_token,
                    request,
                    status,
                    failed,
                    keep=decision.keep,
                    sample_rate=decision.sample_rate,
                    reason=decision.reason,
                    end_time=end_time,
                )
            except Exception:
                self._metrics.internal_error("tracing")
        try:
            request.release()
        except Exception:  # a route_template that raises, say: counted, never raised
            self._metrics.internal_error("middleware")

    def _credential_shaped(self, request_id: str) -> bool:
        """Whether a request id the client sent has a credential's shape (``token:...``, a
        JWT, ``sk_live_...``: :meth:`Scrubber.has_credential_shape`): such a one is not
        written, a generated id stands in. A random token cannot be told from a random id
        (a ULID, a KSUID) and is kept."""
        # Not cached: request ids are all different, a cache of them would only grow.
        return self._scrubber.has_credential_shape(request_id, cached=False)

    def count_with_batches(self) -> None:
        """Account for every request with its batch from now on (see
        :meth:`Sentinel.serving`)."""
        self._account_now = None

    def _settle_soon(self) -> None:
        try:
            self._metrics.settle_soon()
        except Exception:
            self._metrics.internal_error("metrics")

    def _first_on_loop(self, scope: Scope, loop: object) -> None:
        self._last_loop = loop
        self._only_last_loop = frozenset((loop,)) if loop is not None else frozenset()
        hook_running_loop()
        self.sentinel.serving(self)
        self._mutations.serving_started()
        if "app" in scope:  # the app that added this middleware: its app.state is global
            watch_app_state(scope["app"])

    def _read_request(self, request: TenantRequest, scope: Scope) -> None:
        """What the configuration reads from each request: the trusted headers (location,
        request id, keep, tenant) and the ``tenant`` callable."""
        tenant: Any = None
        if self._scan_headers:
            for name, value in scope.get("headers", ()):
                if name == self._tenant_header:
                    tenant = value
                elif name == self._keep_header:
                    request.forced = "keep_header"
                elif name == self._location_header:
                    request.location = self._locations.resolve(value.decode("latin-1").strip())
                elif name == self._request_id_header:
                    candidate = value.decode("latin-1").strip()
                    if _REQUEST_ID_RE.match(candidate) and not self._credential_shaped(candidate):
                        request._request_id = candidate
        if self._tenant_of is not None:
            given = self._tenant_of(scope)
            if given is _FAILED:  # counted: the request goes on with no tenant at all
                tenant = None
            elif given is not None:
                tenant = given
        if tenant is not None:
            request.tenant = self._tenants.validate(tenant)

    def _refuse_mutated_response(self, request: RequestContext) -> None:
        # raise mode: a change found when the handler starts its response fails the request
        # (the app sees the exception from its send, so its error handling answers 500).
        refused = None
        try:
            if self._mutations.changed_before_response():
                refused = self._mutations.report_changes(request, refusing=True)
        except Exception:
            self._metrics.internal_error("mutations")
        if refused is not None:
            raise GlobalStateMutated(refused.target, refused.key, request.route)

    @staticmethod
    def _final_status(request: RequestContext) -> int:
        # No response started: the client went away (the app saw its disconnect), or the
        # server answers 500 for the app. A cancellation is not the client's by itself:
        # uvicorn never cancels an app whose client left, while a timeout layer outside
        # sentinel, or the server's shutdown, does.
        return CLIENT_CLOSED_STATUS if request.disconnected else 500

    def _report_invalid_status(self, request: RequestContext, failed: BaseException | None) -> None:
        """Report a response start whose status is not an HTTP status, once, as the app's
        protocol error (with the server's refusal, if it raised one, as its cause)."""
        status = request.status
        error = AppProtocolError(
            f"http.response.start status must be an int from 100 to 599: {status!r:.80}"
        )
        error.__cause__ = failed
        if failed is not None:
            _mark_reported(failed)  # one occurrence, one report: the server's line included
        self._reporter.report(error, "request", request)

    async def _flush_then_send(self, message: Message, send: Send) -> None:
        # The server has drained its requests and exits once this is sent (or re-raises the
        # SIGTERM that stopped it): what is pending is written first, on a worker thread so
        # the event loop is not blocked, and whatever fails there is counted, never raised.
        try:
            await anyio.to_thread.run_sync(functools.partial(self.sentinel.flush, final=True))
        except Exception:
            self._metrics.internal_error("writer")
        await send(message)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Invalid configuration: fail the lifespan startup (the server refuses to start),
        and fail any request served without one."""
        error = self.config_error
        assert error is not None
        message = f"sentinel: invalid configuration: {error}"
        if scope["type"] == "lifespan":
            startup = await receive()
            if startup["type"] == "lifespan.startup":
                note_startup_failure(raised=False)
                await send({"type": "lifespan.startup.failed", "message": message})
                return
        raise error

    def _unbind_from_capture(self, scope: Scope) -> None:
        """Inside a :func:`sentinel.testing.capture_reports` block, have the Starlette app
        that built this layer with a sentinel other than the capture's (a module-level app
        whose stack an earlier test built) build its stack again at its next request, which
        then reports to the capture, as the testing clients have it do. Noticed at the
        lifespan, which Starlette's TestClient runs before the requests: nothing per
        request."""
        app: Any = scope.get("app")
        stack = getattr(app, "middleware_stack", None)
        if stack is None:
            return
        with _capturing_lock:
            elsewhere = bool(_capturing) and all(s is not self.sentinel for s in _capturing)
        if elsewhere and find_sentinel(stack) is self:
            app.middleware_stack = None

    def _report_quoted_failure(self, message: Message) -> None:
        """A failed lifespan's message sent from inside the app's ``except`` block (Starlette
        sends the traceback as its text): the exception being handled is reported now, and
        the server's log line quoting it is left out once it is written (each exception is
        reported once; the exception reaching this layer after it is then a no-op)."""
        exc = sys.exc_info()[1]
        text = message.get("message")
        if exc is None:
            return
        self._reporter.report(exc, "lifespan")
        if isinstance(text, str) and text and self._reporter.was_written(exc):
            leave_out_once(text)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> Any:
        hook_running_loop()
        self._unbind_from_capture(scope)
        token = current_phase.set("lifespan")
        lifespan = Lifespan()
        lifespan_token = current_lifespan.set(lifespan)
        mutations = self._mutations
        received = False  # whether the app called receive(): see the except clause
        startup_over = False  # whether the app said startup is complete or failed

        # Between startup's end and shutdown's start, what lifespan's tasks write while
        # requests are served is not startup any more.
        async def lifespan_receive() -> Message:
            nonlocal received
            received = True
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                mutations.lifespan_serving = lifespan.serving = False
            return message

        def lifespan_send(message: Message) -> Awaitable[None]:
            nonlocal startup_over
            message_type = message["type"]
            if message_type == "lifespan.startup.complete":
                mutations.lifespan_serving = lifespan.serving = True
                startup_over = True
            elif message_type == "lifespan.startup.failed":
                startup_over = True
                note_startup_failure(raised=False)
                self._report_quoted_failure(message)
            elif message_type in _SHUTDOWN_DONE:
                if message_type == "lifespan.shutdown.failed":
                    self._report_quoted_failure(message)
                return self._flush_then_send(message, send)
            return send(message)

        app: Callable[[Scope, Receive, Send], Awaitable[Any]] = self.app
        try:
            return await app(scope, lifespan_receive, lifespan_send)
        except BaseException as exc:
            # Raised before its first receive(), the app does not support lifespan (the
            # spec's way to say so; uvicorn's "auto" notes it at INFO): nothing to report.
            if received:
                self._reporter.report(exc, "lifespan")
                if not startup_over:
                    note_startup_failure(raised=True)
            raise
        finally:
            with contextlib.suppress(ValueError):  # closed outside its context, as above
                current_lifespan.reset(lifespan_token)
                current_phase.reset(token)


def _plain_status(status: Any) -> Any:
    """An ``int`` subclass's value as a plain int (``HTTPStatus.GONE`` is 410, as servers
    send it); ``bool`` and anything else as it is, to be counted ``invalid``."""
    if isinstance(status, int) and not isinstance(status, bool):
        return int(status)
    return status


class TenantRequest(RequestContext):
    """A request served by the middleware: with its tenant (the validated id, see
    :mod:`sentinel._tenants`, or None), and the ``receive`` and ``send`` the app is given,
    which note what the request and response did on their way through."""

    __slots__ = ("completed_at", "first_start", "middleware", "receive", "send", "tenant")

    tenant: str | None
    middleware: SentinelMiddleware
    send: Send
    receive: Receive
    first_start: Message | None
    """The response's first start (set with ``response_started``): a start the server
    refused is told apart from a later one by it."""
    completed_at: float
    """When the response's last body was sent (set with ``body_complete``): the end of the
    request's duration, which background work after it does not lengthen."""

    def send_wrapper(self, message: Message) -> Awaitable[None]:
        # A plain method handing back send's own awaitable: no coroutine of ours per
        # message, and whatever send raises reaches the app unchanged. A start the server
        # then refuses is told by its exception, on the failure path (_start_refused).
        send = self.send  # read once: calling an instance attribute as self.send() is slower
        try:
            message_type = message["type"]
        except Exception:  # not an ASGI message: the server refuses it, as without us
            return send(message)
        if message_type == "http.response.start":
            # Only the first start reaches the client: servers refuse any later one.
            if not self.response_started:
                if watch_modes or self.middleware._raise_mode:
                    self.middleware._refuse_mutated_response(self)
                self.response_started = True
                status = message.get("status")
                if type(status) is not int:
                    status = _plain_status(status)
                # Once the client left, the server sends nothing on (ASGI 2.3: send does
                # nothing): a start then (an error page for the upload cut short) never
                # reached anyone, and the request is the client's, who closed it.
                self.status = CLIENT_CLOSED_STATUS if self.disconnected else status
                self.first_start = message
        elif message_type == "http.response.body":
            if not message.get("more_body", False):
                self.body_complete = True
                self.completed_at = _now()
        elif self.kind != "websocket":
            # The other ways to end a response (a websocket message from an http app: the
            # server refuses it).
            if message_type == "http.response.pathsend" or (
                message_type == "http.response.zerocopysend" and not message.get("more_body", False)
            ):
                self.body_complete = True
                self.completed_at = _now()
        elif message_type == "websocket.accept":
            if not self.response_started:
                self.response_started = True
                self.status = 101
                self.completed_at = _now()  # the handshake's end: the request's duration
        elif message_type == "websocket.close" and not self.response_started:
            self.status = 403  # refused before accept: the server answers 403
            self.completed_at = _now()
        elif message_type == "websocket.http.response.start":
            if not self.response_started:  # the denial response extension: its own status
                self.response_started = True
                self.status = _plain_status(message.get("status"))
                self.first_start = message
                self.completed_at = _now()  # until its last body is sent
        elif message_type == "websocket.http.response.body" and not message.get("more_body"):
            self.body_complete = True
            self.completed_at = _now()
        return send(message)

    def release(self) -> None:
        """The request has ended: keep what is read of it later (the route, resolved now
        while the router's match is in the scope; the headers and query string a late
        report reads) and let go of the server's scope and channels. A request waiting for
        its batch, or held by a handle the server scheduled as the response completed
        (uvicorn's keep-alive timer copies the context), then holds a few fields instead of
        every object of the request: held whole, a busy server's finished requests
        tripled its garbage collections, and their pauses showed in the p99."""
        scope = self.scope
        if self._route is None:  # the route property, inline: this runs for every request
            resolve = self._resolve
            self._route = resolve(scope) if resolve is not None else UNMATCHED_ROUTE
        self.scope = {
            "type": self.kind,
            "path": self.path,
            "headers": scope.get("headers"),
            "query_string": scope.get("query_string", b""),
        }
        self.send, self.receive, self.first_start = _send_after_end, _receive_after_end, None

    async def receive_wrapper(self) -> Message:
        receive = self.receive
        message = await receive()
        try:
            message_type = message["type"]
            if message_type == "http.disconnect" or (
                message_type == "websocket.disconnect" and not self.response_started
            ):  # (a websocket's client gone before its handshake was answered)
                self.disconnected = True
        except Exception:  # not an ASGI message: the app's to refuse, as without us
            pass
        return message


SLOW_CALLS_TO_PAUSE = 5
"""Slow ``tenant`` calls in a row after which it is not called for a while."""
PAUSE_SECONDS = 10.0
"""How long a ``tenant`` callable that keeps being slow is left alone."""


class TenantCallable:
    """The configured ``tenant(scope)``, guarded: a call that raises (anything but
    KeyboardInterrupt and SystemExit), returns something other than text or None, or takes
    longer than the time budget returns :data:`_FAILED` (the request has no tenant, not even
    the header's) and is counted as ``sentinel_internal_errors_total{component="tenant"}``.
    A synchronous call cannot be interrupted, so after :data:`SLOW_CALLS_TO_PAUSE` slow calls
    in a row it is not called for :data:`PAUSE_SECONDS`; each request meanwhile is one that
    failed, counted alike: the header's value is not used either, or a tenant the callable
    names would flip to its header's name for the pause."""

    __slots__ = ("_budget", "_function", "_metrics", "_paused_until", "_slow")

    def __init__(self, config: Config, metrics: Any) -> None:
        self._function = config.tenant
        self._budget = config.tenant_time_budget_seconds
        self._metrics = metrics
        self._slow = 0
        self._paused_until = 0.0

    def __call__(self, scope: Scope) -> Any:
        start = _now()
        if start < self._paused_until:
            self._metrics.internal_error("tenant")
            return _FAILED
        try:
            value = self._function(scope)  # type: ignore[misc]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            # A synchronous call is never where a cancellation arrives: a CancelledError (or
            # any BaseException) out of it is the callable's own failure, not the request's.
            self._metrics.internal_error("tenant")
            return _FAILED
        end = _now()
        if end - start > self._budget:
            self._metrics.internal_error("tenant")
            self._slow += 1
            if self._slow >= SLOW_CALLS_TO_PAUSE:
                self._slow = 0
                self._paused_until = end + PAUSE_SECONDS
            return _FAILED
        self._slow = 0
        if value is None or isinstance(value, str | bytes | bytearray):
            return value
        self._metrics.internal_error("tenant")
        return _FAILED


_FAILED = object()
"""What :class:`TenantCallable` returns for a call that failed."""
_NO_HEADERS = object()
_NO_LOOP_YET = object()
_SHUTDOWN_DONE = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class AppProtocolError(Exception):
    """The app broke the ASGI protocol (e.g. a response status that is not an HTTP status)."""


AppProtocolError.__module__ = "sentinel"  # reported under its public name


def _mark_reported(exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        setattr(exc, REPORTED_ATTR, True)


async def _send_after_end(message: Message) -> None:
    # What a server does with a message sent after the request's end.
    message_type = message.get("type") if isinstance(message, dict) else None
    raise RuntimeError(f"ASGI message {message_type!r:.40} sent after the request ended")


async def _receive_after_end() -> Message:
    return {"type": "http.disconnect"}


def _never() -> bool:
    return False


def _same_request(outer: Scope, scope: Scope) -> bool:
    """Whether ``scope`` is the request an outer sentinel serves: its very scope, or a copy a
    middleware between the two made (``dict(scope)``, often with a rebuilt header list) that
    still shares the server's header list, ``state`` or ``extensions``. A request of its
    own (an app calling another app in-process) shares none of them."""
    if outer is scope or outer.get("headers", _NO_HEADERS) is scope.get("headers"):
        return True
    state = outer.get("state")
    if state is not None and state is scope.get("state"):
        return True
    extensions = outer.get("extensions")
    return extensions is not None and extensions is scope.get("extensions")


def _start_refused(request: TenantRequest, exc: BaseException) -> bool:
    """Whether ``exc`` (or the exception it was raised while handling: an app may wrap the
    server's) came out of the server's ``send`` given the response's first start: it never
    reached the client (a later start refused is not it). Read from the traceback,
    on the failure path only, so that the request path keeps no coroutine of its own around
    ``send``; a ``send`` without code of its own (a C function), or not in the traceback (a
    wrapper that hands back send's awaitable, as sentinel's does), tells nothing."""
    start = getattr(request, "first_start", None)  # set with the first start only
    if start is None:  # a request with no start of its own (a websocket accepted), say
        return False
    try:
        return _raised_by_send(request.send, start, exc)
    except Exception:
        return False


def _raised_by_send_safely(request: TenantRequest, exc: BaseException) -> bool:
    try:
        return _raised_by_send(request.send, None, exc)
    except Exception:
        return False


def _raised_by_send(send: Send, start: Message | None, exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised while handling) came out of ``send``: given
    ``start``, out of the call that sent it; with None, out of any call."""
    code = getattr(getattr(send, "__func__", send), "__code__", None)
    if code is None:
        return False
    for error in (exc, exc.__context__):
        tb = error.__traceback__ if error is not None else None
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code is code:
                if start is None:
                    return True
                arguments = frame.f_locals
                return any(
                    arguments.get(name) is start for name in code.co_varnames[: code.co_argcount]
                )
            tb = tb.tb_next
    return False


def _cancelled_from_inside(exc: BaseException) -> bool:
    """A cancellation that escaped the app while the request's own task was not cancelled
    (it awaited a task something else cancelled): the app's error, answered 500, not the
    client leaving nor a timeout or shutdown cancelling the request."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not on an asyncio loop (trio)
        return False
    return task is not None and task.cancelling() == 0


def _safe_phase(request: RequestContext, exc: BaseException) -> Phase:
    # Outside the reporter's own guard: whatever the exception's traceback looks like,
    # working out the phase must not replace the app's exception with ours.
    try:
        return phase_of(request, exc, propagated=True)
    except Exception:
        return "request"


_MAX_CALLER_FRAMES = 64


def app_module(app: Any, caller: types.FrameType | None) -> str | None:
    """The app's own module, for the default service name (``mypkg.main``), never a
    framework's; None when nothing names one.

    In order: the module whose code built the middleware (``instrument(app)`` or
    ``SentinelMiddleware(app)`` in ``mypkg/main.py``; ``caller`` is the frame that called
    sentinel); when a framework built it (``add_middleware``, on the first call), the module
    that holds the app (a global that is ``app`` or the Starlette app around its router);
    else the module of the app's first endpoint that is the app's code.
    """
    frame = caller
    for _ in range(_MAX_CALLER_FRAMES):
        if frame is None or not is_sentinel_file(frame.f_code.co_filename):
            break
        frame = frame.f_back
    if frame is not None and is_app_file(frame.f_code.co_filename):
        name = _module_name(frame.f_globals)
        if name is not None:
            return name
    router = find_router(app)
    holder = _module_holding(app, router)
    if holder is not None:
        return holder
    for route in getattr(router, "routes", ()) or ():
        module = sys.modules.get(str(getattr(getattr(route, "endpoint", None), "__module__", "")))
        namespace = _app_namespace(module)
        if namespace is not None:
            return _module_name(namespace)
    return None


def _module_name(namespace: Mapping[str, Any]) -> str | None:
    """The name of the module with globals ``namespace``; for ``__main__``, the name it
    was run as (``python -m mypkg.main``) or its file's (``python main.py``)."""
    name = namespace.get("__name__")
    if not isinstance(name, str) or not name:
        return None
    if name != "__main__":
        return name
    spec = namespace.get("__spec__")
    spec_name = getattr(spec, "name", None) if spec is not None else None
    if isinstance(spec_name, str) and spec_name and spec_name != "__main__":
        return spec_name
    filename = namespace.get("__file__")
    if isinstance(filename, str) and filename:
        return os.path.splitext(os.path.basename(filename))[0] or None
    return None


def _app_namespace(module: Any) -> dict[str, Any] | None:
    """The globals of ``module`` if it is the app's code, else None. Read from the module's
    dict only: an attribute a module lacks would run its ``__getattr__``, and any attribute
    of a lazily loaded module would load it."""
    if type(module) is not types.ModuleType:
        return None
    namespace: dict[str, Any] = vars(module)
    filename = namespace.get("__file__")
    return namespace if isinstance(filename, str) and is_app_file(filename) else None


def _module_holding(app: Any, router: Any) -> str | None:
    """The app module with a global that is ``app`` itself or the Starlette app whose router
    is ``router``; of several (``from mypkg.main import app`` elsewhere), the last imported,
    which is usually where it was defined."""
    found = None
    for name, module in list(sys.modules.items()):
        namespace = _app_namespace(module)
        # An alias (multiprocessing's __mp_main__ for __main__) is not where it was put.
        if namespace is None or namespace.get("__name__") != name:
            continue
        for value in list(namespace.values()):
            # type(), not isinstance(): a lazy proxy's __class__ would run its code.
            if value is app or (
                router is not None
                and issubclass(type(value), Starlette)
                and getattr(value, "router", None) is router
            ):
                found = _module_name(namespace)
                break
    return found


def instrument(
    app: ASGIApp,
    config: Config | None = None,
    *,
    registry: CollectorRegistry | None = None,
    stream: IO[str] | None = None,
    sinks: Iterable[Sink] = (),
    route_template: Callable[[Scope], str | None] | None = None,
    tracer_provider: TracerProvider | None = None,
    span_exporter: SpanExporter | None = None,
    sampling_hook: SamplingHook | None = None,
    sentinel: Sentinel | None = None,
    **overrides: Unpack[ConfigOptions],
) -> SentinelMiddleware:
    """Wrap any ASGI app from the outside; the same arguments as :class:`SentinelMiddleware`.

    Raises :class:`ConfigError` for an invalid configuration (an unknown keyword included).
    An app that is already wrapped is returned as it is: one sentinel per app.
    """
    if isinstance(app, SentinelMiddleware):
        return app
    middleware = SentinelMiddleware(
        app,
        config,
        registry=registry,
        stream=stream,
        sinks=sinks,
        route_template=route_template,
        tracer_provider=tracer_provider,
        span_exporter=span_exporter,
        sampling_hook=sampling_hook,
        sentinel=sentinel,
        **overrides,
    )
    if middleware.config_error is not None:
        raise middleware.config_error
    return middleware


_COLLABORATORS = (
    "registry",
    "stream",
    "sinks",
    "route_template",
    "tracer_provider",
    "span_exporter",
    "sampling_hook",
    "sentinel",
)
"""The middleware's keywords that are not settings (suggested for a misspelt keyword)."""


def _refuse_beside_sentinel(**given: Any) -> None:
    """ConfigError naming what was given beside an already built ``sentinel``, which has
    its configuration and collaborators: they would be ignored."""
    ignored = [
        name
        for name, value in given.items()
        if value is not None and not (name == "sinks" and value == ())
    ]
    if ignored:
        names = ", ".join(f'"{name}"' for name in ignored)
        msg = (
            f'{names} cannot be given with "sentinel", which has its own configuration '
            "and collaborators (they would be ignored): configure that sentinel instead "
            '(capture_reports(location=...), say), or leave "sentinel" out'
        )
        raise ConfigError(msg)


def find_sentinel(app: Any) -> SentinelMiddleware | type[SentinelMiddleware] | None:
    """The sentinel layer already in ``app`` (an instance, or the class when Starlette's
    ``add_middleware`` will build it), found through the ``app`` attributes middleware
    layers keep; None when there is none."""
    for _ in range(64):  # a chain of layers, bounded in case of a cycle
        if isinstance(app, SentinelMiddleware):
            return app
        for layer in getattr(app, "user_middleware", None) or ():
            if getattr(layer, "cls", None) is SentinelMiddleware:
                return SentinelMiddleware
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None

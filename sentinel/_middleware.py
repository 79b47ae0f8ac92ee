"""The pure ASGI middleware that wires sentinel into an app."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from ._config import Config
from ._context import RequestContext, current_phase, current_request
from ._exceptions import is_reportable
from ._hooks import hook_running_loop
from ._metrics import bounded_method
from ._output import Sink
from ._phase import phase_of
from ._runtime import Sentinel, install
from ._tracing import RequestTracer
from .types import ASGIApp, Message, Receive, Scope, Send

_running_loop = asyncio.events._get_running_loop
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PLAIN_500_BODY = b"Internal Server Error"
_PLAIN_500_LENGTH = str(len(_PLAIN_500_BODY)).encode()
CLIENT_CLOSED_STATUS = 499
"""The ``code`` counted for a request whose response never started because the client went
away (the request was cancelled, or the app returned after seeing ``http.disconnect``);
nginx's convention for "client closed request"."""


class SentinelMiddleware:
    """Reports every exception the app raises, counts every request, and stays transparent.

    Use as ``app.add_middleware(SentinelMiddleware, ...)`` or wrap any ASGI app with
    :func:`instrument`. Keyword arguments are :class:`Config` fields (read from the
    environment when not given) plus the collaborators ``registry``, ``stream``, ``sinks``,
    ``route_template`` (a callable giving the route of a scope, for non-Starlette apps) and
    ``tracer_provider`` (server spans go there; default: OTLP when the OTel variables ask),
    or an already built ``sentinel`` (see :func:`sentinel.testing.capture_reports`).
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
        sentinel: Sentinel | None = None,
        **overrides: Any,
    ) -> None:
        from ._routes import RouteResolver

        self.app = app
        module = app_module(app)
        self.sentinel: Sentinel = sentinel or install(
            config,
            registry=registry,
            stream=stream,
            sinks=sinks,
            service_fallback=module,
            tracer_provider=tracer_provider,
            **overrides,
        )
        package = (module or "").partition(".")[0]
        if package and package not in ("sentinel", "starlette", "fastapi", "__main__"):
            self.sentinel.reporter.classifier.add_app_package(package)
        provider = tracer_provider or self.sentinel.tracer_provider

        self._tracer = (
            RequestTracer(provider, self.sentinel.scrubber) if provider is not None else None
        )
        config = self.sentinel.config
        self._routes = RouteResolver(app, route_template)
        self._location_header = (
            config.location_header.encode("latin-1") if config.location_header else None
        )
        self._request_id_header = (
            config.request_id_header.encode("latin-1") if config.request_id_header else None
        )
        self._static_location = config.location
        self._locations = self.sentinel.locations
        self._metrics = self.sentinel.metrics
        self._reporter = self.sentinel.reporter
        self._last_loop: object = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _new_context(self, scope: Scope) -> RequestContext:
        loop = _running_loop()
        if loop is not self._last_loop:
            hook_running_loop()
            self._last_loop = loop

        location = self._static_location
        request_id = None
        if self._location_header is not None or self._request_id_header is not None:
            for name, value in scope.get("headers", ()):
                if name == self._location_header:
                    location = self._locations.resolve(value.decode("latin-1").strip())
                elif name == self._request_id_header:
                    candidate = value.decode("latin-1").strip()
                    if _REQUEST_ID_RE.match(candidate):
                        request_id = candidate
        return RequestContext(
            kind=scope["type"],
            method=bounded_method(scope.get("method", "GET")),
            path=scope.get("path", ""),
            route=self._routes.resolve(scope),
            location=location,
            start=time.perf_counter(),
            request_id=request_id,
            query_string=scope.get("query_string", b""),
            raw_headers=scope.get("headers"),
        )

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = self._new_context(scope)
        except Exception:
            # Whatever went wrong inside sentinel, the request is served as if it were absent.
            self._metrics.internal_error("middleware")
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            message_type = message["type"]
            if message_type == "http.response.start":
                request.response_started = True
                request.status = message.get("status")
            elif message_type == "http.response.body":
                if not message.get("more_body", False):
                    request.body_complete = True
            elif message_type == "websocket.accept":
                request.response_started = True
                request.status = 101
            await send(message)

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                request.disconnected = True
            return message

        # Inside a framework's own stack (Starlette sets scope["app"]) the framework's error
        # middleware answers the client; sentinel only answers when it is the outermost layer.
        answers_errors = "app" not in scope
        token = current_request.set(request)
        sentinel = self.sentinel
        sentinel.in_flight += 1
        failed: BaseException | None = None
        span = span_token = None
        if self._tracer is not None:
            try:
                span, span_token = self._tracer.start(scope, request)
            except Exception:
                self._metrics.internal_error("tracing")
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            failed = exc
            self._reporter.report(exc, phase_of(request, exc, propagated=True), request)
            if (
                answers_errors
                and request.kind == "http"
                and not request.response_started
                and is_reportable(exc)
            ):
                await self._send_plain_500(request, send)
            raise
        finally:
            current_request.reset(token)
            sentinel.in_flight -= 1
            status = self._final_status(request, failed)

            if request.kind == "http":
                self._count(request, status)
            if span is not None and self._tracer is not None:
                try:
                    self._tracer.finish(span, span_token, request, status, failed)
                except Exception:
                    self._metrics.internal_error("tracing")

    async def _send_plain_500(self, request: RequestContext, send: Send) -> None:
        try:
            # Built anew each time: an outer layer may add headers to the message in place.
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", _PLAIN_500_LENGTH),
                        # The server closes the connection after an app exception; say so.
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _PLAIN_500_BODY})
            request.response_started = True
            request.body_complete = True
            request.status = 500
        except Exception:
            pass  # the client is gone; the server will see the app's exception either way

    @staticmethod
    def _final_status(request: RequestContext, failed: BaseException | None) -> int:
        if request.status is not None:
            return int(request.status)
        cancelled = failed is not None and not is_reportable(failed)
        # No response started: the client went away (cancelled, or the app saw the
        # disconnect and gave up), or the server answers 500 for the app.
        return CLIENT_CLOSED_STATUS if cancelled or request.disconnected else 500

    def _count(self, request: RequestContext, status: int) -> None:
        try:
            self._metrics.count_request(
                request.location,
                request.route,
                request.method,
                status,
                time.perf_counter() - request.start,
            )
        except Exception:
            self._metrics.internal_error("metrics")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        hook_running_loop()
        token = current_phase.set("lifespan")
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self._reporter.report(exc, "lifespan")
            raise
        finally:
            current_phase.reset(token)


def app_module(app: Any) -> str | None:
    """The module the app's code lives in: that of its first routed endpoint, else its own."""
    from ._routes import find_router

    router = find_router(app)
    for route in getattr(router, "routes", ()) or ():
        endpoint = getattr(route, "endpoint", None)
        module = getattr(endpoint, "__module__", None)
        if module:
            return str(module)
    module = getattr(app, "__module__", None)
    if module and not str(module).startswith(("starlette.", "fastapi.", "sentinel.")):
        return str(module)
    return None


def instrument(app: ASGIApp, config: Config | None = None, **kwargs: Any) -> SentinelMiddleware:
    """Wrap any ASGI app from the outside; the same keyword arguments as the middleware."""
    return SentinelMiddleware(app, config, **kwargs)

"""OpenTelemetry server spans: one per request, named and attributed by the HTTP semconv."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._config import Config
from ._context import RequestContext
from ._scrub import Scrubber
from ._version import __version__
from .types import Scope

_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def default_tracer_provider(config: Config) -> trace.TracerProvider:
    """An SDK provider exporting over OTLP as the OTEL_* variables say (batched, bounded)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": config.service, "service.version": config.version})
    provider = TracerProvider(resource=resource)
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    exporter: Any
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        exporter = HTTPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RequestTracer:
    """Starts and ends the server span of each request, honouring incoming W3C context."""

    def __init__(self, tracer_provider: trace.TracerProvider, scrubber: Scrubber) -> None:
        self._tracer = tracer_provider.get_tracer("sentinel", __version__)
        self._scrubber = scrubber

    def start(self, scope: Scope, request: RequestContext) -> tuple[trace.Span, object]:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _PROPAGATION_HEADERS
        }
        parent = propagate.extract(carrier) if carrier else None
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "http.route": request.route,
            "url.path": self._scrubber.text(request.path),
            "url.scheme": scope.get("scheme", "http"),
            "sentinel.location": request.location,
        }
        server = scope.get("server")
        if server:
            attributes["server.address"] = str(server[0])
            if server[1] is not None:
                attributes["server.port"] = int(server[1])
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
        name = f"{request.method} {request.route}"
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def finish(
        self,
        span: trace.Span,
        token: object,
        request: RequestContext,
        status: int,
        failed: BaseException | None,
    ) -> None:
        try:
            span.set_attribute("http.response.status_code", status)
            if failed is not None and status >= 500:
                span.set_attribute("error.type", type(failed).__qualname__)
            elif status >= 500:
                span.set_attribute("error.type", str(status))
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        finally:
            otel_context.detach(token)  # type: ignore[arg-type]

"""Server spans: one per request, HTTP semantic conventions, W3C parents, errors marked."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import Config, instrument
from sentinel._config import traces_configured
from sentinel.testing import Captured, serve


class OrderFailed(Exception):
    """The app's failure."""


async def show(request: Request) -> Response:
    return PlainTextResponse(f"order {request.path_params['order_id']}")


async def fail(request: Request) -> Response:
    raise OrderFailed("password=hunter2 rejected")


def _traced_app(captured: Captured) -> tuple[object, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Starlette(routes=[Route("/orders/{order_id}", show), Route("/fail", fail)])
    return instrument(app, sentinel=captured.sentinel, tracer_provider=provider), exporter


def test_one_server_span_per_request_with_http_semconv(captured: Captured) -> None:
    """Name "METHOD route", kind SERVER, the current HTTP attributes, sentinel's location."""
    app, exporter = _traced_app(captured)
    with serve(app) as url:
        assert httpx.get(f"{url}/orders/7?x=1").status_code == 200
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /orders/{order_id}"
    assert span.kind == SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == "/orders/{order_id}"
    assert attributes["url.path"] == "/orders/7"
    assert attributes["http.response.status_code"] == 200
    assert attributes["sentinel.location"] == "unknown"
    assert "error.type" not in attributes
    assert span.status.status_code == StatusCode.UNSET


def test_incoming_w3c_parent_is_honoured(captured: Captured) -> None:
    """A traceparent header makes the server span a child in the caller's trace."""
    app, exporter = _traced_app(captured)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with serve(app) as url:
        httpx.get(f"{url}/orders/1", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    [span] = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id


def test_failed_request_marks_the_span_and_links_the_report(captured: Captured) -> None:
    """5xx: status ERROR, error.type, a scrubbed exception event; the report has the ids."""
    app, exporter = _traced_app(captured)
    with serve(app) as url:
        assert httpx.get(f"{url}/fail").status_code == 500
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "OrderFailed"
    assert (span.attributes or {})["http.response.status_code"] == 500
    [event] = [event for event in span.events if event.name == "exception"]
    assert "hunter2" not in str(event.attributes)
    assert (event.attributes or {})["exception.type"].endswith("OrderFailed")
    [report] = captured.reports
    assert report["trace_id"] == format(span.context.trace_id, "032x")
    assert report["span_id"] == format(span.context.span_id, "016x")


def test_no_provider_no_spans(captured: Captured) -> None:
    """Traces are off by default: no span, no trace ids in reports."""
    app = instrument(Starlette(routes=[Route("/fail", fail)]), sentinel=captured.sentinel)
    with serve(app) as url:
        httpx.get(f"{url}/fail")
    [report] = captured.reports
    assert report["trace_id"] is None


def test_traces_follow_the_otel_variables() -> None:
    """An exporter or an OTLP endpoint turns traces on; OTEL_TRACES_EXPORTER=none wins."""
    assert traces_configured({}) is False
    assert traces_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) is True
    assert traces_configured({"OTEL_TRACES_EXPORTER": "otlp"}) is True
    assert (
        traces_configured(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}
        )
        is False
    )
    assert Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}).traces

"""sentinel.testing: the helpers users rely on in their own tests."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import _runtime, capture_exception, instrument
from sentinel.testing import capture_reports, serve


def test_capture_reports_isolates_and_restores() -> None:
    """A fresh sentinel during the block, the previous one after it."""
    before = _runtime.current()
    with capture_reports(location="fra") as captured:
        assert _runtime.current() is captured.sentinel
        try:
            raise ValueError("captured")
        except ValueError as exc:
            assert capture_exception(exc) is True
        [report] = captured.reports
        assert report["location"] == "fra"
        assert report["exception_type"] == "ValueError"
        assert (
            captured.metric(
                "sentinel_unhandled_exceptions_total",
                location="fra",
                route="<none>",
                exception_type="ValueError",
                phase="process",
            )
            == 1
        )
        assert captured.metric("sentinel_unhandled_exceptions_total", location="nowhere") == 0
    assert _runtime.current() is before


def test_serve_runs_a_real_server_and_stops_it() -> None:
    """serve() yields a loopback URL that answers, and stops the server afterwards."""

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    with capture_reports() as captured:
        app = instrument(Starlette(routes=[Route("/", hello)]), sentinel=captured.sentinel)
        with serve(app) as url:
            assert url.startswith("http://127.0.0.1:")
            assert httpx.get(url).text == "hello"
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError("the server still answers after serve() returned")


def test_capture_reports_with_a_span_exporter_keeps_traces_of_kept_requests() -> None:
    """capture_reports(span_exporter=...) gives tests the tail-sampled traces."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as captured:
        app = instrument(Starlette(routes=[Route("/", hello)]), sentinel=captured.sentinel)
        with serve(app) as url:
            httpx.get(url)  # a new key: kept
        [record] = captured.events("request")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "GET /"]
    assert record["trace_id"] == format(span.context.trace_id, "032x")

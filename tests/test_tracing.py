"""Server spans: one per request, HTTP semantic conventions, W3C parents, errors marked."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from helpers import request_context, wait_for
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GRPCSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HTTPSpanExporter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import Config, ConfigError, instrument
from sentinel._config import traces_configured
from sentinel._metrics import Metrics
from sentinel._output import Emitter
from sentinel._scrub import Scrubber
from sentinel._tracing import (
    PENDING_TIMEOUT_SECONDS,
    BoundedBatchProcessor,
    CountingExporter,
    FanOutExporter,
    RequestTracer,
    TailSamplingProcessor,
    build_tracer_provider,
)
from sentinel._writer import Writer
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
    """Name "METHOD route", kind SERVER, the current HTTP attributes (the query and the user
    agent scrubbed), sentinel's location."""
    app, exporter = _traced_app(captured)
    with serve(app) as url:
        headers = {"user-agent": "probe/1.0"}
        assert httpx.get(f"{url}/orders/7?x=1&token=hunter2", headers=headers).status_code == 200
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /orders/{order_id}"
    assert span.kind == SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == "/orders/{order_id}"
    assert attributes["url.path"] == "/orders/7"
    assert str(attributes["url.query"]).startswith("x=1&token=[scrubbed len=7 ")
    assert attributes["http.response.status_code"] == 200
    assert attributes["user_agent.original"] == "probe/1.0"
    assert attributes["network.protocol.version"] == "1.1"
    assert attributes["server.address"] == attributes["client.address"] == "127.0.0.1"
    assert type(attributes["client.port"]) is int and attributes["client.port"] > 0
    assert attributes["sentinel.location"] == "unknown"
    assert "error.type" not in attributes
    assert span.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize("pipeline", ["the caller's", "sentinel's own"])
def test_the_server_span_ends_with_the_response_not_its_background_task(
    captured: Captured, pipeline: str
) -> None:
    """As OpenTelemetry's ASGI instrumentation does: the span ends when the last body is
    sent, not after the background task Starlette runs inside the app's call; a background
    task that fails keeps the span open until the failure it records."""
    from starlette.background import BackgroundTask

    async def cleanup(fail: bool) -> None:
        await asyncio.sleep(0.5)
        if fail:
            raise OrderFailed("cleanup failed")

    async def answer(request: Request) -> Response:
        fail = request.query_params.get("fail") == "1"
        return PlainTextResponse("ok", background=BackgroundTask(cleanup, fail))

    exporter = InMemorySpanExporter()
    app = Starlette(routes=[Route("/answer", answer)])
    with contextlib.ExitStack() as stack:
        wrapped, flush = _in_pipeline(stack, pipeline, app, captured, exporter)
        with serve(wrapped) as url:
            assert httpx.get(f"{url}/answer", timeout=5).text == "ok"
            assert httpx.get(f"{url}/answer?fail=1", timeout=5).text == "ok"
            time.sleep(0.8)
        flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    quick, failed = sorted(spans, key=lambda span: span.status.status_code != StatusCode.UNSET)
    assert quick.end_time is not None and quick.start_time is not None
    assert (quick.end_time - quick.start_time) / 1e9 < 0.4
    assert failed.end_time is not None and failed.start_time is not None
    assert (failed.end_time - failed.start_time) / 1e9 >= 0.5


def _in_pipeline(
    stack: contextlib.ExitStack,
    pipeline: str,
    app: Any,
    captured: Captured,
    exporter: InMemorySpanExporter,
) -> tuple[Any, Callable[..., Any]]:
    """``app`` instrumented to trace to ``exporter`` through the caller's tracer provider or
    sentinel's own pipeline (a capture of its own, entered on ``stack``), and the flush of
    the sentinel it reports to."""
    from sentinel.testing import capture_reports

    if pipeline == "the caller's":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return (
            instrument(app, sentinel=captured.sentinel, tracer_provider=provider),
            captured.sentinel.flush,
        )
    traced = stack.enter_context(capture_reports(span_exporter=exporter))
    return instrument(app, sentinel=traced.sentinel), traced.sentinel.flush


@pytest.mark.parametrize("pipeline", ["the caller's", "sentinel's own"])
def test_a_method_outside_the_known_ones_is_other_as_the_semantic_conventions_say(
    captured: Captured, pipeline: str
) -> None:
    """A PURGE (and a method no token could be) in either pipeline: http.request.method
    is "_OTHER" with the method as sent in http.request.method_original when it is a plain
    token, and the span is named "HTTP route" (the metrics count both under "OTHER"); with
    no route matched, "HTTP" alone."""

    async def anything(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    exporter = InMemorySpanExporter()
    with contextlib.ExitStack() as stack:
        app, flush = _in_pipeline(stack, pipeline, anything, captured, exporter)
        for method in ("PURGE", "GET\x00"):
            scope = {"type": "http", "method": method, "path": "/cache", "headers": []}
            asyncio.run(_call(app, scope))
        flush(final=True)
    spans = sorted(exporter.get_finished_spans(), key=lambda span: len(span.attributes or {}))
    assert [span.name for span in spans] == ["HTTP"] * 2
    assert [dict(span.attributes or {}).get("http.request.method") for span in spans] == [
        "_OTHER",
        "_OTHER",
    ]
    assert [dict(span.attributes or {}).get("http.request.method_original") for span in spans] == [
        None,
        "PURGE",
    ]


async def _call(app: Any, scope: dict[str, Any]) -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


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


# -- the tail decision ---------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pipeline:
    """A provider whose spans go through a TailSamplingProcessor into memory."""

    def __init__(self, *, max_buffered_spans: int = 1000, max_spans_per_trace: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.exporter = InMemorySpanExporter()
        self.clock = FakeClock()
        self.tail = TailSamplingProcessor(
            SimpleSpanProcessor(self.exporter),
            self.metrics,
            max_buffered_spans=max_buffered_spans,
            max_spans_per_trace=max_spans_per_trace,
            clock=self.clock,
        )
        self.provider = TracerProvider(sampler=ALWAYS_ON)
        self.provider.add_span_processor(self.tail)
        self.tracer = self.provider.get_tracer("test")

    def server_span(self, parent: Context | None = None) -> Span:
        """A span like the one RequestTracer starts for a request."""
        return self.tracer.start_span(
            "GET /", context=parent, kind=SpanKind.SERVER, attributes={"sentinel.location": "fra"}
        )

    def child(self, parent: Span, name: str = "db") -> Span:
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent))

    def exported(self) -> list[str]:
        return sorted(span.name for span in self.exporter.get_finished_spans())

    def dropped(self, reason: str) -> float:
        value = self.registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
        return 0.0 if value is None else value


def _trace_id(span: Span) -> int:
    return span.get_span_context().trace_id


def test_kept_request_exports_its_whole_trace_once() -> None:
    """Children ending before and after the server span all arrive once, after the decision."""
    pipeline = Pipeline()
    root = pipeline.server_span()
    early, late = pipeline.child(root, "early"), pipeline.child(root, "late")
    grandchild = pipeline.child(early, "grandchild")
    grandchild.end()
    early.end()
    assert pipeline.exported() == []  # held back until the decision
    assert pipeline.tail.buffered_spans == 2
    pipeline.tail.decide(_trace_id(root), True)
    root.end()
    late.end()
    assert pipeline.exported() == ["GET /", "early", "grandchild", "late"]
    assert pipeline.tail.buffered_spans == 0
    assert pipeline.tail.pending_traces == 0


def test_dropped_request_exports_nothing() -> None:
    """Nothing of a dropped request's trace is exported, not even a child ending late."""
    pipeline = Pipeline()
    root = pipeline.server_span()
    early, late = pipeline.child(root, "early"), pipeline.child(root, "late")
    early.end()
    pipeline.tail.decide(_trace_id(root), False)
    root.end()
    late.end()
    pipeline.child(root, "after").end()  # started after the decision, e.g. a background task
    assert pipeline.exported() == []
    assert pipeline.tail.buffered_spans == 0
    assert pipeline.dropped("span_buffer_full") == 0


def test_other_traces_pass_through() -> None:
    """Jobs, spans outside requests and foreign server spans are exported as they end."""
    pipeline = Pipeline()
    job = pipeline.tracer.start_span("job")
    step = pipeline.child(job, "step")
    step.end()
    assert pipeline.exported() == ["step"]
    job.end()
    pipeline.tracer.start_span("GET /other", kind=SpanKind.SERVER).end()
    assert pipeline.exported() == ["GET /other", "job", "step"]
    assert pipeline.tail.pending_traces == 0


def test_per_trace_bound_counts_what_a_kept_request_lost() -> None:
    """Spans beyond max_spans_per_trace are dropped; counted only if the request is kept."""
    pipeline = Pipeline(max_spans_per_trace=3)
    kept, dropped = pipeline.server_span(), pipeline.server_span()
    for root in (kept, dropped):
        for index in range(5):
            pipeline.child(root, f"child-{index}").end()
    pipeline.tail.decide(_trace_id(dropped), False)
    dropped.end()
    pipeline.tail.decide(_trace_id(kept), True)
    kept.end()
    assert pipeline.exported() == ["GET /", "child-0", "child-1", "child-2"]
    assert pipeline.dropped("span_buffer_full") == 2


def test_total_buffer_bound_counts_what_kept_requests_lost() -> None:
    """Spans beyond max_buffered_spans over all pending requests are dropped and counted."""
    pipeline = Pipeline(max_buffered_spans=4)
    first, second = pipeline.server_span(), pipeline.server_span()
    for root in (first, second):
        for _ in range(3):
            pipeline.child(root).end()
    assert pipeline.tail.buffered_spans == 4
    for root in (first, second):
        pipeline.tail.decide(_trace_id(root), True)
        root.end()
    assert len(pipeline.exported()) == 4 + 2  # 4 buffered children and both server spans
    assert pipeline.dropped("span_buffer_full") == 2
    assert pipeline.tail.buffered_spans == 0


def test_undecided_requests_age_out_and_are_counted() -> None:
    """A request whose decision never comes frees its buffer after the timeout, counted."""
    pipeline = Pipeline()
    abandoned = pipeline.server_span()
    pipeline.child(abandoned).end()
    pipeline.child(abandoned).end()
    pipeline.clock.now += 30
    assert pipeline.tail.buffered_spans == 2  # not yet
    fresh = pipeline.server_span()
    pipeline.clock.now += PENDING_TIMEOUT_SECONDS - 10
    pipeline.server_span()  # any request start looks for overdue ones
    assert pipeline.dropped("span_undecided") == 2
    assert pipeline.tail.buffered_spans == 0
    assert pipeline.tail.pending_traces == 2  # fresh and the latest one
    pipeline.child(fresh).end()
    pipeline.tail.decide(_trace_id(fresh), True)
    fresh.end()
    assert pipeline.exported() == ["GET /", "db"]


def test_a_full_buffer_makes_room_from_overdue_requests() -> None:
    """When the buffer is full, spans of overdue requests are given up first (counted)."""
    pipeline = Pipeline(max_buffered_spans=2)
    abandoned = pipeline.server_span()
    pipeline.child(abandoned).end()
    pipeline.child(abandoned).end()
    pipeline.clock.now += PENDING_TIMEOUT_SECONDS + 0.5  # due, but not yet swept
    current = pipeline.server_span()
    pipeline.child(current).end()
    pipeline.tail.decide(_trace_id(current), True)
    current.end()
    assert pipeline.exported() == ["GET /", "db"]
    assert pipeline.dropped("span_undecided") == 2
    assert pipeline.dropped("span_buffer_full") == 0


def test_requests_sharing_a_trace_keep_it_if_any_is_kept() -> None:
    """Two requests in one caller's trace: held until both decide, kept if one keeps."""
    pipeline = Pipeline()
    caller = pipeline.tracer.start_span("caller")  # the caller's trace, ended later
    parent = trace.set_span_in_context(caller)
    first, second = pipeline.server_span(parent), pipeline.server_span(parent)
    pipeline.child(first, "first-child").end()
    pipeline.tail.decide(_trace_id(first), False)
    first.end()
    pipeline.child(second, "second-child").end()
    assert pipeline.exported() == []
    pipeline.tail.decide(_trace_id(second), True)
    second.end()
    caller.end()
    assert pipeline.exported() == ["GET /", "GET /", "caller", "first-child", "second-child"]


def test_decide_says_whether_the_spans_can_still_leave_the_process() -> None:
    """A server span sure to be dropped gets no more attributes (they cost an SDK span a
    good part of its time); one whose trace another request may still keep does."""
    pipeline = Pipeline()
    alone = pipeline.server_span()
    assert pipeline.tail.decide(_trace_id(alone), False) is False
    kept = pipeline.server_span()
    assert pipeline.tail.decide(_trace_id(kept), True) is True
    caller = pipeline.tracer.start_span("caller")
    parent = trace.set_span_in_context(caller)
    first, second = pipeline.server_span(parent), pipeline.server_span(parent)
    assert pipeline.tail.decide(_trace_id(first), False) is True  # second may keep it
    assert pipeline.tail.decide(_trace_id(second), False) is False
    assert pipeline.tail.decide(12345, True) is True  # a trace it never held passes


def test_only_exported_server_spans_get_their_ending_attributes(captured: Captured) -> None:
    """Two requests in one caller's trace, the first dropped, the second kept: both spans
    are exported with every attribute, while a request dropped alone is never exported."""
    pipeline = Pipeline()
    tracer = RequestTracer(pipeline.provider, captured.sentinel.scrubber, pipeline.tail)
    scope = {
        "type": "http",
        "headers": [(b"traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-00")],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    requests = [request_context(scope=scope) for _ in range(2)]
    alone = request_context()
    alone_span, alone_token, _ = tracer.start_request(alone.scope, alone)
    first = tracer.start_request(scope, requests[0])
    second = tracer.start_request(scope, requests[1])
    tracer.finish(*first[:2], requests[0], 200, None, keep=False)
    tracer.finish(*second[:2], requests[1], 503, None, keep=True, reason="new_key")
    tracer.finish(alone_span, alone_token, alone, 200, None, keep=False)
    spans = pipeline.exporter.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        attributes = dict(span.attributes or {})
        assert attributes["server.port"] == 8000
        assert attributes["client.address"] == "127.0.0.1"
        assert "url.path" in attributes and "sentinel.keep_reason" in attributes
    codes = sorted(dict(span.attributes or {})["http.response.status_code"] for span in spans)
    assert codes == [200, 503]


def test_concurrent_span_ends_keep_exactly_the_kept_traces() -> None:
    """Many threads ending spans and deciding at once: every kept span once, no dropped one."""
    pipeline = Pipeline(max_buffered_spans=100_000, max_spans_per_trace=100)
    requests_per_thread, children = 150, 4

    enders = ThreadPoolExecutor(max_workers=4)
    late_ends: list[Future[None]] = []

    def serve(worker: int) -> None:
        for index in range(requests_per_thread):
            root = pipeline.server_span()
            spans = [pipeline.child(root, f"{worker}-{index}-{n}") for n in range(children)]
            spans[0].end()
            # These end on other threads, racing with the decision.
            late_ends.extend(enders.submit(span.end) for span in spans[1:])
            pipeline.tail.decide(_trace_id(root), index % 3 == 0)
            root.end()

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads as much as possible
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(serve, range(8)))
        for future in late_ends:
            future.result(10)
    finally:
        sys.setswitchinterval(switch_interval)
        enders.shutdown()
    names = [span.name for span in pipeline.exporter.get_finished_spans()]
    exported_children = [name for name in names if name != "GET /"]
    assert len(exported_children) == len(set(exported_children))  # each exported once
    expected = {
        f"{worker}-{index}-{n}"
        for worker in range(8)
        for index in range(0, requests_per_thread, 3)
        for n in range(children)
    }
    assert set(exported_children) == expected
    assert names.count("GET /") == 8 * len(range(0, requests_per_thread, 3))
    assert pipeline.tail.buffered_spans == 0
    assert pipeline.tail.pending_traces == 0


def test_request_tracer_passes_the_decision_on(captured: Captured) -> None:
    """finish(keep=...) decides the trace and marks the weight and the reason on the span."""
    pipeline = Pipeline()
    tracer = RequestTracer(pipeline.provider, captured.sentinel.scrubber, pipeline.tail)
    for keep in (False, True):
        span, token, parent_sampled = tracer.start_request({"type": "http"}, request_context())
        assert parent_sampled is False
        pipeline.child(span).end()
        tracer.finish(
            span, token, request_context(), 200, None, keep=keep, sample_rate=8, reason="sampled"
        )
    [server, child] = sorted(pipeline.exporter.get_finished_spans(), key=lambda s: s.name)
    assert server.name == "GET /" and child.name == "db"
    assert child.context.trace_id == server.context.trace_id
    attributes = dict(server.attributes or {})
    assert attributes["sentinel.sample_rate"] == 8
    assert attributes["sentinel.keep_reason"] == "sampled"
    assert trace.get_current_span() is trace.INVALID_SPAN  # context detached


def test_a_sampled_caller_is_reported() -> None:
    """start_request says whether the incoming W3C parent is sampled (flags 01)."""
    pipeline = Pipeline()
    tracer = RequestTracer(pipeline.provider, Scrubber(), pipeline.tail)
    for flags, expected in (("01", True), ("00", False)):
        traceparent = f"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}".encode()
        scope = {"type": "http", "headers": [(b"traceparent", traceparent)]}
        span, token, parent_sampled = tracer.start_request(scope, request_context())
        assert parent_sampled is expected
        assert span.get_span_context().trace_flags.sampled  # recorded either way
        tracer.finish(span, token, request_context(), 200, None, keep=False)
    assert pipeline.exported() == []


def test_a_caller_that_samples_at_its_tail_is_no_request_to_keep() -> None:
    """A sentinel's server span says "sampled" (its spans must be recorded until it
    decides) with ``sentinel=tail`` in its trace state, which it passes on: a sentinel
    downstream does not take that flag for the caller keeping the trace. Another entry of
    the caller's trace state is kept."""
    from opentelemetry import propagate

    from sentinel._deferred_span import PresetIdGenerator

    pipeline = Pipeline()
    provider = TracerProvider(sampler=ALWAYS_ON, id_generator=PresetIdGenerator())
    provider.add_span_processor(pipeline.tail)
    tracer = RequestTracer(provider, Scrubber(), pipeline.tail)  # deferred server spans
    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    scope = {"type": "http", "headers": [(b"traceparent", traceparent), (b"tracestate", b"a=1")]}
    span, token, parent_sampled = tracer.start_request(scope, request_context())
    outgoing: dict[str, str] = {}
    propagate.inject(outgoing)  # what a call the app makes now carries
    tracer.finish(span, token, request_context(), 200, None, keep=False)
    assert parent_sampled is False
    assert outgoing["traceparent"].endswith("-01")
    assert outgoing["tracestate"] == "sentinel=tail,a=1"
    downstream = {
        "type": "http",
        "headers": [(k.encode(), v.encode()) for k, v in outgoing.items()],
    }
    span, token, parent_sampled = tracer.start_request(downstream, request_context())
    tracer.finish(span, token, request_context(), 200, None, keep=False)
    assert parent_sampled is False


def test_trace_state_split_over_header_lines_is_read_whole() -> None:
    """W3C Trace Context combines tracestate lines: ``sentinel=tail`` on one line and a
    vendor's entry on the next is still a caller sampling at its tail (no request to keep
    the trace), and both entries go on; of two traceparent lines the first counts, as for
    OpenTelemetry's own propagator."""
    from opentelemetry import propagate

    pipeline = Pipeline()
    tracer = RequestTracer(pipeline.provider, Scrubber(), pipeline.tail)
    sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [
        (b"traceparent", sampled),
        (b"tracestate", b"sentinel=tail"),
        (b"tracestate", b"v=x"),
    ]
    span, token, parent_sampled = tracer.start_request(
        {"type": "http", "headers": headers}, request_context()
    )
    outgoing: dict[str, str] = {}
    propagate.inject(outgoing)
    tracer.finish(span, token, request_context(), 200, None, keep=False)
    assert parent_sampled is False
    assert outgoing["tracestate"] == "sentinel=tail,v=x"
    unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    headers = [(b"traceparent", unsampled), (b"traceparent", sampled)]
    span, token, parent_sampled = tracer.start_request(
        {"type": "http", "headers": headers}, request_context()
    )
    tracer.finish(span, token, request_context(), 200, None, keep=False)
    assert parent_sampled is False


class GatedExporter(SpanExporter):
    """An exporter whose exports wait for a gate, failing once told to."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.fail = False
        self.spans: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait(10)
        if self.fail:
            return SpanExportResult.FAILURE
        self.spans.extend(span.name for span in spans)
        return SpanExportResult.SUCCESS


def test_export_queue_is_bounded_counted_and_never_blocks() -> None:
    """A stuck exporter: spans beyond max_export_queue are refused at once and counted."""
    pipeline = Pipeline()
    gated = GatedExporter()
    counting = CountingExporter(gated, pipeline.metrics)
    batch = BoundedBatchProcessor(
        counting, pipeline.metrics, max_export_queue=10, schedule_delay_millis=10
    )
    tracer = TracerProvider(sampler=ALWAYS_ON)
    tracer.add_span_processor(batch)
    try:
        started = time.perf_counter()
        for index in range(50):
            tracer.get_tracer("test").start_span(f"span-{index}").end()
        assert time.perf_counter() - started < 1.0
        assert counting.outstanding == 10
        assert pipeline.dropped("export_queue_full") == 40
        gated.gate.set()
        tracer.force_flush()
        assert sorted(gated.spans) == sorted(f"span-{index}" for index in range(10))
        assert counting.outstanding == 0 and counting.exported == 10
        gated.fail = True
        tracer.get_tracer("test").start_span("lost").end()
        tracer.force_flush()
        assert pipeline.dropped("export_failed") == 1 and counting.failed == 1
        assert counting.outstanding == 0
    finally:
        gated.gate.set()
        tracer.shutdown()
    tracer.get_tracer("test").start_span("after").end()
    assert pipeline.dropped("export_shutdown") == 1


def test_lost_spans_are_announced_on_the_writer_by_reason_and_count() -> None:
    """Spans refused (queue full) and failed (export failed) are counted at once and written
    as one spans_dropped warning by the writer's thread: how many, by reason, and why; later
    losses wait for the interval (or the final flush), and none is announced twice."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    clock = FakeClock()
    gated = GatedExporter()
    config = Config(metrics_port=0, max_export_queue=5, drop_warning_interval_seconds=60)
    provider, tail = build_tracer_provider(
        config, metrics, gated, schedule_delay_millis=10, clock=clock
    )
    stream = io.StringIO()
    emitter = Emitter(service="svc", location="fra", metrics=metrics, stream=stream)
    writer = Writer(emitter, metrics, queue_size=10, drop_warning_interval_seconds=60)
    writer.add_summaries(tail.drops.due, "tracing")

    def warnings() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [line for line in lines if line["event"] == "spans_dropped"]

    tracer = provider.get_tracer("test")
    try:
        for index in range(12):  # the exporter is stuck: 5 admitted, 7 refused
            tracer.start_span(f"span-{index}").end()
        gated.fail = True
        gated.gate.set()
        assert provider.force_flush()  # the 5 admitted fail
        writer.flush()
        [first] = warnings()
        assert first["level"] == "warning"
        assert first["dropped"] == {"export_queue_full": 7, "export_failed": 5}
        assert first["spans"] == 12
        assert "dropped 12 spans" in str(first["message"])
        assert "collector" in str(first["message"])
        tracer.start_span("later").end()
        assert provider.force_flush()
        writer.flush()
        assert len(warnings()) == 1  # within the interval: counted, announced later
        clock.now += 61
        writer.flush()
        assert warnings()[-1]["dropped"] == {"export_failed": 1}
        tracer.start_span("last").end()
        assert provider.force_flush()
        writer.flush(everything=True)  # a final flush says what is left, interval or not
        assert [w["dropped"] for w in warnings()] == [
            {"export_queue_full": 7, "export_failed": 5},
            {"export_failed": 1},
            {"export_failed": 1},
        ]
    finally:
        gated.gate.set()
        writer.close()
        provider.shutdown()
    counted = {
        reason: registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
        for reason in ("export_queue_full", "export_failed")
    }
    assert counted == {"export_queue_full": 7, "export_failed": 7}


def test_built_provider_records_every_request_and_names_the_service() -> None:
    """ALWAYS_ON (the decision comes later), the service, its release and its deployment
    environment on the resource, tail in front."""
    exporter = InMemorySpanExporter()
    registry = CollectorRegistry()
    config = Config(service="shop", version="1.2.3", environment="staging", metrics_port=0)
    provider, tail = build_tracer_provider(
        config, Metrics(registry), exporter, schedule_delay_millis=10
    )
    try:
        tracer = RequestTracer(provider, Scrubber(), tail)
        unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        scope = {"type": "http", "headers": [(b"traceparent", unsampled)]}
        span, token, _ = tracer.start_request(scope, request_context())
        assert span.is_recording()
        tracer.finish(span, token, request_context(), 503, None, keep=True)
        provider.force_flush()
        [exported] = exporter.get_finished_spans()
        assert exported.resource.attributes["service.name"] == "shop"
        assert exported.resource.attributes["service.version"] == "1.2.3"
        assert exported.resource.attributes["deployment.environment"] == "staging"
        assert (exported.attributes or {})["error.type"] == "503"
    finally:
        provider.shutdown()


def test_sentinel_environment_wins_over_the_resource_variable_on_the_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SENTINEL_ENVIRONMENT is the spans' deployment.environment even when
    OTEL_RESOURCE_ATTRIBUTES names another; without it, the resource variable's is used."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=qa,team=core")
    for environ, expected in (
        ({"SENTINEL_ENVIRONMENT": "production"}, "production"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=qa"}, "qa"),
    ):
        config = Config.from_env(environ, metrics_port=0)
        exporter = InMemorySpanExporter()
        provider, tail = build_tracer_provider(
            config, Metrics(CollectorRegistry()), exporter, schedule_delay_millis=10
        )
        try:
            tracer = RequestTracer(provider, Scrubber(), tail)
            span, token, _ = tracer.start_request({"type": "http"}, request_context())
            tracer.finish(span, token, request_context(), 200, None, keep=True)
            provider.force_flush()
            [exported] = exporter.get_finished_spans()
        finally:
            provider.shutdown()
        assert exported.resource.attributes["deployment.environment"] == expected
        assert exported.resource.attributes["team"] == "core"


def test_exception_event_carries_the_reports_fingerprint(captured: Captured) -> None:
    """The span's exception event and the report share the fingerprint, to join them."""
    app, exporter = _traced_app(captured)
    with serve(app) as url:
        httpx.get(f"{url}/fail")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "GET /fail"]
    [event] = [event for event in span.events if event.name == "exception"]
    [report] = captured.reports
    assert (event.attributes or {})["exception.fingerprint"] == report["fingerprint"]


_TRACE_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


def _trace_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for name in _TRACE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_console_exporter_writes_kept_spans_to_the_stream_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_TRACES_EXPORTER=console exports with the SDK's ConsoleSpanExporter, to the
    ``console`` stream (stdout by default), instead of OTLP."""
    _trace_environment(monkeypatch, OTEL_TRACES_EXPORTER="console")
    out = io.StringIO()
    provider, tail = build_tracer_provider(
        Config(service="shop", metrics_port=0, traces=True),
        Metrics(CollectorRegistry()),
        schedule_delay_millis=10,
        console=out,
    )
    try:
        assert isinstance(tail.exporter, ConsoleSpanExporter)
        tracer = RequestTracer(provider, Scrubber(), tail)
        span, token, _ = tracer.start_request({"type": "http"}, request_context())
        tracer.finish(span, token, request_context(), 500, None, keep=True)
        assert provider.force_flush(5000)
    finally:
        provider.shutdown()
    exported = json.loads(out.getvalue())  # one span: one JSON document
    assert exported["attributes"]["http.response.status_code"] == 500
    assert exported["resource"]["attributes"]["service.name"] == "shop"


def test_otlp_and_console_together_fan_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """otlp,console exports every batch to both, with OTLP over the protocol chosen."""
    _trace_environment(
        monkeypatch, OTEL_TRACES_EXPORTER="otlp,console", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
    )
    provider, tail = build_tracer_provider(
        Config(metrics_port=0), Metrics(CollectorRegistry()), console=io.StringIO()
    )
    try:
        assert isinstance(tail.exporter, FanOutExporter)
        otlp, console = tail.exporter.exporters
        assert isinstance(otlp, GRPCSpanExporter)
        assert isinstance(console, ConsoleSpanExporter)
    finally:
        provider.shutdown()


class RaisingExporter(SpanExporter):
    """An exporter whose export raises."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector gone")


def test_fan_out_fails_the_export_if_any_exporter_fails() -> None:
    """Every exporter sees the batch; one failing or raising fails the export."""
    good, failing = InMemorySpanExporter(), GatedExporter()
    failing.fail = True
    failing.gate.set()
    span = TracerProvider().get_tracer("test").start_span("s")
    span.end()
    spans = [span]
    assert FanOutExporter([good]).export(spans) is SpanExportResult.SUCCESS  # type: ignore[arg-type]
    for other in (failing, RaisingExporter()):
        result = FanOutExporter([other, good]).export(spans)  # type: ignore[arg-type]
        assert result is SpanExportResult.FAILURE
    assert len(good.get_finished_spans()) == 3


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, HTTPSpanExporter),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, GRPCSpanExporter),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            HTTPSpanExporter,
        ),
        ({"OTEL_TRACES_EXPORTER": "none"}, HTTPSpanExporter),
    ],
)
def test_otlp_protocol_follows_the_otel_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: type
) -> None:
    """HTTP/protobuf by default, gRPC when asked, the traces variable first; with traces on by
    keyword, OTEL_TRACES_EXPORTER=none still gets OTLP (keyword arguments win)."""
    _trace_environment(monkeypatch, **variables)
    provider, tail = build_tracer_provider(
        Config(metrics_port=0, traces=True), Metrics(CollectorRegistry())
    )
    try:
        assert type(tail.exporter) is expected
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER must be otlp, console, both (otlp,console) or none (sentinel "
            "has no Zipkin exporter; send otlp to an OpenTelemetry Collector and use its "
            "zipkin exporter): 'zipkin'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf "
            "(the Python OTLP exporters have no http/json): 'http/json'",
        ),
    ],
)
def test_exporters_sentinel_cannot_build_are_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    """An exporter or protocol sentinel cannot export by is a ConfigError naming the
    variable, not a silent OTLP/HTTP exporter."""
    _trace_environment(monkeypatch, **variables)
    with pytest.raises(ConfigError) as error:
        build_tracer_provider(Config(metrics_port=0, traces=True), Metrics(CollectorRegistry()))
    assert str(error.value) == message


def test_the_exporter_is_shut_down_once() -> None:
    """close_tracer_provider shuts the exporter, then the provider's shutdown reaches it
    again: the real exporter sees one call (the SDK's exporters warn on a second one)."""
    from sentinel._tracing import build_tracer_provider, close_tracer_provider

    class CountsShutdowns(InMemorySpanExporter):
        calls = 0

        def shutdown(self) -> None:
            CountsShutdowns.calls += 1
            super().shutdown()

    metrics = Metrics(CollectorRegistry())
    provider, tail = build_tracer_provider(Config(metrics_port=0), metrics, CountsShutdowns())
    close_tracer_provider(provider, tail)
    assert CountsShutdowns.calls == 1


def test_the_span_carries_the_tenant() -> None:
    """A request's validated tenant is the span's sentinel.tenant attribute; a refused
    value puts none there."""
    from sentinel.testing import capture_reports

    with capture_reports(tenant_header="x-tenant") as captured:
        app, exporter = _traced_app(captured)
        with serve(app) as url:
            httpx.get(f"{url}/orders/7", headers={"x-tenant": "acme"})
            httpx.get(f"{url}/orders/8", headers={"x-tenant": "not a tenant"})
    first, second = exporter.get_finished_spans()
    assert dict(first.attributes or {})["sentinel.tenant"] == "acme"
    assert "sentinel.tenant" not in dict(second.attributes or {})


def test_own_pipeline_names_the_span_from_the_routers_match_as_it_ends() -> None:
    """With sentinel's own tail-sampled pipeline the span starts named by its method and
    takes its route as it ends, from the router's match in the scope: once the app's routes
    are known, no request path is matched against them, and an exported span has its full
    name."""
    from sentinel._routes import _Alternation
    from sentinel.testing import capture_reports

    exporter = InMemorySpanExporter()
    matched: list[str] = []
    original = _Alternation.first

    def counting_first(self: _Alternation, path: str) -> str | None:
        matched.append(path)
        return original(self, path)

    with capture_reports(span_exporter=exporter) as traced:
        routes = [Route("/orders/{order_id}", show)]
        app = instrument(Starlette(routes=routes), sentinel=traced.sentinel)
        _Alternation.first = counting_first  # type: ignore[method-assign]
        try:
            with serve(app) as url:
                for n in range(5):
                    assert httpx.get(f"{url}/orders/{n}", timeout=10).status_code == 200
        finally:
            _Alternation.first = original  # type: ignore[method-assign]
        traced.sentinel.flush(final=True)
    assert {span.name for span in exporter.get_finished_spans()} == {"GET /orders/{order_id}"}
    assert matched[1:] == []  # the first request is resolved up front, before routes are known


def test_the_apps_own_spans_leave_with_their_text_scrubbed() -> None:
    """The app's child span records an exception as the SDK does, its message in an event
    and in the status, and carries an attribute of its own: what leaves through sentinel's
    exporter is scrubbed like the server span (the message's secret masked), and spans with
    nothing to scrub leave as they are."""
    from sentinel.testing import capture_reports

    exporter = InMemorySpanExporter()

    async def pay(request: Request) -> Response:
        provider = request.app.state.provider
        with provider.get_tracer("app").start_as_current_span("db") as db:
            db.set_attribute("db.password", "hunter2-attr-q7")
            db.set_attribute("db.system", "postgresql")
            try:
                with provider.get_tracer("app").start_as_current_span("query"):
                    raise ConnectionError("db down password=hunter2-event-q7")
            except ConnectionError:
                pass
        raise RuntimeError("payment failed")

    with capture_reports(span_exporter=exporter) as traced:
        app = Starlette(routes=[Route("/pay", pay)])
        app.state.provider, _ = traced.sentinel.tracing
        with serve(instrument(app, sentinel=traced.sentinel)) as url:
            httpx.get(f"{url}/pay", timeout=10)
        traced.sentinel.flush(final=True)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"db", "query", "GET /pay"} <= set(spans)
    text = json.dumps([json.loads(span.to_json()) for span in spans.values()])
    assert "hunter2" not in text
    query = spans["query"]
    assert query.status.description and "[scrubbed len=" in query.status.description
    [event] = query.events
    assert event.attributes is not None
    assert str(event.attributes["exception.message"]).startswith("db down password=[scrubbed")
    assert spans["db"].attributes is not None
    assert spans["db"].attributes["db.system"] == "postgresql"


def _exported(handler: Any, path: str, **headers: str) -> list[ReadableSpan]:
    """The spans exported through sentinel's own pipeline (a real server) for one request
    to ``handler`` served at ``path``; the handler finds the provider on the app's state."""
    from sentinel.testing import capture_reports

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as traced:
        app = Starlette(routes=[Route(path, handler)])
        app.state.provider, _ = traced.sentinel.tracing
        with serve(instrument(app, sentinel=traced.sentinel)) as url:
            httpx.get(f"{url}{path}", headers=headers, timeout=10)
        traced.sentinel.flush(final=True)
    return list(exporter.get_finished_spans())


def test_an_app_span_that_calls_itself_sentinels_is_scrubbed_all_the_same() -> None:
    """sentinel's own server spans used to be passed unscrubbed when they carried
    ``sentinel.location``, which any span can set: the app's span that set it left with the
    exception message it recorded. Sentinel's spans are known by identity now."""

    async def pay(request: Request) -> Response:
        tracer = request.app.state.provider.get_tracer("app")
        with tracer.start_as_current_span("charge") as charge:
            charge.set_attribute("sentinel.location", "fra")
            charge.record_exception(ConnectionError("refused password=hunter2-loc-q7"))
        return PlainTextResponse("failed", status_code=502)

    spans = {span.name: span for span in _exported(pay, "/pay")}
    charge = spans["charge"]
    assert "hunter2" not in charge.to_json()
    [event] = charge.events
    assert str((event.attributes or {})["exception.message"]).startswith("refused password=[")


def test_app_span_names_and_link_attributes_are_scrubbed() -> None:
    """An app span named after the URL it calls, credentials and all, a link whose
    attribute has a secret name, and the URL as an attribute: the name is scrubbed by value,
    the link's attribute masked, the URL's credentials masked (all left as they were)."""

    async def call(request: Request) -> Response:
        tracer = request.app.state.provider.get_tracer("app")
        name = "GET https://svc:hunter2-name-q7@api.example/v1"
        with tracer.start_as_current_span(name) as span:
            span.add_link(span.get_span_context(), {"password": "hunter2-link-q7", "why": "retry"})
            span.set_attribute("url.full", "https://svc:hunter2-url-q7@api.example/v1")
            span.set_attribute("enduser.id", "alice@example.com")
        return PlainTextResponse("failed", status_code=502)

    spans = _exported(call, "/call")
    text = "".join(span.to_json() for span in spans)
    assert "hunter2" not in text
    [client] = [span for span in spans if span.kind is not SpanKind.SERVER]
    assert client.name.startswith("GET https://[scrubbed len=") and "@api.example/v1" in client.name
    [link] = client.links
    assert str((link.attributes or {})["password"]).startswith("[scrubbed len=")
    assert (link.attributes or {})["why"] == "retry"
    # Values under other names are scanned when they hold an "@": credentials in a URL.
    attributes = client.attributes or {}
    assert str(attributes["url.full"]).startswith("https://[scrubbed len=")
    assert attributes["enduser.id"] == "alice@example.com"


def test_a_message_the_sdk_cut_before_a_urls_at_shows_no_part_of_it() -> None:
    """The SDK cuts an event's text at the span limit (4096) when it is recorded, before the
    exporter scrubs it: a message padded so that the cut fell between a URL's password and
    its ``@`` left the password readable. The token at a cut is masked now."""
    upstream = "postgres://orders:hunter2-sdkcut-q7@db.internal:5432/orders"

    async def lookup(request: Request) -> Response:
        tracer = request.app.state.provider.get_tracer("app")
        before = "no sku "
        pad = "z" * (4096 - len(before) - len("postgres://orders:hunter2-sdkcut-q7"))
        with tracer.start_as_current_span("lookup") as span:
            span.record_exception(LookupError(f"{before}{pad}{upstream}"))
        return PlainTextResponse("failed", status_code=502)

    spans = {span.name: span for span in _exported(lookup, "/lookup")}
    [event] = spans["lookup"].events
    message = str((event.attributes or {})["exception.message"])
    assert "hunter2" not in message and "sdkcut-q7" not in message
    assert message.startswith("no sku ") and "[cut: [scrubbed len=" in message


def test_the_callers_baggage_is_not_passed_on() -> None:
    """Only the W3C trace context is taken from the caller: an instrumented client of the
    app used to send the caller's baggage on to every service it called, an API key in it
    included. The trace context still goes on (the trace is the caller's)."""
    from opentelemetry import propagate

    sent: dict[str, str] = {}

    async def call(request: Request) -> Response:
        propagate.inject(sent)  # what an instrumented HTTP client sends downstream
        return PlainTextResponse("ok")

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    _exported(
        call,
        "/call",
        traceparent=f"00-{trace_id}-b7ad6b7169203331-01",
        baggage="user=alice,api_key=hunter2-baggage-q7",
    )
    assert "baggage" not in sent
    assert sent["traceparent"].startswith(f"00-{trace_id}-")


def test_the_resource_is_scrubbed_by_key_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """``OTEL_RESOURCE_ATTRIBUTES`` went onto every exported span as it was: a repository
    URL with its credentials, a build token. Scrubbed once, by key and by value; the
    service's own names stay whole (a release named by its commit is no key)."""
    commit = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "vcs.repository.url.full=https://ci:hunter2-res-q7@git.example/shop.git,"
        f"build.token=hunter2-tok-q7,team=core,service.version={commit}",
    )
    exporter = InMemorySpanExporter()
    config = Config.from_env(metrics_port=0)
    provider, tail = build_tracer_provider(
        config,
        Metrics(CollectorRegistry()),
        exporter,
        schedule_delay_millis=10,
        scrubber=Scrubber(),
    )
    try:
        tracer = RequestTracer(provider, Scrubber(), tail)
        span, token, _ = tracer.start_request({"type": "http"}, request_context())
        tracer.finish(span, token, request_context(), 200, None, keep=True)
        provider.force_flush()
        [exported] = exporter.get_finished_spans()
    finally:
        provider.shutdown()
    attributes = exported.resource.attributes
    assert "hunter2" not in json.dumps(dict(attributes))
    assert str(attributes["vcs.repository.url.full"]).startswith("https://[scrubbed len=")
    assert str(attributes["build.token"]).startswith("[scrubbed len=")
    assert attributes["team"] == "core"
    assert attributes["service.version"] == commit


def test_the_traces_unavailable_warning_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OTLP variable the exporter cannot use costs the traces, with a warning that quotes
    the exporter's error, and the error quotes the value: scrubbed, it keeps the rest."""
    from sentinel import Sentinel

    for name, value in {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "token=hunter2-timeout-q7",
    }.items():
        monkeypatch.setenv(name, value)
    stream = io.StringIO()
    sentinel = Sentinel(
        Config.from_env(metrics_port=0), registry=CollectorRegistry(), stream=stream
    )
    try:
        assert sentinel.tracing == (None, None)
    finally:
        sentinel.close()
        sentinel.wait_closed()
    [warning] = [
        json.loads(line) for line in stream.getvalue().splitlines() if "traces_unavailable" in line
    ]
    assert "hunter2" not in warning["error"]
    assert warning["error"].startswith("ValueError: could not convert string to float: 'token=[")


def test_own_pipeline_spans_follow_the_http_semantic_conventions() -> None:
    """With sentinel's own pipeline: the user agent (scrubbed as a header is, and cut), the
    query (scrubbed), the client's port and the protocol version are on the span; a request
    no route matched is named by its method alone, with no ``http.route``; and a request
    that ended with an exception has it as its ``error.type`` below 500 too (a response
    that failed after its 200 started, a websocket handler that failed after accepting)."""
    from starlette.responses import StreamingResponse
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from sentinel.testing import capture_reports

    async def stream_fails(request: Request) -> Response:
        async def chunks() -> Any:
            yield b"first\n"
            raise OrderFailed("mid-stream")

        return StreamingResponse(chunks())

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise OrderFailed("websocket handler failed")

    exporter = InMemorySpanExporter()
    secret_agent = "probe/1.0 token=sk_live_abcdefghijklmnop1234"
    long_agent = " ".join(["Mozilla/5.0"] * 400)
    with capture_reports(span_exporter=exporter, keep_header="x-debug") as traced:
        routes = [
            Route("/orders/{order_id}", show),
            Route("/stream", stream_fails),
            WebSocketRoute("/ws", echo),
        ]
        app = instrument(Starlette(routes=routes), sentinel=traced.sentinel)
        with serve(app) as url, httpx.Client(base_url=url, headers={"x-debug": "1"}) as client:
            agent = {"user-agent": secret_agent}
            assert client.get("/orders/7?q=1&password=hunter2", headers=agent).status_code == 200
            assert client.get("/nowhere", headers={"user-agent": long_agent}).status_code == 404
            with pytest.raises(httpx.HTTPError):
                client.get("/stream")
            with connect(url.replace("http://", "ws://") + "/ws") as ws:
                ws.send("hello")
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=5)
        traced.flush()
        traced.sentinel.flush(final=True)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"GET /orders/{order_id}", "GET", "GET /stream", "GET /ws"}
    order = dict(spans["GET /orders/{order_id}"].attributes or {})
    assert str(order["url.query"]).startswith("q=1&password=[scrubbed len=7 ")
    assert str(order["user_agent.original"]).startswith("probe/1.0 token=[scrubbed len=28 ")
    assert "hunter2" not in json.dumps(order) and "sk_live" not in json.dumps(order)
    assert order["network.protocol.version"] == "1.1"
    assert type(order["client.port"]) is int and order["client.port"] > 0
    assert "error.type" not in order
    unmatched = dict(spans["GET"].attributes or {})
    assert "http.route" not in unmatched
    assert unmatched["sentinel.route"] == "<unmatched>"  # the metrics' label, for links
    assert "sentinel.route" not in order
    assert unmatched["http.response.status_code"] == 404
    assert "url.query" not in unmatched  # none was sent
    user_agent = str(unmatched["user_agent.original"])
    from sentinel._tracing import MAX_USER_AGENT_CHARS

    assert user_agent.startswith("Mozilla/5.0 Mozilla/5.0 ")
    assert len(user_agent) <= MAX_USER_AGENT_CHARS + 3
    for name in ("GET /stream", "GET /ws"):
        failed = spans[name]
        attributes = dict(failed.attributes or {})
        assert failed.status.status_code is StatusCode.ERROR, name
        assert attributes["http.response.status_code"] < 500, (name, attributes)
        assert attributes["error.type"] == "OrderFailed", name


def test_flushing_and_closing_sentinels_pipeline_are_bounded_against_a_hanging_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDK's batch processor exports every queued batch on force_flush, each waiting out
    the exporter's timeout against a collector that hangs, whatever the flush's own timeout.
    Through sentinel's pipeline a flush returns at its timeout (False), leaving the exports
    to go on (nothing is counted lost yet); close_tracer_provider gives up at its own and
    counts every span left exactly once, also after the stuck exports return."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from test_otlp import collector

    from sentinel._tracing import close_tracer_provider

    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10")
    registry = CollectorRegistry()

    def dropped(reason: str) -> float:
        value = registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
        return 0.0 if value is None else value

    with collector("hanging") as (endpoint, _):
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)
        provider, tail = build_tracer_provider(
            Config(metrics_port=0), Metrics(registry), exporter, schedule_delay_millis=10
        )
        tracer = provider.get_tracer("job")
        for index in range(40):  # outside requests: straight to the batch processor
            tracer.start_span(f"step-{index}").end()
        started = time.monotonic()
        assert provider.force_flush(timeout_millis=500) is False
        flushed = time.monotonic() - started
        assert dropped("export_failed") == 0  # its exports go on
        started = time.monotonic()
        close_tracer_provider(provider, tail, timeout=1.0)
        closed = time.monotonic() - started
        assert dropped("export_failed") == 40
    assert tail.batch is not None
    counting = tail.batch.exporter
    assert wait_for(lambda: counting.outstanding == 0, 30)  # the stuck exports returned
    assert dropped("export_failed") == 40 and counting.failed == 40 and counting.exported == 0
    assert flushed < 5 and closed < 5, (flushed, closed)
    tracer.start_span("after").end()
    assert dropped("export_shutdown") == 1

"""The deferred server span: an SDK span only for the traces that leave the process, with
the ids, the start time and everything done to it while the request ran."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import instrument
from sentinel._deferred_span import DeferredServerSpan, PresetIdGenerator
from sentinel.testing import capture_reports, serve


class Started(SpanProcessor):
    """Counts the SDK spans started, by kind."""

    def __init__(self) -> None:
        self.kinds: list[SpanKind] = []

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.kinds.append(span.kind)


class QuotaExceeded(Exception):
    """The app's failure."""


def _app(provider: TracerProvider) -> Starlette:
    tracer = provider.get_tracer("app")

    async def order(request: Request) -> Response:
        current = trace.get_current_span()
        current.set_attribute("app.plan", "gold")
        current.add_event("cache miss", {"app.key": "order"})
        with tracer.start_as_current_span("db query"):
            pass
        if request.path_params["order_id"] == "fail":
            raise QuotaExceeded("over quota")
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/orders/{order_id}", order)])


def _served(paths: list[str], **headers: str) -> tuple[list[ReadableSpan], Started]:
    exporter = InMemorySpanExporter()
    started = Started()
    with capture_reports(span_exporter=exporter) as traced:
        provider, _ = traced.sentinel.tracing
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(started)
        app = instrument(_app(provider), sentinel=traced.sentinel)
        with serve(app) as url:
            for path in paths:
                httpx.get(f"{url}{path}", headers=headers, timeout=10)
        traced.sentinel.flush(final=True)
    return list(exporter.get_finished_spans()), started


def test_a_kept_request_exports_its_server_span_with_what_the_app_did_to_it() -> None:
    """The first request of a route is kept: its server span is exported with its route
    name, the attribute and event the app put on the current span, and the app's child span
    under it (same trace, its parent the server span's id)."""
    spans, _ = _served(["/orders/1"])
    [server] = [span for span in spans if span.kind is SpanKind.SERVER]
    [child] = [span for span in spans if span.name == "db query"]
    assert server.name == "GET /orders/{order_id}"
    assert server.attributes is not None and server.attributes["app.plan"] == "gold"
    assert server.attributes["http.response.status_code"] == 200
    assert [event.name for event in server.events] == ["cache miss"]
    assert server.context is not None and child.context is not None and child.parent is not None
    assert child.context.trace_id == server.context.trace_id
    assert child.parent.span_id == server.context.span_id
    assert server.start_time is not None and child.start_time is not None
    assert server.start_time <= child.start_time  # the request's start, not the build's


def test_a_failed_request_carries_the_reports_exception_event_and_an_error_status() -> None:
    """What the reporter notes on the current span while the request fails is on the
    exported span: the scrubbed exception event, and the error status."""
    spans, _ = _served(["/orders/fail"])
    [server] = [span for span in spans if span.kind is SpanKind.SERVER]
    assert [event.name for event in server.events] == ["cache miss", "exception"]
    exception = server.events[1].attributes
    assert exception is not None and exception["exception.type"].endswith("QuotaExceeded")
    assert server.status.status_code is StatusCode.ERROR


def test_dropped_requests_start_no_sdk_span() -> None:
    """Of 40 requests of one route most are dropped by the sampler: only the kept ones were
    ever SDK spans (the children are spans of the app's own, started either way)."""
    spans, started = _served(["/orders/1"] * 40)
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert 0 < len(servers) < 40
    assert started.kinds.count(SpanKind.SERVER) == len(servers)
    assert started.kinds.count(SpanKind.INTERNAL) == 40


def test_a_request_with_no_caller_exports_a_root_span() -> None:
    """No traceparent (most requests): the exported server span has no parent. It used to
    name itself, taken from the current context, where the deferred span still was."""
    spans, _ = _served(["/orders/1", "/orders/fail"])
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert len(servers) == 2
    assert all(server.parent is None for server in servers)


def test_an_incoming_parent_is_the_exported_spans_parent() -> None:
    """A W3C traceparent: the exported server span is in the caller's trace, under the
    caller's span, and the app's child under the server span."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    spans, _ = _served(["/orders/1"], traceparent=f"00-{trace_id}-{parent_id}-01")
    [server] = [span for span in spans if span.kind is SpanKind.SERVER]
    [child] = [span for span in spans if span.name == "db query"]
    assert server.context is not None and server.parent is not None
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent_id
    assert child.parent is not None and child.parent.span_id == server.context.span_id


def test_a_deferred_span_has_the_ids_and_flags_its_sdk_span_gets() -> None:
    """Built as a root, the SDK span takes the deferred span's trace id, span id and flags
    (not its trace state: the pending decision it announced is made by then); after it,
    operations on the deferred span are ignored."""
    ids = PresetIdGenerator()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    deferred = DeferredServerSpan("GET", None, ids)
    deferred.set_attribute("before", 1)
    built = deferred.finish(provider.get_tracer("t"), ids, {"after": 2}, None, name="GET /")
    made, announced = built.get_span_context(), deferred.get_span_context()
    assert (made.trace_id, made.span_id, made.trace_flags) == (
        announced.trace_id,
        announced.span_id,
        announced.trace_flags,
    )
    assert announced.trace_state.get("sentinel") == "tail" and not made.trace_state
    deferred.set_attribute("too late", 3)
    assert not deferred.is_recording()
    [span] = exporter.get_finished_spans()
    assert dict(span.attributes or {}) == {"before": 1, "after": 2}


def test_a_preset_is_taken_once_and_by_its_own_thread() -> None:
    """The preset ids go to the next span the presetting thread starts, and to no other."""
    ids = PresetIdGenerator()
    ids.preset(7, 9)
    other: list[Any] = []
    thread = threading.Thread(target=lambda: other.append(ids.generate_span_id()))
    thread.start()
    thread.join()
    assert other[0] != 9
    assert (ids.generate_trace_id(), ids.generate_span_id()) == (7, 9)
    assert ids.generate_span_id() != 9


def test_links_exceptions_and_status_recorded_before_the_build_are_on_the_sdk_span() -> None:
    """What the OpenTelemetry API lets code do to the current span arrives on the SDK span:
    a link, an exception recorded as an event with its type, a status with its description
    (sentinel's own status, given to the build, comes after it)."""
    ids = PresetIdGenerator()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    other = trace.SpanContext(1, 2, is_remote=True)
    deferred = DeferredServerSpan("GET", None, ids)
    deferred.add_link(other, {"why": "batch"})
    deferred.record_exception(QuotaExceeded("over quota"))
    deferred.set_status(StatusCode.ERROR, "quota")
    deferred.end()  # the app's end is a no-op: the middleware builds and ends it
    assert deferred.is_recording()
    deferred.finish(provider.get_tracer("t"), ids, {}, None)
    [span] = exporter.get_finished_spans()
    assert [(link.context, dict(link.attributes or {})) for link in span.links] == [
        (other, {"why": "batch"})
    ]
    [event] = span.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "QuotaExceeded"
    assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, "quota")


def test_what_a_deferred_span_records_is_bounded() -> None:
    """An app that sets attributes or adds events in a loop holds at most MAX_RECORDED of
    each, the newest, until the SDK span's own limits apply."""
    from sentinel._deferred_span import MAX_RECORDED

    ids = PresetIdGenerator()
    deferred = DeferredServerSpan("GET", None, ids)
    for index in range(MAX_RECORDED + 50):
        deferred.set_attribute(f"key{index}", index)
        deferred.add_event(f"event{index}")
    assert len(deferred._attributes or {}) == MAX_RECORDED
    assert "key0" not in (deferred._attributes or {})
    assert len(deferred._events or ()) == MAX_RECORDED
    assert (deferred._events or [("",)])[-1][0] == f"event{MAX_RECORDED + 49}"


CANARY = "hunter2-span-q7"


def _writes_on_the_server_span(request: Request) -> Response:
    """What an app writes on the current span with the OpenTelemetry API, secrets in each."""
    current = trace.get_current_span()
    current.set_attribute("db.password", f"attr-{CANARY}")
    current.set_attribute("app.plan", "gold")
    current.add_event("login", {"password": f"event-{CANARY}", "note": f"Bearer ev2-{CANARY}"})
    try:
        raise ConnectionError(f"cannot reach postgres://app:recexc-{CANARY}@db:5432/app")
    except ConnectionError as error:
        current.record_exception(error)
    current.add_link(trace.SpanContext(1, 2, is_remote=True), {"password": f"link-{CANARY}"})
    current.set_status(trace.Status(StatusCode.ERROR, f"login failed for password={CANARY}"))
    return PlainTextResponse("no", status_code=int(request.path_params["status"]))


def test_what_the_app_writes_on_the_server_span_leaves_scrubbed() -> None:
    """The app's attribute under a secret name, its event, its recorded exception (message
    and traceback), its link and its status on the current span were replayed onto the
    exported server span as they were given, and sentinel's exporter passed server spans
    through unscrubbed. Now each is scrubbed as the app's own spans are (through a real
    server, a 401 and a 503: the app's status is kept, and sentinel's error status set over
    it), and the rest stays readable."""
    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as traced:
        app = Starlette(routes=[Route("/login/{status}", _writes_on_the_server_span)])
        with serve(instrument(app, sentinel=traced.sentinel)) as url:
            for status in (401, 503):
                assert httpx.get(f"{url}/login/{status}", timeout=10).status_code == status
        traced.sentinel.flush(final=True)
    servers = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    assert len(servers) == 2
    for server in servers:
        assert CANARY not in server.to_json() and "hunter2" not in server.to_json()
        attributes = server.attributes or {}
        assert str(attributes["db.password"]).startswith("[scrubbed len=")
        assert attributes["app.plan"] == "gold"
        login, exception = server.events[:2]
        assert login.name == "login" and exception.name == "exception"
        assert str((login.attributes or {})["note"]).startswith("Bearer [scrubbed len=")
        recorded = exception.attributes or {}
        assert recorded["exception.type"] == "ConnectionError"
        assert str(recorded["exception.message"]).startswith("cannot reach postgres://[scrubbed")
        assert "Traceback (most recent call last)" in str(recorded["exception.stacktrace"])
        [link] = server.links
        assert str((link.attributes or {})["password"]).startswith("[scrubbed len=")
    [unauthorized] = [
        span for span in servers if (span.attributes or {})["http.response.status_code"] == 401
    ]
    assert unauthorized.status.status_code is StatusCode.ERROR
    assert str(unauthorized.status.description).startswith("login failed for password=[scrub")


def test_scrubbed_server_spans_are_known_by_their_context_and_bounded() -> None:
    """The exporter passes a server span built scrubbed as it is, knowing it by its span
    context object (an equal context from elsewhere is not it), once; the registry forgets
    the oldest past its bound."""
    from sentinel._deferred_span import ScrubbedSpans

    spans = ScrubbedSpans(limit=2)
    built = trace.SpanContext(1, 10, is_remote=False)
    spans.add(built)
    assert not spans.take(trace.SpanContext(1, 10, is_remote=False))  # equal, not the same
    assert spans.take(built)
    assert not spans.take(built)  # taken once
    contexts = [trace.SpanContext(1, span_id, is_remote=False) for span_id in (11, 12, 13)]
    for context in contexts:
        spans.add(context)
    assert [spans.take(context) for context in contexts] == [False, True, True]


def test_exported_spans_carry_no_pending_decision_in_their_trace_state() -> None:
    """While the request runs its trace says ``sentinel=tail`` (its decision is pending),
    and the app's child spans inherit that from the server span; what is exported has the
    decision made: no such entry on any span, the server span or the child, while the
    caller's own entries stay (also when the caller was a sentinel that had not decided)."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    for tracestate, kept in (("vendor=abc", {"vendor": "abc"}), ("sentinel=tail,a=1", {"a": "1"})):
        spans, _ = _served(
            ["/orders/1"], traceparent=f"00-{trace_id}-{parent_id}-01", tracestate=tracestate
        )
        assert {span.name for span in spans} == {"GET /orders/{order_id}", "db query"}
        for span in spans:
            assert span.context is not None
            assert dict(span.context.trace_state) == kept, (span.name, span.context.trace_state)
    spans, _ = _served(["/orders/1"])  # no caller
    assert [dict(span.context.trace_state) for span in spans if span.context] == [{}, {}]


def test_a_span_leaves_without_the_pending_decision_and_with_its_dropped_counts() -> None:
    """decided_span takes ``sentinel=tail`` out of a span's trace state and its links', and
    the span still says how much the SDK dropped from it; a span without it is the same."""
    from opentelemetry.sdk.trace import SpanLimits
    from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState

    from sentinel._tracing import decided_span

    pending = TraceState([("sentinel", "tail"), ("a", "1")])
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_attributes=1))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = SpanContext(7, 9, is_remote=False, trace_flags=TraceFlags(1), trace_state=pending)
    tracer = provider.get_tracer("app")
    link = Link(SpanContext(8, 10, is_remote=True, trace_state=pending), {"why": "batch"})
    with tracer.start_as_current_span(
        "child", context=trace.set_span_in_context(trace.NonRecordingSpan(parent)), links=[link]
    ) as child:
        child.set_attributes({"one": 1, "two": 2})
    with tracer.start_as_current_span("plain"):
        pass
    marked, plain = exporter.get_finished_spans()
    decided = decided_span(marked)
    assert decided.context is not None and dict(decided.context.trace_state) == {"a": "1"}
    assert [dict(link.context.trace_state) for link in decided.links] == [{"a": "1"}]
    assert [dict(link.attributes or {}) for link in decided.links] == [{"why": "batch"}]
    assert (decided.name, decided.parent, dict(decided.attributes or {})) == (
        "child",
        marked.parent,
        dict(marked.attributes or {}),
    )
    assert decided.dropped_attributes == marked.dropped_attributes == 1
    assert decided_span(plain) is plain

"""Traces over the real OTLP/HTTP exporter to a receiver on loopback: kept requests arrive
whole, dropped ones not at all, and a dead collector costs spans (each one counted), never
memory. Latency under exporter faults: test_export_faults.py and bench/export_faults.py."""

from __future__ import annotations

import gzip
import io
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
from helpers import answer_otlp_export, free_port, request_context, start_http_server
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import Config, instrument
from sentinel._metrics import Metrics
from sentinel._runtime import Sentinel, set_current
from sentinel._scrub import Scrubber
from sentinel._tracing import RequestTracer, build_tracer_provider
from sentinel.testing import Captured, serve

EXPORT_TIMEOUT_SECONDS = 1
SCHEDULE_DELAY_MILLIS = 50


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class ReceivedSpan:
    """One span as the collector saw it, decoded from the protobuf payload."""

    def __init__(self, resource: dict[str, Any], span: Any) -> None:
        self.resource = resource
        self.name: str = span.name
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_id = span.parent_span_id.hex()
        self.attributes = {item.key: _value(item.value) for item in span.attributes}


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps what it was sent."""

    def __init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer_otlp_export(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server, self._thread = start_http_server(Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def take(self, request: ExportTraceServiceRequest) -> None:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received.extend(ReceivedSpan(resource, span) for span in scope_spans.spans)
        with self._lock:
            self._spans.extend(received)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Received spans by trace id."""
        by_trace: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            by_trace.setdefault(span.trace_id, []).append(span)
        return by_trace

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class HangingCollector:
    """A loopback port that accepts connections and never answers."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._closing = threading.Event()
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1/traces"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        for connection in self._held:
            connection.close()
        self._listener.close()


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A running receiver, closed afterwards."""
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def collector(state: str) -> Iterator[tuple[str, Receiver | None]]:
    """The endpoint of a collector that is ``up``, ``refusing`` or ``hanging``, and the
    receiver when it is up."""
    if state == "up":
        with receiver() as up:
            yield up.endpoint, up
    elif state == "refusing":
        yield f"http://127.0.0.1:{free_port()}/v1/traces", None  # nobody listens there
    else:
        hanging = HangingCollector()
        try:
            yield hanging.endpoint, None
        finally:
            hanging.close()


def _exporter(endpoint: str) -> OTLPSpanExporter:
    return OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_SECONDS)


def _dropped(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("sentinel_reports_dropped_total", {"reason": reason})
    return 0.0 if value is None else value


class HandDriven:
    """build_tracer_provider + RequestTracer, driven as the middleware drives them."""

    def __init__(self, endpoint: str, **config: Any) -> None:
        self.registry = CollectorRegistry()
        config.setdefault("metrics_port", 0)
        self.provider, tail = build_tracer_provider(
            Config(service="shop", version="2.0", **config),
            Metrics(self.registry),
            _exporter(endpoint),
            schedule_delay_millis=SCHEDULE_DELAY_MILLIS,
        )
        self.tracer = RequestTracer(self.provider, Scrubber(), tail)
        self.app_tracer = self.provider.get_tracer("shop")
        self.spans = 0

    def request(self, keep: bool, status: int = 200) -> str:
        """One request with two child spans; its trace id."""
        span, token, _ = self.tracer.start_request({"type": "http"}, request_context())
        with (
            self.app_tracer.start_as_current_span("load"),
            self.app_tracer.start_as_current_span("query"),
        ):
            pass
        trace_id = format(span.get_span_context().trace_id, "032x")
        self.tracer.finish(
            span,
            token,
            request_context(),
            status,
            None,
            keep=keep,
            sample_rate=1 if keep else 0,
            reason="sampled",
        )
        if keep:
            self.spans += 3
        return trace_id

    def dropped(self, reason: str) -> float:
        return _dropped(self.registry, reason)


def _assert_complete(spans: list[ReceivedSpan]) -> ReceivedSpan:
    """A request's trace as the collector has it: server span, load, query; the server span."""
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == sorted(span.name for span in spans)  # each exactly once
    [server_name] = [name for name in by_name if name not in ("load", "query")]
    server = by_name[server_name]
    assert sorted(by_name) == sorted([server_name, "load", "query"])
    assert by_name["load"].parent_id == server.span_id
    assert by_name["query"].parent_id == by_name["load"].span_id
    return server


def test_kept_traces_arrive_complete_over_otlp() -> None:
    """Only kept requests' traces reach the collector, each with its children and service."""
    with receiver() as collector_up:
        driven = HandDriven(collector_up.endpoint)
        try:
            kept: set[str] = set()
            for index in range(30):
                keep = index % 3 == 0
                trace_id = driven.request(keep, status=500 if index % 4 == 0 else 200)
                if keep:
                    kept.add(trace_id)
            assert driven.provider.force_flush()
        finally:
            driven.provider.shutdown()
        traces = collector_up.traces()
    assert set(traces) == kept
    for spans in traces.values():
        server = _assert_complete(spans)
        assert server.resource["service.name"] == "shop"
        assert server.resource["service.version"] == "2.0"
        assert server.attributes["sentinel.sample_rate"] == 1
        assert server.attributes["sentinel.keep_reason"] == "sampled"
    assert driven.dropped("export_failed") == driven.dropped("export_queue_full") == 0


def test_a_dead_collector_costs_counted_spans_and_no_memory() -> None:
    """Collector refusing, then hanging: every span is either exported or counted as dropped,
    and with the exporter stuck, more requests hold no more memory than the export queue's
    bound. (That requests are not held up meanwhile is test_export_faults.py's, under real
    faults and load; the timing per state is measured by ``python -m bench.export_faults``.)"""
    requests = 500
    max_export_queue = 200
    for state in ("up", "refusing", "hanging"):
        with collector(state) as (endpoint, up):
            driven = HandDriven(endpoint, max_export_queue=max_export_queue)
            try:
                for _ in range(requests):
                    driven.request(keep=True)
                if state == "hanging":
                    # The worker is stuck on an export that will time out and the queue is
                    # full: more requests must not hold more memory.
                    tracemalloc.start()
                    try:
                        for _ in range(200):
                            driven.request(keep=True)
                        before = tracemalloc.get_traced_memory()[0]
                        spans_before = driven.spans
                        refused_before = driven.dropped("export_queue_full")
                        failed_before = driven.dropped("export_failed")
                        for _ in range(1000):
                            driven.request(keep=True)
                        growth = tracemalloc.get_traced_memory()[0] - before
                        # On a loaded machine stuck exports can time out inside this window
                        # and free room in the queue, which new spans then take: what is held
                        # changes but never exceeds the queue, and the refused cost nothing.
                        admitted = (driven.spans - spans_before) - (
                            driven.dropped("export_queue_full") - refused_before
                        )
                        freed = driven.dropped("export_failed") - failed_before
                    finally:
                        tracemalloc.stop()
                    assert admitted <= max_export_queue + freed, (admitted, freed)
                    # At most a queue of spans held anew, and one export's batch encoded and
                    # in flight; the 3,000 spans of these requests would hold several MB.
                    assert growth < 256 * 1024 + 2 * max_export_queue * 4096, (growth, admitted)
            finally:
                # Waits for the exports in flight (at most the exporter's timeout each).
                driven.provider.shutdown()
            failed = driven.dropped("export_failed")
            queue_full = driven.dropped("export_queue_full")
            if up is not None:
                assert failed == 0
                assert len(up.spans) + queue_full == driven.spans
            else:
                assert failed > 0 and queue_full > 0
                assert failed + queue_full == driven.spans
            assert driven.dropped("span_buffer_full") == driven.dropped("span_undecided") == 0


# -- end to end, through the middleware under uvicorn --------------------------------------


@contextmanager
def traced_sentinel(span_exporter: OTLPSpanExporter, **overrides: Any) -> Iterator[Captured]:
    """A fresh sentinel whose tail-sampled traces go to ``span_exporter``, for the block."""
    stream = io.StringIO()
    holder: list[Captured] = []
    config = Config(metrics_port=0, **overrides)
    sentinel = Sentinel(
        config,
        registry=CollectorRegistry(),
        stream=stream,
        sinks=(lambda record: holder[0].sink(record),),
        span_exporter=span_exporter,
    )
    holder.append(Captured(sentinel, stream))
    previous = set_current(sentinel)
    try:
        yield holder[0]
    finally:
        provider = _provider_of(sentinel)
        sentinel.close()
        set_current(previous)
        if provider is not None:
            provider.shutdown()


def _provider_of(sentinel: Sentinel) -> TracerProvider | None:
    provider = sentinel.tracing[0]
    assert provider is None or isinstance(provider, TracerProvider)
    return provider


def _app(provider: TracerProvider) -> Starlette:
    """Two routes whose handlers create child spans; /boom fails."""
    tracer = provider.get_tracer("shop")

    def work() -> None:
        with tracer.start_as_current_span("load"), tracer.start_as_current_span("query"):
            pass

    async def ok(request: Request) -> Response:
        work()
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        work()
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/ok", ok), Route("/boom", boom)])


def test_under_uvicorn_exactly_the_kept_requests_traces_arrive() -> None:
    """Two locations, 2xx and 5xx: the traces received are those of the request log lines,
    complete, with the same weight; every 5xx is among them, most busy 2xx are not."""
    plan = [("fra", "/ok")] * 40 + [("fra", "/boom")] * 6
    plan += [("syd", "/ok")] * 10 + [("syd", "/boom")] * 4
    with (
        receiver() as collector_up,
        traced_sentinel(
            _exporter(collector_up.endpoint), location_header="x-location", locations=("fra", "syd")
        ) as captured,
    ):
        provider = _provider_of(captured.sentinel)
        assert provider is not None
        app = instrument(_app(provider), sentinel=captured.sentinel)
        with serve(app) as url, httpx.Client(base_url=url) as client:
            for location, path in plan:
                # A new connection each: the server closes one after an app exception.
                client.get(path, headers={"x-location": location, "connection": "close"})
        captured.flush()
        records = captured.events("request")
        assert provider.force_flush()
        traces = collector_up.traces()
        assert _dropped(captured.registry, "export_failed") == 0
    assert {record["trace_id"] for record in records} == set(traces)
    assert len(records) == len(traces)
    for record in records:
        server = _assert_complete(traces[record["trace_id"]])
        assert server.name == f"GET {record['route']}"
        assert server.attributes["sentinel.location"] == record["location"]
        assert server.attributes["http.response.status_code"] == record["status"]
        assert server.attributes["sentinel.sample_rate"] == record["sample_rate"]
        assert server.attributes["sentinel.keep_reason"] == record["reason"]
    errors = [record for record in records if record["status"] == 500]
    assert len(errors) == 10  # every 5xx, in both locations
    busy = [r for r in records if r["location"] == "fra" and r["status"] == 200]
    assert 0 < len(busy) < 40  # the busy 2xx key is sampled


def test_under_uvicorn_a_dead_collector_costs_counted_spans() -> None:
    """With the collector up, refusing or hanging, every request is answered and the drop
    counters account for every span of every kept request."""
    for state in ("up", "refusing", "hanging"):
        with (
            collector(state) as (endpoint, up),
            traced_sentinel(
                _exporter(endpoint), keep_header="x-debug", max_export_queue=30
            ) as captured,
        ):
            provider = _provider_of(captured.sentinel)
            assert provider is not None
            app = instrument(_app(provider), sentinel=captured.sentinel)
            with serve(app) as url, httpx.Client(base_url=url) as client:
                statuses = {
                    client.get("/ok", headers={"x-debug": "1"}).status_code for _ in range(101)
                }
            captured.flush()
            kept_spans = 3 * len(captured.events("request"))
            provider.shutdown()  # waits for the exports in flight
            failed = _dropped(captured.registry, "export_failed")
            queue_full = _dropped(captured.registry, "export_queue_full")
            received = len(up.spans) if up is not None else 0
        assert statuses == {200}
        assert kept_spans == 3 * 101  # all forced by the header
        assert received + failed + queue_full == kept_spans, (state, failed, queue_full)
        if up is None:
            assert failed > 0

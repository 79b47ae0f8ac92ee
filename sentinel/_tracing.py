"""OpenTelemetry: one server span per request, and the tail decision that keeps or drops it.

A request's spans are recorded while it runs and held back until the sampler has seen its
status; then the whole trace is exported or dropped. Every stage between a span's end and
the collector is bounded, and every span it gives up is counted in
``sentinel_reports_dropped_total`` by reason:

``span_buffer_full``
    spans of a kept request that did not fit in the buffer of pending traces;
``span_undecided``
    spans of a request whose decision never came (its task was abandoned);
``export_queue_full``
    spans refused because the exporter is that far behind (collector slow or down);
``export_failed``
    spans in an export the collector did not accept (refused, timed out, rejected), and those
    a final flush or a shutdown gave up on at its deadline (still queued, or in an export
    that had not returned: they are never sent after);
``export_shutdown``
    spans that ended after the tracer provider was shut down.

The counter says it at once; :class:`SpanDrops` also says it on stderr, as a ``spans_dropped``
warning (how many spans since the last one, by reason, and why) that sentinel's writer thread
writes at most once every ``drop_warning_interval_seconds``.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util import types

from ._config import Config, otlp_protocol, trace_exporters
from ._context import RequestContext, text_path
from ._deferred_span import (
    SCRUBBED,
    DeferredServerSpan,
    PresetIdGenerator,
    is_tail_pending,
    scrub_attributes,
    scrub_links,
    scrub_name,
    scrub_status,
    without_tail_pending,
)
from ._metrics import Metrics
from ._routes import UNMATCHED_ROUTE
from ._scrub import Scrubber, cut_scrubbed
from ._version import __version__
from ._vocabulary import DropReason
from .types import Scope

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Span, SpanLimits, TracerProvider

_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate"})
# The W3C trace context only: the caller's baggage is not taken in, so the app's instrumented
# clients do not send it on to the services it calls (a caller's baggage can hold a secret).
_TRACE_CONTEXT = TraceContextTextMapPropagator()
LOCATION_ATTRIBUTE = "sentinel.location"
KEEP_REASON_ATTRIBUTE = "sentinel.keep_reason"
"""Why an exported request's trace was kept (the sampler's rate, or a reason to keep it)."""
UNMATCHED_ROUTE_ATTRIBUTE = "sentinel.route"
"""Set (to ``<unmatched>``) only on a request no route matched, which has no ``http.route``:
the metrics' route label, so a dashboard's link finds its traces."""
TENANT_ATTRIBUTE = "sentinel.tenant"
"""The request's tenant (the customer's id, whether counted by name in the metrics or not)."""
"""Set at start on the server span RequestTracer opens: it marks the traces to hold back, and
the generated Collector configuration rate-limits per location on it."""

PENDING_TIMEOUT_SECONDS = 600.0
"""A held-back trace whose decision has not come after this long is given up (and counted)."""
DECISION_MEMORY = 8192
"""Dropped traces remembered, so that their spans ending after the decision are dropped too."""
MAX_ATTRIBUTE_LENGTH = 4096
"""Longest attribute value kept on a span unless the OTEL_*_VALUE_LENGTH_LIMIT variables say
otherwise: held-back spans are bounded in number, and this bounds what each one holds."""
_DEFAULT_EXPORT_BATCH_SIZE = 512
_WHY_DROPPED: dict[str, str] = {
    "span_buffer_full": "more spans of kept requests than the buffer of pending traces holds",
    "span_undecided": "requests whose keep/drop decision never came",
    "export_queue_full": "the exporter was that far behind (collector slow or down)",
    "export_failed": (
        "the collector did not accept an export (refused, timed out, rejected), or shutdown's "
        "deadline came first"
    ),
    "export_shutdown": "spans ended after tracing was shut down",
}


class SpanDrops:
    """Counts the spans the pipeline gives up, by reason, and announces them.

    :meth:`add` counts in ``sentinel_reports_dropped_total`` at once and is cheap enough for
    the request path; :meth:`due` (a summary source for sentinel's writer thread) gives the
    ``spans_dropped`` warning: the spans lost since the last warning, by reason, and why; at
    most one every ``interval_seconds`` (the first at once), and with ``everything`` (a final
    flush) whatever is pending.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._interval = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last_warning = -float("inf")
        _after_fork_in_child(self._forget_parent)

    def add(self, reason: DropReason, count: int = 1) -> None:
        """Count ``count`` spans lost for ``reason``; the warning comes later, off this thread."""
        self._metrics.dropped(reason, count)
        with self._lock:
            self._pending[reason] = self._pending.get(reason, 0) + count

    def due(self, everything: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """The ``(level, event, fields)`` of the warning now due, if any."""
        if not self._pending:
            return []
        now = self._clock()
        if not everything and now - self._last_warning < self._interval:
            return []
        with self._lock:
            dropped, self._pending = self._pending, {}
        if not dropped:
            return []
        self._last_warning = now
        total = sum(dropped.values())
        reasons = "; ".join(
            f"{count} {reason}: {_WHY_DROPPED.get(reason, reason)}"
            for reason, count in sorted(dropped.items())
        )
        message = (
            f"sentinel dropped {total} span{'s' if total != 1 else ''} ({reasons}); "
            "see sentinel_reports_dropped_total"
        )
        return [
            ("warning", "spans_dropped", {"dropped": dropped, "spans": total, "message": message})
        ]

    def _forget_parent(self) -> None:
        # The parent announces its own drops; the lock may be held by a thread the child lacks.
        self._lock = threading.Lock()
        self._pending = {}


class TailSamplingProcessor(SpanProcessor):
    """Holds back the spans of each request until the request's keep/drop decision.

    The traces held back are those whose server span RequestTracer started (kind SERVER,
    with ``sentinel.location``): their spans wait in a bounded buffer until
    :meth:`decide` is called (right before the server span ends), then go to
    ``downstream`` if kept and are discarded if not. Spans of the trace that end after the
    decision follow it. Any other trace (a background job, a span outside requests) passes
    straight through. Safe to call from any thread; it never blocks on I/O. Spans it loses
    go to ``drops``.
    """

    def __init__(
        self,
        downstream: SpanProcessor,
        metrics: Metrics,
        *,
        max_buffered_spans: int,
        max_spans_per_trace: int,
        clock: Callable[[], float] = time.monotonic,
        pending_timeout_seconds: float = PENDING_TIMEOUT_SECONDS,
        decision_memory: int = DECISION_MEMORY,
        drops: SpanDrops | None = None,
    ) -> None:
        self._downstream = downstream
        self._metrics = metrics
        self.drops = drops or SpanDrops(metrics, clock=clock)
        """Where the spans given up are counted and announced (shared by the whole pipeline
        when :func:`build_tracer_provider` builds it)."""
        self.exporter: SpanExporter | None = None
        """The real exporter at the end of the pipeline, when built by sentinel."""
        self.shutdown_exporter: Callable[[], None] | None = None
        """Shuts that exporter down, once however many times it is called."""
        self.batch: BoundedBatchProcessor | None = None
        """The batch processor in front of that exporter, when built by sentinel."""
        self._max_buffered = max_buffered_spans
        self._max_per_trace = max_spans_per_trace
        self._clock = clock
        self._timeout = pending_timeout_seconds
        self._sweep_interval = min(1.0, pending_timeout_seconds)
        self._decision_memory = decision_memory
        self._lock = threading.Lock()
        # Oldest first, so expiry looks only at the front.
        self._pending: OrderedDict[int, _PendingTrace] = OrderedDict()
        # Only drops need remembering: a late span of a kept trace, like one of a trace
        # never seen, simply passes through.
        self._dropped: OrderedDict[int, None] = OrderedDict()
        self._buffered = 0
        self._next_sweep = clock() + self._sweep_interval
        _after_fork_in_child(self._forget_parent)

    @property
    def buffered_spans(self) -> int:
        """Spans held back right now, waiting for their trace's decision."""
        return self._buffered

    @property
    def pending_traces(self) -> int:
        """Traces whose decision has not come yet."""
        return len(self._pending)

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        try:
            if span.kind is SpanKind.SERVER:
                attributes = span.attributes
                # A websocket (scheme ws/wss) can stay open for hours: its trace is kept
                # as it goes, never held back for a decision.
                if (
                    attributes
                    and LOCATION_ATTRIBUTE in attributes
                    and attributes.get("url.scheme") not in ("ws", "wss")
                ):
                    self._open(span.context.trace_id)
            self._downstream.on_start(span, parent_context)
        except Exception:
            self._metrics.internal_error("tracing")

    def _on_ending(self, span: Span) -> None:
        try:
            self._downstream._on_ending(span)
        except Exception:
            self._metrics.internal_error("tracing")

    def on_end(self, span: ReadableSpan) -> None:
        try:
            if self._hold(span):
                return
            self._downstream.on_end(span)
        except Exception:
            self._metrics.internal_error("tracing")

    def decide(self, trace_id: int, keep: bool) -> bool:
        """Keep (export) or drop the spans of ``trace_id``'s request, also those still to end;
        False when they are certain to be dropped (a span that is not exported needs no
        more attributes).

        Call once per server span, before ending it. When several requests of this process
        share one trace (a caller's trace id), the trace is kept if any of them is, and the
        decision is made when the last of them decides.
        """
        with self._lock:
            entry = self._pending.get(trace_id)
            if entry is None:
                if not keep:
                    self._remember_drop(trace_id)
                return keep
            entry.keep = entry.keep or keep
            entry.open_roots -= 1
            if entry.open_roots > 0:
                return True  # another request of the trace may still keep it
            del self._pending[trace_id]
            self._buffered -= len(entry.spans)
            if not entry.keep:
                self._remember_drop(trace_id)
                return False
        # Spans a dropped request could not buffer were never going to be exported; only
        # those of a kept one are lost.
        if entry.overflow:
            self.drops.add("span_buffer_full", entry.overflow)
        for span in entry.spans:
            try:
                self._downstream.on_end(span)
            except Exception:
                self._metrics.internal_error("tracing")
        return True

    def shutdown(self) -> None:
        with self._lock:
            lost = self._expire(float("inf"))
        if lost:
            self.drops.add("span_undecided", lost)
        self._downstream.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._downstream.force_flush(timeout_millis)

    def hold(self, trace_id: int) -> None:
        """Hold ``trace_id``'s spans back until :meth:`decide` (what :meth:`on_start` does for
        a server span that carries ``sentinel.location``)."""
        try:
            self._open(trace_id)
        except Exception:
            self._metrics.internal_error("tracing")

    def _open(self, trace_id: int) -> None:
        now = self._clock()
        lost = 0
        with self._lock:
            if now >= self._next_sweep:
                lost = self._expire(now - self._timeout)
                self._next_sweep = now + self._sweep_interval
            entry = self._pending.get(trace_id)
            if entry is None:
                self._pending[trace_id] = _PendingTrace(now)
                self._dropped.pop(trace_id, None)
            else:
                entry.open_roots += 1
                entry.opened = now
                self._pending.move_to_end(trace_id)
        if lost:
            self.drops.add("span_undecided", lost)

    def _hold(self, span: ReadableSpan) -> bool:
        """Buffer or discard ``span`` if its trace is held back or dropped; False to forward."""
        context = span.context
        if context is None:
            return False
        trace_id = context.trace_id
        lost = 0
        with self._lock:
            entry = self._pending.get(trace_id)
            if entry is None:
                return trace_id in self._dropped
            if self._buffered >= self._max_buffered:
                # Full: make room from traces whose decision is overdue, if there are any.
                lost = self._expire(self._clock() - self._timeout)
                entry = self._pending.get(trace_id)
            if entry is not None:
                if len(entry.spans) >= self._max_per_trace or self._buffered >= self._max_buffered:
                    entry.overflow += 1
                else:
                    entry.spans.append(span)
                    self._buffered += 1
        if lost:
            self.drops.add("span_undecided", lost)
        # An expired trace is no longer held back: its span goes on like any other.
        return entry is not None

    def _expire(self, opened_before: float) -> int:
        """Give up traces opened before ``opened_before``; the number of spans lost. Locked."""
        lost = 0
        while self._pending:
            trace_id, entry = next(iter(self._pending.items()))
            if entry.opened >= opened_before:
                break
            del self._pending[trace_id]
            self._buffered -= len(entry.spans)
            lost += len(entry.spans) + entry.overflow
            # Its late spans follow it out rather than leave as an orphan partial trace.
            self._remember_drop(trace_id)
        return lost

    def _forget_parent(self) -> None:
        # A forked child serves none of its parent's requests, and the lock may have been
        # held by a thread the child does not have.
        self._lock = threading.Lock()
        self._pending.clear()
        self._buffered = 0

    def _remember_drop(self, trace_id: int) -> None:
        dropped = self._dropped
        dropped[trace_id] = None
        dropped.move_to_end(trace_id)
        if len(dropped) > self._decision_memory:
            dropped.popitem(last=False)


class _PendingTrace:
    __slots__ = ("keep", "open_roots", "opened", "overflow", "spans")

    def __init__(self, opened: float) -> None:
        self.opened = opened
        self.open_roots = 1
        self.keep = False
        self.spans: list[ReadableSpan] = []
        self.overflow = 0


class CountingExporter(SpanExporter):
    """Wraps the real exporter: counts what it exported and what it lost, and what is in flight.

    ``outstanding`` is the number of spans admitted towards this exporter (by
    :class:`BoundedBatchProcessor`) whose export has not returned yet; spans of a failed
    export are counted as ``export_failed`` (in ``drops``). An exporter that raises counts as
    failed. :meth:`give_up` counts what is outstanding as lost at once (a final flush or a
    shutdown whose deadline passed) and makes sure it is never sent, nor counted again. What
    leaves has :data:`~sentinel._deferred_span.TAIL_PENDING` taken out of its trace state.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        metrics: Metrics,
        *,
        drops: SpanDrops | None = None,
        scrubber: Scrubber | None = None,
        max_attribute_length: int | None = None,
    ) -> None:
        self._exporter = exporter
        self._scrubber = scrubber
        self._max_attribute_length = max_attribute_length
        self._metrics = metrics
        self._drops = drops or SpanDrops(metrics)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._in_flight: dict[int, int] = {}
        """Spans in each export that has not returned, by export."""
        self._abandoned: dict[int, int] = {}
        """The same for exports given up on: counted already, their outcome ignored."""
        self._written_off = 0
        """Spans given up on while still queued: counted already, skipped when they come."""
        self._exports = itertools.count()
        self.exported = 0
        """Spans the real exporter accepted."""
        self.failed = 0
        """Spans in exports that failed, or given up on."""
        self._shut_down = False
        _after_fork_in_child(self._forget_parent)

    @property
    def exporter(self) -> SpanExporter:
        """The real exporter."""
        return self._exporter

    @property
    def outstanding(self) -> int:
        """Spans admitted and not yet returned from an export."""
        return self._outstanding

    @property
    def uncounted(self) -> int:
        """Spans admitted whose fate is not counted yet (:attr:`outstanding`, less those
        given up on)."""
        with self._lock:
            return self._uncounted()

    def _uncounted(self) -> int:
        return self._outstanding - self._written_off - sum(self._abandoned.values())

    def admit(self, limit: int) -> bool:
        """Count one more span in flight, unless ``limit`` spans already are."""
        with self._lock:
            if self._outstanding >= limit:
                return False
            self._outstanding += 1
            return True

    def give_up(self) -> int:
        """Count every span admitted and not counted yet as lost (``export_failed``), now:
        an export in flight is left to return (its outcome ignored), spans still queued are
        skipped when they reach :meth:`export`, never sent. How many were counted."""
        with self._lock:
            lost = max(0, self._uncounted())
            self._written_off += max(0, lost - sum(self._in_flight.values()))
            self._abandoned.update(self._in_flight)
            self._in_flight.clear()
        if lost:
            self.failed += lost
            self._drops.add("export_failed", lost)
        return lost

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            # Spans leave the queue oldest first: the first ones are those given up on.
            skipped = min(len(spans), self._written_off)
            if skipped:
                self._written_off -= skipped
                self._outstanding = max(0, self._outstanding - skipped)
                spans = spans[skipped:]
            if not spans:
                return SpanExportResult.FAILURE  # counted when given up on
            export = next(self._exports)
            self._in_flight[export] = count = len(spans)
        try:
            scrubber = self._scrubber
            if scrubber is not None:  # on the export thread, for the traces that leave
                cut_at = self._max_attribute_length
                spans = [scrubbed_span(span, scrubber, cut_at) for span in spans]
            spans = [decided_span(span) for span in spans]
            result = self._exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        finally:
            with self._lock:
                given_up = self._abandoned.pop(export, None) is not None
                self._in_flight.pop(export, None)
                self._outstanding = max(0, self._outstanding - count)
        if given_up:
            return result  # counted as lost when given up on
        if result is SpanExportResult.SUCCESS:
            self.exported += count
        else:
            self.failed += count
            self._drops.add("export_failed", count)
        return result

    def shutdown(self) -> None:
        # Once: close_tracer_provider shuts it before the provider's shutdown comes here
        # again, and the SDK's exporters log a warning for a second call.
        if self._shut_down:
            return
        self._shut_down = True
        self._exporter.shutdown()

    def _forget_parent(self) -> None:
        # The SDK's batch processor empties its queue in a forked child: the parent's spans
        # in flight never come back here.
        self._lock = threading.Lock()
        self._outstanding = self._written_off = 0
        self._in_flight = {}
        self._abandoned = {}

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def scrubbed_span(
    span: ReadableSpan, scrubber: Scrubber, max_attribute_length: int | None = None
) -> ReadableSpan:
    """``span`` as it may leave the process: the app's own spans carry what the app put
    there (the SDK records an exception's message and traceback on them as they are, in an
    event and in the status). Its name, its events (names and attributes, by key and by
    value), its status description: scrubbed; its attributes and its links' attributes under
    secret-looking names: masked. A text of ``max_attribute_length`` characters was cut by
    the SDK before it could be scrubbed: the token at its end is masked as well. The same
    span when nothing had to change.

    Attribute values under other names are scanned only when they hold an ``@`` (a URL's
    credentials, ``url.full``, a connection string): scanning each would cost the export
    thread a scrub per attribute, and slow its catching up after a collector outage.
    sentinel's own server spans, scrubbed as they were built (see :data:`SCRUBBED`), pass
    as they are: known by identity, never by an attribute a span could carry."""
    if SCRUBBED.take(span.context):
        return span
    attributes = scrub_attributes(
        span.attributes, scrubber, by_value=False, cut_at=max_attribute_length
    )
    events = [
        (
            event,
            scrub_name(event.name, scrubber),
            scrub_attributes(
                event.attributes, scrubber, by_value=True, cut_at=max_attribute_length
            ),
        )
        for event in span.events
    ]
    links = scrub_links(span.links, scrubber)
    status = scrub_status(span.status, scrubber)
    name = scrub_name(span.name, scrubber)
    unchanged = (
        attributes is None
        and links is None
        and name is span.name
        and all(scrubbed is None and new_name is event.name for event, new_name, scrubbed in events)
    )
    if unchanged and status is span.status:
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes if attributes is None else attributes,
        events=[
            event
            if scrubbed is None and new_name is event.name
            else Event(
                new_name,
                event.attributes if scrubbed is None else scrubbed,
                event.timestamp,
                limit=None,
            )
            for event, new_name, scrubbed in events
        ],
        links=span.links if links is None else links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def decided_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` as it leaves the process: its trace state, and its links', without
    :data:`~sentinel._deferred_span.TAIL_PENDING` (the app's spans inherit it from the server
    span while the decision is pending; once exported, it was made). The same span when it
    carries none (most links lists are empty: one look)."""
    context = span.context
    if context is None:
        return span
    decided = without_tail_pending(context)
    links = span.links
    if links and any(is_tail_pending(link.context.trace_state) for link in links):
        links = [Link(without_tail_pending(link.context), link.attributes) for link in links]
    elif decided is context:
        return span
    return _ExportedSpan(span, decided, links)


class _ExportedSpan(ReadableSpan):
    """A span rebuilt with another context and links, that still says how many attributes,
    events and links the SDK dropped from it."""

    def __init__(self, original: ReadableSpan, context: SpanContext, links: Sequence[Link]) -> None:
        super().__init__(
            name=original.name,
            context=context,
            parent=original.parent,
            resource=original.resource,
            attributes=original.attributes,
            events=original.events,
            links=links,
            kind=original.kind,
            status=original.status,
            start_time=original.start_time,
            end_time=original.end_time,
            instrumentation_scope=original.instrumentation_scope,
        )
        self._dropped = (
            original.dropped_attributes,
            original.dropped_events,
            original.dropped_links,
        )

    @property
    def dropped_attributes(self) -> int:
        return self._dropped[0]

    @property
    def dropped_events(self) -> int:
        return self._dropped[1]

    @property
    def dropped_links(self) -> int:
        return self._dropped[2]


_IDENTITY_ATTRIBUTES = frozenset(
    {
        "service.name",
        "service.namespace",
        "service.version",
        "service.instance.id",
        "deployment.environment",
        "deployment.environment.name",
    }
)
"""Resource attributes that name the service, as the metrics and records name it too: kept
whole unless shaped like a credential (a release named by a 40-hex-digit commit is no key)."""


def scrubbed_resource(resource: Resource, scrubber: Scrubber) -> Resource:
    """``resource`` with its attributes scrubbed by key and by value
    (``OTEL_RESOURCE_ATTRIBUTES`` and the detectors can put a repository URL with its
    credentials, a build token there); the attributes in :data:`_IDENTITY_ATTRIBUTES` are
    masked whole when they have a credential's shape, else kept. The same resource when
    nothing had to change. Once per tracer provider: every span carries it."""
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, types.AttributeValue] = {}
    changed = False
    for key, value in resource.attributes.items():
        new: types.AttributeValue = value
        if scrubber.is_secret_key(key):
            new = scrubber.mask(value if isinstance(value, str) else repr(value))
        elif isinstance(value, str):
            identity = key in _IDENTITY_ATTRIBUTES
            new = scrubber.identifier(value) if identity else scrubber.text(value)
        elif isinstance(value, Sequence) and any(isinstance(item, str) for item in value):
            new = [scrubber.text(item) if isinstance(item, str) else item for item in value]
            new = value if new == list(value) else new
        changed = changed or new != value
        attributes[key] = new
    return Resource(attributes, resource.schema_url) if changed else resource


class BoundedBatchProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, refusing (and counting) spans beyond ``max_export_queue``.

    The SDK's processor drops the oldest queued span when its queue is full and only logs
    it; here a span is refused before that can happen, counted as ``export_queue_full``,
    and the caller never waits: a slow or dead collector costs spans, never latency.

    Flushing and shutting down are bounded by their timeout: the SDK's ``force_flush``
    exports every queued batch whatever its timeout says, each waiting out the exporter's
    own timeout against a hanging collector. So they run on a thread of this processor's,
    and the caller stops waiting at the timeout; a final :meth:`flush` (``give_up``) and
    :meth:`close` then count what is still outstanding as lost (``export_failed``), never to
    be sent (see :meth:`CountingExporter.give_up`).
    """

    def __init__(
        self,
        exporter: CountingExporter,
        metrics: Metrics,
        *,
        max_export_queue: int,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        drops: SpanDrops | None = None,
    ) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._exporter = exporter
        self._metrics = metrics
        self._drops = drops or SpanDrops(metrics)
        self._max_export_queue = max_export_queue
        if max_export_batch_size is None:
            max_export_batch_size = _env_int(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _DEFAULT_EXPORT_BATCH_SIZE
            )
        # The SDK's queue can hold every admitted span, so it never drops one silently.
        self._batch: SpanProcessor = BatchSpanProcessor(
            exporter,
            max_queue_size=max_export_queue,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=max(1, min(max_export_batch_size, max_export_queue)),
        )
        self._shut_down = False
        self._runner = _Runner("sentinel-span-flush", metrics)

    @property
    def exporter(self) -> CountingExporter:
        """Where the batches go."""
        return self._exporter

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self._batch.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return  # not recorded for export (the SDK's processor would ignore it too)
        if self._shut_down:
            self._drops.add("export_shutdown")
        elif self._exporter.admit(self._max_export_queue):
            self._batch.on_end(span)
        else:
            self._drops.add("export_queue_full")

    def shutdown(self) -> None:
        self.close(SHUTDOWN_TIMEOUT_SECONDS)

    def close(self, timeout: float) -> bool:
        """Shut down within about ``timeout`` seconds: the spans queued are exported (the
        SDK's shutdown), those not exported by then are counted as lost. True when it was
        done in time (also when it was shut down already)."""
        if self._shut_down:
            return True
        self._shut_down = True
        if not self._exporter.uncounted:
            # Nothing left to export: no need to wait for an export stuck on a collector
            # that hangs (the SDK's worker stops behind it, whenever it returns).
            timeout = min(timeout, _QUICK_SECONDS)
        done = self._runner.call(self._shutdown_batch, timeout, last=True)
        if not done:
            self._exporter.give_up()
        return done

    def _shutdown_batch(self) -> bool:
        self._batch.shutdown()
        return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000)

    def flush(self, timeout: float, *, give_up: bool = False) -> bool:
        """Export what is queued, within about ``timeout`` seconds; True when all of it went
        (or nothing was left to export). With ``give_up`` (a final flush: the process may end
        right after), what is not exported by then is counted as lost at once and never
        sent; else its export goes on, and is counted when it returns."""
        if not self._exporter.uncounted:
            return True  # nothing queued or in flight (or all of it given up on already)
        done = self._runner.call(self._batch.force_flush, timeout)
        if not done and give_up:
            self._exporter.give_up()
        return done


SHUTDOWN_TIMEOUT_SECONDS = 30.0
"""How long :meth:`BoundedBatchProcessor.shutdown` (a provider's ``shutdown()``) waits for
the spans queued to be exported: the SDK's own bound. :func:`close_tracer_provider` gives
the pipeline less."""
_QUICK_SECONDS = 0.1


class _Runner:
    """One daemon thread that runs the calls it is given, in order, so that their caller can
    stop waiting at a deadline: an export stuck on a collector that hangs holds this thread,
    never the caller. Started up front (a process at exit cannot start one on Python 3.12+)
    and again in a forked child, on first use; where none can start, calls run inline."""

    def __init__(self, name: str, metrics: Metrics) -> None:
        self._name = name
        self._metrics = metrics
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._pid = 0
        self._ended = False
        self._start()

    def _start(self) -> bool:
        self._calls = queue.SimpleQueue()
        try:
            threading.Thread(
                target=self._run, args=(self._calls,), name=self._name, daemon=True
            ).start()
        except RuntimeError:  # the interpreter is shutting down
            return False
        self._pid = os.getpid()
        return True

    def call(self, function: Callable[[], bool], timeout: float, *, last: bool = False) -> bool:
        """What ``function()`` returned, or False when it had not returned within ``timeout``
        seconds (it goes on, on the thread). ``last``: the thread ends after it."""
        pending = _Call(function, last)
        if self._ended or (self._pid != os.getpid() and not self._start()):
            self._run_one(pending)  # no thread to run it on
        else:
            self._ended = last
            self._calls.put(pending)
            pending.done.wait(max(0.0, timeout))
        return pending.done.is_set() and pending.result

    def _run(self, calls: queue.SimpleQueue[_Call]) -> None:
        while True:
            pending = calls.get()
            self._run_one(pending)
            if pending.last:
                return

    def _run_one(self, pending: _Call) -> None:
        try:
            pending.result = bool(pending.function())
        except Exception:
            self._metrics.internal_error("tracing")
        finally:
            pending.done.set()


class _Call:
    __slots__ = ("done", "function", "last", "result")

    def __init__(self, function: Callable[[], bool], last: bool) -> None:
        self.function = function
        self.last = last
        self.result = False
        self.done = threading.Event()


def otlp_span_exporter(protocol: str | None = None) -> SpanExporter:
    """The official OTLP exporter for ``protocol`` (``grpc`` or ``http/protobuf``).

    By default the protocol the OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL variables choose,
    else HTTP/protobuf; the exporter reads its endpoint, headers, compression and timeout
    from the OTEL_* variables itself.
    """
    if (protocol or otlp_protocol(os.environ)) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()


def span_exporter_from_env(
    environ: Mapping[str, str] | None = None, *, console: IO[str] | None = None
) -> SpanExporter:
    """The exporter ``OTEL_TRACES_EXPORTER`` names: OTLP (also when unset or ``none``: traces
    were asked for by keyword), ``console`` (to ``console``, by default ``sys.stdout``), or
    both. ConfigError for any other value; ``environ`` defaults to ``os.environ``.
    """
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    env = os.environ if environ is None else environ
    exporters = [
        ConsoleSpanExporter(out=sys.stdout if console is None else console)
        if kind == "console"
        else otlp_span_exporter(kind)
        for kind in trace_exporters(env) or (otlp_protocol(env),)
    ]
    return exporters[0] if len(exporters) == 1 else FanOutExporter(exporters)


class FanOutExporter(SpanExporter):
    """Several exporters as one (``OTEL_TRACES_EXPORTER=otlp,console``): each gets every
    batch, and the export failed if any of them failed."""

    def __init__(self, exporters: Sequence[SpanExporter]) -> None:
        self.exporters = tuple(exporters)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        failed = False
        for exporter in self.exporters:
            try:
                failed = exporter.export(spans) is not SpanExportResult.SUCCESS or failed
            except Exception:
                failed = True
        return SpanExportResult.FAILURE if failed else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        for exporter in self.exporters:
            exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all([exporter.force_flush(timeout_millis) for exporter in self.exporters])


def build_tracer_provider(
    config: Config,
    metrics: Metrics,
    exporter: SpanExporter | None = None,
    *,
    schedule_delay_millis: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    console: IO[str] | None = None,
    scrubber: Scrubber | None = None,
) -> tuple[TracerProvider, TailSamplingProcessor]:
    """An SDK provider whose request traces are tail-sampled, then batched and exported.

    Every span is recorded (sampler ALWAYS_ON: the decision comes after the response), held
    back by the returned :class:`TailSamplingProcessor` until :meth:`~TailSamplingProcessor.
    decide`, then exported in batches through ``exporter`` (default: what
    ``OTEL_TRACES_EXPORTER`` names, see :func:`span_exporter_from_env`; a console exporter
    writes to ``console``). Bounds come from ``config`` (``max_buffered_spans``,
    ``max_spans_per_trace``, ``max_export_queue``); ``schedule_delay_millis`` defaults to
    ``OTEL_BSP_SCHEDULE_DELAY``. Every span lost on the way is counted and announced by the
    tail processor's :attr:`~TailSamplingProcessor.drops` (its warning every
    ``drop_warning_interval_seconds``: give ``drops.due`` to the writer as a summary source).
    ConfigError for OTel variables sentinel cannot export by.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    # Chosen first: a ConfigError leaves nothing half built.
    exporter = exporter or span_exporter_from_env(console=console)
    resource = Resource.create(
        {
            "service.name": config.service,
            "service.version": config.version,
            "deployment.environment": config.environment,
        }
    )
    if scrubber is not None:
        resource = scrubbed_resource(resource, scrubber)
    limits = _span_limits()
    # shutdown_on_exit=False: the SDK's own exit hook exports what is queued with the full
    # exporter timeout per batch (tens of seconds against a hanging collector); sentinel's
    # close() shuts the exporter first, so the rest fails fast and is counted.
    provider = TracerProvider(
        sampler=ALWAYS_ON,
        resource=resource,
        span_limits=limits,
        shutdown_on_exit=False,
        id_generator=PresetIdGenerator(),  # server spans start late, with the ids set early
    )
    drops = SpanDrops(metrics, interval_seconds=config.drop_warning_interval_seconds, clock=clock)
    counting = CountingExporter(
        exporter,
        metrics,
        drops=drops,
        scrubber=scrubber,
        max_attribute_length=limits.max_attribute_length,
    )
    batch = BoundedBatchProcessor(
        counting,
        metrics,
        max_export_queue=config.max_export_queue,
        schedule_delay_millis=schedule_delay_millis,
        drops=drops,
    )
    tail = TailSamplingProcessor(
        batch,
        metrics,
        max_buffered_spans=config.max_buffered_spans,
        max_spans_per_trace=config.max_spans_per_trace,
        clock=clock,
        drops=drops,
    )
    provider.add_span_processor(tail)
    tail.exporter = counting.exporter
    tail.shutdown_exporter = counting.shutdown
    tail.batch = batch
    return provider, tail


CLOSE_TIMEOUT_SECONDS = 2.0
"""How long :func:`close_tracer_provider` gives the spans queued to leave."""


def flush_tracer_provider(
    provider: trace.TracerProvider,
    tail: TailSamplingProcessor | None,
    timeout: float,
    metrics: Metrics,
) -> bool:
    """The final flush (the server is shutting down, the process may end right after):
    export what is queued within about ``timeout`` seconds; True when all of it went.

    With sentinel's own pipeline (``tail``), what is not exported by then (a collector that
    hangs or is down) is counted as lost (``export_failed``) at once, so that it can be said
    before the process ends, and is never sent after. A caller's own provider is flushed as
    it does it, on another thread: sentinel stops waiting at ``timeout``.
    """
    batch = tail.batch if tail is not None else None
    if batch is not None:
        return batch.flush(timeout, give_up=True)
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is None:
        return True
    # A caller's provider: a thread of its own, once at shutdown (sentinel has none there).
    runner = _Runner("sentinel-span-flush", metrics)
    return runner.call(lambda: force_flush(int(timeout * 1000)) is not False, timeout, last=True)


def close_tracer_provider(
    provider: TracerProvider, tail: TailSamplingProcessor, timeout: float = CLOSE_TIMEOUT_SECONDS
) -> None:
    """Flush what is queued, then stop, all within about ``timeout`` seconds: a collector
    that hangs (or is down) costs at most that, and the spans not exported by then are
    counted as lost (``export_failed``) before this returns; spans that end later are
    counted as ``export_shutdown``."""
    deadline = time.monotonic() + timeout
    batch = tail.batch
    if batch is not None:
        batch.flush(timeout, give_up=True)
    else:  # a pipeline assembled by hand
        provider.force_flush(timeout_millis=int(timeout * 1000))
    if tail.shutdown_exporter is not None:
        # Retries waiting for their next try stop now (an export reading from a hanging
        # collector does not: what it holds was counted above).
        tail.shutdown_exporter()
    if batch is not None:
        batch.close(max(0.0, deadline - time.monotonic()))
    provider.shutdown()  # the spans still waiting for their request's decision are counted


class RequestTracer:
    """Starts and ends the server span of each request, honouring incoming W3C context.

    With ``tail`` (from :func:`build_tracer_provider`) the span's trace is kept or dropped
    as :meth:`finish` is told; without it every span goes to the provider's processors.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider,
        scrubber: Scrubber,
        tail: TailSamplingProcessor | None = None,
    ) -> None:
        self._tracer = tracer_provider.get_tracer("sentinel", __version__)
        self._scrubber = scrubber
        self._tail = tail
        ids = getattr(tracer_provider, "id_generator", None)
        # sentinel's own pipeline: a request's server span is a DeferredServerSpan until its
        # trace is known to leave the process (most are dropped after the response).
        self._ids = ids if tail is not None and isinstance(ids, PresetIdGenerator) else None

    def start_request(
        self, scope: Scope, request: RequestContext
    ) -> tuple[trace.Span, object, bool]:
        """Start the server span and make it current: the span, the context token, and
        whether the caller's W3C context says "sampled".

        A sampled parent asks for this request's trace (the caller keeps its part), so the
        middleware keeps it whatever the sampler says.
        """
        # Every line of each header, in order: the propagator reads the first traceparent
        # and joins tracestate lines, as W3C Trace Context combines them.
        carrier: dict[str, list[str]] = {}
        for name, value in scope.get("headers", ()):
            if name in _PROPAGATION_HEADERS:
                carrier.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        parent = _TRACE_CONTEXT.extract(carrier) if carrier else None
        parent_sampled = False
        if parent is not None:
            parent_context = trace.get_current_span(parent).get_span_context()
            # A caller that samples at its tail (another sentinel) says "sampled" before it
            # has decided: that is no request to keep the trace.
            parent_sampled = (
                parent_context.is_valid
                and parent_context.trace_flags.sampled
                and not is_tail_pending(parent_context.trace_state)
            )
        if self._tail is None:
            # The caller's pipeline: its sampler and processors see the request as it starts.
            span = self._tracer.start_span(
                _span_name(request),
                context=parent,
                kind=SpanKind.SERVER,
                attributes=self._request_attributes(scope, request),
            )
        elif self._ids is not None and scope.get("scheme") not in ("ws", "wss"):
            # sentinel's own pipeline: the SDK span is built as the request ends, and only
            # if its trace leaves the process (most are dropped); meanwhile a deferred span
            # with its ids is current, and records what is done to it. The name's route is
            # read at the end, from the router's match, instead of matched against the routes
            # now.
            span = DeferredServerSpan(_span_method(request.method), parent, self._ids)
            self._tail.hold(span.get_span_context().trace_id)
        else:
            # A websocket can stay open for hours: its trace is kept as it goes, never held
            # back for a decision; its attributes are set as it ends.
            span = self._tracer.start_span(
                _span_method(request.method), context=parent, kind=SpanKind.SERVER
            )
            if scope.get("scheme") not in ("ws", "wss"):  # a provider sentinel did not build
                self._tail.hold(span.get_span_context().trace_id)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token, parent_sampled

    def finish(
        self,
        span: trace.Span,
        token: object,
        request: RequestContext,
        status: int,
        failed: BaseException | None,
        *,
        keep: bool = True,
        sample_rate: float = 1,
        reason: str = "unsampled",
        end_time: int | None = None,
    ) -> None:
        """Mark the response on the span, pass the keep/drop decision on, end the span (at
        ``end_time``, nanoseconds since the epoch, else now).

        ``sample_rate`` is the weight of a kept trace (one kept request stands for that
        many); ``reason`` says why it was kept.
        """
        deferred = span if isinstance(span, DeferredServerSpan) else None
        try:
            try:
                if self._tail is not None and not self._tail.decide(
                    span.get_span_context().trace_id, keep
                ):
                    if deferred is not None:
                        deferred.discard()  # dropped: no SDK span is ever built
                    return
                attributes = self._ending_attributes(request, status, failed)
                name = None
                if self._tail is not None:
                    attributes.update(self._request_attributes(request.scope, request))
                    name = _span_name(request)
                attributes["sentinel.sample_rate"] = sample_rate
                attributes[KEEP_REASON_ATTRIBUTE] = reason
                error = Status(StatusCode.ERROR) if status >= 500 else None
                if deferred is not None and self._ids is not None:
                    deferred.finish(
                        self._tracer,
                        self._ids,
                        attributes,
                        error,
                        name=name,
                        scrubber=self._scrubber,
                        end_time=end_time,
                    )
                    return
                if name is not None:
                    span.update_name(name)
                span.set_attributes(attributes)
                if error is not None:
                    span.set_status(error)
            finally:
                # Ended whatever happened above, so the trace is never stranded (a deferred
                # span's SDK span is ended where it is built).
                if deferred is None:
                    span.end(end_time)
        finally:
            otel_context.detach(token)  # type: ignore[arg-type]

    @staticmethod
    def _request_attributes(scope: Scope, request: RequestContext) -> dict[str, Any]:
        """The attributes known when the request starts."""
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.scheme": scope.get("scheme", "http"),
            LOCATION_ATTRIBUTE: request.location,
        }
        route = request.route
        if route != UNMATCHED_ROUTE:
            attributes["http.route"] = route
        else:  # no route matched: none is said (semantic conventions), but the label is
            attributes[UNMATCHED_ROUTE_ATTRIBUTE] = route
        if request.method == OTHER_METHOD:
            # The semantic conventions' word for a method outside the known ones, with the
            # method as sent beside it when it is a plain token (bounded: a client chose it).
            attributes["http.request.method"] = SEMCONV_OTHER_METHOD
            original = scope.get("method")
            if type(original) is str and _METHOD_TOKEN.fullmatch(original):
                attributes["http.request.method_original"] = original
        tenant = getattr(request, "tenant", None)
        if tenant is not None:  # validated (and screened for credentials) at the door
            attributes[TENANT_ATTRIBUTE] = tenant
        return attributes

    def _ending_attributes(
        self, request: RequestContext, status: int, failed: BaseException | None
    ) -> dict[str, Any]:
        """The attributes of a span that is exported, set as it ends."""
        scope = request.scope
        attributes: dict[str, Any] = {
            "url.path": self._scrubber.text(text_path(request.path)),
            "http.response.status_code": status,
        }
        server = scope.get("server")
        if server:
            attributes["server.address"] = str(server[0])
            if server[1] is not None:
                attributes["server.port"] = int(server[1])
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
            if len(client) > 1 and type(client[1]) is int:
                attributes["client.port"] = client[1]
        version = scope.get("http_version")
        if type(version) is str:
            attributes["network.protocol.version"] = version[:_MAX_PROTOCOL_VERSION_CHARS]
        query = scope.get("query_string")
        if query and type(query) is bytes:
            attributes["url.query"] = self._query(query)
        for name, value in scope.get("headers") or ():
            if name == b"user-agent":
                attributes["user_agent.original"] = self._user_agent(value)
                break
        # An exception ended the request (after a 200 started, say): it is the error, also
        # below 500; else a 5xx is.
        if failed is not None:
            attributes["error.type"] = type(failed).__qualname__
        elif status >= 500:
            attributes["error.type"] = str(status)
        return attributes

    def _query(self, query: bytes) -> str:
        """The query string as ``url.query``: each parameter scrubbed by its name and value,
        kept as sent where nothing is masked (as a URL's query is scrubbed), then cut."""
        scrubbed = self._scrubber.url("?" + query.decode("latin-1"))
        if not scrubbed.startswith("?"):  # no reading left it a URL's query: masked whole
            return self._scrubber.mask(query)
        return cut_scrubbed(scrubbed[1:], MAX_ATTRIBUTE_LENGTH)

    def _user_agent(self, value: Any) -> str:
        """The ``User-Agent`` header as ``user_agent.original``: scrubbed as any header's
        value is in a report, then cut."""
        text = bytes(value).decode("latin-1")
        return cut_scrubbed(self._scrubber.value("user-agent", text), MAX_USER_AGENT_CHARS)


OTHER_METHOD = "OTHER"
"""The ``method`` sentinel counts a request under when its method is not a standard one."""
SEMCONV_OTHER_METHOD = "_OTHER"
"""The HTTP semantic conventions' ``http.request.method`` for such a request."""
_METHOD_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
"""An HTTP method as RFC 9110 spells one (a token), at most 32 characters."""


MAX_USER_AGENT_CHARS = 1024
"""Longest ``user_agent.original`` on a span (a client chooses it; browsers' are shorter)."""
_MAX_PROTOCOL_VERSION_CHARS = 8


def _span_name(request: RequestContext) -> str:
    """A server span's name: ``{method} {route}``, or the method alone when no route matched
    (the semantic conventions' low-cardinality name: no template, no path)."""
    route = request.route
    method = _span_method(request.method)
    return method if route == UNMATCHED_ROUTE else f"{method} {route}"


def _span_method(method: str) -> str:
    """The method part of a server span's name: ``HTTP`` for a method outside the known ones,
    as the semantic conventions name it."""
    return "HTTP" if method == OTHER_METHOD else method


def _span_limits() -> SpanLimits:
    from opentelemetry.sdk.trace import SpanLimits

    if "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT" in os.environ or (
        "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT" in os.environ
    ):
        return SpanLimits()
    return SpanLimits(max_attribute_length=MAX_ATTRIBUTE_LENGTH)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


def _after_fork_in_child(method: Callable[[], None]) -> None:
    """Call the bound ``method`` in a forked child, for as long as its object lives."""
    if not hasattr(os, "register_at_fork"):
        return
    ref = weakref.WeakMethod(method)

    def after_in_child() -> None:
        target = ref()
        if target is not None:
            target()

    os.register_at_fork(after_in_child=after_in_child)

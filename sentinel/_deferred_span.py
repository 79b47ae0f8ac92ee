"""A server span that becomes an SDK span only if its trace leaves the process.

With sentinel's own tail-sampled pipeline most requests' traces are dropped after the
response, so an SDK span started for every request is mostly work thrown away: its sampler,
its processors' start and end, its attribute cleaning. :class:`DeferredServerSpan` stands in
for it while the request runs. It has the span context the SDK span will have (the ids come
from the provider's :class:`PresetIdGenerator`, so the app's child spans name it as their
parent), it records what the app and sentinel's reporter do to it (attributes, events,
links, status, name), and :meth:`DeferredServerSpan.finish` starts the SDK span with those
ids and the request's start time, replays what was recorded, scrubbed, and ends it: only for
a trace that is exported.

What the app records on the server span (``trace.get_current_span()``) is scrubbed as it is
replayed, as the app's own spans are at export: attributes and link attributes under
secret-looking names masked, events (an exception's message and traceback) by name and by
value, the status description and the name by value. The SDK span that comes out is in
:data:`SCRUBBED`, so the exporter passes it as it is.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types

from ._scrub import Scrubber

MAX_RECORDED = 1024
"""Attributes, events and links a deferred span holds at most, each (the newest: what the
SDK span keeps of them is then cut by its own span limits, which are lower by default)."""


TAIL_PENDING = ("sentinel", "tail")
"""The W3C trace state entry of a trace whose keep-or-drop decision is made when its
request ends (tail sampling): its "sampled" flag only lets its spans be recorded meanwhile."""


def with_tail_pending(trace_state: TraceState | None) -> TraceState:
    """``trace_state`` with :data:`TAIL_PENDING` (first, replacing any entry of that key)."""
    key, value = TAIL_PENDING
    if trace_state is None:
        return TraceState([TAIL_PENDING])
    if trace_state.get(key) == value:
        return trace_state
    if key in trace_state:
        return trace_state.update(key, value)
    return trace_state.add(key, value)


def is_tail_pending(trace_state: TraceState | None) -> bool:
    """Whether a caller's trace state says its decision is still to be made."""
    return trace_state is not None and trace_state.get(TAIL_PENDING[0]) == TAIL_PENDING[1]


def without_tail_pending(context: SpanContext) -> SpanContext:
    """``context`` as it is exported: :data:`TAIL_PENDING` says a decision is still to be
    made while the request runs (the app's child spans inherit it from the server span), and
    an exported span's decision was made. The same context when it has no such entry."""
    trace_state = context.trace_state
    if not is_tail_pending(trace_state):
        return context
    return SpanContext(
        context.trace_id,
        context.span_id,
        is_remote=context.is_remote,
        trace_flags=context.trace_flags,
        trace_state=trace_state.delete(TAIL_PENDING[0]),
    )


class ScrubbedSpans:
    """The SDK spans :meth:`DeferredServerSpan.finish` built from what it scrubbed, until
    the exporter takes them (then passed as they are). Known by identity, that of the span
    context the SDK hands on from the span to what it exports (any span could carry an
    attribute that said so). Bounded: the oldest are forgotten (a span that never reached
    the exporter, its queue full), and a span forgotten is only scrubbed again. No lock
    (each step is one dict operation), so a fork cannot leave one held."""

    def __init__(self, limit: int = 8192) -> None:
        self._limit = limit
        self._contexts: dict[int, SpanContext] = {}

    def add(self, context: SpanContext) -> None:
        contexts = self._contexts
        contexts[context.span_id] = context
        if len(contexts) > self._limit:
            # The oldest; if another thread changed the dict meanwhile, next time.
            with contextlib.suppress(RuntimeError, StopIteration):
                contexts.pop(next(iter(contexts)), None)

    def take(self, context: SpanContext | None) -> bool:
        """Whether ``context`` is that of a span added here (forgotten once taken)."""
        if context is None or self._contexts.get(context.span_id) is not context:
            return False
        self._contexts.pop(context.span_id, None)
        return True


SCRUBBED = ScrubbedSpans()
"""The server spans built scrubbed, for the exporter to pass as they are."""


def scrub_attributes(
    attributes: types.Attributes,
    scrubber: Scrubber,
    *,
    by_value: bool,
    cut_at: int | None = None,
) -> dict[str, types.AttributeValue] | None:
    """``attributes`` with their text scrubbed (``by_value``: by key and value; else the
    values of secret-looking keys masked, and only the texts with an ``@`` in them scrubbed
    by value, for credentials in a URL: scanning every value would cost the export thread
    a scrub per attribute); None when that changes none of them. A text of ``cut_at``
    characters or more was cut short by the SDK's length limit: it is scrubbed whatever it
    holds, and the token at its end is masked (see :meth:`Scrubber.cut_text`)."""
    if not attributes:
        return None
    scrubbed: dict[str, types.AttributeValue] = {}
    changed = False
    for key, value in attributes.items():
        new: types.AttributeValue = value
        if not by_value and not scrubber.is_secret_key(key):
            if isinstance(value, str) and (
                "@" in value or (cut_at is not None and len(value) >= cut_at)
            ):
                new = _scrubbed_value(key, value, scrubber, cut_at)
        elif isinstance(value, str):
            new = _scrubbed_value(key, value, scrubber, cut_at)
        elif isinstance(value, Sequence) and any(isinstance(item, str) for item in value):
            items = [
                _scrubbed_value(key, item, scrubber, cut_at) if isinstance(item, str) else item
                for item in value
            ]
            if items != list(value):
                new = items
        elif scrubber.is_secret_key(key) and not isinstance(value, bool):
            new = scrubber.mask(repr(value))  # a number under a secret name (a pin)
        changed = changed or new != value
        scrubbed[key] = new
    return scrubbed if changed else None


def _scrubbed_value(key: str, value: str, scrubber: Scrubber, cut_at: int | None) -> str:
    if scrubber.is_secret_key(key):
        return scrubber.mask(value)
    if cut_at is not None and len(value) >= cut_at:
        return scrubber.cut_text(value)
    return scrubber.text(value)


def scrub_links(links: Sequence[Link], scrubber: Scrubber) -> list[Link] | None:
    """``links`` with their attributes under secret-looking names masked; None when that
    changes none of them."""
    scrubbed = [
        (link, scrub_attributes(link.attributes, scrubber, by_value=False)) for link in links
    ]
    if all(attributes is None for _, attributes in scrubbed):
        return None
    return [
        link if attributes is None else Link(link.context, attributes)
        for link, attributes in scrubbed
    ]


def scrub_status(status: Status, scrubber: Scrubber) -> Status:
    """``status`` with its description scrubbed by value (the same object when unchanged)."""
    description = status.description
    if not description:
        return status
    scrubbed = scrubber.text(description)
    return status if scrubbed == description else Status(status.status_code, scrubbed)


def scrub_name(name: str, scrubber: Scrubber) -> str:
    """A span's or event's name scrubbed by value (names repeat: the check is cached)."""
    return scrubber.text(name) if scrubber.looks_secret(name) else name


class PresetIdGenerator(IdGenerator):
    """Random ids, except the pair a thread presets for its next span: how a deferred span's
    SDK span gets the ids its children already point to."""

    def __init__(self, ids: IdGenerator | None = None) -> None:
        self._ids = ids or RandomIdGenerator()
        self._preset = threading.local()

    def preset(self, trace_id: int, span_id: int) -> None:
        """The next span this thread starts gets these ids (the trace id if it is a root)."""
        self._preset.ids = (trace_id, span_id)

    def clear(self) -> None:
        """Forget a preset that no span took."""
        self._preset.ids = None

    def generate_trace_id(self) -> int:
        ids = getattr(self._preset, "ids", None)
        return ids[0] if ids is not None else self._ids.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._preset, "ids", None)
        if ids is None:
            return self._ids.generate_span_id()
        self._preset.ids = None
        return int(ids[1])

    def is_trace_id_random(self) -> bool:
        return self._ids.is_trace_id_random()


class DeferredServerSpan(trace.Span):
    """The server span of a request while it runs: recording, with its final ids, but no SDK
    span yet (see the module's docstring). Operations after :meth:`finish` are ignored."""

    __slots__ = (
        "_attributes",
        "_context",
        "_events",
        "_links",
        "_name",
        "_parent",
        "_recording",
        "_start",
        "_status",
    )

    def __init__(
        self, name: str, parent: Any, ids: PresetIdGenerator, start_time: int | None = None
    ) -> None:
        parent_context = trace.get_current_span(parent).get_span_context() if parent else None
        if parent_context is not None and parent_context.is_valid:
            trace_id = parent_context.trace_id
            random_trace_id = parent_context.trace_flags.random_trace_id
            trace_state = parent_context.trace_state
        else:
            trace_id = ids.generate_trace_id()
            random_trace_id = ids.is_trace_id_random()
            trace_state = None
        # Sampled, so the app's child spans are recorded until the decision at the end; the
        # trace state says the decision is pending, so a sentinel downstream does not take
        # the flag for this caller keeping the trace (see TAIL_PENDING).
        trace_state = with_tail_pending(trace_state)
        flags = TraceFlags.SAMPLED | (TraceFlags.RANDOM_TRACE_ID if random_trace_id else 0)
        self._context = SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        self._parent = parent
        self._name = name
        self._start = start_time if start_time is not None else time.time_ns()
        self._recording = True
        self._attributes: dict[str, Any] | None = None
        self._events: deque[tuple[str, types.Attributes, int]] | None = None
        self._links: deque[Link] | None = None
        self._status: Status | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._recording:
            if self._attributes is None:
                self._attributes = {}
            recorded = self._attributes
            for key, value in attributes.items():
                recorded.pop(key, None)  # a key set again counts as the newest
                recorded[key] = value
                if len(recorded) > MAX_RECORDED:
                    del recorded[next(iter(recorded))]

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        self.set_attributes({key: value})

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._recording:
            if self._events is None:
                self._events = deque(maxlen=MAX_RECORDED)
            self._events.append((name, attributes, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._recording:
            if self._links is None:
                self._links = deque(maxlen=MAX_RECORDED)
            self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._recording:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._recording:
            self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # What the SDK span records: the type, the message and the traceback, as an event.
        if not self._recording:
            return
        event: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """The middleware ends the server span (:meth:`finish`); an end from the app is a
        no-op, as a second ``end()`` of an SDK span is."""

    def discard(self) -> None:
        """The trace is dropped: nothing is built, later operations are ignored."""
        self._recording = False

    def finish(
        self,
        tracer: trace.Tracer,
        ids: PresetIdGenerator,
        attributes: Mapping[str, types.AttributeValue],
        status: Status | None,
        name: str | None = None,
        scrubber: Scrubber | None = None,
        end_time: int | None = None,
    ) -> trace.Span:
        """Start the SDK span with this span's ids and start time (named ``name``, else its
        last name), give it what was recorded, then ``attributes`` and ``status``, and end
        it (at ``end_time``, nanoseconds since the epoch, else now). With a ``scrubber``,
        what was recorded is scrubbed first (see the module's docstring: ``attributes``,
        ``status`` and ``name`` are sentinel's, scrubbed already) and the span is added to
        :data:`SCRUBBED`."""
        self._recording = False
        context = self._context
        recorded = self._attributes
        links: list[Link] = list(self._links or ())
        events: list[tuple[str, types.Attributes, int]] = list(self._events or ())
        recorded_status = self._status
        last_name = self._name
        if scrubber is not None:
            recorded = scrub_attributes(recorded, scrubber, by_value=False) or recorded
            links = scrub_links(links, scrubber) or links
            events = [
                (
                    scrub_name(event_name, scrubber),
                    scrub_attributes(event_attributes, scrubber, by_value=True) or event_attributes,
                    timestamp,
                )
                for event_name, event_attributes, timestamp in events
            ]
            if recorded_status is not None:
                recorded_status = scrub_status(recorded_status, scrubber)
            if name is None:
                last_name = scrub_name(last_name, scrubber)
        ids.preset(context.trace_id, context.span_id)
        try:
            span = tracer.start_span(
                name or last_name,
                # No parent is a root span: the current context holds this span itself.
                context=self._parent if self._parent is not None else Context(),
                kind=SpanKind.SERVER,
                links=links,
                start_time=self._start,
            )
        finally:
            ids.clear()
        try:
            if scrubber is not None:
                SCRUBBED.add(span.get_span_context())  # before it ends: its export may start
            # In the order they came: what the app and the reporter did while the request
            # ran, then what sentinel sets as it ends.
            if recorded:
                span.set_attributes(recorded)
            for event_name, event_attributes, timestamp in events:
                span.add_event(event_name, event_attributes, timestamp)
            if recorded_status is not None:
                span.set_status(recorded_status)
            span.set_attributes(attributes)
            if status is not None:
                span.set_status(status)
        finally:
            span.end(end_time)
        return span

"""A server span that becomes an SDK span only if its trace leaves the process.

With sentinel's own tail-sampled pipeline most requests' traces are dropped after the
response, so an SDK span started for every request is mostly work thrown away: its sampler,
its processors' start and end, its attribute cleaning. :class:`DeferredServerSpan` stands in
for it while the request runs. It has the span context the SDK span will have (the ids come
from the provider's :class:`PresetIdGenerator`, so the app's child spans name it as their
parent), it records what the app and sentinel's reporter do to it (attributes, events,
links, status, name), and :meth:`DeferredServerSpan.finish` starts the SDK span with those
ids and the request's start time, replays what was recorded, and ends it: only for a trace
that is exported.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
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
    ) -> trace.Span:
        """Start the SDK span with this span's ids and start time (named ``name``, else its
        last name), give it what was recorded, then ``attributes`` and ``status``, and end
        it."""
        self._recording = False
        context = self._context
        ids.preset(context.trace_id, context.span_id)
        try:
            span = tracer.start_span(
                name or self._name,
                # No parent is a root span: the current context holds this span itself.
                context=self._parent if self._parent is not None else Context(),
                kind=SpanKind.SERVER,
                links=list(self._links or ()),
                start_time=self._start,
            )
        finally:
            ids.clear()
        try:
            # In the order they came: what the app and the reporter did while the request
            # ran, then what sentinel sets as it ends.
            if self._attributes:
                span.set_attributes(self._attributes)
            for event_name, event_attributes, timestamp in self._events or ():
                span.add_event(event_name, event_attributes, timestamp)
            if self._status is not None:
                span.set_status(self._status)
            span.set_attributes(attributes)
            if status is not None:
                span.set_status(status)
        finally:
            span.end()
        return span

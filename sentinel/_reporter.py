"""Exception reports: counted on the spot, built off the request path, grouped and folded.

The request path does only what must happen there: mark the exception as reported (so no
other layer reports it again), count it, note it on the active span, and hand it to the
writer. On the writer's thread the reporter computes the fingerprint, decides whether to
write it in full or fold it into a summary, and builds, scrubs and size-caps the report.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._config import Config
from ._context import (
    RequestContext,
    annotations_for,
    scrub_annotations,
    scrub_data,
    text_path,
)
from ._exceptions import (
    MESSAGE_TIME_BUDGET_SECONDS,
    FrameClassifier,
    LocalsBudget,
    Renderer,
    chain,
    culprit,
    culprit_frame,
    describe,
    error_path,
    fingerprint,
    is_reportable,
    raised_at,
    scrubbed_message,
    type_name,
    walk_tb,
)
from ._metrics import Metrics
from ._output import Emitter, dumps, iso_timestamp
from ._scrub import Scrubber, cut_scrubbed
from ._vocabulary import NO_ROUTE, Phase
from ._writer import Writer

_REQUEST_PHASES = frozenset({"request", "response", "background"})
REPORTED_ATTR = "__sentinel_reported__"
"""Set on an exception once it is reported as unhandled: the requests it was reported in
(see :class:`Reporter`'s ``_already_reported``); any true value (``True``) means reported,
the request unknown."""
HANDLED_ATTR = "__sentinel_handled__"
"""Set on an exception once ``sentinel.capture_exception`` reported it as handled (alike)."""


def mark_of(exc: BaseException, marker: str) -> object:
    """What sentinel marked ``exc`` with (``True``, or the requests it was reported in), read
    from the instance itself: never through the class's ``__getattr__`` (a client library's
    error answering every attribute would look reported, and never be)."""
    try:
        value = _INSTANCE_DICT(exc).get(marker)
    except Exception:
        return None
    return value if value is True or type(value) is tuple else None


_INSTANCE_DICT = BaseException.__dict__["__dict__"].__get__

_NO_REQUEST = None
"""The request key of what is reported outside any request."""
_REQUESTS_REMEMBERED = 64
"""How many requests an exception object remembers being reported in: one object shared by
more requests at once (a failed shared task) may be counted twice in one of them."""
UNHANDLED_EVENT = "unhandled_exception"
HANDLED_EVENT = "handled_exception"
_UNMARKABLE_LIMIT = 256
_PREKEY_CACHE_LIMIT = 4096
_IGNORED_CACHE_LIMIT = 1024
_FIXED_BY_SENTINEL = frozenset({"event", "level"})
"""Fields a ``before_report`` hook cannot change (sentinel writes them)."""
_SPAN_MESSAGE_SECONDS = 0.005
"""How long the request path waits for the app's own ``__str__`` (for the span event)."""


class Occurrence:
    """One exception as seen on the request path, waiting to be written."""

    __slots__ = (
        "context",
        "decided",
        "exc",
        "exception_type",
        "fingerprint",
        "handled",
        "location",
        "phase",
        "pre_key",
        "query_string",
        "raw_headers",
        "span_id",
        "tb",
        "timestamp",
        "trace_id",
        "written",
    )

    def __init__(
        self,
        exc: BaseException,
        phase: Phase,
        location: str,
        exception_type: str,
        context: dict[str, Any],
        tb: TracebackType | None,
    ) -> None:
        self.exc = exc
        # The traceback grows as the exception travels up past the point where it was
        # caught; keeping its head now makes the frames (and fingerprint) independent of
        # how far it got before the worker looks at it.
        self.tb = tb
        self.phase = phase
        self.location = location
        self.exception_type = exception_type
        self.context = context
        self.timestamp = time.time()
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.pre_key: tuple[Any, ...] | None = None
        self.raw_headers: Any = None
        self.query_string: bytes | None = None
        self.fingerprint: str | None = None
        self.decided = False
        self.handled = False
        self.written = False
        """Whether its report went out (not dropped by ``before_report``, a failed build,
        a full queue or a writer out of time)."""


class _Fold:
    __slots__ = ("exception_type", "folded", "full", "window_start")

    def __init__(self, exception_type: str, now: float) -> None:
        self.exception_type = exception_type
        self.window_start = now
        self.full = 0
        self.folded = 0


Summary = tuple[str, str, str, int]
"""(fingerprint, location, exception_type, occurrences)"""


class FoldTable:
    """Per (fingerprint, location): how many full reports this window, and how many folded.

    Bounded LRU; an evicted entry with folded occurrences yields its summary first, so the
    folded counts always add up.
    """

    def __init__(
        self, window: float, full_limit: int, max_entries: int, clock: Callable[[], float]
    ) -> None:
        self._window = window
        self._limit = full_limit
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Fold] = OrderedDict()
        self._folding: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def decide(self, key: tuple[str, str], exception_type: str) -> tuple[bool, list[Summary]]:
        """Whether this occurrence is written in full, and summaries that are now due."""
        now = self._clock()
        due: list[Summary] = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Fold(exception_type, now)
                self._entries[key] = entry
                if len(self._entries) > self._max:
                    old_key, old = self._entries.popitem(last=False)
                    if old.folded:
                        due.append((*old_key, old.exception_type, old.folded))
                        self._folding.discard(old_key)
            else:
                self._entries.move_to_end(key)
                if now - entry.window_start >= self._window:
                    if entry.folded:
                        due.append((*key, entry.exception_type, entry.folded))
                        self._folding.discard(key)
                    entry.window_start, entry.full, entry.folded = now, 0, 0
            if entry.full < self._limit:
                entry.full += 1
                return True, due
            entry.folded += 1
            self._folding.add(key)
            return False, due

    def expired(self, everything: bool = False) -> list[Summary]:
        """Summaries of windows that have closed (or of all folded entries, at shutdown)."""
        now = self._clock()
        due: list[Summary] = []
        with self._lock:
            for key in list(self._folding):
                entry = self._entries[key]
                if everything or now - entry.window_start >= self._window:
                    due.append((*key, entry.exception_type, entry.folded))
                    entry.window_start, entry.full, entry.folded = now, 0, 0
                    self._folding.discard(key)
        return due

    def __len__(self) -> int:
        return len(self._entries)


class Reporter:
    """Reports exceptions once each, grouped by fingerprint; see the module docstring."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        emitter: Emitter,
        scrubber: Scrubber,
        writer: Writer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._emitter = emitter
        self._writer = writer
        self._scrubber = scrubber
        self._clock = clock
        self.classifier = FrameClassifier(config.app_modules)
        # A class whose __str__ or __repr__ never returns is counted, once per time it
        # did not finish, and then rendered no more (see Renderer).
        self.renderer = Renderer(on_unfinished=lambda: metrics.internal_error("render"))
        # One helper of its own: a before_report hook that hangs keeps it, and later reports
        # are written unchanged at once instead of waiting (nor do messages and locals wait).
        self._hook_runner = Renderer(max_helpers=1)
        self.folds = FoldTable(
            config.fold_window_seconds, config.fold_full_reports, config.max_fingerprints, clock
        )
        self.handled_folds = FoldTable(
            config.fold_window_seconds, config.fold_full_reports, config.max_fingerprints, clock
        )
        """Handled exceptions fold apart from unhandled ones: their summaries say which."""
        self._fingerprints: dict[tuple[Any, ...], str] = {}
        self._pending_summaries: deque[tuple[Summary, bool]] = deque()
        writer.add_summaries(self._due_summaries, "reporter")
        # Exceptions that refuse the marker attribute (frozen dataclasses, attrs) are
        # remembered by id, with their marks; holding them keeps their id from being reused.
        self._reported_unmarkable: OrderedDict[
            tuple[int, str], tuple[BaseException, tuple[int | None, ...]]
        ] = OrderedDict()
        self._unmarkable_lock = threading.Lock()
        self._unwritten: OrderedDict[int, BaseException] = OrderedDict()
        """Exceptions reported as the process ended whose report did not go out: Python's
        own hook still prints them (see :meth:`was_written`)."""
        self._host = socket.gethostname()
        self._ignore_classes = tuple(
            entry for entry in config.ignore_exceptions if isinstance(entry, type)
        )
        self._ignore_names = frozenset(
            entry for entry in config.ignore_exceptions if isinstance(entry, str)
        )
        self._ignored_types: dict[type[BaseException], bool] = {}

    # -- the request path -------------------------------------------------------------------

    def report(
        self,
        exc: BaseException,
        phase: Phase,
        request: RequestContext | None = None,
        *,
        route: str | None = None,
        sync: bool = False,
        handled: bool = False,
        error: bool = False,
    ) -> bool:
        """Count and queue ``exc``; False when it was already reported or is not an error
        (``error``: it is one, though its type is control flow: a cancellation that escaped a
        request whose own task was not cancelled).

        ``handled``: the app caught it and reports it itself (``sentinel.capture_exception``):
        counted in ``sentinel_handled_exceptions_total`` and written as a
        ``handled_exception``; an exception reported as unhandled is not reported again as
        handled, but one reported as handled that then escapes is still reported as
        unhandled (it did escape). Never raises: a failure here is counted as an internal
        error.
        """
        try:
            # A group around a single error (its other members cancelled) is usually a task
            # group's wrapping (anyio, asyncio.TaskGroup); the bug is the error inside it.
            # Both are marked.
            path = error_path(exc)
            group, exc = exc, path[-1]
            in_request = request is not None and phase in _REQUEST_PHASES
            if not error and not is_reportable(exc, in_request=in_request):
                return False
            marker = HANDLED_ATTR if handled else REPORTED_ATTR
            key = _request_key(request)
            if handled and (
                self._reported_in(exc, REPORTED_ATTR, key)
                or self._reported_in(group, REPORTED_ATTR, key)
            ):
                return False
            group_seen = group is not exc and self._already_reported(group, marker, key)
            if self._already_reported(exc, marker, key) or group_seen:
                return False
            location = request.location if request is not None else self._emitter.location
            route = request.route if request is not None else (route or NO_ROUTE)
            exception_type = type_name(type(exc))
            if handled:
                self._metrics.count_handled(location, route, exception_type)
            else:
                self._metrics.count_exception(location, route, exception_type, phase)
            occurrence = Occurrence(
                exc, phase, location, exception_type, {"route": route}, raised_at(path)
            )
            occurrence.handled = handled
            if request is not None:
                occurrence.context = _request_fields(request)
                occurrence.raw_headers = request.raw_headers
                occurrence.query_string = request.query_string
            if group is not exc:
                occurrence.context["wrapped_in"] = type_name(type(group))
            occurrence.pre_key = _pre_key(exc, occurrence.tb)
            self._note_on_span(exc, exception_type, occurrence)
            if self._ignored(type(exc)):
                return True  # counted, and on the span: never written
            # Taken now: what the request (or process) was tagged with when it happened.
            occurrence.context.update(annotations_for(request))
            known = self._fingerprints.get(occurrence.pre_key) if occurrence.pre_key else None
            if known is not None:
                full, due = self._folds(handled).decide((known, location), exception_type)
                self._pending_summaries.extend((summary, handled) for summary in due)
                if not full:
                    return True
                occurrence.fingerprint, occurrence.decided = known, True
            if sync:  # the process is about to end: written now, on this thread
                self._writer.run_now(self._process, occurrence)
                if not occurrence.written:
                    with self._unmarkable_lock:
                        self._unwritten[id(exc)] = exc
                        if len(self._unwritten) > _UNMARKABLE_LIMIT:
                            self._unwritten.popitem(last=False)
            else:
                self._writer.submit(self._process, occurrence)
        except Exception:
            self._metrics.internal_error("reporter")
        return True

    def _folds(self, handled: bool) -> FoldTable:
        return self.handled_folds if handled else self.folds

    def _already_reported(
        self, exc: BaseException, marker: str = REPORTED_ATTR, key: int | None = _NO_REQUEST
    ) -> bool:
        """Whether ``exc`` was reported before in the request ``key`` stands for (as
        ``marker`` says); marks it now.

        One occurrence seen by several layers of one request is one report, but an exception
        object raised again in another request (one failed task all requests await, a cached
        error) is another occurrence there. Outside a request, any earlier report counts.
        """
        if self._reported_in(exc, marker, key):
            return True
        marks = (*self._marks(exc, marker)[-(_REQUESTS_REMEMBERED - 1) :], key)
        try:
            setattr(exc, marker, marks)
        except Exception:
            with self._unmarkable_lock:
                self._reported_unmarkable[(id(exc), marker)] = (exc, marks)
                self._reported_unmarkable.move_to_end((id(exc), marker))
                if len(self._reported_unmarkable) > _UNMARKABLE_LIMIT:
                    self._reported_unmarkable.popitem(last=False)
        return False

    def _reported_in(self, exc: BaseException, marker: str, key: int | None) -> bool:
        """Whether ``exc`` carries ``marker`` for the request ``key`` (without marking it)."""
        value = mark_of(exc, marker)
        if not isinstance(value, tuple):
            if value:  # True: reported, in a request not named
                return True
            with self._unmarkable_lock:
                entry = self._reported_unmarkable.get((id(exc), marker))
            if entry is None or entry[0] is not exc:
                return False
            value = entry[1]
        return bool(value) and (key is _NO_REQUEST or key in value)

    def _marks(self, exc: BaseException, marker: str) -> tuple[int | None, ...]:
        """The request keys ``exc`` was reported in, as ``marker`` says."""
        value = mark_of(exc, marker)
        if isinstance(value, tuple):
            return value
        with self._unmarkable_lock:
            entry = self._reported_unmarkable.get((id(exc), marker))
        return entry[1] if entry is not None and entry[0] is exc else ()

    def was_written(self, exc: BaseException) -> bool:
        """Whether ``exc`` (or the error a group around it wraps) was reported as unhandled
        and written, now or before (an ignored type is counted, never written)."""
        try:
            error = error_path(exc)[-1]
            marked = self._is_marked(error, REPORTED_ATTR) or self._is_marked(exc, REPORTED_ATTR)
            with self._unmarkable_lock:
                dropped = self._unwritten.get(id(error)) is error
            return marked and not dropped and not self._ignored(type(error))
        except Exception:
            return False

    def _is_marked(self, exc: BaseException, marker: str) -> bool:
        """Whether ``exc`` carries ``marker``, for any request (without marking it)."""
        return self._reported_in(exc, marker, _NO_REQUEST)

    def _ignored(self, exc_type: type[BaseException]) -> bool:
        """Whether ``ignore_exceptions`` names this class or one of its bases."""
        if not (self._ignore_classes or self._ignore_names):
            return False
        known = self._ignored_types.get(exc_type)
        if known is None:
            known = issubclass(exc_type, self._ignore_classes) or any(
                _names(cls) & self._ignore_names for cls in exc_type.__mro__
            )
            if len(self._ignored_types) >= _IGNORED_CACHE_LIMIT:
                self._ignored_types.clear()
            self._ignored_types[exc_type] = known
        return known

    def _note_on_span(self, exc: BaseException, exception_type: str, occ: Occurrence) -> None:
        span = trace.get_current_span()
        span_context = span.get_span_context()
        if not span_context.is_valid:
            return
        occ.trace_id = format(span_context.trace_id, "032x")
        occ.span_id = format(span_context.span_id, "016x")
        if span.is_recording():
            try:
                # Not span.record_exception(): that exports the raw message and formats the
                # whole stack on the request path. The event carries the scrubbed message.
                span.add_event(
                    "exception",
                    {
                        "exception.type": exception_type,
                        "exception.message": scrubbed_message(
                            exc,
                            self._scrubber,
                            self.renderer,
                            time.monotonic() + _SPAN_MESSAGE_SECONDS,
                        ),
                        "exception.escaped": not occ.handled,
                        # Computed here, only for traced requests, so the span and the
                        # report can be joined; the worker reuses it.
                        "exception.fingerprint": self._fingerprint_now(occ),
                    },
                )
                if not occ.handled:  # a handled error did not fail the request
                    span.set_status(Status(StatusCode.ERROR, exception_type))
            except Exception:
                self._metrics.internal_error("tracing")

    def _fingerprint_now(self, occ: Occurrence) -> str:
        known = self._fingerprints.get(occ.pre_key) if occ.pre_key is not None else None
        if known is None:
            known = fingerprint(occ.exc, self.classifier, occ.tb)
            self._remember_fingerprint(occ.pre_key, known)
        return known

    def _remember_fingerprint(self, pre_key: tuple[Any, ...] | None, value: str) -> None:
        if pre_key is None:
            return
        if len(self._fingerprints) >= _PREKEY_CACHE_LIMIT:
            self._fingerprints.clear()
        self._fingerprints[pre_key] = value

    def _take_pending(self) -> list[tuple[Summary, bool]]:
        due = []
        while self._pending_summaries:
            due.append(self._pending_summaries.popleft())
        return due

    def _process(self, occ: Occurrence) -> None:
        """Fingerprint, fold or build, and write one occurrence (on the writer's thread)."""
        exc = occ.exc  # for before_report, which is given the exception too
        try:
            if occ.fingerprint is None:
                occ.fingerprint = fingerprint(occ.exc, self.classifier, occ.tb)
                self._remember_fingerprint(occ.pre_key, occ.fingerprint)
            if not occ.decided:
                full, due = self._folds(occ.handled).decide(
                    (occ.fingerprint, occ.location), occ.exception_type
                )
                self._write_summaries(due, occ.handled)
                if not full:
                    return
            record = self._build(occ)
        except Exception:
            self._metrics.internal_error("reporter")
            self._writer.note_drop("build_failed")
            return
        finally:
            # Drop the traceback (and the frames it keeps alive) as soon as possible.
            occ.exc, occ.tb, occ.raw_headers = _RELEASED, None, None

        event = HANDLED_EVENT if occ.handled else UNHANDLED_EVENT
        if self.config.before_report is not None:
            amended = self._before_report(record, exc, event)
            if amended is None:
                return
            record = amended
        self._emitter.emit("error", event, **record)
        occ.written = True

    def _before_report(
        self, record: dict[str, Any], exc: BaseException, event: str
    ) -> dict[str, Any] | None:
        """The report as ``before_report`` returns it (scrubbed and capped again), or None
        when the hook drops it. When the hook raises, returns something other than a dict or
        None, does not answer within ``before_report_time_budget_seconds``, or returns a
        report that cannot be cut to ``max_report_bytes``, the report as it was (and the
        failure is counted)."""
        hook = self.config.before_report
        assert hook is not None
        outcome: list[Any] = []

        def call(report: dict[str, Any]) -> str:
            result = hook(report, exc)
            if result is not None and not isinstance(result, dict):
                return "not a report"
            # Made plain JSON data here, on the helper: nothing of the app's (a __repr__,
            # an __eq__) runs on the writer's thread afterwards.
            outcome.append(None if result is None else json.loads(dumps(result)))
            return "done"

        deadline = time.monotonic() + self.config.before_report_time_budget_seconds
        [done] = self._hook_runner.run(call, [copy.deepcopy(record)], deadline)
        if done != "done" or not outcome:
            self._metrics.internal_error("before_report")
            return record
        result = outcome[0]
        if result is None:
            self._metrics.dropped("before_report")
            return None
        try:
            amended: dict[str, Any] = {}
            for key, value in result.items():
                if key in _FIXED_BY_SENTINEL:
                    continue
                unchanged = key in record and record[key] == value
                amended[key] = value if unchanged else scrub_data(self._scrubber, key, value)
            limit = self.config.max_report_bytes - self._emitter.envelope_bytes(event, "error")
            amended = _cap(amended, limit, fallback=False)
            if len(dumps(amended)) > limit:  # what the hook added cannot be cut to fit
                raise ValueError(f"before_report returned a report over {limit} bytes")
            return amended
        except Exception:
            self._metrics.internal_error("before_report")
            return record

    def _build(self, occ: Occurrence) -> dict[str, Any]:
        config = self.config
        # The app's own __str__ and __repr__ run on the renderer's helpers: this report
        # waits for them until these deadlines at most, whatever they do.
        budget = (
            _LocalsBudgetFromFirstUse(
                config.locals_max_chars, config.locals_time_budget_seconds, self.renderer
            )
            if config.log_locals
            else None
        )
        deadline = time.monotonic() + MESSAGE_TIME_BUDGET_SECONDS
        exc = occ.exc
        described = describe(
            exc,
            self.classifier,
            config.max_frames,
            self._scrubber,
            budget,
            tb=occ.tb,
            renderer=self.renderer,
            deadline=deadline,
        )
        record: dict[str, Any] = {
            "timestamp": iso_timestamp(occ.timestamp),
            "location": occ.location,
            "exception_type": described.pop("exception_type"),
            "message": described.pop("message"),
            "fingerprint": occ.fingerprint,
            "culprit": culprit(described["frames"]),
            "phase": occ.phase,
            "handled": occ.handled,
            **occ.context,
            "trace_id": occ.trace_id,
            "span_id": occ.span_id,
            "version": config.version,
            "host": self._host,
            "pid": os.getpid(),
            "frames": described.pop("frames"),
        }
        record.update(described)  # notes, causes and group members, when there are any
        if "path" in record:
            record["path"] = self._scrubber.text(record["path"])
        if record.get("tenant"):
            record["tenant"] = self._scrubber.identifier(record["tenant"])
        if occ.raw_headers is not None:
            record["headers"] = self._scrubber.pairs(_decode_headers(occ.raw_headers))
        if occ.query_string is not None:
            record["query"] = self._scrubber.query(occ.query_string.decode("latin-1"))
        scrub_annotations(record, self._scrubber)
        event = HANDLED_EVENT if occ.handled else UNHANDLED_EVENT
        envelope = self._emitter.envelope_bytes(event, "error")
        return _cap(record, config.max_report_bytes - envelope)

    def _write_summaries(self, due: list[Summary], handled: bool) -> None:
        for level, event, fields in self._summary_records(due, handled):
            self._emitter.emit(level, event, **fields)

    def _due_summaries(self, everything: bool) -> list[tuple[str, str, dict[str, Any]]]:
        records = []
        for summary, handled in self._take_pending():
            records.extend(self._summary_records([summary], handled))
        records.extend(self._summary_records(self.folds.expired(everything), False))
        records.extend(self._summary_records(self.handled_folds.expired(everything), True))
        return records

    def _summary_records(
        self, due: list[Summary], handled: bool
    ) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (
                "warning",
                "exception_summary",
                {
                    "fingerprint": fp,
                    "location": location,
                    "exception_type": exception_type,
                    "handled": handled,
                    "occurrences": occurrences,
                    "window_seconds": self.config.fold_window_seconds,
                },
            )
            for fp, location, exception_type, occurrences in due
        ]


def _names(cls: type) -> frozenset[str]:
    """The names ``ignore_exceptions`` may give a class by: sentinel's ``exception_type``
    (``ValueError`` for builtins) and ``module.Qualname``."""
    try:
        full = f"{cls.__module__}.{cls.__qualname__}"
    except Exception:
        return frozenset()
    return frozenset({full, type_name(cls)}) if issubclass(cls, BaseException) else frozenset()


class _LocalsBudgetFromFirstUse(LocalsBudget):
    """A locals budget whose time runs from its first use, not its creation: describe() waits
    for the message (on the message's own budget) before it renders any local, and that wait
    must not use up the locals' time."""

    def __init__(self, max_chars: int, seconds: float, renderer: Renderer) -> None:
        self._seconds = seconds
        self._deadline: float | None = None
        super().__init__(max_chars, seconds, renderer)

    @property
    def deadline(self) -> float:
        if self._deadline is None:
            self._deadline = time.monotonic() + self._seconds
        return self._deadline

    @deadline.setter
    def deadline(self, _value: float) -> None:
        pass  # LocalsBudget sets one on creation: this budget's starts at first use


class _Released(Exception):
    pass


_RELEASED = _Released()


def _pre_key(exc: BaseException, tb: TracebackType | None) -> tuple[Any, ...] | None:
    """A cheap in-process stand-in for the fingerprint: code objects and lines of the chain."""
    if isinstance(exc, BaseExceptionGroup) or tb is None:
        # A group fingerprints by its members' paths, an exception never raised by its
        # message: neither is told apart by code objects alone.
        return None
    parts: list[Any] = []
    for relation, member in chain(exc):
        parts.append(relation)
        parts.append(type(member))
        member_tb = tb if member is exc else member.__traceback__
        parts.extend((frame.f_code, lineno) for frame, lineno in walk_tb(member_tb))
    return tuple(parts)


def _request_key(request: RequestContext | None) -> int | None:
    """What an exception's marker remembers of a request: the request object itself would
    keep it alive (and make the exception unpicklable), its id alone may be reused once it
    is gone; with when it started and its id (random when not given) the key is its own."""
    if request is None:
        return _NO_REQUEST
    return hash((id(request), request.start, request.request_id))


def _request_fields(request: RequestContext) -> dict[str, Any]:
    return {
        "method": request.method,
        "route": request.route,
        "path": text_path(request.path),
        "request_id": request.request_id,
        "status": request.status,
        "response_started": request.response_started,
        "tenant": getattr(request, "tenant", None),  # set when a tenant is configured
    }


def _decode_headers(raw: Any) -> list[tuple[str, str]]:
    pairs = []
    for name, value in list(raw or ())[:100]:
        pairs.append((bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1")))
    return pairs


def _cap(record: dict[str, Any], limit: int, *, fallback: bool = True) -> dict[str, Any]:
    """Shrink a report that serializes to more than ``limit`` bytes, marking what was cut.

    The steps of ``_CUTS`` run in order (docs/reporting.md lists them) until the report
    fits, some of them a piece at a time. With ``fallback``, a report that still does not
    fit keeps only what identifies the exception (see :func:`_fallback`): the bound always
    holds. Without it (a ``before_report`` hook's report, whose fields are the hook's to
    choose), its frames and message are cut further and what is left may still be over.
    """
    size = _size(record)
    if size <= limit:
        return record
    record["truncated"] = True
    record["original_bytes"] = size
    for cut in _CUTS:
        if cut(record, limit) <= limit:
            return record
    if fallback:
        return _fallback(record, limit)
    if isinstance(record.get("frames"), list):
        record["frames"] = _innermost(record["frames"], 3)
    if isinstance(record.get("message"), str):
        record["message"] = cut_scrubbed(record["message"], _FALLBACK_MESSAGE_CHARS)
    return record


def _size(record: dict[str, Any]) -> int:
    return len(dumps(record))  # ASCII only: characters are bytes


_NESTING_LIMIT = 16
"""How deep the cuts look into causes and members (a hook may have nested them further)."""
_CUT_MESSAGE_CHARS = 1024
_CUT_NOTE_CHARS = 256
_CUT_SOURCE_CHARS = 200
_CUT_TAG_CHARS = 32
_FALLBACK_MESSAGE_CHARS = 256
_FALLBACK_VALUE_CHARS = 64
_IDENTIFYING = (
    "timestamp",
    "location",
    "exception_type",
    "message",
    "fingerprint",
    "culprit",
    "phase",
    "handled",
    "method",
    "route",
    "path",
    "request_id",
    "status",
    "response_started",
    "tenant",
    "wrapped_in",
    "trace_id",
    "span_id",
    "version",
    "host",
    "pid",
    "frames",
    "exceptions_skipped",
    "causes_skipped",
    "scope_truncated",
    "truncated",
    "original_bytes",
)
"""The fields a report keeps when nothing else fits (see :func:`_fallback`)."""


def _items(record: dict[str, Any], depth: int = 0) -> Iterator[dict[str, Any]]:
    """The report, then its causes and group members at every depth, each before its own."""
    yield record
    if depth < _NESTING_LIMIT:
        for nested in _nested(record):
            yield from _items(nested, depth + 1)


def _frames_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [frame for frame in _list(item, "frames") if isinstance(frame, dict)]


def _all_frames(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [frame for item in _items(record) for frame in _frames_of(item)]


def _list(record: dict[str, Any], key: str) -> list[Any]:
    value = record.get(key)
    return value if isinstance(value, list) else []


def _nested(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The causes and group members of a report (a hook may have reshaped them)."""
    items = (*_list(record, "causes"), *_list(record, "exceptions"))
    return [item for item in items if isinstance(item, dict)]


def _count(record: dict[str, Any], key: str) -> int:
    """A count the report already holds under ``key`` (0 when none)."""
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _add_count(record: dict[str, Any], key: str, more: int) -> None:
    if more:
        record[key] = _count(record, key) + more


def _blamed(record: dict[str, Any]) -> Mapping[str, Any] | None:
    """The frame the report's culprit names (its locals are cut last)."""
    return culprit_frame(_frames_of(record))


def _without(container: dict[str, Any], key: str, size: int) -> int:
    """``size`` of the report once ``key`` is taken out of ``container`` (taken out here):
    JSON is written piece by piece, so the report shrinks by what ``container`` does."""
    before = len(dumps(container))
    container.pop(key, None)
    return size - (before - len(dumps(container)))


def _drop_outer_locals(record: dict[str, Any], limit: int) -> int:
    """Locals of every frame but the culprit's, one frame at a time: members' and causes'
    first, then the report's own, outermost first (the frame that raised keeps its locals
    longest)."""
    size = _size(record)
    blamed = _blamed(record)
    nested = [frame for item in list(_items(record))[1:] for frame in _frames_of(item)]
    for frame in (*nested, *_frames_of(record)):
        if frame is blamed or "locals" not in frame:
            continue
        size = _without(frame, "locals", size)
        if size <= limit:
            break
    return size


def _shorten_messages(record: dict[str, Any], _limit: int) -> int:
    for item in _items(record):
        if isinstance(item.get("message"), str):
            item["message"] = cut_scrubbed(item["message"], _CUT_MESSAGE_CHARS, "... [truncated]")
        notes = item.get("notes")
        if isinstance(notes, list):
            item["notes"] = [
                cut_scrubbed(note, _CUT_NOTE_CHARS) if isinstance(note, str) else note
                for note in notes
            ]
    for frame in _all_frames(record):
        if isinstance(frame.get("source"), str):
            frame["source"] = cut_scrubbed(frame["source"], _CUT_SOURCE_CHARS)
    return _size(record)


def _drop_cause_frames(record: dict[str, Any], _limit: int) -> int:
    """Causes' frames, of the report's own causes and of its members' alike, to the
    innermost two."""
    for item in _items(record):
        for cause in _list(item, "causes"):
            if isinstance(cause, dict):
                cause["frames"] = _innermost(_list(cause, "frames"), 2)
    return _size(record)


def _keep_innermost_frames(record: dict[str, Any], _limit: int) -> int:
    if isinstance(record.get("frames"), list):
        record["frames"] = _innermost(record["frames"], 20)
    return _size(record)


def _innermost(frames: list[Any], count: int) -> list[Any]:
    """The innermost ``count`` frames, after one marker that says how many were left out,
    the frames an earlier marker stood for included."""
    if len(frames) <= count:
        return frames
    skipped = sum(_frames_in(frame) for frame in frames[:-count])
    return [{"skipped_frames": skipped}, *frames[-count:]]


def _frames_in(entry: Any) -> int:
    """How many frames an entry of ``frames`` stands for: a marker its count, a frame one."""
    if isinstance(entry, dict):
        skipped = entry.get("skipped_frames")
        if isinstance(skipped, int) and not isinstance(skipped, bool) and skipped >= 0:
            return skipped
    return 1


def _cut_members(record: dict[str, Any], limit: int) -> int:
    """Group members: their frames to the innermost three; then members left out from the
    last, one at a time, down to the first; then the first one's own members and causes.
    Each member left out is counted in ``exceptions_skipped``, each cause in
    ``causes_skipped``."""
    members = _list(record, "exceptions")
    if not members:
        return _size(record)
    for item in list(_items(record))[1:]:
        if isinstance(item.get("frames"), list):
            item["frames"] = _innermost(item["frames"], 3)
    size = _size(record)
    while size > limit and len(members) > 1:
        members.pop()
        _add_count(record, "exceptions_skipped", 1)
        size = _size(record)
    first = members[0]
    if size > limit and isinstance(first, dict):
        _add_count(first, "exceptions_skipped", len(_list(first, "exceptions")))
        _add_count(first, "causes_skipped", len(_list(first, "causes")))
        first.pop("exceptions", None)
        first.pop("causes", None)
        size = _size(record)
    return size


def _drop_request_details(record: dict[str, Any], _limit: int) -> int:
    record.pop("headers", None)
    record.pop("query", None)
    contexts = record.pop("contexts", None)
    if isinstance(contexts, dict):
        _add_count(record, "scope_truncated", len(contexts))
    return _size(record)


def _drop_culprit_locals(record: dict[str, Any], _limit: int) -> int:
    blamed = _blamed(record)
    if isinstance(blamed, dict):
        blamed.pop("locals", None)
    return _size(record)


def _cut_tags(record: dict[str, Any], limit: int) -> int:
    """Tag values cut to 32 characters; then, when that is not enough, the tags left out.
    Each value cut and each tag left out counts in ``scope_truncated``."""
    tags = record.get("tags")
    if not isinstance(tags, dict) or not tags:
        return _size(record)
    cut = 0
    for key, value in tags.items():
        if isinstance(value, str) and len(value) > _CUT_TAG_CHARS:
            tags[key] = cut_scrubbed(value, _CUT_TAG_CHARS)
            cut += 1
    _add_count(record, "scope_truncated", cut)
    size = _size(record)
    if size > limit:
        del record["tags"]
        _add_count(record, "scope_truncated", len(tags))
        size = _size(record)
    return size


def _drop_causes(record: dict[str, Any], _limit: int) -> int:
    causes = record.pop("causes", None)
    if isinstance(causes, list):
        _add_count(record, "causes_skipped", len(causes))
    return _size(record)


_CUTS: tuple[Callable[[dict[str, Any], int], int], ...] = (
    _drop_outer_locals,
    _shorten_messages,
    _drop_cause_frames,
    _keep_innermost_frames,
    _cut_members,
    _drop_request_details,
    _drop_culprit_locals,
    _cut_tags,
    _drop_causes,
)
"""The cuts, in order; each returns the report's size after it."""


def _fallback(record: dict[str, Any], limit: int) -> dict[str, Any]:
    """What is left of a report no cut made fit: the fields of ``_IDENTIFYING``, its message
    cut to 256 characters and its innermost three frames without their locals; then one
    frame; then no frame (a marker counts them) and every text cut to 64 characters; and at
    the very last the exception's type and fingerprint alone. Members and causes left out
    are counted."""
    kept = {key: record[key] for key in _IDENTIFYING if key in record}
    _add_count(kept, "exceptions_skipped", len(_list(record, "exceptions")))
    _add_count(kept, "causes_skipped", len(_list(record, "causes")))
    if isinstance(kept.get("message"), str):
        kept["message"] = cut_scrubbed(kept["message"], _FALLBACK_MESSAGE_CHARS)
    frames = _list(kept, "frames")
    for frame in frames:
        if isinstance(frame, dict):
            frame.pop("locals", None)
    for count in (3, 1):
        kept["frames"] = _innermost(frames, count)
        if _size(kept) <= limit:
            return kept
    kept["frames"] = [{"skipped_frames": sum(_frames_in(frame) for frame in frames)}]
    for key, value in kept.items():
        if isinstance(value, str):
            kept[key] = cut_scrubbed(value, _FALLBACK_VALUE_CHARS)
    if _size(kept) <= limit:
        return kept
    return {
        key: kept[key]
        for key in ("exception_type", "fingerprint", "truncated", "original_bytes")
        if key in kept
    }

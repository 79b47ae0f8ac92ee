"""Exception reports: counted on the spot, built off the request path, grouped and folded.

The request path does only what must happen there: mark the exception as reported (so no
other layer reports it again), count it, note it on the active span, and hand it to the
writer. On the writer's thread the reporter computes the fingerprint, decides whether to
write it in full or fold it into a summary, and builds, scrubs and size-caps the report.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._config import Config
from ._context import RequestContext
from ._exceptions import (
    MESSAGE_TIME_BUDGET_SECONDS,
    FrameClassifier,
    LocalsBudget,
    Renderer,
    chain,
    culprit,
    describe,
    error_path,
    fingerprint,
    is_reportable,
    raised_at,
    safe_message,
    type_name,
    walk_tb,
)
from ._metrics import Metrics
from ._output import Emitter, dumps, iso_timestamp
from ._scrub import Scrubber
from ._vocabulary import NO_ROUTE, Phase
from ._writer import Writer

_REQUEST_PHASES = frozenset({"request", "response", "background"})
REPORTED_ATTR = "__sentinel_reported__"
_UNMARKABLE_LIMIT = 256
_PREKEY_CACHE_LIMIT = 4096
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
        "location",
        "phase",
        "pre_key",
        "query_string",
        "raw_headers",
        "span_id",
        "tb",
        "timestamp",
        "trace_id",
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
        self.renderer = Renderer()
        self.folds = FoldTable(
            config.fold_window_seconds, config.fold_full_reports, config.max_fingerprints, clock
        )
        self._fingerprints: dict[tuple[Any, ...], str] = {}
        self._pending_summaries: deque[Summary] = deque()
        writer.add_summaries(self._due_summaries, "reporter")
        # Exceptions that refuse the marker attribute (frozen dataclasses, attrs) are
        # remembered by id; holding them keeps their id from being reused meanwhile.
        self._reported_unmarkable: OrderedDict[int, BaseException] = OrderedDict()
        self._unmarkable_lock = threading.Lock()
        self._host = socket.gethostname()

    # -- the request path -------------------------------------------------------------------

    def report(
        self,
        exc: BaseException,
        phase: Phase,
        request: RequestContext | None = None,
        *,
        route: str | None = None,
        sync: bool = False,
    ) -> bool:
        """Count and queue ``exc``; False when it was already reported or is not an error.

        Never raises: a failure here is counted as an internal error.
        """
        try:
            # A group around a single error (its other members cancelled) is usually a task
            # group's wrapping (anyio, asyncio.TaskGroup); the bug is the error inside it.
            # Both are marked.
            path = error_path(exc)
            group, exc = exc, path[-1]
            if not is_reportable(exc, in_request=request is not None and phase in _REQUEST_PHASES):
                return False
            group_seen = group is not exc and self._already_reported(group)
            if self._already_reported(exc) or group_seen:
                return False
            location = request.location if request is not None else self._emitter.location
            route = request.route if request is not None else (route or NO_ROUTE)
            exception_type = type_name(type(exc))
            self._metrics.count_exception(location, route, exception_type, phase)
            occurrence = Occurrence(
                exc, phase, location, exception_type, {"route": route}, raised_at(path)
            )
            if request is not None:
                occurrence.context = _request_fields(request)
                occurrence.raw_headers = request.raw_headers
                occurrence.query_string = request.query_string
            if group is not exc:
                occurrence.context["wrapped_in"] = type_name(type(group))
            occurrence.pre_key = _pre_key(exc, occurrence.tb)
            self._note_on_span(exc, exception_type, occurrence)
            known = self._fingerprints.get(occurrence.pre_key) if occurrence.pre_key else None
            if known is not None:
                full, due = self.folds.decide((known, location), exception_type)
                self._pending_summaries.extend(due)
                if not full:
                    return True
                occurrence.fingerprint, occurrence.decided = known, True
            if sync:  # the process is about to end: written now, on this thread
                self._writer.run_now(self._process, occurrence)
            else:
                self._writer.submit(self._process, occurrence)
        except Exception:
            self._metrics.internal_error("reporter")
        return True

    def _already_reported(self, exc: BaseException) -> bool:
        """Whether ``exc`` was reported before; marks it as reported now."""
        try:
            if getattr(exc, REPORTED_ATTR, False):
                return True
            setattr(exc, REPORTED_ATTR, True)
            return False
        except Exception:
            with self._unmarkable_lock:
                if self._reported_unmarkable.get(id(exc)) is exc:
                    return True
                self._reported_unmarkable[id(exc)] = exc
                if len(self._reported_unmarkable) > _UNMARKABLE_LIMIT:
                    self._reported_unmarkable.popitem(last=False)
            return False

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
                        "exception.message": self._scrubber.text(
                            safe_message(
                                exc, self.renderer, time.monotonic() + _SPAN_MESSAGE_SECONDS
                            )
                        ),
                        "exception.escaped": True,
                        # Computed here, only for traced requests, so the span and the
                        # report can be joined; the worker reuses it.
                        "exception.fingerprint": self._fingerprint_now(occ),
                    },
                )
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

    def _take_pending(self) -> list[Summary]:
        due = []
        while self._pending_summaries:
            due.append(self._pending_summaries.popleft())
        return due

    def _process(self, occ: Occurrence) -> None:
        """Fingerprint, fold or build, and write one occurrence (on the writer's thread)."""
        try:
            if occ.fingerprint is None:
                occ.fingerprint = fingerprint(occ.exc, self.classifier, occ.tb)
                self._remember_fingerprint(occ.pre_key, occ.fingerprint)
            if not occ.decided:
                full, due = self.folds.decide((occ.fingerprint, occ.location), occ.exception_type)
                self._write_summaries(due)
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

        self._emitter.emit("error", "unhandled_exception", **record)

    def _build(self, occ: Occurrence) -> dict[str, Any]:
        config = self.config
        # The app's own __str__ and __repr__ run on the renderer's helpers: this report
        # waits for them until these deadlines at most, whatever they do.
        budget = (
            LocalsBudget(config.locals_max_chars, config.locals_time_budget_seconds, self.renderer)
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
        causes = []
        for relation, member in chain(exc)[1:]:
            cause = describe(
                member,
                self.classifier,
                config.max_frames,
                self._scrubber,
                None,
                renderer=self.renderer,
                deadline=deadline,
            )
            cause["relation"] = relation
            causes.append(cause)
        record: dict[str, Any] = {
            "timestamp": iso_timestamp(occ.timestamp),
            "location": occ.location,
            "exception_type": described.pop("exception_type"),
            "message": described.pop("message"),
            "fingerprint": occ.fingerprint,
            "culprit": culprit(described["frames"]),
            "phase": occ.phase,
            **occ.context,
            "trace_id": occ.trace_id,
            "span_id": occ.span_id,
            "version": config.version,
            "host": self._host,
            "pid": os.getpid(),
            "frames": described.pop("frames"),
        }
        record.update(described)
        if causes:
            record["causes"] = causes
        if "path" in record:
            record["path"] = self._scrubber.text(record["path"])
        if occ.raw_headers is not None:
            record["headers"] = self._scrubber.pairs(_decode_headers(occ.raw_headers))
        if occ.query_string is not None:
            record["query"] = self._scrubber.query(occ.query_string.decode("latin-1"))
        envelope = self._emitter.envelope_bytes("unhandled_exception", "error")
        return _cap(record, config.max_report_bytes - envelope)

    def _write_summaries(self, due: list[Summary]) -> None:
        for level, event, fields in self._summary_records(due):
            self._emitter.emit(level, event, **fields)

    def _due_summaries(self, everything: bool) -> list[tuple[str, str, dict[str, Any]]]:
        return self._summary_records(self._take_pending() + self.folds.expired(everything))

    def _summary_records(self, due: list[Summary]) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (
                "warning",
                "exception_summary",
                {
                    "fingerprint": fp,
                    "location": location,
                    "exception_type": exception_type,
                    "occurrences": occurrences,
                    "window_seconds": self.config.fold_window_seconds,
                },
            )
            for fp, location, exception_type, occurrences in due
        ]


class _Released(Exception):
    pass


_RELEASED = _Released()


def _pre_key(exc: BaseException, tb: TracebackType | None) -> tuple[Any, ...] | None:
    """A cheap in-process stand-in for the fingerprint: code objects and lines of the chain."""
    if isinstance(exc, BaseExceptionGroup):
        return None
    parts: list[Any] = []
    for relation, member in chain(exc):
        parts.append(relation)
        parts.append(type(member))
        member_tb = tb if member is exc else member.__traceback__
        parts.extend((frame.f_code, lineno) for frame, lineno in walk_tb(member_tb))
    return tuple(parts)


def _request_fields(request: RequestContext) -> dict[str, Any]:
    return {
        "method": request.method,
        "route": request.route,
        "path": request.path,
        "request_id": request.request_id,
        "status": request.status,
        "response_started": request.response_started,
    }


def _decode_headers(raw: Any) -> list[tuple[str, str]]:
    pairs = []
    for name, value in list(raw or ())[:100]:
        pairs.append((bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1")))
    return pairs


def _cap(record: dict[str, Any], limit: int) -> dict[str, Any]:
    """Shrink a report that serializes to more than ``limit`` bytes, marking what was cut."""
    size = len(dumps(record))
    if size <= limit:
        return record
    record["truncated"] = True
    record["original_bytes"] = size
    steps: list[Callable[[dict[str, Any]], None]] = [
        _drop_locals,
        _shorten_messages,
        _drop_cause_frames,
        _keep_innermost_frames,
        _drop_members,
        _drop_request_details,
    ]
    for step in steps:
        step(record)
        if len(dumps(record)) <= limit:
            return record
    record["frames"] = record["frames"][-3:]
    record["message"] = record["message"][:256]
    return record


def _all_frames(record: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(record.get("frames", []))
    for nested in (*record.get("causes", []), *record.get("exceptions", [])):
        found.extend(_all_frames(nested))
    return found


def _drop_locals(record: dict[str, Any]) -> None:
    for frame in _all_frames(record):
        frame.pop("locals", None)


def _shorten_messages(record: dict[str, Any]) -> None:
    for item in (record, *record.get("causes", []), *record.get("exceptions", [])):
        if len(item.get("message", "")) > 1024:
            item["message"] = item["message"][:1024] + "... [truncated]"
    for frame in _all_frames(record):
        if len(frame.get("source", "")) > 200:
            frame["source"] = frame["source"][:200] + "..."


def _drop_cause_frames(record: dict[str, Any]) -> None:
    for cause in record.get("causes", []):
        cause["frames"] = cause.get("frames", [])[-2:]


def _keep_innermost_frames(record: dict[str, Any]) -> None:
    if len(record["frames"]) > 20:
        record["frames"] = [{"skipped_frames": len(record["frames"]) - 20}, *record["frames"][-20:]]


def _drop_members(record: dict[str, Any]) -> None:
    if "exceptions" in record:
        record["exceptions_skipped"] = len(record.pop("exceptions"))


def _drop_request_details(record: dict[str, Any]) -> None:
    record.pop("headers", None)
    record.pop("query", None)
    record.pop("causes", None)

"""Helpers for users' tests: traffic "from" any location, and what sentinel wrote about it.

- :func:`capture_reports` installs a fresh sentinel for a block (an app wrapped or built in
  the block reports to it); :func:`observe` captures from the sentinel an app was wrapped
  with. Both give a :class:`Captured`: the records written, the metrics, and assertions
  that show what was seen when they fail. A capture never lets a test pass on reports it
  cannot see, and both leave the process as they found it.
- :class:`Client` and :class:`AsyncClient` (on httpx: ``pip install 'sentinel-asgi[testing]'``)
  send requests to an app in-process or to a URL, each with a location and a request id.
- :func:`serve` runs an app on a real uvicorn on loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import functools
import io
import math
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from ._config import Config, ConfigOptions
from ._context import restore_process_annotations, save_process_annotations
from ._current import current
from ._log_filter import scrub_log_text
from ._middleware import _REQUEST_ID_RE, SentinelMiddleware, find_sentinel
from ._mutation import compared
from ._output import dumps
from ._runtime import (
    PROCESS_WIDE_PARTS,
    Sentinel,
    capturing,
    install_process_wide,
    metrics_endpoint,
    process_wide_installed,
    serve_metrics,
    set_current,
    stop_metrics_endpoint,
    uninstall_process_wide,
)
from ._scrub import Scrubber
from .types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AsyncClient",
    "Captured",
    "Client",
    "Exchange",
    "capture_reports",
    "observe",
    "serve",
]

T = TypeVar("T")
_SHOWN = 20
"""At most this many items are listed in a failure message (the rest are counted)."""
_HTTPX_MISSING = (
    "sentinel.testing's clients need httpx, which is not installed: "
    "pip install 'sentinel-asgi[testing]'"
)


@dataclass(frozen=True)
class Exchange:
    """One request a testing client sent, and the status it got back."""

    method: str
    path: str
    """Path and query string as sent, scrubbed (the query by key and by value) as sentinel
    scrubs a request target in a log line."""
    location: str | None
    """The location header's value as sent (None when none was)."""
    request_id: str | None
    """The request id header's value as sent (None when the sentinel takes none)."""
    status: int

    def __str__(self) -> str:
        where = f"location {self.location}" if self.location is not None else "no location"
        return f"{self.method} {self.path} -> {self.status} ({where}, request id {self.request_id})"


class Captured:
    """Records written by a sentinel under test, its metrics registry, and the responses the
    testing clients got from it.

    With ``sees_all_traffic`` (a :func:`capture_reports` capture), the responses the testing
    clients get during the capture from an app whose reports it cannot see (an app wrapped
    with a sentinel of its own, or not at all) make its assertions fail, and the block; so
    do the records written during it by the sentinel that was current when it began, and by
    the sentinels of earlier captures (an app's middleware stack still built with one), for
    traffic sent any other way (Starlette's ``TestClient``, plain httpx).

    In async code (asyncio or trio), wait with :meth:`wait_for_async` and
    :meth:`flush_async`: the sync ones would block the event loop the app runs on."""

    def __init__(
        self, sentinel: Sentinel, stream: io.StringIO, *, sees_all_traffic: bool = False
    ) -> None:
        self.sentinel = sentinel
        self.registry: CollectorRegistry = sentinel.registry
        self.stream = stream
        self.sees_all_traffic = sees_all_traffic
        self._records: list[dict[str, Any]] = []
        self._exchanges: list[Exchange] = []
        self._unseen: list[tuple[Exchange, str]] = []
        self._elsewhere: list[tuple[dict[str, Any], str]] = []
        self._listened: list[Sentinel] = []
        """Sentinels besides this one whose records during the capture are noted as unseen."""
        self._lock = threading.Lock()

    def sink(self, record: dict[str, Any]) -> None:
        """Keep one record (the sentinel calls this for every record it writes)."""
        with self._lock:
            self._records.append(record)

    def _note_exchange(self, exchange: Exchange) -> None:
        """Remember a response a client got (the clients call this for captures in force)."""
        with self._lock:
            self._exchanges.append(exchange)

    def _note_unseen(self, exchange: Exchange, why: str) -> None:
        """Remember a response a client got from an app whose reports this capture cannot
        see, and ``why`` (the clients call this for captures in force)."""
        with self._lock:
            self._unseen.append((exchange, why))

    def _note_elsewhere(self, record: dict[str, Any], why: str) -> None:
        """Remember a record of a request (a report, a request record, a mutation) that a
        sentinel this capture does not see wrote during it, and ``why`` it cannot see it."""
        with self._lock:
            self._elsewhere.append((record, why))

    def assert_sees_all_traffic(self) -> None:
        """Fail when requests were served during the capture by an app whose reports,
        records and metrics this capture cannot see (responses the testing clients got, or
        records another sentinel wrote), saying what to do: then any other assertion would
        pass on nothing. The assertions and the end of a :func:`capture_reports` block
        check this."""
        for sentinel in self._listened:
            if not sentinel.closed:
                sentinel.flush()  # its queued records, noted while the capture is in force
        with self._lock:
            unseen, elsewhere = list(self._unseen), list(self._elsewhere)
        if not unseen and not elsewhere:
            return
        parts = []
        if unseen:
            reasons = sorted({why for _, why in unseen})
            parts.append(
                f"{len(unseen)} responses the testing clients got during this capture came "
                f"from an app whose reports it cannot see ({'; '.join(reasons)}):\n"
                + _listing([str(exchange) for exchange, _ in unseen])
            )
        if elsewhere:
            reasons = sorted({why for _, why in elsewhere})
            parts.append(
                f"{len(elsewhere)} records of requests served during this capture were written "
                f"by a sentinel it cannot see ({'; '.join(reasons)}):\n"
                + _listing([_describe_any(record) for record, _ in elsewhere])
            )
        msg = "\n".join(parts) + (
            "\nwrap the app inside the capture_reports() block (sentinel.instrument(app), "
            "or instrument(app, sentinel=captured.sentinel)), or capture from the app's own "
            "sentinel with sentinel.testing.observe(app) instead"
        )
        if elsewhere:
            msg += (
                "; an app that added SentinelMiddleware with add_middleware builds its stack "
                "with the capture's sentinel when sent requests with sentinel.testing.Client "
                "or AsyncClient (or after app.middleware_stack = None in the block)"
            )
        raise AssertionError(msg)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the requests being served have finished and their reports are written.

        A client can have its response before the server's middleware is done with the
        request (an inner error middleware sends the 500, then the exception travels up),
        so waiting for the queue alone could miss the last report. In async code with
        requests still in flight it is a RuntimeError (they may be waiting for the very
        event loop this would block): ``await`` :meth:`flush_async` there.
        """
        if self.sentinel.in_flight > 0:
            what = "flush() (which reading records, reports or events does)"
            _refuse_in_async_code(what, "await captured.flush_async()")
        deadline = time.monotonic() + timeout
        while self.sentinel.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.sentinel.flush(max(0.0, deadline - time.monotonic()))

    async def flush_async(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (as flush())
        """:meth:`flush` for async code (asyncio or trio): the event loop keeps running, so
        the requests and tasks on it can finish."""
        import anyio.to_thread

        deadline = time.monotonic() + timeout
        while self.sentinel.in_flight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.005)  # (no event says when the last request ends)
        remaining = max(0.0, deadline - time.monotonic())
        await anyio.to_thread.run_sync(self.sentinel.flush, remaining)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (after a flush)."""
        self.flush()
        with self._lock:
            return list(self._records)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Records whose ``event`` is ``event``, e.g. ``"unhandled_exception"``; an event
        sentinel never writes is a ValueError naming the closest ones."""
        _check_event(event)
        return self._events(self.records, event)

    @staticmethod
    def _events(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
        return [record for record in records if record.get("event") == event]

    def _records_now(self) -> list[dict[str, Any]]:
        """The records written so far, without a flush."""
        with self._lock:
            return list(self._records)

    @property
    def reports(self) -> list[dict[str, Any]]:
        """The ``unhandled_exception`` records."""
        return self.events("unhandled_exception")

    @property
    def handled_reports(self) -> list[dict[str, Any]]:
        """The ``handled_exception`` records (``sentinel.capture_exception``)."""
        return self.events("handled_exception")

    @property
    def request_records(self) -> list[dict[str, Any]]:
        """The kept (sampled) ``request`` records; ``sample_rate`` says what each stands for."""
        return self.events("request")

    @property
    def exchanges(self) -> list[Exchange]:
        """The responses :class:`Client` and :class:`AsyncClient` got during the capture."""
        with self._lock:
            return list(self._exchanges)

    @property
    def mutations(self) -> list[dict[str, Any]]:
        """Reports of writes to process-global state made by requests: attributed ``exact``
        or to ``suspects`` in flight. ``unattributed`` writes (made on the serving loop
        outside any request while requests were in flight) and the summaries of repeats
        are in ``events("global_state_mutated")``."""
        return [
            record
            for record in self.events("global_state_mutated")
            if not record.get("summary") and record.get("attribution") != "unattributed"
        ]

    def assert_no_unhandled_exceptions(self) -> None:
        """Fail when sentinel reported an unhandled exception, showing each report."""
        self.assert_sees_all_traffic()
        found = self.reports
        if not found:
            return
        folded = sum(int(s.get("occurrences", 0)) for s in self.events("exception_summary"))
        more = f" (and {folded} repeats folded into summaries)" if folded else ""
        msg = f"sentinel reported unhandled exceptions ({len(found)}){more}:\n" + _listing(
            [_describe_report(report) for report in found]
        )
        raise AssertionError(msg)

    def assert_no_global_mutation(self) -> None:
        """Fail when any request wrote process-global state, naming each write: target, key,
        request, code line, location and the values (scrubbed)."""
        self.assert_sees_all_traffic()
        found = self.mutations
        if not found:
            return
        msg = f"requests mutated process-global state ({len(found)}):\n" + _listing(
            [_describe_mutation(mutation) for mutation in found]
        )
        raise AssertionError(msg)

    def assert_no_mutations(self) -> None:
        """The same as :meth:`assert_no_global_mutation`."""
        self.assert_no_global_mutation()

    def assert_all_5xx_kept(self) -> None:
        """Fail unless every 5xx response a testing client got during the capture has a kept
        request record, matched by request id; the failure lists the unmatched responses and
        the records that were kept.

        Needs the sentinel to take request ids from a header (``request_id_header``,
        ``SENTINEL_REQUEST_ID_HEADER``), and the traffic sent with :class:`Client` or
        :class:`AsyncClient` (with no responses seen at all, it fails rather than pass).
        """
        self.assert_sees_all_traffic()
        exchanges = self.exchanges
        if not exchanges:
            msg = (
                "assert_all_5xx_kept() saw no responses: send the requests with "
                "sentinel.testing.Client or AsyncClient while the capture is open"
            )
            raise AssertionError(msg)
        failed = [e for e in exchanges if 500 <= e.status <= 599]
        kept = self.request_records
        kept_ids = {record.get("request_id") for record in kept}
        missing = [e for e in failed if e.request_id is None or e.request_id not in kept_ids]
        if not missing:
            return
        lines = [f"{e}{'' if e.request_id else ' (sent without a request id)'}" for e in missing]
        hint = ""
        if any(e.request_id is None for e in missing):
            hint = (
                "\nresponses sent without a request id cannot be matched: configure the "
                "sentinel's request_id_header (SENTINEL_REQUEST_ID_HEADER)"
            )
        msg = (
            f"{len(missing)} of {len(failed)} 5xx responses have no kept request record:\n"
            + _listing(lines)
            + f"\nkept request records ({len(kept)}):\n"
            + (_listing([_describe_record(record) for record in kept]) if kept else "  none")
            + hint
        )
        raise AssertionError(msg)

    def wait_for(
        self, count: int, event: str = "unhandled_exception", timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The ``event`` records once there are at least ``count`` (or after ``timeout``).

        For reports that arrive on their own time: an unawaited task's failure, say, is
        reported after ``task_grace_seconds``. In async code it is a RuntimeError: what it
        waits for may need the event loop it would block; ``await`` :meth:`wait_for_async`
        there.
        """
        _check_event(event)
        found = self.events(event)
        if len(found) >= count:
            return found  # nothing to wait for, in async code too
        _refuse_in_async_code("wait_for()", "await captured.wait_for_async(...)")
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            found = self.events(event)
        return found

    async def wait_for_async(
        self,
        count: int,
        event: str = "unhandled_exception",
        timeout: float = 5.0,  # noqa: ASYNC109 (returns what it found, as wait_for() does)
    ) -> list[dict[str, Any]]:
        """:meth:`wait_for` for async code (asyncio or trio): the event loop keeps running
        while it waits, so a task on it can fail and be reported."""
        import anyio

        _check_event(event)
        deadline = time.monotonic() + timeout
        while True:
            await self.flush_async(max(0.0, deadline - time.monotonic()))
            found = self._events(self._records_now(), event)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            await anyio.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0.0 when
        none does): ``metric("sentinel_http_requests_total", route="/items/{id}")`` counts
        that route's requests over every location, method and code.

        A ``name`` the registry has no metric for, or a label that metric does not have, is
        a ValueError naming the closest ones: a typo never reads as 0. With :func:`observe`
        on a sentinel that uses prometheus_client's default registry, the value counts
        everything since the process started, not only the block.
        """
        for label, value in labels.items():
            if not isinstance(value, str):
                msg = f"label values are text: {label}={value!r} (write {label}={str(value)!r})"
                raise TypeError(msg)
        families = list(self.registry.collect())
        family = next((f for f in families if name in _sample_names(f)), None)
        if family is None:
            known = sorted({n for f in families for n in _sample_names(f)})
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            msg = f"the captured registry has no metric {name!r}{hint}"
            raise ValueError(msg)
        samples = [sample for sample in family.samples if sample.name == name]
        names = _label_names(self.registry, family, name, samples)
        unknown = sorted(set(labels) - names) if names is not None else []
        if unknown:
            msg = (
                f"{name} has no label {', '.join(unknown)}; its labels are "
                f"{', '.join(sorted(names or ())) or 'none'}"
            )
            raise ValueError(msg)
        return float(
            sum(
                sample.value
                for sample in samples
                if all(sample.labels.get(label) == value for label, value in labels.items())
            )
        )


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
"""The samples of a family by its type, after its name (the rest have the name itself)."""


def _sample_names(family: Metric) -> set[str]:
    """Every sample name ``family`` has or may have (a counter with no child yet has none)."""
    names = {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names | {sample.name for sample in family.samples}


def _label_names(
    registry: CollectorRegistry, family: Metric, name: str, samples: list[Any]
) -> set[str] | None:
    """The labels of the samples called ``name``: those of its samples, and those its
    family declares (so a misspelt label is caught before the first sample exists); None
    when a family without samples does not say."""
    names: set[str] = {label for sample in samples for label in sample.labels}
    declared = getattr(family, "_labelnames", None)
    if not declared:
        # prometheus_client's own metrics (read where its registry keeps them).
        collector = getattr(registry, "_names_to_collectors", {}).get(name)
        for part in (collector, getattr(collector, "counter", None)):
            if getattr(part, "_name", None) == family.name:
                declared = getattr(part, "_labelnames", None)
        for part in getattr(collector, "_families", ()) or ():
            if getattr(part, "_name", None) == family.name:
                declared = getattr(part, "_labelnames", None)
    if declared:
        names.update(declared)
    elif not samples:
        return None
    if name.endswith("_bucket"):
        names.add("le")
    if family.type == "summary" and name == family.name:
        names.add("quantile")
    return names


_EVENTS = frozenset(
    {
        "exception_summary",
        "global_state_mutated",
        "handled_exception",
        "metrics_endpoint_unavailable",
        "reports_dropped",
        "request",
        "series_budget_reached",
        "spans_dropped",
        "traces_unavailable",
        "unhandled_exception",
    }
)
"""Every ``event`` sentinel writes a record with (a test keeps it equal to the code's)."""
_TRAFFIC_EVENTS = frozenset(
    {"request", "unhandled_exception", "handled_exception", "global_state_mutated"}
)
"""The events of records about one request (a summary of repeats excepted)."""


def _check_event(event: object) -> None:
    """A ValueError naming the closest events when sentinel never writes ``event``: a typo
    must not read as "no such records"."""
    if isinstance(event, str) and event in _EVENTS:
        return
    if not isinstance(event, str):
        msg = f'"event" must be the text of an event name: {event!r}'
        raise TypeError(msg)
    close = difflib.get_close_matches(event, sorted(_EVENTS), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    msg = f"sentinel writes no event {event!r}; {hint}its events are {', '.join(sorted(_EVENTS))}"
    raise ValueError(msg)


def _in_async_code() -> bool:
    """Whether this thread runs async code now (an asyncio loop, or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _refuse_in_async_code(what: str, instead: str) -> None:
    if _in_async_code():
        msg = (
            f"{what} cannot wait in async code: it would block the event loop that the app's "
            f"requests and tasks run on, so what it waits for could not happen; {instead} "
            "instead"
        )
        raise RuntimeError(msg)


def _listing(lines: list[str]) -> str:
    shown = [f"- {line}" for line in lines[:_SHOWN]]
    if len(lines) > _SHOWN:
        shown.append(f"... and {len(lines) - _SHOWN} more")
    return "\n".join(shown)


def _code_line(report: dict[str, Any]) -> str:
    """The innermost frame of the app's own code (else the innermost one)."""
    frames = [f for f in report.get("frames") or () if isinstance(f, dict)]
    if not frames:
        return "an unknown line"
    frame = next((f for f in reversed(frames) if f.get("in_app")), frames[-1])
    return f"{frame.get('file')}:{frame.get('line')} in {frame.get('function')}"


def _describe_report(report: dict[str, Any]) -> str:
    request = (
        f"{report.get('method')} {report.get('route')}, request id {report.get('request_id')}, "
        if report.get("route") is not None and report.get("method") is not None
        else ""
    )
    return (
        f"{report.get('exception_type')}: {str(report.get('message'))[:200]}\n"
        f"  ({request}phase {report.get('phase')}, location {report.get('location')}) "
        f"at {_code_line(report)}"
    )


def _describe_mutation(mutation: dict[str, Any]) -> str:
    # What is unknown (the request and code line of a write found by comparison) is left
    # out rather than shown as None.
    suspects = mutation.get("suspects")
    request = f"request id {mutation.get('request_id')}"
    if suspects:
        request = f"suspects {suspects!r:.200}"
    by = f"{mutation['method']} {mutation.get('route')}" if mutation.get("method") else ""
    where = ""
    if mutation.get("file"):
        where = f" at {mutation['file']}"
        if mutation.get("line") is not None:
            where += f":{mutation['line']}"
        if mutation.get("function"):
            where += f" in {mutation['function']}"
    return (
        f"{mutation.get('target')} {mutation.get('key')!r}{f' by {by}' if by else ''}{where} "
        f"({mutation.get('attribution')}; location {mutation.get('location')}, {request}; "
        f"{mutation.get('old')!r:.80} -> {mutation.get('new')!r:.80})"
    )


def _describe_record(record: dict[str, Any]) -> str:
    return (
        f"{record.get('method')} {record.get('path')} -> {record.get('status')} (location "
        f"{record.get('location')}, request id {record.get('request_id')}, sample_rate "
        f"{record.get('sample_rate')})"
    )


def _describe_any(record: dict[str, Any]) -> str:
    """One record of a request, whatever its event, after its event's name."""
    event = record.get("event")
    if event == "request":
        return f"request: {_describe_record(record)}"
    if event == "global_state_mutated":
        return f"{event}: {_describe_mutation(record)}"
    return f"{event}: {_describe_report(record)}"


_active: list[Captured] = []
"""The captures in force: testing clients note their responses there."""
_active_lock = threading.Lock()


@contextmanager
def _in_force(captured: Captured) -> Iterator[None]:
    with _active_lock:
        _active.append(captured)
    try:
        yield
    finally:
        with _active_lock:
            _active.remove(captured)


def _note(exchange: Exchange, sentinel: Sentinel | None, *, any_sentinel: bool) -> None:
    with _active_lock:
        captures = [c for c in _active if any_sentinel or c.sentinel is sentinel]
        # An app whose sentinel no capture in force sees: its reports go elsewhere.
        blind = [] if captures else [c for c in _active if c.sees_all_traffic]
    for captured in captures:
        captured._note_exchange(exchange)
    if blind:
        if sentinel is None:
            why = "the app is not wrapped with sentinel"
        elif sentinel.closed:
            why = "the app is wrapped with a sentinel that was closed, a capture's that ended"
        else:
            why = "the app is wrapped with a sentinel of its own, installed before the block"
        for captured in blind:
            captured._note_unseen(exchange, why)


_EARLIER_CAPTURE = (
    "the sentinel of an earlier capture_reports() block, which an app's middleware stack "
    "still holds: Starlette's TestClient and plain httpx do not have it built again"
)
_BEFORE_THE_BLOCK = "the sentinel current when the block began, an app wrapped before it"


def _note_elsewhere(sentinel: Sentinel, record: dict[str, Any], why: str) -> None:
    """A record ``sentinel`` wrote: when it is about a request and no capture in force sees
    that sentinel, the captures that must see all traffic are told."""
    if record.get("event") not in _TRAFFIC_EVENTS or record.get("summary"):
        return
    with _active_lock:
        if any(c.sentinel is sentinel for c in _active):
            return
        blind = [c for c in _active if c.sees_all_traffic]
    for captured in blind:
        captured._note_elsewhere(record, why)


def _unbind_stale_stack(app: Any) -> None:
    """Have an app that added sentinel with Starlette's ``add_middleware`` build its
    middleware stack again at its next call, when the stack was built with a sentinel that
    has closed since (the capture of an earlier test), or, inside a
    :func:`capture_reports` block, with one no capture in force sees: built again, it
    reports to the capture (:func:`sentinel.install` hands the capture's sentinel out).
    So a module-level app reports to each test's capture, in any test order. A stack whose
    sentinel refused its configuration (in another test's capture, say) is built again too.
    """
    stack = getattr(app, "middleware_stack", None)
    if stack is None or getattr(app, "build_middleware_stack", None) is None:
        return
    found = find_sentinel(stack)
    if not isinstance(found, SentinelMiddleware):
        return
    if found.config_error is not None:
        app.middleware_stack = None
        return
    with _active_lock:
        watched = any(c.sentinel is found.sentinel for c in _active)
        capturing_all = any(c.sees_all_traffic for c in _active)
    if found.sentinel.closed or (capturing_all and not watched):
        app.middleware_stack = None


@contextmanager
def capture_reports(
    config: Config | None = None,
    *,
    span_exporter: SpanExporter | None = None,
    **overrides: Unpack[ConfigOptions],
) -> Iterator[Captured]:
    """Install a fresh sentinel (own registry, in-memory stream) for the ``with`` block.

    Configuration comes from ``config``/``overrides`` only, never from the environment, so
    tests are reproducible. With ``span_exporter`` (an ``InMemorySpanExporter``, say) the
    tail-sampled traces of kept requests go there; with a ``metrics_port``, the block's
    registry is served there (off by default, also for a ``config`` whose ``metrics_port``
    is Config's default, 9464: a Config cannot tell a value given from its default, so give
    ``metrics_port=`` to ``capture_reports`` itself to serve on that port).

    Every app wrapped or built in the block reports to the capture:
    ``sentinel.instrument(app)``, ``instrument(app, sentinel=captured.sentinel)``, and an
    app that added ``SentinelMiddleware`` with ``add_middleware`` (its stack is built at
    its first call; the testing clients have an app built in an earlier test build it
    again). An app's own settings must then be the capture's, or a ConfigError says which
    differ (give them to ``capture_reports`` too); where the app serves its metrics
    (``metrics_port``, ``metrics_host``) is left out. An app wrapped before the block keeps
    its own sentinel: responses a testing client gets from it (or from an app without
    sentinel) make the assertions and the block fail, saying to wrap it in the block or to
    use :func:`observe`; so do the request records and reports written during the block by
    the sentinel current when it began, or by an earlier capture's sentinel that an app's
    stack still holds, whatever sent the requests (Starlette's ``TestClient``, plain httpx).

    Afterwards the process is as before: the previous sentinel is current again, the
    process-level hooks the block installed (exception hooks, global-state watches, log
    filters) are removed, the tags and contexts set outside a request are the ones from
    before, and the metrics endpoint serves what it served before. Process-wide
    infrastructure that the first sentinel of the process starts stays, as it would after
    any sentinel: the ``sentinel-handover`` daemon thread and its ``gc.callbacks`` entry,
    which make the reports finalizers hand over (a failed future the garbage collector
    frees, an exception in ``__del__``) for whichever sentinel is current.
    """
    if config is None:
        config = Config()
    elif not isinstance(config, Config):
        msg = f'"config" must be a sentinel.Config: {config!r}'
        raise TypeError(msg)
    if "metrics_port" not in overrides and config.metrics_port == _DEFAULT_METRICS_PORT:
        config = config.replace(metrics_port=0)  # tests read the registry, not a port
    config = config.replace(**overrides)
    stream = io.StringIO()
    holder: list[Captured] = []
    ended = False

    def sink(record: dict[str, Any]) -> None:
        holder[0].sink(record)
        if ended:
            # Written after the block, by a stack an app built in it: the block now in
            # force cannot see that request.
            _note_elsewhere(sentinel, record, _EARLIER_CAPTURE)

    sentinel = Sentinel(
        config,
        registry=CollectorRegistry(),
        stream=stream,
        sinks=(sink,),
        span_exporter=span_exporter,
    )
    captured = Captured(sentinel, stream, sees_all_traffic=True)
    holder.append(captured)
    installed_before = process_wide_installed()
    annotations = save_process_annotations()
    served_before = metrics_endpoint()
    previous = set_current(sentinel)
    detach: Callable[[], None] = _nothing
    try:
        detach = _listen_to(previous, captured)
        install_process_wide()
        sentinel.start_metrics_endpoint()
        with capturing(sentinel), _in_force(captured):
            yield captured
            captured.assert_sees_all_traffic()
    finally:
        detach()
        sentinel.close()
        set_current(previous)
        sentinel.wait_closed()
        ended = True
        stop_metrics_endpoint(sentinel.registry)
        if served_before is not None and metrics_endpoint() is None:
            with contextlib.suppress(OSError):
                serve_metrics(*served_before)  # the endpoint the block's replaced
        uninstall_process_wide([p for p in PROCESS_WIDE_PARTS if p not in installed_before])
        restore_process_annotations(annotations)


_DEFAULT_METRICS_PORT = Config().metrics_port


def _nothing() -> None:
    pass


def _listen_to(previous: Sentinel | None, captured: Captured) -> Callable[[], None]:
    """Have the records ``previous`` (the sentinel current before the block) writes about
    requests during the block noted as unseen; returns what ends that."""
    if previous is None:
        return _nothing
    if not previous.closed:
        previous.flush()  # what its requests before the block left queued stays out of it

    def sink(record: dict[str, Any]) -> None:
        _note_elsewhere(previous, record, _BEFORE_THE_BLOCK)

    captured._listened.append(previous)
    return previous.attach_sink(sink)


@contextmanager
def observe(app_or_sentinel: Any) -> Iterator[Captured]:
    """Capture what a sentinel writes during the ``with`` block: the one given, or the one
    the app was wrapped with (``instrument`` or ``add_middleware``; for the latter the
    app's middleware stack is built now, as its first request would).

    An app without a sentinel, or whose sentinel was closed, is an error, never an empty
    capture. What was queued before the block is written first and stays out of it, and
    what changed process-global state before it (a fixture's ``monkeypatch.syspath_prepend``,
    its undoing after an earlier test) is the baseline its requests are compared with, not
    their doing; ``stream`` holds the block's records as JSON lines. The tags and contexts
    set outside a request during the block are forgotten afterwards.
    """
    if not isinstance(app_or_sentinel, Sentinel | str):
        _unbind_stale_stack(app_or_sentinel)
    if isinstance(app_or_sentinel, Sentinel):
        sentinel: Sentinel | None = app_or_sentinel
    elif isinstance(app_or_sentinel, str):
        msg = f"observe() needs the app or its Sentinel, not a URL: {app_or_sentinel!r}"
        raise TypeError(msg)
    else:
        sentinel = _sentinel_of(app_or_sentinel)
    if sentinel is None:
        msg = (
            "the app is not wrapped with sentinel (sentinel.instrument(app) or "
            f"app.add_middleware(sentinel.SentinelMiddleware)): {app_or_sentinel!r}"
        )
        raise ValueError(msg)
    if sentinel.closed:
        msg = (
            "observe() needs a sentinel that is not closed (a capture_reports() block's "
            f"ends with it): {app_or_sentinel!r}"
        )
        raise ValueError(msg)
    sentinel.flush()
    _rebaseline_mutations(sentinel)
    stream = io.StringIO()
    captured = Captured(sentinel, stream)

    def sink(record: dict[str, Any]) -> None:
        captured.sink(record)
        stream.write(dumps(record) + "\n")

    detach = sentinel.attach_sink(sink)
    annotations = save_process_annotations()
    try:
        with _in_force(captured):
            yield captured
    finally:
        try:
            captured.flush()
        finally:
            detach()
            restore_process_annotations(annotations)


def _rebaseline_mutations(sentinel: Sentinel) -> None:
    """Take process-global state as it is now as what requests are compared with, as a
    sentinel does at its first request: what the test changed before the block is not a
    request's doing."""
    if sentinel.mutations.mode == "off":
        return
    sentinel.mutations.probe.reset()
    for watch in compared:
        watch.resync()


def _sentinel_of(app: Any) -> Sentinel | None:
    """The sentinel ``app`` is wrapped with; None when there is none. Raises the
    :class:`~sentinel.ConfigError` of a wrapped app whose configuration is invalid."""
    found = find_sentinel(app)
    if isinstance(found, type):
        # Starlette's add_middleware: the layer is built with the stack, on the first call.
        stack = getattr(app, "middleware_stack", None)
        build = getattr(app, "build_middleware_stack", None)
        if stack is None and build is not None:
            stack = build()
            app.middleware_stack = stack
        found = find_sentinel(stack) if stack is not None else None
        if isinstance(found, type):
            return None
    if found is None:
        return None
    if found.config_error is not None:
        raise found.config_error
    return found.sentinel


# -- clients -----------------------------------------------------------------------------------


def _new_request_id() -> str:
    return f"test-{uuid.uuid4().hex[:20]}"


class _Traffic:
    """What both clients share: the headers each request carries, and the responses seen."""

    def __init__(
        self,
        app_or_url: ASGIApp | str,
        location: str | None,
        location_header: str | None,
        request_id_header: str | None,
        tenant: str | None,
        tenant_header: str | None,
        timeout: float,
        lifespan: bool,
    ) -> None:
        if isinstance(app_or_url, str):
            self._url: str | None = app_or_url
            self._app: ASGIApp | None = None
        elif callable(app_or_url):
            self._url, self._app = None, app_or_url
            _unbind_stale_stack(app_or_url)
        else:
            msg = f'"app_or_url" must be an ASGI app or a URL: {app_or_url!r}'
            raise TypeError(msg)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            msg = f'"timeout" must be a positive number of seconds: {timeout!r}'
            raise TypeError(msg)
        if not (timeout > 0 and math.isfinite(timeout)):
            msg = f'"timeout" must be a positive number of seconds: {timeout!r}'
            raise ValueError(msg)
        self.location = location
        """The location every request comes from unless it names its own."""
        self.timeout = timeout
        self._location_header = location_header
        self._request_id_header = request_id_header
        self._sentinel_found: tuple[Sentinel | None] | None = None
        self.tenant = tenant
        """The tenant every request is for unless it names its own."""
        self._tenant_header = tenant_header
        self._lifespan_wanted = lifespan
        self._lifespan: _Lifespan | None = None
        self.exchanges: list[Exchange] = []
        """Every response this client got: method, path, location, request id and status."""

    def _sentinel(self) -> Sentinel | None:
        """The app's sentinel; for a URL, the process's current one (which ``serve`` runs
        in-process apps with, in the usual test), since a URL cannot say."""
        if self._app is None:
            return current()
        if self._sentinel_found is None:
            self._sentinel_found = (_sentinel_of(self._app),)
        return self._sentinel_found[0]

    def _where(self) -> str:
        if self._app is None:
            return "the current sentinel (this client sends to a URL)"
        return "the app's sentinel" if self._sentinel() is not None else "the app (no sentinel)"

    def _headers(
        self, location: str | None, request_id: str | None, headers: Any
    ) -> tuple[httpx.Headers, str | None, str | None]:
        """The request's headers with its location and request id, and the two as sent."""
        import httpx

        sentinel = self._sentinel()
        config = sentinel.config if sentinel is not None else None
        location_header = self._location_header or (config.location_header if config else None)
        id_header = self._request_id_header or (config.request_id_header if config else None)
        sent = httpx.Headers(headers)
        location = self.location if location is None else location
        if location is not None:
            if not location_header:
                msg = (
                    f"cannot send a request from location {location!r}: {self._where()} takes "
                    "no location header; configure location_header (SENTINEL_LOCATION_HEADER) "
                    "or pass location_header= to the client"
                )
                raise ValueError(msg)
            sent[location_header] = location
        if request_id is not None and not id_header:
            msg = (
                f"cannot send request id {request_id!r}: {self._where()} takes no request id "
                "header; configure request_id_header (SENTINEL_REQUEST_ID_HEADER) or pass "
                "request_id_header= to the client"
            )
            raise ValueError(msg)
        if id_header:
            request_id = request_id or sent.get(id_header) or _new_request_id()
            if not _REQUEST_ID_RE.match(request_id):
                msg = f'"request_id" must be 1-128 of A-Z a-z 0-9 . _ : -: {request_id!r}'
                raise ValueError(msg)
            sent[id_header] = request_id
        return sent, sent.get(location_header) if location_header else None, request_id

    def _with_tenant(self, sent: httpx.Headers, tenant: str | None) -> None:
        """Add the tenant header for ``tenant`` (or the client's) to ``sent``."""
        tenant = self.tenant if tenant is None else tenant
        if tenant is None:
            return
        sentinel = self._sentinel()
        header = self._tenant_header or (
            sentinel.config.tenant_header if sentinel is not None else None
        )
        if not header:
            msg = (
                f"cannot send a request for tenant {tenant!r}: {self._where()} takes no tenant "
                "header; configure tenant_header (SENTINEL_TENANT_HEADER) or pass "
                "tenant_header= to the client"
            )
            raise ValueError(msg)
        sent[header] = tenant

    def _seen(self, response: httpx.Response, location: str | None, request_id: str | None) -> None:
        url = response.request.url
        sentinel = self._sentinel()
        # Scrubbed as a log line's request target is: the assertions quote it when they fail,
        # and a test's failure output is output too.
        scrubber = sentinel.scrubber if sentinel is not None else _fallback_scrubber()
        exchange = Exchange(
            response.request.method,
            scrub_log_text(scrubber, url.raw_path.decode("ascii", "replace")),
            location,
            request_id,
            response.status_code,
        )
        self.exchanges.append(exchange)
        _note(exchange, sentinel, any_sentinel=self._app is None)


@functools.cache
def _fallback_scrubber() -> Scrubber:
    """The scrubber for what a testing client saw of an app without a sentinel."""
    return Scrubber()


class _Lifespan:
    """Runs an app's lifespan for a client: startup on entering, shutdown on leaving. An app
    that returns or fails before its startup completes has none (as uvicorn's ``auto``)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        import anyio

        self.app = app
        self.timeout = timeout
        self.state: dict[str, Any] = {}
        self.running = False
        self._to_app, self._app_receives = anyio.create_memory_object_stream[Message](8)
        self._app_sends, self._from_app = anyio.create_memory_object_stream[Message](8)

    async def run(self) -> None:
        """The app's lifespan call (a task beside the requests)."""
        import anyio

        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._app_receives.receive, self._send)
        except Exception:
            pass  # sentinel reported it; before startup completed: no lifespan, as uvicorn
        finally:
            with contextlib.suppress(anyio.BrokenResourceError):  # the client is done
                self._app_sends.send_nowait({"type": "returned"})
            self._app_sends.close()
            self._app_receives.close()

    async def _send(self, message: Message) -> None:
        self._app_sends.send_nowait(dict(message))

    async def _next(self, step: str) -> Message:
        import anyio

        try:
            with anyio.fail_after(self.timeout):
                return await self._from_app.receive()
        except TimeoutError:
            msg = f"the app's lifespan {step} did not finish within {self.timeout} s"
            raise TimeoutError(msg) from None

    async def startup(self) -> None:
        """Start the lifespan; ``running`` says whether the app has one."""
        import anyio

        with contextlib.suppress(anyio.BrokenResourceError):  # returned: "returned" is queued
            self._to_app.send_nowait({"type": "lifespan.startup"})
        message = await self._next("startup")
        if message["type"] == "lifespan.startup.failed":
            msg = f"the app's lifespan startup failed: {message.get('message', '')!r}"
            raise RuntimeError(msg)
        self.running = message["type"] == "lifespan.startup.complete"

    async def shutdown(self) -> None:
        """End the lifespan (when it started), and close the client's ends of it."""
        import anyio

        try:
            if not self.running:
                return
            self.running = False
            try:
                self._to_app.send_nowait({"type": "lifespan.shutdown"})
            except anyio.BrokenResourceError:
                return  # the app's lifespan already returned
            message = await self._next("shutdown")
            if message["type"] == "lifespan.shutdown.failed":
                msg = f"the app's lifespan shutdown failed: {message.get('message', '')!r}"
                raise RuntimeError(msg)
        finally:
            self._to_app.close()
            self._from_app.close()


class _WithState:
    """Gives each request a copy of the lifespan's state, as servers do."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = dict(self._state)
        await self.app(scope, receive, send)


async def _within(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """``awaitable`` within ``seconds``, else httpx's ReadTimeout (as over a socket)."""
    import anyio
    import httpx

    try:
        with anyio.fail_after(seconds):
            return await awaitable
    except TimeoutError:
        msg = f"the app did not answer {what} within {seconds} s"
        raise httpx.ReadTimeout(msg) from None


class _LoopThread:
    """An asyncio event loop in a daemon thread of its own: where the sync client runs an
    app in-process, off the test's thread, as a server would."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sentinel-testing-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coroutine.close()
            msg = "the client is closed"
            raise RuntimeError(msg)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            msg = f"the client's event loop did not finish within {timeout} s"
            raise TimeoutError(msg) from None

    def close(self) -> None:
        if self._closed:
            return
        if threading.current_thread() is self._thread:  # dropped on its own loop
            self._closed = True
            self._loop.stop()
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(_cancel_other_tasks(), 10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._closed = True
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    await asyncio.get_running_loop().shutdown_asyncgens()


class Client(_Traffic):
    """A sync HTTP client (httpx) whose every request says where it comes from: a location
    (the ``location`` given per request or to the client) and a request id (given, or
    generated so that every request can be found in sentinel's records).

    ``app_or_url`` is an ASGI app, served in-process on an event loop in a thread of the
    client's (no socket), or a URL (from :func:`serve`, say). The headers are the ones
    the app's sentinel is configured with (``location_header``, ``request_id_header``;
    for a URL, the process's current sentinel's), unless given here. Used as a context
    manager against an app, it runs the app's lifespan around the block (``lifespan=False``
    turns that off). An exception escaping the app is a 500, as from a server, unless
    ``raise_app_exceptions``. Other keyword arguments go to ``httpx.Client``.
    """

    def __init__(
        self,
        app_or_url: ASGIApp | str,
        *,
        location: str | None = None,
        location_header: str | None = None,
        request_id_header: str | None = None,
        tenant: str | None = None,
        tenant_header: str | None = None,
        base_url: str = "http://testserver",
        timeout: float = 10.0,
        lifespan: bool = True,
        raise_app_exceptions: bool = False,
        **httpx_options: Any,
    ) -> None:
        try:
            import httpx
        except ImportError as error:
            raise ImportError(_HTTPX_MISSING) from error
        super().__init__(
            app_or_url,
            location,
            location_header,
            request_id_header,
            tenant,
            tenant_header,
            timeout,
            lifespan,
        )
        self._loop: _LoopThread | None = None
        self._http: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None
        if self._url is not None:
            self._http = httpx.Client(base_url=self._url, timeout=timeout, **httpx_options)
            return
        assert self._app is not None
        self._transport = httpx.ASGITransport(
            app=self._app, raise_app_exceptions=raise_app_exceptions
        )
        self._async = httpx.AsyncClient(
            transport=self._transport, base_url=base_url, **httpx_options
        )
        self._loop = _LoopThread()
        # A client dropped without close() still ends its thread.
        self._finalizer = weakref.finalize(self, self._loop.close)

    def request(
        self,
        method: str,
        url: str,
        *,
        location: str | None = None,
        request_id: str | None = None,
        tenant: str | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request "from" ``location`` with ``request_id``, for ``tenant`` (all
        optional; the tenant goes in the ``tenant_header``); other keyword arguments as
        ``httpx.Client.request``."""
        sent, location, request_id = self._headers(location, request_id, headers)
        self._with_tenant(sent, tenant)
        if self._http is not None:
            response = self._http.request(method, url, headers=sent, **kwargs)
        else:
            assert self._async is not None and self._loop is not None
            if self._loop.closed:
                msg = "the client is closed"
                raise RuntimeError(msg)
            call = self._async.request(method, url, headers=sent, **kwargs)
            what = f"{method} {url}"
            response = self._loop.run(_within(call, self.timeout, what), self.timeout + 5)
        self._seen(response, location, request_id)
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """``GET url``; the keyword arguments of :meth:`request`."""
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        """``HEAD url``; the keyword arguments of :meth:`request`."""
        return self.request("HEAD", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> httpx.Response:
        """``OPTIONS url``; the keyword arguments of :meth:`request`."""
        return self.request("OPTIONS", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """``POST url``; the keyword arguments of :meth:`request`."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """``PUT url``; the keyword arguments of :meth:`request`."""
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        """``PATCH url``; the keyword arguments of :meth:`request`."""
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """``DELETE url``; the keyword arguments of :meth:`request`."""
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        """Close the connections, and the in-process client's event loop and thread."""
        if self._http is not None:
            self._http.close()
        if self._loop is not None and self._async is not None and self._finalizer.alive:
            with contextlib.suppress(Exception):
                self._loop.run(self._async.aclose(), 10.0)
            self._finalizer()

    def __enter__(self) -> Client:
        if self._loop is not None and self._app is not None and self._lifespan_wanted:
            self._lifespan = lifespan = _Lifespan(self._app, self.timeout)
            self._loop.submit(lifespan.run())
            try:
                self._loop.run(lifespan.startup(), self.timeout + 5)
            except BaseException:
                self.__exit__(None, None, None)
                raise
            if lifespan.running:
                self._transport.app = _WithState(self._app, lifespan.state)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._lifespan is not None and self._loop is not None:
                self._loop.run(self._lifespan.shutdown(), self.timeout + 5)
        finally:
            self.close()


class AsyncClient(_Traffic):
    """The async :class:`Client` (asyncio or trio): the same arguments, requests awaited.

    Against an app the requests run in-process on the caller's event loop (httpx's
    ``ASGITransport``); ``async with`` runs the app's lifespan around the block.
    """

    def __init__(
        self,
        app_or_url: ASGIApp | str,
        *,
        location: str | None = None,
        location_header: str | None = None,
        request_id_header: str | None = None,
        tenant: str | None = None,
        tenant_header: str | None = None,
        base_url: str = "http://testserver",
        timeout: float = 10.0,
        lifespan: bool = True,
        raise_app_exceptions: bool = False,
        **httpx_options: Any,
    ) -> None:
        try:
            import httpx
        except ImportError as error:
            raise ImportError(_HTTPX_MISSING) from error
        super().__init__(
            app_or_url,
            location,
            location_header,
            request_id_header,
            tenant,
            tenant_header,
            timeout,
            lifespan,
        )
        self._stack = contextlib.AsyncExitStack()
        if self._url is not None:
            self._http = httpx.AsyncClient(base_url=self._url, timeout=timeout, **httpx_options)
            return
        assert self._app is not None
        self._transport = httpx.ASGITransport(
            app=self._app, raise_app_exceptions=raise_app_exceptions
        )
        self._http = httpx.AsyncClient(
            transport=self._transport, base_url=base_url, **httpx_options
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        location: str | None = None,
        request_id: str | None = None,
        tenant: str | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request "from" ``location`` with ``request_id``, for ``tenant`` (all
        optional; the tenant goes in the ``tenant_header``); other keyword arguments as
        ``httpx.AsyncClient.request``."""
        sent, location, request_id = self._headers(location, request_id, headers)
        self._with_tenant(sent, tenant)
        call = self._http.request(method, url, headers=sent, **kwargs)
        if self._app is not None:
            response = await _within(call, self.timeout, f"{method} {url}")
        else:
            response = await call
        self._seen(response, location, request_id)
        return response

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """``GET url``; the keyword arguments of :meth:`request`."""
        return await self.request("GET", url, **kwargs)

    async def head(self, url: str, **kwargs: Any) -> httpx.Response:
        """``HEAD url``; the keyword arguments of :meth:`request`."""
        return await self.request("HEAD", url, **kwargs)

    async def options(self, url: str, **kwargs: Any) -> httpx.Response:
        """``OPTIONS url``; the keyword arguments of :meth:`request`."""
        return await self.request("OPTIONS", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """``POST url``; the keyword arguments of :meth:`request`."""
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """``PUT url``; the keyword arguments of :meth:`request`."""
        return await self.request("PUT", url, **kwargs)

    async def patch(self, url: str, **kwargs: Any) -> httpx.Response:
        """``PATCH url``; the keyword arguments of :meth:`request`."""
        return await self.request("PATCH", url, **kwargs)

    async def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """``DELETE url``; the keyword arguments of :meth:`request`."""
        return await self.request("DELETE", url, **kwargs)

    async def aclose(self) -> None:
        """Close the connections (and end the app's lifespan, if it runs)."""
        try:
            await self._stack.aclose()
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        if self._app is not None and self._lifespan_wanted:
            import anyio

            lifespan = _Lifespan(self._app, self.timeout)
            tasks = await self._stack.enter_async_context(anyio.create_task_group())
            self._stack.callback(tasks.cancel_scope.cancel)  # a lifespan that never returns
            tasks.start_soon(lifespan.run)
            self._stack.push_async_callback(lifespan.shutdown)
            try:
                await lifespan.startup()
            except BaseException:
                await self.aclose()
                raise
            if lifespan.running:
                self._transport.app = _WithState(self._app, lifespan.state)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@contextmanager
def serve(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any
) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on ``port`` (default: a free loopback port), in a
    background thread.

    Yields the base URL (``http://127.0.0.1:PORT``); the server is stopped on exit, also
    when the block raises. Extra keyword arguments go to ``uvicorn.Config``. An ``app``
    that is neither an ASGI app nor uvicorn's ``"module:attribute"`` text is a TypeError.
    """
    import uvicorn

    if not (callable(app) or isinstance(app, str)):
        msg = f'"app" must be an ASGI app (or a "module:attribute" to import): {app!r}'
        raise TypeError(msg)
    _unbind_stale_stack(app)
    uvicorn_options.setdefault("log_level", "warning")
    uvicorn_options.setdefault("lifespan", "auto")
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sentinel-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            msg = "uvicorn did not start (see its log above)"
            raise RuntimeError(msg)
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

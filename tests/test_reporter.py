"""The exception reporter: folding, bounds, drops, failure isolation, size caps, content."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import request_context, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import sentinel as sentinel_module
from sentinel import Config, Sentinel, _context, instrument
from sentinel._runtime import set_current
from sentinel.testing import Captured, capture_reports, serve

# -- helpers ---------------------------------------------------------------------------------


PROPERTY_CAP = settings(max_examples=60, deadline=None)


class Storm(Exception):
    """The one bug that happens over and over."""


class Other(Exception):
    """A different bug, arriving in the middle of a storm."""


class LookupFailed(Exception):
    """Raised by the item endpoint, chained to the KeyError behind it."""


class CheckoutFailed(Exception):
    """The app's own exception, which must reach the server unchanged."""


def qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def raise_storm() -> None:
    raise Storm("the same bug")


def raise_type(cls: type[BaseException]) -> None:
    raise cls("boom")


def caught(func: Callable[..., None], *args: Any) -> BaseException:
    """A fresh exception object raised by ``func``, with its traceback."""
    try:
        func(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def distinct_types(count: int, prefix: str) -> list[type[Exception]]:
    """Exception classes that each have their own fingerprint (raised from one line)."""
    return [type(f"{prefix}{i}", (Exception,), {}) for i in range(count)]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def events(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [record for record in lines(stream) if record["event"] == event]


def of_type(records: list[dict[str, Any]], cls: type[BaseException]) -> list[dict[str, Any]]:
    return [record for record in records if record["exception_type"] == qualified(cls)]


def occurrences(summaries: list[dict[str, Any]]) -> int:
    return sum(summary["occurrences"] for summary in summaries)


def metric_sum(registry: CollectorRegistry, sample_name: str, **labels: str) -> float:
    """Sum of every sample called ``sample_name`` whose labels include ``labels``."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


@contextmanager
def current(sentinel: Sentinel) -> Iterator[Sentinel]:
    """Make ``sentinel`` the one the process hooks report to, for the ``with`` block."""
    previous = set_current(sentinel)
    try:
        yield sentinel
    finally:
        sentinel.writer.flush()
        set_current(previous)


def storm_app() -> Starlette:
    async def boom(request: Request) -> PlainTextResponse:
        raise Storm("the same bug")

    return Starlette(routes=[Route("/boom", boom)])


def get_many(url: str, path: str, count: int, headers: dict[str, str] | None = None) -> Counter:
    """``count`` GETs spread over four threads; the status codes seen.

    uvicorn closes the connection after an app raised, so each request asks for a fresh one
    (a pooled keep-alive connection could be closed under the next request).
    """
    threads = 4
    headers = {**(headers or {}), "connection": "close"}

    def worker(n: int) -> list[int]:
        with httpx.Client(base_url=url, timeout=10, headers=headers) as client:
            return [client.get(path).status_code for _ in range(n)]

    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, shares))
    return Counter(code for codes in results for code in codes)


# -- folding: counts exact, detail bounded -----------------------------------------------------


def test_500_identical_exceptions_fold_into_ten_reports_and_exact_summaries(
    captured: Captured,
) -> None:
    """500 identical exceptions in 1 s: <= 10 reports, summaries + reports == 500 == counter."""
    started = time.monotonic()
    for _ in range(500):
        captured.sentinel.capture_exception(caught(raise_storm), "request")
    assert time.monotonic() - started < 1.0, "the storm must happen within one second"

    captured.sentinel.writer.close()

    reports = of_type(events(captured.stream, "unhandled_exception"), Storm)
    summaries = of_type(events(captured.stream, "exception_summary"), Storm)
    assert 1 <= len(reports) <= 10
    assert occurrences(summaries) + len(reports) == 500
    assert len({r["fingerprint"] for r in reports + summaries}) == 1
    total = metric_sum(
        captured.registry, "sentinel_unhandled_exceptions_total", exception_type=qualified(Storm)
    )
    assert total == 500


def test_500_failing_requests_through_uvicorn_fold_and_count_exactly() -> None:
    """500 failing requests via real uvicorn: clients get 500s, <= 10 reports, counts add to 500."""
    with capture_reports() as cap:
        app = instrument(storm_app(), sentinel=cap.sentinel)
        with serve(app) as url:
            codes = get_many(url, "/boom", 500)
        cap.sentinel.writer.close()

        assert codes == Counter({500: 500})
        reports = of_type(events(cap.stream, "unhandled_exception"), Storm)
        summaries = of_type(events(cap.stream, "exception_summary"), Storm)
        assert 1 <= len(reports) <= 10
        assert occurrences(summaries) + len(reports) == 500
        assert len({r["fingerprint"] for r in reports + summaries}) == 1
        assert all(r["route"] == "/boom" and r["phase"] == "request" for r in reports)
        counted = cap.metric(
            "sentinel_unhandled_exceptions_total",
            location="unknown",
            route="/boom",
            exception_type=qualified(Storm),
            phase="request",
        )
        assert counted == 500
        served = cap.metric(
            "sentinel_http_requests_total",
            location="unknown",
            route="/boom",
            method="GET",
            code="500",
        )
        assert served == 500


class ConfigBroken(Exception):
    """A failed initialisation that every request awaits."""


def test_one_exception_object_raised_by_many_requests_is_counted_in_each() -> None:
    """Every request awaiting one failed shared task raises the very same exception object:
    each request counts it and reports it (repeats fold as any repeat does), and the
    server's own "Exception in ASGI application" line adds no report of its own."""
    shared: list[asyncio.Future[None]] = []

    async def load() -> None:
        raise ConfigBroken("invalid configuration")

    async def endpoint(request: Request) -> PlainTextResponse:
        if not shared:
            shared.append(asyncio.ensure_future(load()))
        await shared[0]
        return PlainTextResponse("configured")

    with capture_reports(fold_full_reports=2) as cap:
        app = instrument(Starlette(routes=[Route("/config", endpoint)]), sentinel=cap.sentinel)
        with serve(app) as url:
            codes = get_many(url, "/config", 6)
        cap.sentinel.writer.close()
        counted = cap.metric(
            "sentinel_unhandled_exceptions_total",
            location="unknown",
            route="/config",
            exception_type=qualified(ConfigBroken),
            phase="request",
        )
        reports = of_type(events(cap.stream, "unhandled_exception"), ConfigBroken)
        summaries = of_type(events(cap.stream, "exception_summary"), ConfigBroken)
    assert codes == Counter({500: 6})
    assert counted == 6
    assert len(reports) + occurrences(summaries) == 6
    assert all(report["route"] == "/config" for report in reports)


def test_summary_is_written_when_the_window_closes_without_shutdown() -> None:
    """With a 0.5 s window, the worker writes the summary within ~1 s of the window closing."""
    with capture_reports(fold_window_seconds=0.5) as cap:
        for _ in range(30):
            cap.sentinel.capture_exception(caught(raise_storm), "request")
        last = time.monotonic()

        def complete() -> bool:
            reports = of_type(events(cap.stream, "unhandled_exception"), Storm)
            summaries = of_type(events(cap.stream, "exception_summary"), Storm)
            return bool(summaries) and occurrences(summaries) + len(reports) == 30

        assert wait_for(complete, timeout=3.0), cap.stream.getvalue()[-2000:]
        assert time.monotonic() - last < 2.0
        summary = of_type(events(cap.stream, "exception_summary"), Storm)[0]
        assert summary["window_seconds"] == 0.5
        assert summary["level"] == "warning"

        # A new window starts afresh: its first occurrence is written in full again.
        before = len(of_type(events(cap.stream, "unhandled_exception"), Storm))
        cap.sentinel.capture_exception(caught(raise_storm), "request")
        cap.flush()
        after = len(of_type(events(cap.stream, "unhandled_exception"), Storm))
        assert after == before + 1

        # Shutdown adds nothing: every occurrence is accounted for exactly once.
        cap.sentinel.writer.close()
        reports = of_type(events(cap.stream, "unhandled_exception"), Storm)
        summaries = of_type(events(cap.stream, "exception_summary"), Storm)
        assert occurrences(summaries) + len(reports) == 31


def test_summary_of_an_open_window_is_written_at_shutdown(captured: Captured) -> None:
    """Folded occurrences of a still-open window are summarized by close(), not before."""
    for _ in range(15):
        captured.sentinel.capture_exception(caught(raise_storm), "request")
    captured.flush()
    assert events(captured.stream, "exception_summary") == []
    assert len(of_type(events(captured.stream, "unhandled_exception"), Storm)) == 10

    captured.sentinel.writer.close()

    summaries = of_type(events(captured.stream, "exception_summary"), Storm)
    assert occurrences(summaries) == 5
    assert summaries[0]["fingerprint"] == captured.reports[0]["fingerprint"]


def test_new_fingerprint_in_the_middle_of_a_storm_is_written_in_full(captured: Captured) -> None:
    """A first occurrence is never folded, even while another fingerprint is being folded."""
    for _ in range(50):
        captured.sentinel.capture_exception(caught(raise_storm), "request")
    captured.flush()
    captured.sentinel.capture_exception(caught(raise_type, Other), "request")
    for _ in range(50):
        captured.sentinel.capture_exception(caught(raise_storm), "request")
    captured.sentinel.writer.close()

    reports = events(captured.stream, "unhandled_exception")
    others = of_type(reports, Other)
    assert len(others) == 1
    assert others[0]["message"] == "boom"
    assert of_type(events(captured.stream, "exception_summary"), Other) == []
    storm_reports = of_type(reports, Storm)
    storm_summaries = of_type(events(captured.stream, "exception_summary"), Storm)
    assert len(storm_reports) <= 10
    assert occurrences(storm_summaries) + len(storm_reports) == 100
    assert others[0]["fingerprint"] != storm_reports[0]["fingerprint"]


def test_folding_is_per_fingerprint_and_location() -> None:
    """The same bug in a second location gets its own full reports, not folded into the first."""
    with capture_reports(location_header="x-location") as cap:
        app = instrument(storm_app(), sentinel=cap.sentinel)
        with serve(app) as url:
            for location in ("eu-1", "us-1"):
                codes = get_many(url, "/boom", 15, headers={"x-location": location})
                assert codes == Counter({500: 15})
        cap.sentinel.writer.close()

        reports = of_type(events(cap.stream, "unhandled_exception"), Storm)
        summaries = of_type(events(cap.stream, "exception_summary"), Storm)
        assert len({r["fingerprint"] for r in reports}) == 1
        for location in ("eu-1", "us-1"):
            here = [r for r in reports if r["location"] == location]
            folded = [s for s in summaries if s["location"] == location]
            assert len(here) == 10, location
            assert occurrences(folded) == 5, location


def test_fingerprint_table_is_bounded_and_eviction_emits_the_summary() -> None:
    """max_fingerprints=5: the table stays within 5, and evicting folded entries keeps counts."""
    with capture_reports(max_fingerprints=5) as cap:
        reporter = cap.sentinel.reporter
        sent: Counter[str] = Counter()

        def capture(cls: type[Exception], times: int = 1) -> None:
            for _ in range(times):
                cap.sentinel.capture_exception(caught(raise_type, cls), "request")
                sent[qualified(cls)] += 1
            cap.flush()
            assert len(reporter.folds) <= 5

        capture(Storm, 15)
        assert events(cap.stream, "exception_summary") == []
        fresh = distinct_types(8, "Evictor")
        for cls in fresh:
            capture(cls)
        # Storm, with 5 folded occurrences, was evicted: its summary is already out.
        assert occurrences(of_type(events(cap.stream, "exception_summary"), Storm)) == 5

        # After eviction the storm starts over: its next occurrence is written in full.
        before = len(of_type(events(cap.stream, "unhandled_exception"), Storm))
        capture(Storm)
        assert len(of_type(events(cap.stream, "unhandled_exception"), Storm)) == before + 1

        # Churn: folded entries evicted over and over.
        for cls in fresh[:3]:
            capture(cls, 12)
        for cls in distinct_types(6, "Churn"):
            capture(cls, 11)
        cap.sentinel.writer.close()

        reports = Counter(r["exception_type"] for r in events(cap.stream, "unhandled_exception"))
        folded: Counter[str] = Counter()
        for summary in events(cap.stream, "exception_summary"):
            folded[summary["exception_type"]] += summary["occurrences"]
        assert reports + folded == sent
        assert len(reporter.folds) <= 5


# -- drops --------------------------------------------------------------------------------------


def test_full_queue_drops_reports_counts_them_and_warns_once_per_interval() -> None:
    """Queue of 1 and a stuck worker: drops are counted on the spot, never written from the
    request path; the worker warns once it can, at most once per interval."""
    stream = io.StringIO()
    entered, release = threading.Event(), threading.Event()

    def stuck_sink(record: dict[str, Any]) -> None:
        if record["event"] == "unhandled_exception":
            entered.set()
            release.wait(10)

    config = Config(report_queue_size=1, drop_warning_interval_seconds=0.5, metrics_port=0)
    sentinel = Sentinel(config, registry=CollectorRegistry(), stream=stream, sinks=(stuck_sink,))
    registry = sentinel.metrics.registry
    types = distinct_types(13, "Queued")

    def dropped() -> float:
        return metric_sum(registry, "sentinel_reports_dropped_total", reason="queue_full")

    def warnings() -> list[dict[str, Any]]:
        return events(stream, "reports_dropped")

    try:
        sentinel.capture_exception(caught(raise_type, types[0]), "request")
        assert entered.wait(5), "the worker never reached the sink"
        sentinel.capture_exception(caught(raise_type, types[1]), "request")  # fills the queue
        for cls in types[2:10]:
            sentinel.capture_exception(caught(raise_type, cls), "request")
        assert dropped() == 8
        time.sleep(0.6)  # past the warning interval
        for cls in types[10:]:
            sentinel.capture_exception(caught(raise_type, cls), "request")
        assert dropped() == 11
        # The output is stuck; the request path must not wait on it to warn.
        assert warnings() == []
        total = metric_sum(registry, "sentinel_unhandled_exceptions_total")
        assert total == 13, "counts are never dropped"
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while not warnings() and time.monotonic() < deadline:
        time.sleep(0.02)
    [warning] = warnings()
    assert warning["level"] == "warning"
    assert warning["dropped"] == {"queue_full": 11}

    first_warning_at = time.monotonic()
    sentinel.writer.note_drop("queue_full")
    sentinel.writer.note_drop("queue_full")
    while len(warnings()) < 2 and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    assert len(warnings()) == 2
    assert warnings()[1]["dropped"] == {"queue_full": 2}
    assert time.monotonic() - first_warning_at >= 0.4  # not before the interval has passed
    assert sentinel.writer.flush(5)
    sentinel.close()
    written = {r["exception_type"] for r in events(stream, "unhandled_exception")}
    assert written == {qualified(types[0]), qualified(types[1])}


# -- failure isolation ---------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["starlette", "bare_asgi"])
def test_raising_sink_never_changes_what_client_or_server_sees(framework: str) -> None:
    """A sink that raises: client gets the app's 200 or a 500, the server sees the app's error."""
    stream = io.StringIO()

    def broken_sink(record: dict[str, Any]) -> None:
        raise RuntimeError("sink is down")

    sentinel = Sentinel(
        Config(service="shop"), registry=CollectorRegistry(), stream=stream, sinks=(broken_sink,)
    )

    if framework == "starlette":

        async def ok(request: Request) -> PlainTextResponse:
            return PlainTextResponse("fine")

        async def fail(request: Request) -> PlainTextResponse:
            raise CheckoutFailed("card declined")

        app: Any = Starlette(routes=[Route("/ok", ok), Route("/fail", fail)])
        options: dict[str, Any] = {}
    else:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["path"] == "/fail":
                raise CheckoutFailed("card declined")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"fine"})

        options = {"lifespan": "off"}

    inner = instrument(app, sentinel=sentinel)
    seen_by_server: list[type[BaseException]] = []

    async def server_side(scope: Any, receive: Any, send: Any) -> None:
        try:
            await inner(scope, receive, send)
        except BaseException as exc:
            seen_by_server.append(type(exc))
            raise

    with (
        current(sentinel),
        serve(server_side, **options) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        fine = client.get("/ok")
        failed = client.get("/fail")

    assert (fine.status_code, fine.text) == (200, "fine")
    assert failed.status_code == 500
    assert seen_by_server == [CheckoutFailed]
    assert sentinel.writer.flush(5)
    errors = metric_sum(
        sentinel.metrics.registry, "sentinel_internal_errors_total", component="sink"
    )
    assert errors > 0
    reports = of_type(events(stream, "unhandled_exception"), CheckoutFailed)
    assert len(reports) == 1
    assert reports[0]["message"] == "card declined"
    sentinel.close()


# -- size and hostile payloads -------------------------------------------------------------------


def recurse(depth: int, payload: str) -> None:
    # Several big locals in every frame (all the same string, so memory stays small).
    first = second = payload
    listing = [payload, payload, payload]
    mapping = {"a": payload, "b": payload}
    if depth == 0:
        raise ValueError(payload)
    recurse(depth - 1, payload)
    del first, second, listing, mapping


@pytest.mark.parametrize(
    ("max_frames", "locals_seconds"),
    [(64, 5.0), (1000, 0.01)],
    ids=["64-frames-all-locals", "1000-frames"],
)
def test_huge_report_is_capped_and_marked_truncated(max_frames: int, locals_seconds: float) -> None:
    """1 MB message, huge locals, 500 frames: the written line fits max_report_bytes, truncated."""
    payload = "x" * 1_000_000
    with capture_reports(
        log_locals=True, max_frames=max_frames, locals_time_budget_seconds=locals_seconds
    ) as cap:
        cap.sentinel.capture_exception(caught(recurse, 500, payload), "request")
        cap.flush()
        raw = cap.stream.getvalue().splitlines()
        assert len(raw) == 1
        assert len(raw[0].encode()) <= cap.sentinel.config.max_report_bytes == 65_536
        report = json.loads(raw[0])
        assert report["truncated"] is True
        assert report["original_bytes"] > 65_536
        assert report["event"] == "unhandled_exception"
        assert report["exception_type"] == "ValueError"
        assert report["fingerprint"]
        assert len(report["message"]) < 10_000  # never the whole megabyte
        innermost = report["frames"][-1]
        assert innermost["function"] == "recurse"
        assert "raise ValueError(payload)" in innermost["source"]


def descend_far_enough_that_twenty_frames_take_more_than_four_kilobytes(depth: int) -> None:
    """Recurse ``depth`` times, then raise; its long name makes each frame's record big."""
    if depth == 0:
        raise ValueError("bottom")
    descend_far_enough_that_twenty_frames_take_more_than_four_kilobytes(depth - 1)


@pytest.mark.parametrize(
    ("max_report_bytes", "frames_kept"), [(16_000, 20), (4_096, 3)], ids=["20-frames", "3-frames"]
)
def test_a_capped_report_counts_every_frame_it_left_out(
    max_report_bytes: int, frames_kept: int
) -> None:
    """A traceback deeper than max_frames already starts with a marker for what it left
    out; when the size cap cuts further (to the innermost 20 frames, or at last 3), the one
    marker left counts those frames too: the marker plus the frames kept are the whole
    traceback."""
    error = caught(descend_far_enough_that_twenty_frames_take_more_than_four_kilobytes, 300)
    depth = sum(1 for _ in traceback.walk_tb(error.__traceback__))
    with capture_reports(max_report_bytes=max_report_bytes) as cap:
        assert cap.sentinel.config.max_frames < depth
        cap.sentinel.capture_exception(error, "request")
        cap.flush()
        [report] = cap.reports
    assert report["truncated"] is True
    marker, *kept = report["frames"]
    assert len(kept) == frames_kept
    assert all("skipped_frames" not in frame for frame in kept)
    assert marker["skipped_frames"] + len(kept) == depth


def raise_sized(text: str) -> None:
    raise ValueError(text)


@pytest.mark.parametrize("environment", ["unknown", "e" * 128])
def test_written_line_never_exceeds_max_report_bytes_near_the_limit(environment: str) -> None:
    """Reports whose record is just under the cap: the whole written line, with the fields
    added when it is written (a long environment name included), still fits the cap."""
    limit = 4096
    with capture_reports(
        max_report_bytes=limit, fold_full_reports=10_000, environment=environment
    ) as cap:
        for size in range(3400, 4200, 3):
            cap.sentinel.capture_exception(caught(raise_sized, "m" * size), "request")
        cap.flush()
        raw = cap.stream.getvalue().splitlines()
        assert len(raw) == len(range(3400, 4200, 3))
        too_long = [len(line) for line in raw if len(line.encode()) > limit]
        assert too_long == [], f"{len(too_long)} lines exceed {limit} bytes, e.g. {too_long[:3]}"


class UnprintableError(Exception):
    """An exception whose __str__ raises."""

    def __str__(self) -> str:
        raise RuntimeError("no string for you")


class NotAStringError(Exception):
    """An exception whose __str__ returns something that is not a string."""

    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


class FrozenError(Exception):
    """An exception that refuses new attributes."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class FrozenRecordError(Exception):
    """A frozen dataclass exception: every attribute assignment raises FrozenInstanceError."""

    n: int


def raise_frozen(n: int) -> None:
    raise FrozenRecordError(n)


def test_unmarkable_exceptions_freed_one_after_another_are_each_counted(
    captured: Captured,
) -> None:
    """20 distinct frozen (unmarkable) exceptions, each freed before the next is raised (so
    its id may be reused): the counter is exactly 20, and full reports plus folded
    occurrences add up to 20."""
    for n in range(20):
        assert captured.sentinel.capture_exception(caught(raise_frozen, n), "request") is True
        captured.flush()  # written, and the worker has let go of it
        gc.collect()
    captured.sentinel.writer.close()

    reports = of_type(events(captured.stream, "unhandled_exception"), FrozenRecordError)
    summaries = of_type(events(captured.stream, "exception_summary"), FrozenRecordError)
    assert 1 <= len(reports) <= 10
    assert len(reports) + occurrences(summaries) == 20
    total = metric_sum(
        captured.registry,
        "sentinel_unhandled_exceptions_total",
        exception_type=qualified(FrozenRecordError),
    )
    assert total == 20
    assert captured.metric("sentinel_internal_errors_total", component="reporter") == 0


def test_the_same_unmarkable_exception_reported_twice_is_reported_once(
    captured: Captured,
) -> None:
    """One frozen exception object handed to sentinel twice is one report and one count."""
    error = caught(raise_frozen, 1)
    assert captured.sentinel.capture_exception(error, "request") is True
    assert captured.sentinel.capture_exception(error, "request") is False
    captured.sentinel.writer.close()
    reports = of_type(events(captured.stream, "unhandled_exception"), FrozenRecordError)
    assert len(reports) == 1
    total = metric_sum(
        captured.registry,
        "sentinel_unhandled_exceptions_total",
        exception_type=qualified(FrozenRecordError),
    )
    assert total == 1


HOSTILE_MESSAGES = [
    "nul\x00byte\x00",
    "lone \ud800 high and \udfff low surrogate",
    '\x1b[31mred\x1b[0m\r\n{"event":"forged"}\x07',
    "line\u2028separator\u2029paragraph\x85next\x1c\x1d\x1e",
    "\ufeffbom \U0001f4a5 \u202eright-to-left",
]


@pytest.mark.parametrize("error_type", [Storm, FrozenRecordError], ids=["plain", "unmarkable"])
def test_one_occurrence_is_one_report_within_its_request(error_type: type[Exception]) -> None:
    """The layers of one request that see one exception make one report; outside any
    request (the server's log line, a hook) one report before is enough; in another request
    the same object is a new occurrence, and stays one however many layers see it there.
    Handled and unhandled are told apart by request alike, and an exception that refuses
    the marker attribute (a frozen dataclass) alike."""
    error = caught(raise_type, error_type)
    first, second = request_context(), request_context()
    with capture_reports() as cap:
        reporter = cap.sentinel.reporter
        assert reporter.report(error, "request", first) is True
        assert reporter.report(error, "request", first) is False
        assert reporter.report(error, "task") is False
        assert reporter.report(error, "request", second) is True
        assert reporter.report(error, "response", second) is False
        assert reporter.report(error, "request", first) is False
        handled = caught(raise_type, error_type)
        assert reporter.report(handled, "request", first, handled=True) is True
        assert reporter.report(handled, "request", first, handled=True) is False
        assert reporter.report(handled, "request", second, handled=True) is True
        cap.flush()
        counted = metric_sum(cap.registry, "sentinel_unhandled_exceptions_total")
        handled_count = metric_sum(cap.registry, "sentinel_handled_exceptions_total")
    assert (counted, handled_count) == (2, 2)


@pytest.mark.parametrize("message", HOSTILE_MESSAGES)
def test_hostile_messages_produce_one_valid_json_line(captured: Captured, message: str) -> None:
    """NUL bytes, lone surrogates, ANSI escapes, line separators: one parseable ASCII line."""
    captured.sentinel.capture_exception(caught(raise_sized, message), "request")
    captured.flush()
    raw = captured.stream.getvalue().split("\n")
    assert raw[-1] == ""
    assert len(raw[:-1]) == 1
    line = raw[0]
    assert line.isascii()
    assert "\x1b" not in line and "\x00" not in line and "\r" not in line
    report = json.loads(line)
    assert report["event"] == "unhandled_exception"
    assert report["message"] == message


@pytest.mark.parametrize("cls", [UnprintableError, NotAStringError, FrozenError])
def test_hostile_exception_objects_produce_valid_json(captured: Captured, cls: type) -> None:
    """Exceptions whose __str__ raises or lies, or that refuse attributes, are still reported."""
    captured.sentinel.capture_exception(caught(raise_type, cls), "request")
    captured.flush()
    records = [json.loads(line) for line in captured.stream.getvalue().splitlines()]
    assert [r["exception_type"] for r in records] == [qualified(cls)]
    assert isinstance(records[0]["message"], str)
    assert records[0]["frames"]
    assert captured.metric("sentinel_internal_errors_total", component="reporter") == 0


def test_hostile_exception_class_name_is_still_reported(captured: Captured) -> None:
    """An exception class named with non-ASCII, ANSI escapes and a newline: one valid line."""
    cls = type("Сбой\x1b[31m\nforged", (Exception,), {})
    captured.sentinel.capture_exception(caught(raise_type, cls), "request")
    captured.flush()
    raw = captured.stream.getvalue().splitlines()
    assert len(raw) == 1 and raw[0].isascii()
    records = [json.loads(line) for line in raw]
    assert [r["event"] for r in records] == ["unhandled_exception"]
    assert records[0]["exception_type"] == qualified(cls)


# -- report content -------------------------------------------------------------------------------


def item_app() -> Starlette:
    async def get_item(request: Request) -> PlainTextResponse:
        stock: dict[str, int] = {}
        try:
            return PlainTextResponse(str(stock[request.path_params["item_id"]]))
        except KeyError as missing:
            raise LookupFailed("no such item") from missing

    return Starlette(routes=[Route("/items/{item_id}", get_item)])


def test_report_has_exception_request_and_service_context() -> None:
    """A request's report: type, message, fingerprint, phase, frames, request context, cause."""
    with capture_reports(
        service="shop",
        version="1.2.3",
        location="eu-west-1",
        location_header="x-location",
        request_id_header="x-request-id",
    ) as cap:
        app = instrument(item_app(), sentinel=cap.sentinel)
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            response = client.get(
                "/items/42?token=hunter2-secret&page=2",
                headers={"x-location": "eu-west-2", "x-request-id": "req-123"},
            )
        assert response.status_code == 500
        cap.flush()
        raw = cap.stream.getvalue().splitlines()
        reports = of_type(events(cap.stream, "unhandled_exception"), LookupFailed)

    assert len(reports) == 1
    report = reports[0]
    assert report["exception_type"] == qualified(LookupFailed)
    assert report["message"] == "no such item"
    assert len(report["fingerprint"]) == 16
    int(report["fingerprint"], 16)
    assert report["phase"] == "request"
    assert report["level"] == "error"
    assert (report["method"], report["route"], report["path"]) == (
        "GET",
        "/items/{item_id}",
        "/items/42",
    )
    assert report["location"] == "eu-west-2"
    assert report["request_id"] == "req-123"
    assert (report["service"], report["version"]) == ("shop", "1.2.3")
    assert report["host"] == socket.gethostname()
    assert not any("hunter2-secret" in line for line in raw)

    frames = [f for f in report["frames"] if "skipped_frames" not in f]
    for frame in frames:
        assert {"file", "function", "line", "source", "in_app"} <= frame.keys()
    innermost = frames[-1]
    assert innermost["file"] == __file__
    assert innermost["function"].endswith("get_item")
    assert innermost["source"] == 'raise LookupFailed("no such item") from missing'
    assert innermost["in_app"] is True
    assert report["culprit"] == f"test_reporter.py:{innermost['line']} in {innermost['function']}"
    assert any(not f["in_app"] and "starlette" in f["file"] for f in frames)
    assert not any("/sentinel/_" in f["file"] for f in frames)

    assert len(report["causes"]) == 1
    cause = report["causes"][0]
    assert (cause["relation"], cause["exception_type"], cause["message"]) == (
        "cause",
        "KeyError",
        "'42'",
    )
    assert "stock[request.path_params" in cause["frames"][-1]["source"]


SHOP_CHECKOUT = """\
import json

import yaml


def _check(order):
    if "amount" not in order:
        raise ValueError("no amount")
    return order


def parse(body):
    return json.loads(body, object_hook=_check)


def load(text):
    return yaml.safe_load(text)
"""


@pytest.fixture
def shop(tmp_path: Path, restore_sys_path: None) -> Iterator[types.ModuleType]:
    """An app module, ``sentinel_shop.checkout``, in a directory of its own (app code), that
    calls into the standard library (json) and an installed package (yaml)."""
    package = tmp_path / "sentinel_shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "checkout.py").write_text(SHOP_CHECKOUT)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("sentinel_shop.checkout")
    finally:
        for name in [name for name in sys.modules if name.startswith("sentinel_shop")]:
            del sys.modules[name]


def test_every_report_names_its_culprit_the_innermost_frame_of_the_app(
    shop: types.ModuleType, captured: Captured
) -> None:
    """``culprit`` is ``path:line in function`` of the innermost frame in the app's own code,
    the path from the import root: the app's callback under the standard library's frames,
    or the app's call into an installed package that raised. Each frame says whether it is
    the app's: the app's module and this test are, json (stdlib) and yaml (site-packages)
    are not, and sentinel's own frames are not listed."""
    for call, argument in ((shop.parse, '{"items": []}'), (shop.load, "a: [")):
        try:
            call(argument)
        except Exception as error:
            captured.sentinel.capture_exception(error, "request")
    under_stdlib, under_library = captured.reports

    assert under_stdlib["culprit"] == "sentinel_shop/checkout.py:8 in _check"
    assert under_library["culprit"] == "sentinel_shop/checkout.py:17 in load"
    for report, library in ((under_stdlib, "json"), (under_library, "yaml")):
        frames = report["frames"]
        for frame in frames:
            ours = frame["file"] in (__file__, shop.__file__)
            assert frame["in_app"] is ours, frame
            assert ours or f"{os.sep}{library}{os.sep}" in frame["file"], frame
        assert any(not frame["in_app"] for frame in frames)
        assert not any(f"{os.sep}sentinel{os.sep}_" in frame["file"] for frame in frames)
    assert all(
        "site-packages" in frame["file"] for frame in under_library["frames"] if not frame["in_app"]
    )


def raise_during_handling() -> None:
    try:
        raise KeyError("inner")
    except KeyError:
        raise LookupFailed("outer")  # noqa: B904 - the implicit context is the point


def test_implicit_context_is_reported_as_context(captured: Captured) -> None:
    """An exception raised while handling another lists it with relation "context"."""
    captured.sentinel.capture_exception(caught(raise_during_handling), "request")
    (report,) = captured.reports
    assert [(c["relation"], c["exception_type"]) for c in report["causes"]] == [
        ("context", "KeyError")
    ]


def test_report_carries_active_span_and_marks_it_failed(captured: Captured) -> None:
    """With an OpenTelemetry span active: trace_id/span_id in the report, span has an exception."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("checkout") as span:
        captured.sentinel.capture_exception(caught(raise_type, CheckoutFailed), "request")
        context = span.get_span_context()
    provider.shutdown()

    (report,) = captured.reports
    assert report["trace_id"] == format(context.trace_id, "032x")
    assert report["span_id"] == format(context.span_id, "016x")
    (finished,) = exporter.get_finished_spans()
    assert [event.name for event in finished.events] == ["exception"]
    assert finished.events[0].attributes["exception.type"] == qualified(CheckoutFailed)
    assert finished.status.status_code is StatusCode.ERROR


def test_report_without_span_has_no_trace_ids(captured: Captured) -> None:
    """Outside any span, trace_id and span_id are null rather than made up."""
    captured.sentinel.capture_exception(caught(raise_type, CheckoutFailed), "request")
    (report,) = captured.reports
    assert report["trace_id"] is None
    assert report["span_id"] is None


# -- deep groups, long chains, cycles -------------------------------------------------------------


class DeepAppError(Exception):
    """The app's own error, buried under many levels of groups or chained exceptions."""


DEPTH = 1_200  # past the interpreter's recursion limit (1,000)


def raise_app_error() -> None:
    raise DeepAppError("the app's own failure")


def raise_level(inner: BaseException, level: int) -> None:
    """One task group giving up: the failed task's error beside a cancelled sibling."""
    import asyncio

    raise BaseExceptionGroup(f"level {level}", [inner, asyncio.CancelledError()])


def raise_built_group(group: BaseException) -> None:
    raise group


def deep_group_with_cancelled_siblings() -> tuple[BaseException, str]:
    """The app's error under DEPTH groups, each raised with a cancelled sibling (a loop)."""
    inner = caught(raise_app_error)
    for level in range(DEPTH):
        inner = caught(raise_level, inner, level)
    return inner, "raise_app_error"


def deep_single_member_group() -> tuple[BaseException, str]:
    """The app's error built (never raised) into DEPTH single-member groups; only the
    outermost group is raised, so that is where the app raised."""
    inner: BaseException = DeepAppError("built, not raised")
    for level in range(DEPTH):
        inner = ExceptionGroup(f"level {level}", [inner])
    return caught(raise_built_group, inner), "raise_built_group"


class ChainLink(Exception):
    """One link of a long chain of causes."""


def raise_link(cause: BaseException, number: int) -> None:
    raise ChainLink(f"link {number}") from cause


def long_cause_chain() -> tuple[BaseException, str]:
    """10,000 exceptions, each raised from the one before (a loop)."""
    current = caught(raise_app_error)
    for number in range(10_000):
        current = caught(raise_link, current, number)
    return current, "raise_link"


def raise_while_handling() -> None:
    try:
        raise KeyError("first")
    except KeyError:
        raise DeepAppError("second")  # noqa: B904 - the implicit context is the point


def context_cycle() -> tuple[BaseException, str]:
    """a.__context__ is b and b.__context__ is a."""
    outer = caught(raise_while_handling)
    assert outer.__context__ is not None
    outer.__context__.__context__ = outer
    return outer, "raise_while_handling"


DEEP_CASES = {
    "group-with-cancelled-siblings": (deep_group_with_cancelled_siblings, DeepAppError),
    "single-member-group-never-raised": (deep_single_member_group, DeepAppError),
    "10000-causes": (long_cause_chain, ChainLink),
    "context-cycle": (context_cycle, DeepAppError),
}


def internal_errors(registry: CollectorRegistry) -> float:
    return metric_sum(registry, "sentinel_internal_errors_total")


@pytest.mark.parametrize("case", DEEP_CASES)
def test_deep_groups_chains_and_cycles_are_reported_as_the_apps_error(
    captured: Captured, case: str
) -> None:
    """Straight to the reporter: the report names the app's exception (not RecursionError),
    keeps the frame that raised it, and nothing inside sentinel failed."""
    build, expected = DEEP_CASES[case]
    error, raised_in = build()
    started = time.perf_counter()
    assert captured.sentinel.reporter.report(error, "request") is True
    on_request_path = time.perf_counter() - started
    [report] = captured.reports
    assert report["exception_type"] == qualified(expected)
    assert report["frames"][-1]["function"] == raised_in
    assert len(report.get("causes", [])) <= 4
    assert internal_errors(captured.registry) == 0
    assert (
        metric_sum(
            captured.registry,
            "sentinel_unhandled_exceptions_total",
            exception_type=qualified(expected),
        )
        == 1
    )
    assert on_request_path < 1.0


HTTP_SCOPE = {"type": "http", "method": "GET", "path": "/deep", "query_string": b"", "headers": []}


async def call_app(app: Any, scope: dict[str, Any]) -> BaseException | None:
    """Drive one request through ``app`` in-process; what it raised (what a server sees)."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    try:
        await app(dict(scope), receive, send)
    except BaseException as exc:
        return exc
    return None


@pytest.mark.parametrize("case", DEEP_CASES)
def test_deep_groups_chains_and_cycles_through_the_middleware(
    captured: Captured, case: str
) -> None:
    """Through the middleware: the app's own exception object reaches the server, the
    report names the app's exception with the frame that raised it, the
    request is counted and nothing inside sentinel failed."""
    from helpers import run_client

    build, expected = DEEP_CASES[case]
    error, raised_in = build()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise error

    middleware = instrument(app, sentinel=captured.sentinel)
    propagated = run_client(call_app(middleware, HTTP_SCOPE))
    assert propagated is error
    [report] = captured.reports
    assert report["exception_type"] == qualified(expected)
    assert report["frames"][-1]["function"] == raised_in
    assert internal_errors(captured.registry) == 0
    assert metric_sum(captured.registry, "sentinel_http_requests_total", code="500") == 1


# -- the app's slow __str__ and __repr__ ----------------------------------------------------------


SLOW_SECONDS = 2.0


class SlowToShowError(Exception):
    """An app exception whose __str__ takes seconds (it renders something remote, say)."""

    release: threading.Event

    def __str__(self) -> str:
        self.release.wait(SLOW_SECONDS)
        return "finally shown"


class SlowRepr:
    """A local whose __repr__ takes seconds."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def __repr__(self) -> str:
        self.release.wait(SLOW_SECONDS)
        return "SlowRepr()"


def raise_slow_to_show(release: threading.Event) -> None:
    held = SlowRepr(release)
    error = SlowToShowError("order 17")
    error.release = held.release
    raise error


def test_slow_str_and_repr_do_not_hold_the_reporter() -> None:
    """Five reports of an exception whose __str__ and whose local's __repr__ each take 2 s:
    all are written far sooner than the 20 s those would take, with placeholders where the
    app's code did not answer in time, and a normal report after them is written at once."""
    release = threading.Event()  # set at the end, so the abandoned calls end with the test
    with capture_reports(log_locals=True) as cap:
        try:
            started = time.monotonic()
            for _ in range(5):
                cap.sentinel.capture_exception(caught(raise_slow_to_show, release), "request")
            slow = wait_for(lambda: len(cap.events("unhandled_exception")) >= 5, timeout=3.0)
            five_reports = time.monotonic() - started
            assert slow, "the five reports were not written within 3 s"
            cap.sentinel.capture_exception(caught(raise_type, CheckoutFailed), "request")
            written = wait_for(lambda: len(cap.events("unhandled_exception")) >= 6, timeout=1.0)
            normal_report = time.monotonic() - started - five_reports
            assert written, "the normal report was held up"
        finally:
            release.set()
        reports = cap.reports
    assert five_reports < 1.0
    assert normal_report < 0.5
    assert [report["exception_type"] for report in reports] == [qualified(SlowToShowError)] * 5 + [
        qualified(CheckoutFailed)
    ]
    for report in reports[:5]:
        assert report["message"] == "<str() did not finish within the time budget>"
        shown = report["frames"][-1]["locals"]
        assert "held" not in shown
        assert shown["<skipped>"] == "time budget for locals exhausted"
    assert reports[5]["message"] == "boom"


class SlowMessageError(Exception):
    """Its __str__ takes 20 ms: slow, but well within the 50 ms a report waits for it."""

    def __str__(self) -> str:
        time.sleep(0.02)
        return "order 1042 failed"


def raise_slow_message(order_id: int, items: list[str]) -> None:
    raise SlowMessageError()


def test_a_slow_message_leaves_the_locals_their_own_time_budget() -> None:
    """The message and the locals have separate time budgets: waiting 20 ms for a message
    does not use up the 10 ms for locals, so the frame that raised keeps all its locals."""
    with capture_reports(log_locals=True) as cap:
        assert cap.sentinel.config.locals_time_budget_seconds == 0.01
        cap.sentinel.capture_exception(caught(raise_slow_message, 1042, ["A1", "B2"]), "request")
        cap.flush()
        [report] = cap.reports
    assert report["message"] == "order 1042 failed"
    assert report["frames"][-1]["locals"] == {"order_id": "1042", "items": "['A1', 'B2']"}


# -- before_report and ignore_exceptions --------------------------------------------------------


def hook_failures(cap: Captured) -> float:
    return cap.metric("sentinel_internal_errors_total", component="before_report")


def test_before_report_amends_the_report_and_what_it_adds_is_scrubbed() -> None:
    """The hook gets a copy of the report (without the envelope) and the exception itself;
    what it returns is written, but ``event`` and ``level`` stay sentinel's and whatever it
    added or changed is scrubbed again."""
    seen: list[tuple[dict[str, Any], BaseException]] = []

    def before_report(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
        seen.append((dict(report), exception))
        report["team"] = "payments"
        report["message"] = f"{report['message']}: password=hunter2"
        report["contexts"] = {"auth": {"user": "acme"}}
        report["event"], report["level"] = "something_else", "debug"
        del report["host"]
        return report

    error = caught(raise_type, CheckoutFailed)
    with capture_reports(before_report=before_report, before_report_time_budget_seconds=5.0) as cap:
        cap.sentinel.capture_exception(error, "request")
        [report] = cap.reports
        raw = cap.stream.getvalue()
    [(given, exception)] = seen
    assert exception is error
    assert not {"event", "level", "service", "environment"} & set(given)
    assert given["exception_type"] == qualified(CheckoutFailed) and "host" in given
    assert (report["event"], report["level"]) == ("unhandled_exception", "error")
    assert report["team"] == "payments"
    assert report["message"].startswith("boom: password=[scrubbed len=7 ")
    assert report["contexts"]["auth"]["user"].startswith("[scrubbed")
    assert "host" not in report
    assert "hunter2" not in raw


def test_before_report_drop_is_counted_under_its_own_reason_without_a_warning() -> None:
    """None drops the report: counted as reason="before_report" (no warning line: it was
    asked for); the exception is still counted, and other reports are written."""

    def before_report(report: dict[str, Any], exception: BaseException) -> dict[str, Any] | None:
        return None if isinstance(exception, Storm) else report

    with capture_reports(before_report=before_report, before_report_time_budget_seconds=5.0) as cap:
        cap.sentinel.capture_exception(caught(raise_storm), "request")
        cap.sentinel.capture_exception(caught(raise_type, Other), "request")
        cap.sentinel.flush(final=True)
        assert [report["exception_type"] for report in cap.reports] == [qualified(Other)]
        assert cap.events("reports_dropped") == []
        assert cap.metric("sentinel_reports_dropped_total", reason="before_report") == 1
        assert metric_sum(cap.registry, "sentinel_unhandled_exceptions_total") == 2


def _raises(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
    raise RuntimeError("the hook's own bug")


def _exits(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
    raise SystemExit(3)


def _answers_a_list(report: dict[str, Any], exception: BaseException) -> Any:
    report["team"] = "changed, then not returned"
    return [report]


def _unserializable(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
    report[("tuple", "key")] = 1  # type: ignore[index]
    return report


def _too_big(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
    report["blob"] = "x" * 100_000
    return report


@pytest.mark.parametrize(
    "before_report",
    [_raises, _exits, _answers_a_list, _unserializable, _too_big],
    ids=["raises", "exits", "list", "unserializable", "too-big"],
)
def test_a_failing_before_report_writes_the_report_unchanged(
    before_report: Callable[[dict[str, Any], BaseException], Any],
) -> None:
    """A hook that raises (even SystemExit), answers something that is not a report, or a
    report that cannot be written or cut to size: the report is written as it was, and
    the failure counted under component="before_report"."""
    with capture_reports(
        before_report=before_report, max_report_bytes=8192, before_report_time_budget_seconds=5.0
    ) as cap:
        cap.sentinel.capture_exception(caught(raise_type, CheckoutFailed), "request")
        [report] = cap.reports
        assert hook_failures(cap) == 1
    assert report["message"] == "boom"
    assert not {"team", "blob"} & set(report)


def test_a_hanging_before_report_holds_up_no_report() -> None:
    """A hook that hangs on its first call: that report, and every report while the hook
    still holds its helper thread, is written unchanged and counted, without waiting for it;
    once it returns, the next report goes through the hook again."""
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def before_report(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
        calls.append(report["exception_type"])
        report["team"] = "hook"
        if len(calls) == 1:
            entered.set()
            release.wait(30)
        return report

    types = distinct_types(6, "Hanging")
    with capture_reports(
        before_report=before_report, before_report_time_budget_seconds=0.05
    ) as cap:
        try:
            for cls in types[:5]:
                cap.sentinel.capture_exception(caught(raise_type, cls), "request")
            assert wait_for(lambda: len(cap.events("unhandled_exception")) >= 5, timeout=5.0)
            assert entered.is_set()
            assert calls == [qualified(types[0])], "the hook ran again while it still hung"
            assert hook_failures(cap) == 5
        finally:
            release.set()
        runner = cap.sentinel.reporter._hook_runner
        assert wait_for(lambda: runner._idle, timeout=5.0), "the hook's helper never came back"
        cap.sentinel.capture_exception(caught(raise_type, types[5]), "request")
        reports = cap.reports
    assert len(reports) == 6
    assert all("team" not in report for report in reports[:5])
    assert reports[5]["team"] == "hook"


def test_a_failing_before_report_never_breaks_the_request() -> None:
    """Through a real server, with a hook that raises: the client gets the app's own
    responses (its 500 for an error, its 200 after a handled one), and both reports are
    written unchanged."""

    async def handled(request: Request) -> PlainTextResponse:
        try:
            raise Other("handled in the handler")
        except Other as error:
            sentinel_module.capture_exception(error)
        return PlainTextResponse("fine")

    with capture_reports(before_report=_raises) as cap:
        routes = [Route("/boom", storm_app().routes[0].endpoint), Route("/handled", handled)]
        app = instrument(Starlette(routes=routes), sentinel=cap.sentinel)
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/boom", headers={"connection": "close"}).status_code == 500
            response = client.get("/handled", headers={"connection": "close"})
            assert (response.status_code, response.text) == (200, "fine")
        [unhandled] = cap.wait_for(1)
        [handled_report] = cap.wait_for(1, event="handled_exception")
        assert hook_failures(cap) == 2
    assert unhandled["message"] == "the same bug"
    assert handled_report["message"] == "handled in the handler"


def test_ignored_exceptions_are_counted_but_never_written() -> None:
    """ignore_exceptions by class (its subclasses too), by dotted name and by a builtin's
    name: those are counted in their metric, unhandled or handled, and never written, not
    in full, not in a summary, not to before_report; other exceptions are written."""
    hooked: list[str] = []

    def before_report(report: dict[str, Any], exception: BaseException) -> dict[str, Any]:
        hooked.append(report["exception_type"])
        return report

    ignored = (ConnectionError, qualified(CheckoutFailed), "builtins.KeyError")
    with capture_reports(
        ignore_exceptions=ignored,
        before_report=before_report,
        fold_full_reports=1,
        before_report_time_budget_seconds=5.0,
    ) as cap:
        for _ in range(3):
            cap.sentinel.capture_exception(caught(raise_type, ConnectionResetError), "request")
            cap.sentinel.capture_exception(caught(raise_type, CheckoutFailed), "request")
            cap.sentinel.capture_exception(caught(raise_type, KeyError), "request")
            cap.sentinel.capture_exception(caught(raise_type, LookupFailed), "request")
        assert sentinel_module.capture_exception(caught(raise_type, CheckoutFailed)) is True
        cap.sentinel.flush(final=True)
        written = [r["exception_type"] for r in cap.reports + cap.events("handled_exception")]
        summaries = cap.events("exception_summary")

        def unhandled(exception_type: str) -> float:
            return metric_sum(
                cap.registry, "sentinel_unhandled_exceptions_total", exception_type=exception_type
            )

        counts = {
            name: unhandled(name)
            for name in ("ConnectionResetError", qualified(CheckoutFailed), "KeyError")
        }
        handled = metric_sum(
            cap.registry,
            "sentinel_handled_exceptions_total",
            exception_type=qualified(CheckoutFailed),
        )
    assert written == [qualified(LookupFailed)]
    assert [summary["exception_type"] for summary in summaries] == [qualified(LookupFailed)]
    assert hooked == [qualified(LookupFailed)]
    assert counts == {"ConnectionResetError": 3, qualified(CheckoutFailed): 3, "KeyError": 3}
    assert handled == 1


def test_big_contexts_are_cut_before_a_report_exceeds_its_cap() -> None:
    """Eight full contexts do not fit a 4 KiB report: the contexts go with the request
    details, and the report says it was truncated."""
    request = request_context()
    request.annotations = _context.Annotations()
    for number in range(8):
        contents = {f"key{index}": "v" * 200 for index in range(20)}
        request.annotations.set_context(f"context{number}", contents)
    with capture_reports(max_report_bytes=4096) as cap:
        cap.sentinel.reporter.report(caught(raise_type, CheckoutFailed), "request", request)
        [report] = cap.reports
        line = next(
            line for line in cap.stream.getvalue().splitlines() if '"unhandled_exception"' in line
        )
    assert report["truncated"] is True
    assert "contexts" not in report
    assert len(line.encode()) <= 4096


def test_a_token_sent_as_a_websocket_subprotocol_and_second_factor_headers_are_masked(
    captured: Captured,
) -> None:
    """A browser sends its websocket token as a subprotocol (``access_token, <token>``): the
    report of the failed websocket kept it, and headers named for one-time and MFA codes,
    webhook HMACs and licenses, as harmless-looking names. Through a real server, each is
    masked; the subprotocol's name and ordinary headers stay."""
    import websockets
    from helpers import run_client
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def feed(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="access_token")
        raise ConnectionAbortedError("the feed broke")

    async def fail(request: Request) -> PlainTextResponse:
        raise RuntimeError("login failed")

    app = Starlette(routes=[WebSocketRoute("/ws", feed), Route("/login", fail)])
    secret_headers = {
        "x-totp": "hunter2-totp-q7",
        "x-mfa": "hunter2-mfa-q7",
        "x-webhook-hmac": "hunter2-hmac-q7",
        "x-license": "hunter2-license-q7",
    }

    async def connect(url: str) -> None:
        protocols = ["access_token", "hunter2-subprotocol-q7"]
        async with websockets.connect(url, subprotocols=protocols) as socket:  # type: ignore[arg-type]
            with pytest.raises(websockets.ConnectionClosedError):
                await socket.recv()

    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        run_client(connect(url.replace("http", "ws", 1) + "/ws"))
        httpx.get(f"{url}/login", headers={**secret_headers, "x-team": "core"}, timeout=10)
        captured.wait_for(2)
    assert "hunter2" not in captured.stream.getvalue()
    reports = {report["route"]: report for report in captured.reports}
    offered = reports["/ws"]["headers"]["sec-websocket-protocol"]
    assert offered.startswith("access_token, [scrubbed len=")
    headers = reports["/login"]["headers"]
    assert all(headers[name].startswith("[scrubbed len=") for name in secret_headers)
    assert headers["x-team"] == "core"


# -- what the size cap keeps ---------------------------------------------------------------------


def descend_with_many_locals(depth: int) -> None:
    """Recurse ``depth`` times with forty medium locals in every frame, then raise."""
    a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = "v" * 400  # noqa: F841
    a11 = a12 = a13 = a14 = a15 = a16 = a17 = a18 = a19 = a20 = "w" * 400  # noqa: F841
    b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = b10 = list(range(100))  # noqa: F841
    b11 = b12 = b13 = b14 = b15 = b16 = b17 = b18 = b19 = b20 = list(range(100, 200))  # noqa: F841
    if depth == 0:
        culprit_local = "the value that explains the bug"  # noqa: F841
        raise ValueError("bad")
    descend_with_many_locals(depth - 1)


def test_the_size_cap_cuts_locals_from_the_outermost_frame_and_keeps_the_culprits() -> None:
    """Thirteen frames of locals do not fit 64 KiB: locals are cut a frame at a time from the
    outermost, so the frame that raised keeps its own (the culprit local with them) and the
    report stays near its budget rather than losing every local."""
    with capture_reports(log_locals=True, locals_time_budget_seconds=5.0) as cap:
        cap.sentinel.capture_exception(caught(descend_with_many_locals, 12), "request")
        cap.flush()
        [line] = cap.stream.getvalue().splitlines()
    report = json.loads(line)
    assert report["truncated"] is True
    limit = cap.sentinel.config.max_report_bytes
    assert limit // 2 < len(line.encode()) <= limit
    frames = [frame for frame in report["frames"] if frame.get("function")]
    innermost = frames[-1]
    assert innermost["locals"]["culprit_local"] == "'the value that explains the bug'"
    with_locals = [index for index, frame in enumerate(frames) if "locals" in frame]
    # The frames that kept their locals are the innermost ones, in one run.
    assert with_locals == list(range(len(frames) - len(with_locals), len(frames)))
    assert 1 < len(with_locals) < len(frames)


def fail_with_a_long_message(number: int) -> None:
    raise ValueError(f"member {number} " + "m" * 3000)


def test_cutting_a_group_to_size_counts_every_member_left_out_and_keeps_one() -> None:
    """A group of 50 big members at 8 KiB: the members listed and those counted as skipped
    add up to 50 (the 40 over the bound included), and at least the first member is kept."""
    members = [caught(fail_with_a_long_message, number) for number in range(50)]
    with capture_reports(max_report_bytes=8192) as cap:
        cap.sentinel.capture_exception(ExceptionGroup("many", members), "request")
        cap.flush()
        [line] = cap.stream.getvalue().splitlines()
    report = json.loads(line)
    assert report["truncated"] is True and len(line.encode()) <= 8192
    kept = report["exceptions"]
    assert len(kept) >= 1 and kept[0]["message"].startswith("member 0 ")
    assert len(kept) + report["exceptions_skipped"] == 50


def test_causes_of_group_members_are_cut_to_size_like_the_reports_own() -> None:
    """The cut of causes' frames reaches members' causes too (they are described now)."""
    from sentinel._reporter import _drop_cause_frames

    cause = {"exception_type": "OSError", "frames": [{"line": n} for n in range(30)]}
    record = {"frames": [], "exceptions": [{"exception_type": "E", "causes": [cause]}]}
    _drop_cause_frames(record, 0)
    assert cause["frames"] == [{"skipped_frames": 28}, {"line": 28}, {"line": 29}]


def raise_plain() -> None:
    raise ValueError("x")


def test_tags_are_cut_and_the_written_line_never_exceeds_max_report_bytes() -> None:
    """32 tags of 195 characters do not fit 4 KiB: tag values are cut, then tags left out
    (counted in scope_truncated), and the written line fits."""
    request = request_context()
    request.annotations = _context.Annotations()
    for number in range(32):
        request.annotations.set_tag(f"tag{number:02d}", "word " * 39)
    with capture_reports(max_report_bytes=4096) as cap:
        cap.sentinel.reporter.report(caught(raise_plain), "request", request)
        cap.flush()
        line = next(
            line for line in cap.stream.getvalue().splitlines() if '"unhandled_exception"' in line
        )
    report = json.loads(line)
    assert len(line.encode()) <= 4096
    assert report["truncated"] is True
    assert report.get("scope_truncated", 0) >= 1
    assert all(len(value) <= 32 + 3 for value in report.get("tags", {}).values())


@PROPERTY_CAP
@given(
    texts=st.lists(st.text(max_size=3000), min_size=1, max_size=12),
    limit=st.integers(min_value=600, max_value=8192),
)
def test_the_cap_always_holds_whatever_the_report_holds(texts: list[str], limit: int) -> None:
    """Whatever a report holds (long identifying fields no step cuts, fields sentinel does
    not know, deep members and causes), what _cap returns fits its limit."""
    from sentinel._output import dumps
    from sentinel._reporter import _cap

    def item(depth: int) -> dict[str, Any]:
        text = texts[depth % len(texts)]
        nested: dict[str, Any] = {
            "exception_type": text[:80],
            "message": text,
            "notes": texts,
            "frames": [{"file": text, "line": 1, "source": text, "locals": {"x": text}}] * 3,
        }
        if depth < 3:
            nested["causes"] = [item(depth + 1)]
            nested["exceptions"] = [item(depth + 1), item(depth + 1)]
        return nested

    record: dict[str, Any] = {
        **item(0),
        "route": texts[0],
        "path": texts[-1],
        "request_id": texts[0],
        "culprit": texts[-1],
        "wrapped_in": texts[0],
        "unknown": texts,
        "tags": {f"t{index}": text for index, text in enumerate(texts)},
        "contexts": {"c": {"v": texts}},
        "headers": {"h": texts[0]},
    }
    capped = _cap(record, limit)
    assert len(dumps(capped)) <= limit
    assert capped["truncated"] is True or len(dumps(record)) <= limit


def test_every_field_a_report_holds_is_documented() -> None:
    """Each field of a report (and of its causes, members and frames) is named in
    docs/reporting.md."""
    documented = (Path(__file__).parent.parent / "docs" / "reporting.md").read_text()

    def fields(item: Any, found: set[str]) -> set[str]:
        if isinstance(item, dict):
            for key, value in item.items():
                found.add(key)
                if key not in {"tags", "contexts", "headers", "query", "locals"}:
                    fields(value, found)
        elif isinstance(item, list):
            for value in item:
                fields(value, found)
        return found

    def chained() -> None:
        error: BaseException | None = None
        for attempt in range(10):
            try:
                raise TimeoutError(attempt) from error
            except TimeoutError as caught_error:
                error = caught_error
        assert error is not None
        error.add_note("a note")
        raise error

    found: set[str] = set()
    request = request_context()
    request.annotations = _context.Annotations()
    request.annotations.set_tag("team", "payments")
    with capture_reports(max_frames=3, max_report_bytes=4096, log_locals=True) as cap:
        cap.sentinel.reporter.report(caught(chained), "request", request)
        group = ExceptionGroup("many", [caught(fail_with_a_long_message, n) for n in range(12)])
        cap.sentinel.reporter.report(group, "request", request_context())
        wrapped = BaseExceptionGroup("one", [caught(raise_plain), asyncio.CancelledError()])
        cap.sentinel.reporter.report(wrapped, "request", request_context())
        deep = caught(descend_far_enough_that_twenty_frames_take_more_than_four_kilobytes, 10)
        cap.sentinel.reporter.report(deep, "request", request_context())
        cap.flush()
        for report in cap.reports:
            fields(report, found)
    expected = {
        "wrapped_in",
        "original_bytes",
        "truncated",
        "skipped_frames",
        "tenant",
        "notes",
        "causes_skipped",
        "exceptions_skipped",
        "tags",
        "relation",
    }
    assert expected <= found
    missing = sorted(name for name in found if f"`{name}`" not in documented)
    assert missing == [], " ".join(missing)

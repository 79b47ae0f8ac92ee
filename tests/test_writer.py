"""The writer: the one bounded queue and thread to the sinks, every drop counted."""

from __future__ import annotations

import io
import json
import threading
import time

from prometheus_client import CollectorRegistry

from sentinel._metrics import metrics_for
from sentinel._output import Emitter
from sentinel._writer import Writer


def make_writer(queue_size: int = 4) -> tuple[Writer, io.StringIO, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    stream = io.StringIO()
    emitter = Emitter(service="svc", location="fra", metrics=metrics, stream=stream)
    writer = Writer(emitter, metrics, queue_size=queue_size, drop_warning_interval_seconds=0)
    return writer, stream, registry


def events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def test_records_are_written_in_order_off_the_callers_thread() -> None:
    """write() queues; the worker writes in order, on its own thread."""
    writer, stream, _ = make_writer(queue_size=100)
    threads: list[str] = []
    for index in range(3):
        assert writer.write("info", f"event{index}", {})
    assert writer.submit(lambda _: threads.append(threading.current_thread().name), None)
    assert writer.flush(5)
    assert events(stream) == ["event0", "event1", "event2"]
    assert threads == ["sentinel-writer"]
    writer.close()


def test_a_full_queue_drops_counts_and_says_so_once() -> None:
    """The request path never blocks: what does not fit is dropped under its reason, counted,
    and one warning line says so."""
    writer, stream, registry = make_writer(queue_size=2)
    gate = threading.Event()
    writer.submit(lambda _: gate.wait(5), None)  # holds the worker
    deadline = time.monotonic() + 5
    while writer._queue.qsize() and time.monotonic() < deadline:  # the worker took it
        time.sleep(0.005)
    accepted = [writer.write("info", "kept", {}, "record_queue_full") for _ in range(5)]
    gate.set()
    writer.flush(5)
    assert accepted == [True, True, False, False, False]
    dropped = registry.get_sample_value(
        "sentinel_reports_dropped_total", {"reason": "record_queue_full"}
    )
    assert dropped == 3
    assert events(stream).count("reports_dropped") == 1
    writer.close()


def test_a_failing_task_is_counted_and_the_writer_goes_on() -> None:
    """A task that raises is an internal error of the writer; later work is written."""
    writer, stream, registry = make_writer()

    def broken(_: object) -> None:
        raise RuntimeError("sink broke")

    writer.submit(broken, None)
    writer.write("info", "after", {})
    writer.flush(5)
    assert events(stream) == ["after"]
    internal = registry.get_sample_value("sentinel_internal_errors_total", {"component": "writer"})
    assert internal == 1
    writer.close()


def test_summaries_are_written_when_due_and_all_at_a_final_flush() -> None:
    """Summary sources are asked after each item (everything=False) and at a final flush
    (everything=True)."""
    writer, stream, _ = make_writer()
    asked: list[bool] = []

    def source(everything: bool) -> list[tuple[str, str, dict[str, object]]]:
        asked.append(everything)
        return [("warning", "summary", {})] if everything else []

    writer.add_summaries(source, "reporter")
    writer.write("info", "one", {})
    writer.flush(5)
    assert events(stream) == ["one"]
    writer.flush(5, everything=True)
    assert events(stream) == ["one", "summary"]
    assert False in asked and True in asked
    writer.close()


def test_a_closed_writer_runs_work_inline_and_starts_no_thread() -> None:
    """After close(), work runs on the caller's thread and nothing starts a worker that no
    close() would stop (one was left alive per sentinel replaced before its first request)."""
    writer, stream, _ = make_writer()
    writer.close()
    before = set(threading.enumerate())
    writer.add_periodic(lambda: None, "metrics")
    assert writer.write("info", "late", {})
    assert events(stream) == ["late"]
    assert writer._worker is None
    # Threads other tests left behind may end meanwhile; none may have been started here.
    assert set(threading.enumerate()) <= before

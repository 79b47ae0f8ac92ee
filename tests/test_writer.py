"""The writer: the one bounded queue and thread to the sinks, every drop counted."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sentinel._metrics import metrics_for
from sentinel._output import Emitter
from sentinel._writer import Writer

REPO = Path(__file__).resolve().parents[1]
STARTUP_BOUND_SECONDS = 30.0
SHUTDOWN_BOUND_SECONDS = 10.0
"""A child whose stderr nobody reads exits within this after its work (shutdown gives up on
the stream at about 5 s)."""


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


def test_drops_since_the_last_warning_are_said_at_close() -> None:
    """Warnings come at most once an interval, but what was dropped since the last one is
    said when the writer closes: every drop counted is said."""
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    stream = io.StringIO()
    emitter = Emitter(service="svc", location="fra", metrics=metrics, stream=stream)
    writer = Writer(emitter, metrics, queue_size=2, drop_warning_interval_seconds=3600)
    said = 0
    for _ in range(3):
        gate = threading.Event()
        writer.submit(lambda _, gate=gate: gate.wait(5), None)  # holds the worker
        deadline = time.monotonic() + 5
        while writer._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.005)
        for _ in range(5):
            writer.write("info", "kept", {}, "record_queue_full")
        gate.set()
        writer.flush(5)
    writer.close()
    for line in stream.getvalue().splitlines():
        record = json.loads(line)
        if record["event"] == "reports_dropped":
            said += sum(record["dropped"].values())
    counted = registry.get_sample_value(
        "sentinel_reports_dropped_total", {"reason": "record_queue_full"}
    )
    assert counted == 9 and said == 9
    assert events(stream).count("reports_dropped") == 2  # the first, and the rest at close


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


# -- a stream nobody reads -------------------------------------------------------------------


def run_with_unread_stderr(code: str) -> tuple[int, float, str]:
    """Run ``code`` in a child whose stderr is a pipe this test never reads (once its buffer
    is full, every write to it blocks for good). The child prints one line when its work is
    done; returns that line, the child's exit status, and the seconds from that line to its
    exit. Fails when the child is still alive ``SHUTDOWN_BOUND_SECONDS`` after the line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTINEL_", "OTEL_"))}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], STARTUP_BOUND_SECONDS)
        assert ready, f"the child printed nothing within {STARTUP_BOUND_SECONDS} s"
        line = child.stdout.readline()
        done = time.monotonic()
        status = child.wait(timeout=SHUTDOWN_BOUND_SECONDS)
        return line, status, time.monotonic() - done
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {SHUTDOWN_BOUND_SECONDS} s after its work: shutdown hung")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


def test_close_gives_up_on_a_stream_nobody_reads_and_counts_what_was_queued() -> None:
    """A worker blocked for good writing to a full pipe holds the writer's lock: close()
    returns at its timeout anyway, what was still queued is counted as dropped
    (write_failed), and work submitted afterwards is dropped at once, not waited for."""
    line, status, _ = run_with_unread_stderr(
        """
        import json, time
        from prometheus_client import CollectorRegistry
        from sentinel._metrics import metrics_for
        from sentinel._output import Emitter
        from sentinel._writer import Writer

        registry = CollectorRegistry()
        metrics = metrics_for(registry)
        emitter = Emitter(service="svc", location="fra", metrics=metrics, log_format="json")
        writer = Writer(emitter, metrics, queue_size=1000, drop_warning_interval_seconds=0)
        for index in range(400):  # 1.6 MB: far more than a pipe holds
            writer.write("info", "filler", {"index": index, "text": "x" * 4000})
        started = time.monotonic()
        writer.close(timeout=1.0)
        closing = time.monotonic() - started
        started = time.monotonic()
        writer.write("info", "late", {})
        late = time.monotonic() - started
        dropped = registry.get_sample_value(
            "sentinel_reports_dropped_total", {"reason": "write_failed"}
        )
        print(json.dumps({"closing": closing, "late": late, "dropped": dropped}), flush=True)
        """
    )
    assert status == 0
    result = json.loads(line)
    assert result["closing"] < 3.0
    assert result["late"] < 1.0
    # Most of the 400 never fit in the pipe; the late record is counted too.
    assert result["dropped"] > 100


def test_a_process_whose_stderr_nobody_reads_exits_on_time_with_its_own_status() -> None:
    """Reports queued behind a blocked stderr hold up neither sys.excepthook (which writes
    its report at once) nor the close at exit: the process ends within about 5 s, with the
    status it would have had without sentinel (1, for the uncaught exception)."""
    line, status, shutdown = run_with_unread_stderr(
        """
        import time
        import sentinel

        sentinel.install(sentinel.Config(metrics_port=0, log_format="json"))
        for index in range(300):
            try:
                raise type(f"Error{index}", (Exception,), {})("word " * 400)
            except Exception as error:
                sentinel.capture_exception(error)
        time.sleep(0.5)  # the writer's worker is now blocked on the full pipe
        print("raising", flush=True)
        raise RuntimeError("the job failed")
        """
    )
    assert line == "raising\n"
    assert status == 1
    assert shutdown < SHUTDOWN_BOUND_SECONDS

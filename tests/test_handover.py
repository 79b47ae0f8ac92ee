"""The handover thread: finalizers' reports made off the finalizer's thread, bounded,
counted when they overflow, and taken over by a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import clean_env

from sentinel._handover import MAX_WAITING, Handover
from sentinel.testing import Captured


def test_reports_are_made_on_the_handover_thread_in_order(captured: Captured) -> None:
    handover = Handover()
    assert not handover.put(lambda: None), "no thread yet: the caller must report inline"
    handover.start()
    made: list[tuple[int, str]] = []
    done = threading.Event()
    for number in range(3):
        handover.put(lambda number=number: made.append((number, threading.current_thread().name)))
    handover.put(done.set)
    assert done.wait(5)
    assert made == [(0, "sentinel-handover"), (1, "sentinel-handover"), (2, "sentinel-handover")]


def test_only_the_thread_the_collector_runs_in_is_collecting() -> None:
    """The collector runs finalizers in the thread it started in; another thread running
    meanwhile (the event loop's, a request failing) is not inside a finalizer, and reports
    as usual: its server line is left out, its report made at once."""
    handover = Handover()
    in_collector: list[bool] = []
    started, finish = threading.Event(), threading.Event()

    def collector() -> None:
        handover._on_gc("start", {})
        in_collector.append(handover.collecting)
        started.set()
        finish.wait(5)
        handover._on_gc("stop", {})
        in_collector.append(handover.collecting)

    thread = threading.Thread(target=collector)
    thread.start()
    assert started.wait(5)
    assert handover.collecting is False  # this thread, while the other one collects
    finish.set()
    thread.join(5)
    assert in_collector == [True, False]


def test_a_flood_beyond_the_bound_is_dropped_and_counted(captured: Captured) -> None:
    """With the thread held up, reports past MAX_WAITING are not queued: each one is counted
    as a dropped report (reason queue_full) once the thread catches up."""
    handover = Handover()
    handover.start()
    release = threading.Event()
    made = 0

    def make() -> None:
        nonlocal made
        made += 1

    holding = threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    handover.put(hold)
    # Flood only once the thread holds the first report: before that, the first report is
    # still queued and takes one of the MAX_WAITING places.
    assert holding.wait(5)
    for _ in range(MAX_WAITING + 25):
        assert handover.put(make)
    release.set()
    handover.drain()
    # The thread was holding the first report; the first MAX_WAITING of the rest were queued.
    assert made == MAX_WAITING
    dropped = captured.metric("sentinel_reports_dropped_total", reason="queue_full")
    assert made + dropped == MAX_WAITING + 25


def test_a_report_that_raises_is_an_internal_error_and_the_next_is_still_made(
    captured: Captured,
) -> None:
    handover = Handover()
    handover.start()
    done = threading.Event()

    def broken() -> None:
        raise RuntimeError("a report that failed")

    handover.put(broken)
    handover.put(done.set)
    assert done.wait(5)
    assert captured.metric("sentinel_internal_errors_total", component="reporter") == 1


def test_closing_waits_for_the_report_the_thread_is_making(captured: Captured) -> None:
    """drain() (what closing a sentinel calls) returns only once the report the thread took
    is made: at exit, the thread would stop with the interpreter, its report lost."""
    handover = Handover()
    handover.start()
    started, made = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        threading.Event().wait(0.3)
        made.set()

    handover.put(slow)
    assert started.wait(5)
    handover.drain()
    assert made.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_reports_inline_until_it_starts_its_own_thread() -> None:
    """A forked worker has no handover thread (its queue is a copy of its parent's): put()
    says so, and the hooks report inline, until start() makes one of its own."""
    code = textwrap.dedent(
        """
        import os, threading
        from sentinel._handover import Handover
        handover = Handover()
        handover.start()
        pid = os.fork()
        if pid == 0:
            inline = handover.put(lambda: None)
            handover.start()
            done = threading.Event()
            queued = handover.put(done.set)
            names = [t.name for t in threading.enumerate()]
            os._exit(0 if (not inline and queued and done.wait(5)
                           and "sentinel-handover" in names) else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"

"""The one route from sentinel to its sinks: a bounded queue, drained by one thread.

Exception reports, kept request records, mutation events and summaries all leave through
here. The request path only appends to the queue (a full queue drops and counts, never
blocks). One worker thread runs each queued task, the sources of summaries after every
item, the periodic tasks (the metrics batch) about twice a second, and the warning about
drops, at most once an interval. Once closed, tasks run at once on the caller's thread.

The worker holds the lock while it writes, and a write to a stream nobody reads (a full
pipe) never returns: so no one else waits for that lock past a deadline. At shutdown what is
still queued then is dropped and counted (``write_failed``), and the process exits on time.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._metrics import Metrics
from ._output import Emitter
from ._vocabulary import Component, DropReason

Task = Callable[[Any], None]
"""Runs on the worker with the item it was queued with."""
SummarySource = Callable[[bool], Iterable[tuple[str, str, dict[str, Any]]]]
"""Given ``everything`` (True at flush and shutdown), the (level, event, fields) now due."""

PERIODIC_SECONDS = 0.5
RUN_NOW_SECONDS = 5.0
"""How long work run on the caller's thread (at process exit) waits for a busy worker."""
GIVEN_UP: DropReason = "write_failed"
"""Why work still queued when shutdown gave up on a blocked stream is counted as dropped."""
_LOCK_GRACE_SECONDS = 0.1
_STOP = object()


class Writer:
    """Queues work for the sinks and runs it off the request path, in order."""

    def __init__(
        self,
        emitter: Emitter,
        metrics: Metrics,
        *,
        queue_size: int,
        drop_warning_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emitter = emitter
        self._metrics = metrics
        self._drop_warning_interval = drop_warning_interval_seconds
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._sources: list[tuple[SummarySource, Component]] = []
        self._periodic: list[tuple[Callable[[], None], Component]] = []
        self._last_periodic = 0.0
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.lock = threading.RLock()
        """Held while anything is written: tasks, summaries and warnings never interleave.
        Others take it with :meth:`_acquire`, never without a deadline."""
        self._stalled = False
        """A wait for the lock timed out and the worker has finished nothing since: later
        waits only try."""
        self._closed = False
        self._drop_lock = threading.Lock()
        self._drops_since_warning: dict[str, int] = {}
        self._last_drop_warning = -1e18

    # -- the request path ---------------------------------------------------------------------

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread, once started (it ends after :meth:`close`)."""
        return self._worker

    def submit(self, task: Task, item: Any, reason: DropReason = "queue_full") -> bool:
        """Queue ``task(item)`` for the worker; False when the full queue dropped it (counted
        under ``reason``). Once closed, it runs now (see :meth:`run_now`)."""
        if self._closed:
            return self.run_now(task, item)
        if self._worker is None:
            self._start_worker()
        try:
            self._queue.put_nowait((task, item))
        except queue.Full:
            self.note_drop(reason)
            return False
        return True

    def write(
        self, level: str, event: str, fields: dict[str, Any], reason: DropReason = "queue_full"
    ) -> bool:
        """Queue a record that is ready (already scrubbed) to be written as it is."""
        return self.submit(self._emit, (level, event, fields), reason)

    def note_drop(self, reason: DropReason) -> None:
        """Count a drop; the worker says so on stderr (at most once an interval).

        Only counting happens here: this runs on the request path, and writing the warning
        could block on the same stalled stream that made the queue overflow.
        """
        self._metrics.dropped(reason)
        with self._drop_lock:
            self._drops_since_warning[reason] = self._drops_since_warning.get(reason, 0) + 1

    # -- what the worker also runs ------------------------------------------------------------

    def add_summaries(self, source: SummarySource, component: Component) -> None:
        """Write what ``source`` says is due, after every item and at flush."""
        self._sources.append((source, component))

    def add_periodic(self, task: Callable[[], None], component: Component) -> None:
        """Run ``task`` about every half second (and start the worker for it)."""
        self._periodic.append((task, component))
        if self._worker is None:
            self._start_worker()

    def run_now(self, task: Task, item: Any, timeout: float = RUN_NOW_SECONDS) -> bool:
        """Run ``task(item)`` on this thread, and write what became due (at process exit).

        False when the worker kept the lock for ``timeout`` seconds (blocked writing): then
        ``task`` does not run, and is counted as dropped.
        """
        if not self._acquire(time.monotonic() + timeout):
            self.note_drop(GIVEN_UP)
            return False
        try:
            self._run_task(task, item)
            self._write_summaries(everything=False)
            self._warn_about_drops()
        finally:
            self.lock.release()
        return True

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0, *, everything: bool = False) -> bool:
        """Wait until every queued task has run, then write the summaries that are due (every
        one, with ``everything``); True if the queue drained within ``timeout``.

        Returns at ``timeout`` also when the worker is blocked writing; at a final flush
        (``everything``) what is still queued is then dropped and counted.
        """
        deadline = time.monotonic() + timeout
        # Stalled: the worker has been blocked writing since a wait for it timed out.
        while self._queue.unfinished_tasks and time.monotonic() < deadline and not self._stalled:
            time.sleep(0.005)
        if not self._acquire(deadline):
            if everything:
                self._give_up()
            return False
        try:
            self._write_summaries(everything)
            self._warn_about_drops(everything)
        finally:
            self.lock.release()
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """Run what is queued, write every summary, stop the worker; later work runs inline.

        Within ``timeout``: when the worker is still blocked writing then, what is queued is
        dropped and counted instead.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        if not self._acquire(deadline):
            self._give_up()
        else:
            try:
                while True:
                    try:
                        entry = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if entry is not _STOP:
                        self._run_task(*entry)
                    self._queue.task_done()
                self._write_summaries(everything=True)
                self._warn_about_drops(everything=True)
            finally:
                self.lock.release()
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)

    def _acquire(self, deadline: float) -> bool:
        """Take the lock by ``deadline``; False when the worker holds it longer (a write that
        does not return). After such a timeout, later calls only try until the worker
        finishes something: a stalled stream costs one wait, not one per caller."""
        if self._stalled:
            acquired = self.lock.acquire(blocking=False)
        else:
            # At least the time one write takes: a busy worker on a healthy stream is no stall.
            timeout = max(deadline - time.monotonic(), _LOCK_GRACE_SECONDS)
            acquired = self.lock.acquire(timeout=timeout)
        self._stalled = not acquired
        return acquired

    def _give_up(self) -> None:
        """Drop (and count) what is queued: the worker is blocked writing, past the deadline."""
        stop = False
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True  # still for the worker, should its write ever return
            else:
                self.note_drop(GIVEN_UP)
            self._queue.task_done()
        if stop:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)

    # -- the worker ---------------------------------------------------------------------------

    def _start_worker(self) -> None:
        with self._worker_lock:
            # Closed: work runs on the caller's thread, and no close() is left to stop one.
            if self._worker is None and not self._closed:
                self._worker = threading.Thread(
                    target=self._run, name="sentinel-writer", daemon=True
                )
                self._worker.start()

    def _run(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=PERIODIC_SECONDS)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                self._queue.task_done()
                return
            try:
                with self.lock:
                    if entry is not None:
                        self._run_task(*entry)
                    self._write_summaries(everything=False)
                    self._warn_about_drops()
                self._stalled = False  # it writes again
            finally:
                if entry is not None:
                    self._queue.task_done()
            self._run_periodic()

    def _run_task(self, task: Task, item: Any) -> None:
        try:
            task(item)
        except Exception:
            self._metrics.internal_error("writer")

    def _run_periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_periodic < PERIODIC_SECONDS:
            return
        self._last_periodic = now
        for task, component in self._periodic:
            try:
                task()
            except Exception:
                self._metrics.internal_error(component)

    def _write_summaries(self, everything: bool) -> None:
        for source, component in self._sources:
            try:
                for level, event, fields in source(everything):
                    self._emitter.emit(level, event, **fields)
            except Exception:
                self._metrics.internal_error(component)

    def _emit(self, record: tuple[str, str, dict[str, Any]]) -> None:
        level, event, fields = record
        self._emitter.emit(level, event, **fields)

    def _warn_about_drops(self, everything: bool = False) -> None:
        """Say what was dropped since the last warning: at most once an interval, and at a
        final flush (``everything``) whatever is left, so every drop is said."""
        now = self._clock()
        if not everything and now - self._last_drop_warning < self._drop_warning_interval:
            return
        with self._drop_lock:
            if not self._drops_since_warning:
                return
            dropped, self._drops_since_warning = self._drops_since_warning, {}
        self._last_drop_warning = now
        self._emitter.emit(
            "warning",
            "reports_dropped",
            dropped=dropped,
            message="sentinel dropped reports; see sentinel_reports_dropped_total",
        )

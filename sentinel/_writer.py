"""The one route from sentinel to its sinks: a bounded queue, drained by one thread.

Exception reports, kept request records, mutation events and summaries all leave through
here. The request path only appends to the queue (a full queue drops and counts, never
blocks). One worker thread runs each queued task, the sources of summaries after every
item, the periodic tasks (the metrics batch) about twice a second, and the warning about
drops, at most once an interval. Once closed, tasks run at once on the caller's thread.
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
        """Held while anything is written: tasks, summaries and warnings never interleave."""
        self._closed = False
        self._drop_lock = threading.Lock()
        self._drops_since_warning: dict[str, int] = {}
        self._last_drop_warning = -1e18

    # -- the request path ---------------------------------------------------------------------

    def submit(self, task: Task, item: Any, reason: DropReason = "queue_full") -> bool:
        """Queue ``task(item)`` for the worker; False when the full queue dropped it (counted
        under ``reason``). Once closed, it runs now."""
        if self._closed:
            self.run_now(task, item)
            return True
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

    def run_now(self, task: Task, item: Any) -> None:
        """Run ``task(item)`` on this thread, and write what became due (at process exit)."""
        with self.lock:
            self._run_task(task, item)
            self._write_summaries(everything=False)
            self._warn_about_drops()

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0, *, everything: bool = False) -> bool:
        """Wait until every queued task has run, then write the summaries that are due (every
        one, with ``everything``); True if the queue drained within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.lock:
            self._write_summaries(everything)
            self._warn_about_drops()
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """Run what is queued, write every summary, stop the worker; later work runs inline."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        with self.lock:
            while True:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is not _STOP:
                    self._run_task(*entry)
                self._queue.task_done()
            self._write_summaries(everything=True)
            self._warn_about_drops()
        if self._worker is not None:
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

    def _warn_about_drops(self) -> None:
        now = self._clock()
        if now - self._last_drop_warning < self._drop_warning_interval:
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

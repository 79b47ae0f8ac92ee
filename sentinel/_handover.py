"""Reports that finalizers hand over, made on a thread of their own.

A finalizer (a failed future freed by the garbage collector, an exception in ``__del__``)
runs at whatever allocation triggers it, on whatever thread: inside sentinel's own code
too, while it holds a lock the report needs (prometheus-client holds its family's lock
while it makes a new label set's child). Reporting there would wait for that lock forever,
and the request with it. So a finalizer's hook only appends to a deque (no lock) and wakes
the handover thread, which makes the report a moment later.

Which hooks hand over: those that only finalizers call (a collected future, an exception in
``__del__``), and any hook while the garbage collector runs (a finalizer that logs the
error it caught, as connection pools do for a connection nobody returned).
"""

from __future__ import annotations

import gc
import os
import threading
from collections import deque
from collections.abc import Callable

from ._current import current

MAX_WAITING = 10_000
"""Reports waiting for the handover thread at most; more are dropped and counted (the
thread fell that far behind, or a flood of finalizers outran it)."""

DRAIN_SECONDS = 5.0
"""How long closing a sentinel waits for the report the handover thread is making."""


class Handover:
    """A deque of reports to make, and the daemon thread that makes them."""

    def __init__(self) -> None:
        self._waiting: deque[Callable[[], object]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._overflow = 0
        self._waking = threading.local()
        self._start_lock = threading.Lock()
        self._draining = threading.Lock()
        self._collecting_thread: int | None = None
        """The thread the garbage collector is running in (its finalizers run there; other
        threads may run meanwhile, and report as usual)."""

    def start(self) -> None:
        """Start the thread in this process (again in a forked child, which has none); call
        it where no finalizer can be running, never from one."""
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._waiting.clear()  # a forked child's copy of its parent's queue
            self._draining = threading.Lock()  # perhaps held at the fork
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._run, name="sentinel-handover", daemon=True)
            self._thread.start()
            self._pid = os.getpid()
            if self._on_gc not in gc.callbacks:
                gc.callbacks.append(self._on_gc)

    def put(self, report: Callable[[], object]) -> bool:
        """Queue ``report`` for the thread; False when no thread runs in this process (the
        caller reports inline, as it must: nothing else would)."""
        if self._pid != os.getpid():
            return False
        if len(self._waiting) >= MAX_WAITING:
            self._overflow += 1
        else:
            self._waiting.append(report)
        # A finalizer run while this thread sets the event (its lock held) must not set it
        # again: the set under way wakes the thread, which takes every report queued.
        if not getattr(self._waking, "active", False):
            self._waking.active = True
            try:
                self._wake.set()
            finally:
                self._waking.active = False
        return True

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Make every queued report now, on this thread (the handover thread, or the one
        closing a sentinel at exit), and count what overflowed. A report the handover thread
        is making is waited for, up to ``timeout`` seconds: at exit, that thread stops with
        the interpreter, its report unwritten."""
        if not self._draining.acquire(timeout=timeout):
            return
        try:
            self._drain()
        finally:
            self._draining.release()

    def _drain(self) -> None:
        while True:
            try:
                report = self._waiting.popleft()
            except IndexError:
                break
            try:
                report()
            except Exception:
                sentinel = current()
                if sentinel is not None:
                    sentinel.metrics.internal_error("reporter")
        overflow, self._overflow = self._overflow, 0
        sentinel = current()
        if overflow and sentinel is not None:
            for _ in range(overflow):
                sentinel.writer.note_drop("queue_full")

    @property
    def collecting(self) -> bool:
        """Whether the garbage collector is running in this thread: what this thread does
        now may be a finalizer's, run wherever the thread was (inside sentinel, holding a
        lock a report needs, perhaps)."""
        return self._collecting_thread == threading.get_ident()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        self._collecting_thread = threading.get_ident() if phase == "start" else None

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()
            self.drain()


handover = Handover()
"""The process's one handover thread."""

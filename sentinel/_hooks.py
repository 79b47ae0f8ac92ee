"""Process-level hooks: everything that can raise outside the middleware's reach.

Each hook reports to the current sentinel and then hands over to whatever was installed
before, so other tools keep working. Installed once per process by :func:`install`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ._context import RequestContext, current_phase, current_request
from ._current import current
from ._handover import handover
from ._reporter import HANDLED_ATTR, REPORTED_ATTR, mark_of
from ._vocabulary import Phase

_installed = False
# Each wrapped Logger method and the original it calls. ``exception`` and ``fatal`` call
# the originals of ``error`` and ``critical`` directly, so the wrapper is always exactly
# one frame above the app's call site (what ``stacklevel`` + 1 accounts for, also with
# logger classes that find the caller their own way, as structlog's does).
_LOGGER_METHODS = {
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
    "log": "log",
}
_install_lock = threading.Lock()
_previous: dict[str, Any] = {}
_current_task = asyncio.current_task
_hooked_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

SERVER_ERROR_LOGGERS = frozenset({"uvicorn.error", "hypercorn.error", "daphne.server"})
"""Loggers through which ASGI servers log an app's exception; their line for an exception
sentinel already reported is left out, so each exception is reported once."""


_SERVER_FAILURE_TEXTS = frozenset(
    {"Exception in ASGI application", "Exception in 'lifespan' protocol"}
)
"""uvicorn's own words for an app's failure, which sentinel reports in its place."""


def install_process_hooks() -> None:
    """The exception hooks (sys, threading, unraisable, logging, atexit), once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _previous["excepthook"] = sys.excepthook
        _previous["threading"] = threading.excepthook
        _previous["unraisable"] = sys.unraisablehook
        sys.excepthook = _excepthook
        threading.excepthook = _threading_excepthook
        sys.unraisablehook = _unraisablehook
        for name in _LOGGER_METHODS:
            _previous[f"logging.{name}"] = logging.Logger.__dict__[name]
        for name, delegate in _LOGGER_METHODS.items():
            setattr(logging.Logger, name, _logging_wrapper(name, _previous[f"logging.{delegate}"]))
        atexit.register(_at_exit)
        handover.start()
        _installed = True


def process_hooks_installed() -> bool:
    """Whether :func:`install_process_hooks` put its hooks in place (not removed since)."""
    return _installed


def uninstall_process_hooks() -> None:
    """Restore the hooks that were there before (for tests)."""
    global _installed
    with _install_lock:
        if not _installed:
            return
        if sys.excepthook is _excepthook:
            sys.excepthook = _previous["excepthook"]
        if threading.excepthook is _threading_excepthook:
            threading.excepthook = _previous["threading"]
        if sys.unraisablehook is _unraisablehook:
            sys.unraisablehook = _previous["unraisable"]
        for name in _LOGGER_METHODS:
            setattr(logging.Logger, name, _previous[f"logging.{name}"])
        atexit.unregister(_at_exit)
        _installed = False


_reporting = threading.local()


def _report(
    exc: BaseException | None,
    phase: Phase | None,
    *,
    sync: bool = False,
    in_request: bool = True,
) -> bool:
    sentinel = current()
    if sentinel is None or exc is None:
        return False
    # An unraisable exception or a log call can fire while this thread is inside sentinel
    # (garbage collection during a report, say); reporting again there could deadlock on
    # sentinel's own locks, so the inner one is left to the hooks chained after us.
    if getattr(_reporting, "active", False):
        return False
    _reporting.active = True
    try:
        if not in_request:
            return sentinel.reporter.report(exc, phase or "process", None, sync=sync)
        return sentinel.capture_exception(exc, phase, sync=sync)
    finally:
        _reporting.active = False


def _written(exc: BaseException | None) -> bool:
    sentinel = current()
    return exc is not None and sentinel is not None and sentinel.reporter.was_written(exc)


# Python's own hooks would print the traceback again, unscrubbed (a secret in the message,
# the source lines): once, scrubbed, is enough. A hook the app set still runs.


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    # The process is about to die: write the report now, not from the worker thread.
    _report(exc, "process", sync=True)
    previous = _previous["excepthook"]
    if previous is sys.__excepthook__ and _written(exc):
        return
    previous(exc_type, exc, tb)


def _threading_excepthook(args: threading.ExceptHookArgs) -> None:
    # Written on the ending thread, as Python's own hook prints: whether it was written
    # decides whether that hook still prints it (a report before_report dropped was not).
    _report(args.exc_value, "thread", sync=True)
    previous = _previous["threading"]
    if previous is threading.__excepthook__ and _written(args.exc_value):
        return
    previous(args)


def _unraisablehook(unraisable: Any) -> None:
    # Garbage collection runs a __del__ whenever, in whichever request happens to allocate:
    # the object is not that request's, so the report names no request. And wherever this
    # thread is, inside sentinel holding a lock perhaps: the report is handed over.
    previous = _previous["unraisable"]
    exc = unraisable.exc_value
    if previous is not sys.__unraisablehook__:
        if not handover.put(functools.partial(_report, exc, "process", in_request=False)):
            _report(exc, "process", in_request=False)
        previous(unraisable)
        return
    # Python's own hook prints it only when no report is written. Held until then: its
    # object may be one being finalized, kept alive a moment longer (Python allows that).
    if not handover.put(functools.partial(_report_unraisable, unraisable)):
        _report_unraisable(unraisable)


def _report_unraisable(unraisable: Any) -> None:
    # Written now (on the handover thread): whether it was decides whether Python prints it.
    _report(unraisable.exc_value, "process", in_request=False, sync=True)
    if not _written(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def _at_exit() -> None:
    sentinel = current()
    if sentinel is not None:
        sentinel.close()


# -- logging -------------------------------------------------------------------------------


def _logged_exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) > 1 else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def _logging_wrapper(name: str, original: Callable[..., None]) -> Callable[..., None]:
    # Patched on the Logger class rather than added as a handler: it sees exceptions logged
    # through disabled loggers, loggers that do not propagate, and loggers reconfigured by
    # dictConfig after sentinel was installed.
    @functools.wraps(original)
    def method(self: logging.Logger, *args: Any, **kwargs: Any) -> None:
        if name == "exception":
            kwargs.setdefault("exc_info", True)
        exc_info = kwargs.get("exc_info")
        if exc_info and (name != "log" or _level_of(args, kwargs) >= logging.ERROR):
            try:
                message = _message_of(name, args, kwargs)
                if _on_logged_exception(self, _logged_exception(exc_info), message):
                    return
            except Exception:
                sentinel = current()
                if sentinel is not None:
                    sentinel.metrics.internal_error("logging")
        # One more frame to skip, so records keep the caller's file, line and function.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        original(self, *args, **kwargs)

    return method


def _level_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    level = args[0] if args else kwargs.get("level")
    return level if isinstance(level, int) else logging.NOTSET


def _message_of(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    position = 1 if name == "log" else 0
    return args[position] if len(args) > position else kwargs.get("msg", "")


def _on_logged_exception(
    logger: logging.Logger, exc: BaseException | None, message: object
) -> bool:
    """Report a logged exception; True when the server's own duplicate line should be left out."""
    if exc is None:
        return False
    if mark_of(exc, HANDLED_ATTR) and not mark_of(exc, REPORTED_ATTR):
        return False  # the app reported it itself (sentinel.capture_exception): once is enough
    # Logged by a finalizer the garbage collector runs: not the running request's, and made
    # wherever this thread is (inside sentinel, holding a lock the report needs, perhaps).
    if handover.collecting and current() is not None and _hand_over(exc):
        return False
    server_line = logger.name in SERVER_ERROR_LOGGERS
    phase: Phase | None = None
    if server_line and current_request.get() is None:
        # The server's own error line for an app exception no middleware saw: a failure
        # in a layer outside sentinel, while serving a request or running the lifespan.
        phase = "lifespan" if "lifespan" in str(message) else "request"
    newly_reported = _report(exc, phase)
    if not server_line or not mark_of(exc, REPORTED_ATTR):
        return False
    # Reported before (by the middleware), or now from this very line: the server's own
    # text for it is left out (its traceback unscrubbed). An app's line through the
    # server's logger that sentinel reports is kept.
    return not newly_reported or str(message).strip() in _SERVER_FAILURE_TEXTS


def _hand_over(exc: BaseException) -> bool:
    return handover.put(functools.partial(_report, exc, "process", in_request=False))


# -- asyncio -------------------------------------------------------------------------------


def hook_running_loop() -> None:
    """Hook the running asyncio loop once: its exception handler, task factory and executor."""
    loop = asyncio.events._get_running_loop()
    if loop is None or loop in _hooked_loops:
        return
    handover.start()  # again in a forked worker, which has no handover thread
    _hooked_loops.add(loop)
    sentinel = current()
    if sentinel is not None:
        sentinel.watch_loop(loop)
    previous_handler = loop.get_exception_handler()
    previous_factory = loop.get_task_factory()

    def exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        reported = False
        if isinstance(exc, BaseException):
            # Executor futures are reported as "thread" by their own callback; whatever
            # reaches the handler (a task, a future, a callback) ran on the loop. A future
            # arrives here when the garbage collector frees it, which may be in the middle
            # of any other request: that request is not the future's, so the report names
            # none, and a future already reported (in its own request) is not reported again.
            # And wherever this thread is, inside sentinel holding a lock perhaps: the
            # report of a collected future is handed over.
            if "future" in context or "task" in context:
                reported = bool(mark_of(exc, REPORTED_ATTR))
                if not reported and current() is not None:
                    logged = context if previous_handler is None else None
                    report = functools.partial(_report_collected, exc, loop, logged)
                    reported = handover.put(report)
                    if not reported:
                        reported = _report(exc, "task", in_request=False)
            else:
                reported = _report(exc, "task") or bool(mark_of(exc, REPORTED_ATTR))
        if previous_handler is not None:
            previous_handler(loop, context)
        elif not reported:
            # asyncio's own "Task exception was never retrieved" would say it a second time.
            loop.default_exception_handler(context)

    def task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if previous_factory is not None:
            task = previous_factory(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        # A task the app's code makes (inside a task, or in a request's or the lifespan's
        # context) is watched for an error nobody retrieves. One a server makes from its I/O
        # callbacks (uvicorn's task per request) is not the app's: a done-callback there
        # would cost every request a turn of the loop, and should such a task ever hold an
        # unretrieved error, the loop's exception handler reports it when it is collected.
        if (
            current_request.get() is not None
            or _current_task(loop) is not None
            or current_phase.get() is not None
        ):
            task.add_done_callback(_on_task_done)
        return task

    loop.set_exception_handler(exception_handler)
    loop.set_task_factory(task_factory)
    original_run_in_executor = loop.run_in_executor

    def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        if (
            current_request.get() is not None
            and (executor is None or isinstance(executor, ThreadPoolExecutor))
            and not _runs_in_a_context(func)
        ):
            # A request's thread-pool work runs in the request's context, as asyncio.to_thread
            # and Starlette's run_in_threadpool run it (a process pool cannot take a context).
            func = functools.partial(contextvars.copy_context().run, func, *args)
            args = ()
        future = original_run_in_executor(executor, func, *args)
        future.add_done_callback(_on_executor_future_done)
        return future

    # Loops implemented in C (uvloop) refuse this; they keep the GC-time report via the handler.
    with contextlib.suppress(AttributeError, TypeError):
        loop.run_in_executor = run_in_executor  # type: ignore[method-assign,assignment]


def _report_collected(
    exc: BaseException, loop: asyncio.AbstractEventLoop, context: dict[str, Any] | None
) -> None:
    """The handed-over report of a future collected with an error nobody retrieved; when
    sentinel does not report it after all, asyncio's own line about it (``context``, when
    no handler the app set got it already) is still logged."""
    reported = _report(exc, "task", in_request=False) or bool(mark_of(exc, REPORTED_ATTR))
    if not reported and context is not None:
        loop.default_exception_handler(context)


def _runs_in_a_context(func: Callable[..., Any]) -> bool:
    # asyncio.to_thread hands over functools.partial(context.run, ...) already.
    return type(func) is functools.partial and type(getattr(func.func, "__self__", None)) is (
        contextvars.Context
    )


def _watch_for_unretrieved(future: asyncio.Future[Any], phase: Phase) -> None:
    # Runs in the context of whoever created the task, so a request's tasks keep the
    # request's route and location.
    if future.cancelled() or not getattr(future, "_log_traceback", False):
        return
    sentinel = current()
    if sentinel is None:
        return
    grace = sentinel.config.task_grace_seconds
    loop = future.get_loop()
    with _waiting_lock:
        _waiting[id(future)] = (future, phase, contextvars.copy_context(), loop)
    loop.call_later(grace, _report_if_unretrieved, future, phase)


_waiting: dict[
    int, tuple[asyncio.Future[Any], Phase, contextvars.Context, asyncio.AbstractEventLoop]
] = {}
"""Failed tasks and executor futures in their grace period, by id (the entry holds the
future, so the id stays its own), with the context they finished in and their loop."""
_waiting_lock = threading.Lock()


def report_waiting() -> None:
    """Report now every failed task or executor future still in its grace period that nobody
    retrieved: the server is shutting down, and a signal may end the process before the
    grace period does (asyncio's own last word, at garbage collection, never comes then).
    Only those of a loop still running (the server's, draining): a loop that stopped (an
    earlier server in the same process) is not this shutdown's. Those of a loop that closed
    before their grace period ended are forgotten: its server ended without a word from
    them."""
    with _waiting_lock:
        due = [
            key
            for key, (_, _, _, loop) in _waiting.items()
            if loop.is_closed() or loop.is_running()
        ]
        waiting = [_waiting.pop(key) for key in due]
    for future, phase, context, loop in waiting:
        if not loop.is_closed():
            context.run(_report_unretrieved, future, phase)


def _on_task_done(future: asyncio.Future[Any]) -> None:
    _watch_for_unretrieved(future, "task")


def _on_executor_future_done(future: asyncio.Future[Any]) -> None:
    _watch_for_unretrieved(future, "thread")


def _report_if_unretrieved(future: asyncio.Future[Any], phase: Phase) -> None:
    # Nobody awaited the task or asked for its exception within the grace period: it is
    # a fire-and-forget failure that would otherwise surface only when garbage collected.
    with _waiting_lock:
        waited = _waiting.pop(id(future), None)
    if waited is None:
        return  # reported at shutdown already
    _report_unretrieved(future, phase)


def _report_unretrieved(future: asyncio.Future[Any], phase: Phase) -> None:
    if not getattr(future, "_log_traceback", False):
        return
    exc = getattr(future, "_exception", None)
    if isinstance(exc, BaseException):
        request: RequestContext | None = current_request.get()
        sentinel = current()
        if sentinel is not None:
            sentinel.reporter.report(exc, phase, request)

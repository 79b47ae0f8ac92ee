"""Which phase an exception belongs to: one rule for every way sentinel sees one."""

from __future__ import annotations

import asyncio
import threading
from contextvars import ContextVar
from types import TracebackType

from ._context import RequestContext, current_phase
from ._exceptions import error_path
from ._vocabulary import Phase

_BACKGROUND_FILES = ("starlette/background.py", "starlette\\background.py")


class Lifespan:
    """One app lifespan's state, shared by the tasks it starts (they inherit the context
    holding it): between startup's end and shutdown's start it is serving, and what those
    tasks raise is not the lifespan's any more."""

    __slots__ = ("serving",)

    def __init__(self) -> None:
        self.serving = False


current_lifespan: ContextVar[Lifespan | None] = ContextVar("sentinel_lifespan", default=None)


def phase_of(
    request: RequestContext | None, exc: BaseException | None = None, *, propagated: bool = False
) -> Phase:
    """The phase of an exception: one that ``propagated`` up to a layer (the middleware), or
    one logged or captured by code running now.

    In a request: ``background`` inside a Starlette background task (an exception that
    propagated shows its frames in the traceback; code running after a successful response
    is the background work), ``response`` while a started response is still streaming or
    when one propagates after a response that was not an error went out (Starlette's
    BaseHTTPMiddleware ends the body of a stream that failed, then re-raises), else
    ``request`` (which includes an inner error middleware having sent its 500).
    Outside a request: an explicitly set phase (lifespan, during its startup and shutdown:
    a task it started raising while requests are served is a task), else thread, task or
    process.
    """
    if request is not None:
        if propagated:
            if exc is not None and _raised_through_background_task(exc):
                return "background"
        elif request.body_complete and (request.status or 0) < 500:
            return "background"
        if request.kind == "http" and request.response_started:
            if not request.body_complete:
                return "response"
            if propagated and (request.status or 0) < 500:
                return "response"
        return "request"
    explicit = current_phase.get()
    if explicit is not None:
        lifespan = current_lifespan.get() if explicit == "lifespan" else None
        if lifespan is None or not lifespan.serving:
            return explicit
    if threading.current_thread() is not threading.main_thread():
        return "thread"
    try:
        if asyncio.current_task() is not None:
            return "task"
    except RuntimeError:
        pass
    return "process"


def _raised_through_background_task(exc: BaseException) -> bool:
    # The groups a task group wrapped the error in, and the error (bounded however deep).
    return any(_tb_has_background_frame(member.__traceback__) for member in error_path(exc))


def _tb_has_background_frame(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_BACKGROUND_FILES):
            return True
        tb = tb.tb_next
    return False

"""One phase rule for every way sentinel sees an exception."""

from __future__ import annotations

import asyncio
import threading

from helpers import request_context
from starlette.background import BackgroundTask

from sentinel._context import current_phase
from sentinel._phase import phase_of


def test_request_response_and_error_middleware_cases() -> None:
    """Before the response: request; mid-stream: response; after a complete 500: request."""
    request = request_context()
    assert phase_of(request) == "request"
    request.response_started = True
    assert phase_of(request) == "response"
    request.body_complete = True
    request.status = 500
    assert phase_of(request) == "request"


def test_background_task_is_seen_in_the_traceback_or_after_a_good_response() -> None:
    """Propagated through a Starlette BackgroundTask, or logged after a successful
    response: background. Logged after a 500 was sent: request."""
    request = request_context()
    request.response_started = request.body_complete = True
    request.status = 200
    seen_inside: list[str] = []
    caught: list[BaseException] = []

    def job() -> None:
        seen_inside.append(phase_of(request))  # as a logged exception would be classified
        raise LookupError("job failed")

    async def run() -> None:
        try:
            await BackgroundTask(job)()
        except LookupError as exc:
            caught.append(exc)

    asyncio.run(run())
    assert seen_inside == ["background"]
    assert phase_of(request, caught[0], propagated=True) == "background"
    assert phase_of(request, ValueError("elsewhere"), propagated=True) == "request"
    request.status = 500
    assert phase_of(request) == "request"


def test_outside_arequest_context() -> None:
    """An explicit phase (lifespan), else thread, task or process."""
    assert phase_of(None) == "process"
    token = current_phase.set("lifespan")
    try:
        assert phase_of(None) == "lifespan"
    finally:
        current_phase.reset(token)
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(phase_of(None)))
    thread.start()
    thread.join()

    async def in_task() -> str:
        return phase_of(None)

    assert seen == ["thread"]
    assert asyncio.run(in_task()) == "task"

"""Process-level hooks: threads, the interpreter, unraisable errors, asyncio and logging.

Everything here runs for real: real threads, a real uvicorn on loopback (through
``sentinel.testing.serve``), an httpx client and real subprocesses. Waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import logging.config
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, first_response, free_port, run_client, stop, wait_for
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sentinel
from sentinel import _hooks
from sentinel._context import current_request
from sentinel.testing import Captured, serve
from sentinel.types import Receive, Scope, Send

REPO = Path(__file__).resolve().parents[1]
PHASES = {"request", "response", "lifespan", "background", "task", "thread", "process", "import"}
NO_ROUTE = "<none>"
EXC_TOTAL = "sentinel_unhandled_exceptions_total"


class MarkerError(Exception):
    """Raised by the marker route's fire-and-forget task: its report means timers caught up."""


class AppError(Exception):
    """An error raised by the test apps, distinct from anything the server raises itself."""


# -- helpers -------------------------------------------------------------------------------


def qualified(exc_type: type[BaseException]) -> str:
    """The ``exception_type`` sentinel writes for an exception class defined in this module."""
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def without_markers(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in reports if r["exception_type"] != qualified(MarkerError)]


def markers(reports: list[dict[str, Any]]) -> int:
    return len(reports) - len(without_markers(reports))


def settle(client: httpx.Client, captured: Captured, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Spawn a marker task and wait for its report; return the other reports written by then.

    Grace timers fire in order, so once the marker (spawned last) is reported, every earlier
    task or future has had its chance to be reported too.
    """
    markers_before = markers(captured.reports)
    # A fresh connection: uvicorn closes the previous one after an app exception.
    assert httpx.get(client.base_url.join("/marker"), timeout=10).status_code == 200

    def reports_once_marked() -> list[dict[str, Any]] | None:
        reports = captured.reports
        return reports if markers(reports) > markers_before else None

    reports = wait_for(reports_once_marked, timeout)
    assert reports is not None, "the marker task was never reported"
    return without_markers(reports)


def build_app(
    captured: Captured, routes: dict[str, Callable[[Request], Any]], keep: list[Any]
) -> Any:
    """A Starlette app with ``routes`` plus ``/marker``, instrumented with the test sentinel."""

    async def marker(request: Request) -> PlainTextResponse:
        async def fail() -> None:
            raise MarkerError("marker")

        keep.append(asyncio.create_task(fail()))
        return PlainTextResponse("marker")

    table = [Route(path, endpoint) for path, endpoint in routes.items()]
    table.append(Route("/marker", marker))
    return sentinel.instrument(Starlette(routes=table), sentinel=captured.sentinel)


@contextmanager
def client_for(app: Any) -> Iterator[httpx.Client]:
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@dataclass
class Recorded:
    """What the hooks installed before sentinel's received."""

    thread: list[BaseException | None] = field(default_factory=list)
    unraisable: list[BaseException | None] = field(default_factory=list)


@pytest.fixture
def recorded_hooks(captured: Captured) -> Iterator[Recorded]:
    """Reinstall sentinel's hooks on top of recording hooks; restore everything afterwards.

    The hooks are installed once per process, so chaining is tested by uninstalling them,
    putting recording hooks in place and installing again. The recording hooks also stand in
    for pytest's own ones, which would turn the deliberate errors into test warnings.
    """
    was_installed = _hooks._installed
    _hooks.uninstall_process_hooks()
    saved_thread, saved_unraisable = threading.excepthook, sys.unraisablehook
    recorded = Recorded()

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        recorded.thread.append(args.exc_value)

    def unraisable_hook(unraisable: Any) -> None:
        recorded.unraisable.append(unraisable.exc_value)

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
    _hooks.install_process_hooks()
    try:
        yield recorded
    finally:
        _hooks.uninstall_process_hooks()
        threading.excepthook, sys.unraisablehook = saved_thread, saved_unraisable
        if was_installed:
            _hooks.install_process_hooks()


@pytest.fixture
def app_logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A fresh named logger for the test; every logger disabled by dictConfig is re-enabled."""
    logger = logging.getLogger(f"sentinel_tests.app.{request.node.name}")
    try:
        yield logger
    finally:
        for existing in list(logging.root.manager.loggerDict.values()):
            if isinstance(existing, logging.Logger):
                existing.disabled = False


# -- threading.excepthook ------------------------------------------------------------------


def test_thread_exception_reported_once_and_previous_hook_still_called(
    captured: Captured, recorded_hooks: Recorded
) -> None:
    """A thread dying of an exception gives one "thread" report, one count, and the prior hook."""
    error = RuntimeError("thread boom")

    def target() -> None:
        raise error

    worker = threading.Thread(target=target, name="doomed-worker")
    worker.start()
    worker.join(5)
    assert not worker.is_alive()

    reports = captured.wait_for(1)
    assert len(reports) == 1
    report = reports[0]
    assert report["phase"] == "thread"
    assert report["exception_type"] == "RuntimeError"
    assert report["message"] == "thread boom"
    assert report["route"] == NO_ROUTE
    labels = {"location": "unknown", "route": NO_ROUTE, "exception_type": "RuntimeError"}
    assert captured.metric(EXC_TOTAL, phase="thread", **labels) == 1
    assert recorded_hooks.thread == [error]


def test_thread_exit_is_not_reported(captured: Captured, recorded_hooks: Recorded) -> None:
    """A thread ending with SystemExit is control flow: not reported, prior hook still called."""

    def target() -> None:
        raise SystemExit(3)

    def crash() -> None:
        raise ValueError("marker thread")

    for func in (target, crash):
        worker = threading.Thread(target=func)
        worker.start()
        worker.join(5)

    reports = captured.wait_for(1)
    assert [r["message"] for r in reports] == ["marker thread"]
    # Both still reach the hook installed before sentinel's (which decides to stay silent).
    assert [type(exc) for exc in recorded_hooks.thread] == [SystemExit, ValueError]


# -- sys.excepthook ------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTINEL_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def test_uncaught_exception_at_top_level_is_reported_once_and_not_printed_again() -> None:
    """An uncaught top-level error writes one "process" JSON report and exits non-zero;
    Python's own traceback is not printed after it, since it would show the secret in the
    message unscrubbed."""
    result = run_python(
        """
        import sentinel
        sentinel.install(service="hooks-test", metrics_port=0)
        raise ValueError("top-level boom token=hunter2-top-q7")
        """
    )
    assert result.returncode != 0
    records = json_lines(result.stderr)
    reports = [r for r in records if r.get("event") == "unhandled_exception"]
    assert len(reports) == 1, result.stderr
    report = reports[0]
    assert report["phase"] == "process"
    assert report["exception_type"] == "ValueError"
    assert report["message"].startswith("top-level boom token=[scrubbed len=")
    assert report["service"] == "hooks-test"
    assert report["route"] == NO_ROUTE
    assert report["location"] == "unknown"
    assert report["level"] == "error"
    assert report["frames"][-1]["function"] == "<module>"
    assert "hunter2" not in result.stderr
    assert "Traceback (most recent call last):" not in result.stderr


def test_a_crash_whose_report_before_report_drops_is_still_printed_by_python() -> None:
    """A report the app's before_report drops is no report: the process would end with no
    word at all, so Python's own traceback is printed, as without sentinel."""
    result = run_python(
        """
        import sentinel
        class PaymentDeclined(Exception):
            pass
        def before_report(report, exc):
            return None if isinstance(exc, PaymentDeclined) else report
        sentinel.install(before_report=before_report, metrics_port=0)
        raise PaymentDeclined("card declined")
        """
    )
    assert result.returncode != 0
    assert not [r for r in json_lines(result.stderr) if r.get("event") == "unhandled_exception"]
    assert "Traceback (most recent call last):" in result.stderr
    assert "PaymentDeclined: card declined" in result.stderr


@pytest.mark.parametrize(
    ("raises", "printed"),
    [
        pytest.param(
            """
            import threading
            thread = threading.Thread(target=fail, name="payments")
            thread.start()
            thread.join()
            """,
            "Exception in thread payments",
            id="thread",
        ),
        pytest.param(
            """
            class Session:
                def __del__(self):
                    fail()
            Session()
            """,
            "Exception ignored in",
            id="__del__",
        ),
    ],
)
def test_an_error_whose_report_before_report_drops_is_still_printed_by_python(
    raises: str, printed: str
) -> None:
    """A thread's crash, or an error in __del__, whose report the app's before_report drops
    is no report: Python's own hook prints it, as without sentinel."""
    setup = """
        import sentinel
        class PaymentDeclined(Exception):
            pass
        def fail():
            raise PaymentDeclined("card declined")
        def before_report(report, exc):
            return None if isinstance(exc, PaymentDeclined) else report
        sentinel.install(before_report=before_report, metrics_port=0)
        """
    result = run_python(textwrap.dedent(setup) + textwrap.dedent(raises))
    assert result.returncode == 0, result.stderr
    assert not [r for r in json_lines(result.stderr) if r.get("event") == "unhandled_exception"]
    assert printed in result.stderr
    assert "PaymentDeclined: card declined" in result.stderr


def test_an_exception_in_del_is_not_printed_again_by_pythons_hook() -> None:
    """With Python's own unraisable hook behind sentinel's, an exception raised in __del__
    is reported once, scrubbed, and not printed a second time ("Exception ignored in")."""
    result = run_python(
        """
        import gc
        import sentinel
        sentinel.install(service="hooks-test", metrics_port=0)  # its report is written at exit
        class Session:
            def __del__(self):
                raise ConnectionError("could not revoke session token=hunter2-del-q7")
        Session()
        gc.collect()
        """
    )
    reports = [r for r in json_lines(result.stderr) if r.get("event") == "unhandled_exception"]
    assert [r["exception_type"] for r in reports] == ["ConnectionError"], result.stderr
    assert "hunter2" not in result.stderr
    assert "Exception ignored in" not in result.stderr


def test_uncaught_exception_chains_a_custom_excepthook_installed_before() -> None:
    """A sys.excepthook installed before sentinel still runs after sentinel's report."""
    result = run_python(
        """
        import sys
        def custom(exc_type, exc, tb):
            print("custom hook saw", exc_type.__name__, file=sys.stderr)
        sys.excepthook = custom
        import sentinel
        sentinel.install(service="hooks-test", metrics_port=0)
        raise KeyError("chained")
        """
    )
    assert result.returncode != 0
    reports = [r for r in json_lines(result.stderr) if r.get("event") == "unhandled_exception"]
    assert [r["exception_type"] for r in reports] == ["KeyError"], result.stderr
    assert "custom hook saw KeyError" in result.stderr


def test_keyboard_interrupt_at_top_level_is_not_reported() -> None:
    """A top-level KeyboardInterrupt is not an error report; the default handling still runs."""
    result = run_python(
        """
        import sentinel
        sentinel.install(service="hooks-test", metrics_port=0)
        raise KeyboardInterrupt
        """
    )
    assert result.returncode != 0
    reports = [r for r in json_lines(result.stderr) if r.get("event") == "unhandled_exception"]
    assert reports == []
    assert "KeyboardInterrupt" in result.stderr


# -- sys.unraisablehook --------------------------------------------------------------------


class ExplodesOnDelete:
    def __del__(self) -> None:
        raise AppError("raised in __del__")


def test_exception_in_del_is_reported_once_and_previous_hook_called(
    captured: Captured, recorded_hooks: Recorded
) -> None:
    """An exception raised in __del__ (unraisable) is reported once; the prior hook still runs."""
    obj = ExplodesOnDelete()
    del obj

    reports = captured.wait_for(1)
    assert len(reports) == 1
    assert reports[0]["exception_type"] == qualified(AppError)
    assert reports[0]["message"] == "raised in __del__"
    assert reports[0]["phase"] in PHASES
    assert len(recorded_hooks.unraisable) == 1
    assert isinstance(recorded_hooks.unraisable[0], AppError)
    time.sleep(0.1)
    assert len(captured.reports) == 1
    labels = {"location": "unknown", "route": NO_ROUTE, "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase=reports[0]["phase"], **labels) == 1
    assert sum(captured.metric(EXC_TOTAL, phase=phase, **labels) for phase in PHASES) == 1


def test_an_exception_in_del_during_a_request_is_the_process_not_the_request(
    captured: Captured, recorded_hooks: Recorded
) -> None:
    """Garbage collection runs a __del__ in whichever request happens to be running: its
    exception is phase process, with no route and no request id, and the request that
    happened to run it answers 200 uncounted as failing."""

    async def collects(request: Request) -> Response:
        ExplodesOnDelete()  # dropped at once: its __del__ runs here
        return PlainTextResponse("ok")

    app = sentinel.instrument(
        Starlette(routes=[Route("/collects", collects)]), sentinel=captured.sentinel
    )
    with client_for(app) as client:
        assert client.get("/collects").status_code == 200
    [report] = captured.wait_for(1)
    assert (report["phase"], report["route"], report.get("request_id")) == (
        "process",
        NO_ROUTE,
        None,
    )
    labels = {"location": "unknown", "route": NO_ROUTE, "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase="process", **labels) == 1


# -- asyncio -------------------------------------------------------------------------------


def start_task(error: AppError) -> asyncio.Future[None]:
    """An asyncio task that raises ``error`` a moment later, after the response went out."""

    async def fail_later() -> None:
        await asyncio.sleep(0.05)
        raise error

    return asyncio.create_task(fail_later())


def start_executor_job(error: AppError) -> asyncio.Future[None]:
    """A ``run_in_executor`` job that raises ``error`` in the loop's thread pool."""

    def work() -> None:
        raise error

    return asyncio.get_running_loop().run_in_executor(None, work)


STARTERS = [
    pytest.param(start_task, "task", id="task"),
    pytest.param(start_executor_job, "thread", id="executor"),
]
"""How a request starts background work, and the phase its unawaited failure is reported as."""


@pytest.mark.parametrize(("start", "phase"), STARTERS)
def test_failure_never_awaited_is_reported_promptly_with_the_requests_route(
    captured: Captured, start: Callable[[AppError], asyncio.Future[None]], phase: str
) -> None:
    """A task ("task") or a run_in_executor future ("thread") that a request spawned and
    never awaited is reported once with the request's route, while it is still referenced
    (no garbage collection needed)."""
    keep: list[Any] = []

    async def spawn(request: Request) -> PlainTextResponse:
        keep.append(start(AppError("fire and forget")))
        return PlainTextResponse("spawned")

    app = build_app(captured, {"/jobs/{job_id}/spawn": spawn}, keep)
    with client_for(app) as client:
        response = client.get("/jobs/17/spawn")
        assert response.status_code == 200
        assert response.text == "spawned"
        reports = captured.wait_for(1)
        assert len(keep) == 1  # the future is still strongly referenced: not collected
        assert len(reports) == 1
        report = reports[0]
        assert report["phase"] == phase
        assert report["route"] == "/jobs/{job_id}/spawn"
        assert report["exception_type"] == qualified(AppError)
        assert report["message"] == "fire and forget"
        assert len(settle(client, captured)) == 1
    labels = {"location": "unknown", "route": "/jobs/{job_id}/spawn", "phase": phase}
    assert captured.metric(EXC_TOTAL, exception_type=qualified(AppError), **labels) == 1


def test_fire_and_forget_failure_is_not_printed_again_by_asyncio(
    captured: Captured, caplog: pytest.LogCaptureFixture
) -> None:
    """One occurrence, one report: once sentinel reported a task's unretrieved exception,
    asyncio's own "Task exception was never retrieved" line (when the task is collected)
    does not say it a second time."""

    async def main() -> None:
        _hooks.hook_running_loop()

        async def fail() -> None:
            raise AppError("fire and forget")

        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.3)  # past the grace period: sentinel reports it
        assert len(captured.reports) == 1
        del task
        gc.collect()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        run_client(main())
    assert [report["message"] for report in captured.reports] == ["fire and forget"]
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]


def test_a_task_a_server_makes_from_an_io_callback_is_reported_when_collected(
    captured: Captured,
) -> None:
    """A task made by a plain loop callback outside any request, lifespan or task (as uvicorn
    makes one per request from its protocol's callbacks) is not the app's: it gets no
    done-callback, so it is not reported after the grace period while referenced; an error
    left in it is reported once when it is collected, through the loop's exception handler."""
    made: list[asyncio.Task[None]] = []

    async def fail() -> None:
        raise AppError("made by the server")

    async def main() -> None:
        _hooks.hook_running_loop()
        loop = asyncio.get_running_loop()
        # A fresh context: what a server's protocol callbacks run in.
        loop.call_soon(lambda: made.append(loop.create_task(fail())), context=contextvars.Context())
        await asyncio.sleep(0.3)  # well past the grace period (0.05 s)
        assert len(made) == 1 and made[0].done()
        assert captured.reports == []  # no done-callback: not reported while referenced
        made.clear()
        gc.collect()

    run_client(main())
    reports = captured.wait_for(1)
    time.sleep(0.1)
    assert reports == captured.reports
    assert [(r["message"], r["phase"]) for r in reports] == [("made by the server", "task")]


def test_a_task_a_callback_makes_in_a_requests_context_is_reported_promptly(
    captured: Captured,
) -> None:
    """A loop callback the app schedules during a request runs in the request's context: the
    task it makes is the app's, watched like one the handler makes, and reported after the
    grace period with the request's route while still referenced."""
    keep: list[Any] = []

    async def fail() -> None:
        raise AppError("made by a callback")

    async def spawn(request: Request) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: keep.append(loop.create_task(fail())))
        return PlainTextResponse("scheduled")

    app = build_app(captured, {"/later/{job_id}": spawn}, keep)
    with client_for(app) as client:
        assert client.get("/later/3").text == "scheduled"
        reports = captured.wait_for(1)
        assert len(keep) == 1  # still referenced: reported by the done-callback, not the GC
        assert [(r["message"], r["phase"], r["route"]) for r in reports] == [
            ("made by a callback", "task", "/later/{job_id}")
        ]


def test_a_task_collected_during_another_request_is_not_that_requests_report(
    captured: Captured,
) -> None:
    """The garbage collector frees a failed task whenever it runs: inside another request,
    perhaps. A task already reported (after its grace period) is not reported again there,
    and one never reported is reported with no route: neither belongs to the request that
    happened to be running when it was collected."""
    keep: list[Any] = []
    made: list[asyncio.Task[None]] = []

    async def fail(message: str) -> None:
        raise AppError(message)

    async def spawn(request: Request) -> PlainTextResponse:
        keep.append(asyncio.create_task(fail("reported in its own request")))
        return PlainTextResponse("spawned")

    async def server_made(request: Request) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        # As a server's protocol callback makes one: no done-callback, reported when collected.
        loop.call_soon(
            lambda: made.append(loop.create_task(fail("made outside"))),
            context=contextvars.Context(),
        )
        return PlainTextResponse("made")

    async def collect(request: Request) -> PlainTextResponse:
        keep.clear()
        made.clear()
        gc.collect()
        return PlainTextResponse("collected")

    app = build_app(captured, {"/spawn": spawn, "/made": server_made, "/collect": collect}, keep)
    with client_for(app) as client:
        assert client.get("/spawn").text == "spawned"
        assert client.get("/made").text == "made"
        first = settle(client, captured)
        assert [r["message"] for r in first] == ["reported in its own request"]
        assert len(made) == 1 and made[0].done()
        assert client.get("/collect").text == "collected"
        reports = settle(client, captured)
    assert [(r["message"], r["route"]) for r in reports] == [
        ("reported in its own request", "/spawn"),
        ("made outside", NO_ROUTE),
    ]
    assert (
        captured.metric(
            EXC_TOTAL,
            location="unknown",
            route="/collect",
            exception_type=qualified(AppError),
            phase="task",
        )
        == 0
    )


async def await_and_handle(task: asyncio.Task[None]) -> str:
    try:
        await task
    except AppError:
        return "recovered"
    return "unreachable"


async def ask_for_the_exception(task: asyncio.Task[None]) -> str:
    await asyncio.wait([task])
    return type(task.exception()).__name__


@pytest.mark.parametrize(
    ("retrieve", "answer"),
    [
        pytest.param(await_and_handle, "recovered", id="awaited-and-handled"),
        pytest.param(ask_for_the_exception, "AppError", id="task.exception()"),
    ],
)
def test_task_exception_the_handler_retrieves_is_not_reported(
    captured: Captured, retrieve: Callable[[asyncio.Task[None]], Any], answer: str
) -> None:
    """A failed task whose exception the handler retrieves (awaits and handles it, or asks for
    it with task.exception()) is not reported."""
    keep: list[Any] = []

    async def handled(request: Request) -> PlainTextResponse:
        async def fail() -> None:
            raise AppError("retrieved by the handler")

        task = asyncio.create_task(fail())
        keep.append(task)
        return PlainTextResponse(await retrieve(task))

    app = build_app(captured, {"/handled": handled}, keep)
    with client_for(app) as client:
        response = client.get("/handled")
        assert (response.status_code, response.text) == (200, answer)
        assert settle(client, captured) == []
    labels = {"location": "unknown", "route": "/handled", "exception_type": qualified(AppError)}
    for phase in ("task", "request"):
        assert captured.metric(EXC_TOTAL, phase=phase, **labels) == 0


def test_unretrieved_future_freed_by_the_garbage_collector_is_reported_once(
    captured: Captured,
) -> None:
    """A plain loop future whose exception nobody retrieved is reported exactly once when it
    is collected, through the hooked loop's exception handler (the asyncio log line about it
    is not a second report)."""

    async def main() -> None:
        _hooks.hook_running_loop()
        future = asyncio.get_running_loop().create_future()
        future.set_exception(AppError("never retrieved"))
        del future
        gc.collect()

    asyncio.run(main())
    reports = captured.wait_for(1)
    time.sleep(0.1)
    assert captured.reports == reports
    assert len(reports) == 1
    report = reports[0]
    assert report["exception_type"] == qualified(AppError)
    assert report["message"] == "never retrieved"
    # The handler calls every future that is not a Task an executor future.
    assert report["phase"] in ("task", "thread")
    labels = {"location": "unknown", "route": NO_ROUTE, "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase=report["phase"], **labels) == 1
    assert sum(captured.metric(EXC_TOTAL, phase=phase, **labels) for phase in PHASES) == 1


def collect_holding_sentinels_lock(captured: Captured, make_garbage: Callable[[], None]) -> None:
    """On a thread of its own, make garbage and collect it while holding the lock sentinel
    needs to count an exception for a new label set (as prometheus-client holds it while it
    makes the label set's child); fail, rather than hang, when that deadlocks."""
    lock = captured.sentinel.metrics.unhandled_exceptions.counter._lock
    finished = threading.Event()

    def collect() -> None:
        make_garbage()
        with lock:
            gc.collect()
        finished.set()

    gc.collect()
    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    deadlocked = not finished.wait(5)
    if deadlocked:
        lock.release()  # free the stuck thread, so the test fails instead of hanging
    thread.join(5)
    assert not deadlocked, "the report waited forever for a lock its own thread held"


def test_an_error_collected_while_sentinel_holds_a_lock_is_reported_after_it(
    captured: Captured,
) -> None:
    """The garbage collector may free a failed future at any allocation: inside sentinel's own
    code too, holding a lock its reports need. Its report waits until the lock is free
    instead of waiting for it forever."""

    def failed_future_in_a_cycle() -> None:
        async def main() -> None:
            _hooks.hook_running_loop()
            future = asyncio.get_running_loop().create_future()
            future.set_exception(AppError("collected inside sentinel"))
            cycle: list[Any] = [future]
            cycle.append(cycle)

        # The loop stays open until collected: asyncio.run closes it, the future lives on.
        asyncio.run(main())

    collect_holding_sentinels_lock(captured, failed_future_in_a_cycle)
    reports = captured.wait_for(1)
    assert [(r["message"], r["route"]) for r in reports] == [
        ("collected inside sentinel", NO_ROUTE)
    ]


def test_an_error_a_finalizer_logs_during_collection_is_reported_after_it(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """A finalizer the garbage collector runs may log the error it caught (a connection pool
    does, for a connection nobody returned), inside sentinel's own code holding a lock its
    reports need: the report is made after, with no request, instead of waiting forever."""

    class Connection:
        def __init__(self) -> None:
            self.cycle = self

        def __del__(self) -> None:
            try:
                raise AppError("connection was never returned to the pool")
            except AppError:
                app_logger.exception("exception during reset")

    collect_holding_sentinels_lock(captured, Connection)
    reports = captured.wait_for(1)
    assert [(r["message"], r["phase"], r["route"]) for r in reports] == [
        ("connection was never returned to the pool", "process", NO_ROUTE)
    ]


def test_loop_hooks_chain_the_exception_handler_and_task_factory_set_before(
    captured: Captured,
) -> None:
    """A loop's own exception handler and task factory, set before sentinel hooks the loop,
    still get every context and still make every task; sentinel reports through both."""
    contexts: list[dict[str, Any]] = []
    made: list[asyncio.Task[Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        contexts.append(context)

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def fail() -> None:
        raise AppError("task never awaited")

    async def main() -> list[asyncio.Task[Any]]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(handler)
        loop.set_task_factory(factory)
        _hooks.hook_running_loop()
        spawned = [asyncio.create_task(fail())]
        future = loop.create_future()
        future.set_exception(AppError("future collected"))
        del future
        gc.collect()
        # Well past the unawaited task's grace period (0.05 s): its report is due by then.
        await asyncio.sleep(0.3)
        return spawned

    spawned = asyncio.run(main())
    assert made[0] is spawned[0]  # (asyncio.run's shutdown makes further tasks through it)
    for task in spawned:
        task.exception()  # retrieved now, so it is not reported again when collected
    assert [str(context.get("exception")) for context in contexts] == ["future collected"]
    reports = captured.wait_for(2)
    by_message = {r["message"]: r["phase"] for r in reports}
    assert len(reports) == 2
    assert by_message["task never awaited"] == "task"
    assert by_message["future collected"] in ("task", "thread")


REQUEST_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("test_tag", default="<none>")


def _seen_in_the_pool() -> list[str | None]:
    request = current_request.get()
    return [REQUEST_TAG.get(), None if request is None else request.route]


def test_run_in_executor_runs_a_requests_work_in_its_context(captured: Captured) -> None:
    """As asyncio.to_thread does: a request's work in the default executor or a thread pool
    of the app's sees the request's context (its variables, sentinel's request); a process
    pool gets the function as it is (a context cannot be pickled); outside a request the
    thread's own context is kept."""

    async def handler(request: Request) -> PlainTextResponse:
        REQUEST_TAG.set(request.query_params["tag"])
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            seen = [
                await loop.run_in_executor(None, _seen_in_the_pool),
                await loop.run_in_executor(pool, _seen_in_the_pool),
                await asyncio.to_thread(_seen_in_the_pool),
            ]
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as processes:
            pid = await loop.run_in_executor(processes, os.getpid)
        return PlainTextResponse(json.dumps({"seen": seen, "elsewhere": pid != os.getpid()}))

    app = build_app(captured, {"/jobs/{n}": handler}, [])
    with client_for(app) as client:
        answer = client.get("/jobs/1", params={"tag": "mine"}, timeout=60).json()
    assert answer == {"seen": [["mine", "/jobs/{n}"]] * 3, "elsewhere": True}

    async def outside() -> list[str | None]:
        _hooks.hook_running_loop()
        return await asyncio.get_running_loop().run_in_executor(None, _seen_in_the_pool)

    assert run_client(outside()) == ["<none>", None]


@pytest.mark.parametrize(("start", "unawaited_phase"), STARTERS)
def test_failure_awaited_and_reraised_into_the_handler_is_reported_once(
    captured: Captured, start: Callable[[AppError], asyncio.Future[None]], unawaited_phase: str
) -> None:
    """A task's or an executor job's exception that the handler awaits and lets propagate is
    one "request" report, not a second "task" or "thread" one."""
    keep: list[Any] = []

    async def reraise(request: Request) -> PlainTextResponse:
        future = start(AppError("reraised"))
        keep.append(future)
        await future
        return PlainTextResponse("unreachable")

    app = build_app(captured, {"/reraise": reraise}, keep)
    with client_for(app) as client:
        assert client.get("/reraise").status_code == 500
        reports = settle(client, captured)
    assert len(reports) == 1
    assert reports[0]["phase"] == "request"
    assert reports[0]["route"] == "/reraise"
    assert reports[0]["message"] == "reraised"
    labels = {"location": "unknown", "route": "/reraise", "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase="request", **labels) == 1
    assert captured.metric(EXC_TOTAL, phase=unawaited_phase, **labels) == 0


# -- logging -------------------------------------------------------------------------------


def logging_routes(logger: logging.Logger) -> dict[str, Callable[[Request], Any]]:
    async def logged(request: Request) -> PlainTextResponse:
        try:
            raise AppError("logged and handled")
        except AppError:
            logger.exception("could not fetch the item")
            return PlainTextResponse("unavailable", status_code=503)

    async def reconfigure(request: Request) -> PlainTextResponse:
        logging.config.dictConfig({"version": 1})
        return PlainTextResponse("reconfigured")

    async def boom(request: Request) -> PlainTextResponse:
        raise ZeroDivisionError("unhandled in the app")

    return {"/logged": logged, "/reconfigure": reconfigure, "/boom": boom}


def log_and_answer_503(logger: logging.Logger) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            raise AppError("logged in the handler")
        except AppError:
            logger.exception("could not fetch the item")
            return PlainTextResponse("unavailable", status_code=503)

    return endpoint


def log_and_answer_503_in_the_threadpool(logger: logging.Logger) -> Callable[[Request], Any]:
    def endpoint(request: Request) -> PlainTextResponse:
        try:
            raise AppError("logged in the handler")
        except AppError:
            logger.exception("could not fetch the item")
        return PlainTextResponse("unavailable", status_code=503)

    return endpoint


def log_and_reraise(logger: logging.Logger) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            raise AppError("logged in the handler")
        except AppError:
            logger.exception("failed, re-raising")
            raise

    return endpoint


@pytest.mark.parametrize(
    ("make_endpoint", "status", "text"),
    [
        pytest.param(log_and_answer_503, 503, "unavailable", id="async-answers-503"),
        pytest.param(
            log_and_answer_503_in_the_threadpool, 503, "unavailable", id="sync-answers-503"
        ),
        pytest.param(log_and_reraise, 500, "Internal Server Error", id="async-reraises"),
    ],
)
def test_exception_logged_in_a_handler_is_one_request_report_for_its_route(
    captured: Captured,
    app_logger: logging.Logger,
    make_endpoint: Callable[[logging.Logger], Callable[[Request], Any]],
    status: int,
    text: str,
) -> None:
    """logger.exception() in a handler is exactly one "request" report for the request's
    route: when the handler then answers a 503 itself (also a sync endpoint, run in the
    threadpool) and when it re-raises the exception it logged."""
    keep: list[Any] = []
    app = build_app(captured, {"/items/{name}": make_endpoint(app_logger)}, keep)
    with client_for(app) as client:
        response = client.get("/items/a")
        assert (response.status_code, response.text) == (status, text)
        reports = settle(client, captured)
    assert [(r["route"], r["phase"]) for r in reports] == [("/items/{name}", "request")]
    assert reports[0]["exception_type"] == qualified(AppError)
    assert reports[0]["message"] == "logged in the handler"
    labels = {"location": "unknown", "route": "/items/{name}"}
    assert (
        captured.metric(EXC_TOTAL, phase="request", exception_type=qualified(AppError), **labels)
        == 1
    )
    assert (
        captured.metric("sentinel_http_requests_total", method="GET", code=str(status), **labels)
        == 1
    )


def test_reports_survive_the_app_calling_dictconfig(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """After the app calls dictConfig({"version": 1}) (disabling existing loggers), logged
    exceptions and the middleware's own reports still arrive, each once."""
    keep: list[Any] = []
    app = build_app(captured, logging_routes(app_logger), keep)
    with client_for(app) as client:
        assert client.get("/logged").status_code == 503
        assert len(captured.wait_for(1)) == 1

        assert client.get("/reconfigure").text == "reconfigured"
        assert app_logger.disabled  # the scenario really happened

        assert client.get("/logged").status_code == 503
        assert client.get("/boom").status_code == 500
        reports = settle(client, captured)
    assert [(r["route"], r["phase"]) for r in reports] == [
        ("/logged", "request"),
        ("/logged", "request"),
        ("/boom", "request"),
    ]
    assert reports[2]["exception_type"] == "ZeroDivisionError"
    labels = {"location": "unknown", "phase": "request"}
    assert (
        captured.metric(EXC_TOTAL, route="/logged", exception_type=qualified(AppError), **labels)
        == 2
    )
    assert (
        captured.metric(EXC_TOTAL, route="/boom", exception_type="ZeroDivisionError", **labels) == 1
    )


def _log_error_without_exc_info(logger: logging.Logger) -> None:
    logger.error("x")


def _log_warning_with_exc_info(logger: logging.Logger) -> None:
    logger.warning("only a warning", exc_info=True)


def _log_at_warning_level_with_exc_info(logger: logging.Logger) -> None:
    logger.log(logging.WARNING, "only a warning", exc_info=True)


def _log_info_with_exc_info(logger: logging.Logger) -> None:
    logger.info("fine", exc_info=True)


@pytest.mark.parametrize(
    "log_call",
    [
        _log_error_without_exc_info,
        _log_warning_with_exc_info,
        _log_at_warning_level_with_exc_info,
        _log_info_with_exc_info,
    ],
)
def test_log_calls_below_error_or_without_exc_info_are_not_reports(
    captured: Captured, app_logger: logging.Logger, log_call: Callable[[logging.Logger], None]
) -> None:
    """Logging without exc_info, or below ERROR, inside an except block is not a report."""
    try:
        raise AppError("handled quietly")
    except AppError:
        log_call(app_logger)
    captured.flush()
    assert captured.reports == []
    assert (
        captured.metric(
            EXC_TOTAL,
            location="unknown",
            route=NO_ROUTE,
            exception_type=qualified(AppError),
            phase="process",
        )
        == 0
    )


def _log_at_error_level_with_exc_info(logger: logging.Logger) -> None:
    logger.log(logging.ERROR, "failed: %s", "job", exc_info=True)


def _log_exception(logger: logging.Logger) -> None:
    logger.exception("failed")


def _log_critical_with_exc_info(logger: logging.Logger) -> None:
    logger.critical("failed", exc_info=True)


def _log_error_with_exception_instance(logger: logging.Logger) -> None:
    logger.error("failed", exc_info=sys.exc_info()[1])


def _log_error_with_exc_info_tuple(logger: logging.Logger) -> None:
    logger.error("failed", exc_info=sys.exc_info())


def _log_through_adapter(logger: logging.Logger) -> None:
    logging.LoggerAdapter(logger, {"job": "nightly"}).exception("failed")


def _log_with_keyword_level_and_exc_info(logger: logging.Logger) -> None:
    """The keyword form, reported like the positional one."""
    logger.log(level=logging.ERROR, msg="failed", exc_info=True)


@pytest.mark.parametrize(
    "log_call",
    [
        _log_at_error_level_with_exc_info,
        _log_exception,
        _log_critical_with_exc_info,
        _log_error_with_exception_instance,
        _log_error_with_exc_info_tuple,
        _log_through_adapter,
        _log_with_keyword_level_and_exc_info,
    ],
)
def test_log_calls_at_error_with_exc_info_are_reported_once(
    captured: Captured, app_logger: logging.Logger, log_call: Callable[[logging.Logger], None]
) -> None:
    """Logging an exception at ERROR or above (any exc_info form) is exactly one report."""
    try:
        raise AppError("logged")
    except AppError:
        log_call(app_logger)
    reports = captured.wait_for(1)
    assert len(reports) == 1
    assert reports[0]["exception_type"] == qualified(AppError)
    assert reports[0]["message"] == "logged"


def test_an_exception_captured_as_handled_and_then_logged_is_one_report(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """The app reports an exception with sentinel.capture_exception, then logs it: one
    handled report, and nothing counted as unhandled."""
    try:
        raise AppError("captured, then logged")
    except AppError as exc:
        assert sentinel.capture_exception(exc) is True
        app_logger.exception("checkout degraded")
    [report] = captured.wait_for(1, event="handled_exception")
    time.sleep(0.1)
    assert report["handled"] is True
    assert captured.reports == []
    assert captured.metric("sentinel_unhandled_exceptions_total", phase="process") == 0


def test_logging_the_same_exception_twice_is_one_report(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """One exception logged by two layers (and also captured explicitly) is reported once."""
    try:
        raise AppError("logged twice")
    except AppError as exc:
        app_logger.exception("inner layer")
        logging.getLogger(f"{app_logger.name}.outer").error("outer layer", exc_info=exc)
        assert sentinel.capture_exception(exc) is False
    reports = captured.wait_for(1)
    time.sleep(0.1)
    assert len(captured.reports) == len(reports) == 1


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_log_records_keep_the_callers_file_line_and_function(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """With sentinel's logging hooks installed, error/exception/critical/log records still name
    the app's own call site (file, line, function), as without sentinel."""
    handler = ListHandler()
    app_logger.addHandler(handler)
    app_logger.propagate = False
    expected_lines = []
    try:
        expected_lines.append(sys._getframe().f_lineno + 1)
        app_logger.error("plain error")
        try:
            raise AppError("logged with traceback")
        except AppError:
            expected_lines.append(sys._getframe().f_lineno + 1)
            app_logger.exception("logged")
        expected_lines.append(sys._getframe().f_lineno + 1)
        app_logger.critical("critical")
        expected_lines.append(sys._getframe().f_lineno + 1)
        app_logger.log(logging.ERROR, "via log")
        expected_lines.append(sys._getframe().f_lineno + 1)
        app_logger.warning("warning (not hooked)")
    finally:
        app_logger.removeHandler(handler)
    function = "test_log_records_keep_the_callers_file_line_and_function"
    assert [(r.pathname, r.funcName, r.lineno) for r in handler.records] == [
        (__file__, function, line) for line in expected_lines
    ]


def test_caller_location_is_kept_with_structlogs_logger_class(captured: Captured) -> None:
    """Apps whose Logger class finds the caller its own way (structlog's) keep the call site."""
    import structlog

    previous_class = logging.getLoggerClass()
    structlog.stdlib.LoggerFactory()  # as structlog's stdlib setup does: sets the Logger class
    try:
        logger = logging.getLogger("sentinel-test-structlog-caller")
        handler = ListHandler()
        logger.addHandler(handler)
        logger.propagate = False
        try:
            raise AppError("logged through a structlog-style logger")
        except AppError:
            line = sys._getframe().f_lineno + 1
            logger.exception("failed")
        logger.fatal("fatal")
        fatal_line = sys._getframe().f_lineno - 1
    finally:
        logging.setLoggerClass(previous_class)
        logging.Logger.manager.loggerDict.pop("sentinel-test-structlog-caller", None)
    function = "test_caller_location_is_kept_with_structlogs_logger_class"
    assert [(r.funcName, r.lineno) for r in handler.records] == [
        (function, line),
        (function, fatal_line),
    ]


class AnsweringErrorMiddleware:
    """An inner error layer: answers 500 itself, then logs the exception it caught and does
    not re-raise it."""

    def __init__(self, app: Any, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except AppError:
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")],
                }
            )
            await send({"type": "http.response.body", "body": b"oops!"})
            self.logger.exception("request failed")


def test_exception_logged_by_an_error_middleware_after_its_own_500_is_phase_request(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """An inner middleware that sent its own 500 and then logs the exception (no re-raise):
    one "request" report, not "background", although the response is already complete."""

    async def boom(request: Request) -> PlainTextResponse:
        raise AppError("answered by the error middleware")

    app = Starlette(
        routes=[Route("/fail", boom)],
        middleware=[Middleware(AnsweringErrorMiddleware, logger=app_logger)],
    )
    with client_for(sentinel.instrument(app, sentinel=captured.sentinel)) as client:
        response = client.get("/fail")
        assert (response.status_code, response.text) == (500, "oops!")
        reports = captured.wait_for(1)
        time.sleep(0.1)
    assert captured.reports == reports
    assert [(r["route"], r["phase"]) for r in reports] == [("/fail", "request")]
    labels = {"location": "unknown", "route": "/fail", "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase="request", **labels) == 1
    assert captured.metric(EXC_TOTAL, phase="background", **labels) == 0


def test_exception_logged_in_a_sync_background_task_after_a_200_is_phase_background(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """logger.exception() inside a sync Starlette BackgroundTask, after the 200 was sent, is
    one "background" report for the request's route."""

    def refresh() -> None:
        try:
            raise AppError("refresh failed")
        except AppError:
            app_logger.exception("background refresh failed")

    async def accepted(request: Request) -> Response:
        return PlainTextResponse("accepted", background=BackgroundTask(refresh))

    keep: list[Any] = []
    app = build_app(captured, {"/accepted": accepted}, keep)
    with client_for(app) as client:
        response = client.get("/accepted")
        assert (response.status_code, response.text) == (200, "accepted")
        reports = settle(client, captured)
    assert [(r["route"], r["phase"]) for r in reports] == [("/accepted", "background")]
    labels = {"location": "unknown", "route": "/accepted", "exception_type": qualified(AppError)}
    assert captured.metric(EXC_TOTAL, phase="background", **labels) == 1


def test_error_with_exc_info_true_outside_an_except_block_is_not_a_report(
    captured: Captured, app_logger: logging.Logger
) -> None:
    """logger.error(..., exc_info=True) with no exception being handled reports nothing."""
    app_logger.error("nothing is being handled", exc_info=True)
    captured.flush()
    assert captured.reports == []


def test_app_exception_is_one_report_despite_the_server_error_log_line(
    captured: Captured,
) -> None:
    """An exception escaping the app is one report: uvicorn's "Exception in ASGI application"
    log line about it is not a second one."""
    keep: list[Any] = []

    async def boom(request: Request) -> PlainTextResponse:
        raise AppError("escapes to the server")

    app = build_app(captured, {"/boom": boom}, keep)
    with client_for(app) as client:
        assert client.get("/boom").status_code == 500
        reports = settle(client, captured)
    assert [(r["route"], r["phase"]) for r in reports] == [("/boom", "request")]
    total = sum(
        captured.metric(
            EXC_TOTAL,
            location="unknown",
            route=route,
            exception_type=qualified(AppError),
            phase=phase,
        )
        for route in ("/boom", NO_ROUTE)
        for phase in PHASES
    )
    assert total == 1


def instrumented_bare_app(captured: Captured) -> Any:
    """A bare ASGI app wrapped by sentinel: the server answers the 500."""

    async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        raise AppError("bare app failure")

    return sentinel.instrument(bare_app, sentinel=captured.sentinel)


def uninstrumented_starlette_app(captured: Captured) -> Any:
    """A Starlette app without the middleware: only sentinel's process hooks see its errors."""

    async def boom(request: Request) -> PlainTextResponse:
        raise AppError("no middleware here")

    return Starlette(routes=[Route("/anything", boom)])


@pytest.mark.parametrize(
    "make_app",
    [
        pytest.param(instrumented_bare_app, id="instrumented-bare-asgi-app"),
        pytest.param(uninstrumented_starlette_app, id="uninstrumented-from-the-server-log-line"),
    ],
)
def test_exception_escaping_to_the_server_is_one_request_report(
    captured: Captured, make_app: Callable[[Captured], Any]
) -> None:
    """An exception that reaches uvicorn is reported exactly once, phase "request": from a
    bare ASGI app wrapped by sentinel (the server's own log line about it adds no second
    report) and, without the middleware, from uvicorn's "Exception in ASGI application" line,
    since sentinel's hooks are installed."""
    with client_for(make_app(captured)) as client:
        assert client.get("/anything").status_code == 500
        captured.wait_for(1)
        time.sleep(0.3)  # room for the server's own log line to (not) add a report
        reports = captured.reports
    assert len(reports) == 1
    assert reports[0]["phase"] == "request"
    assert reports[0]["exception_type"] == qualified(AppError)


def test_the_server_line_an_exception_is_reported_from_is_left_out(captured: Captured) -> None:
    """A failure in a layer outside sentinel's middleware reaches sentinel through uvicorn's
    "Exception in ASGI application" line: it is reported from it, and that line, whose
    traceback shows the secret unscrubbed, is not logged as well. An app's own error line
    through the server's logger stays."""
    canary = "hunter2-outer-q7"

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = sentinel.instrument(Starlette(routes=[Route("/", ok)]), sentinel=captured.sentinel)

    async def outer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/outer":
            raise AppError(f"outer layer failed token={canary}")
        if scope["type"] == "http" and scope["path"] == "/logged":
            try:
                raise AppError("handled and logged")
            except AppError:
                logging.getLogger("uvicorn.error").exception("the app's own line")
        await inner(scope, receive, send)

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    server_logger = logging.getLogger("uvicorn.error")
    with client_for(outer) as client:
        server_logger.addHandler(handler)  # once uvicorn has configured its loggers
        try:
            assert client.get("/outer").status_code == 500
            captured.wait_for(1)
            assert client.get("/logged").status_code == 404
            captured.wait_for(2)
        finally:
            server_logger.removeHandler(handler)
    [first, second] = captured.reports
    assert (first["phase"], first["route"]) == ("request", NO_ROUTE)
    assert canary not in first["message"] and second["message"] == "handled and logged"
    assert not any("Exception in ASGI application" in line for line in lines), lines
    assert "the app's own line" in lines


def test_a_reported_thread_exception_is_not_printed_again_unscrubbed(
    captured: Captured, capsys: pytest.CaptureFixture[str]
) -> None:
    """With Python's own thread hook behind sentinel's, a reported thread exception is not
    printed a second time: that traceback would show the secret in its message."""
    saved = threading.excepthook, _hooks._previous["threading"]
    threading.excepthook = _hooks._threading_excepthook
    _hooks._previous["threading"] = threading.__excepthook__
    canary = "hunter2-thread-q7"

    def target() -> None:
        raise ValueError(f"upstream refused token={canary}")

    try:
        worker = threading.Thread(target=target, name="doomed-worker")
        worker.start()
        worker.join(10)
    finally:
        threading.excepthook, _hooks._previous["threading"] = saved
    [report] = captured.reports
    assert report["message"].startswith("upstream refused token=[scrubbed len=")
    assert canary not in capsys.readouterr().err


def test_a_task_that_fails_just_before_shutdown_is_reported(tmp_path: Path) -> None:
    """A request spawns a fire-and-forget task that fails as the response goes out, while a
    SIGTERM is already draining the server: the process ends before the task's grace period
    would, and asyncio's own "never retrieved" line never comes; the shutdown reports it."""
    (tmp_path / "lateapp.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            async def slow(request):
                await asyncio.sleep(1.0)

                async def audit():
                    raise ZeroDivisionError("audit task failed")

                asyncio.create_task(audit())
                return PlainTextResponse("ok")

            async def ok(request):
                return PlainTextResponse("ok")

            app = Starlette(routes=[Route("/slow", slow), Route("/", ok)])
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sentinel.cli", "run", "lateapp:app", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(SENTINEL_METRICS_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first_response(process, url)
        slow = threading.Thread(target=lambda: httpx.get(f"{url}/slow", timeout=10))
        slow.start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        slow.join(15)
        _, stderr = process.communicate(timeout=20)
    finally:
        stop(process)
    reports = [
        json.loads(line)
        for line in stderr.splitlines()
        if line.startswith("{") and '"unhandled_exception"' in line
    ]
    assert [(r["exception_type"], r["phase"], r["route"]) for r in reports] == [
        ("ZeroDivisionError", "task", "/slow")
    ], stderr

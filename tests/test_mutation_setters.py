"""Every default watch: written from a handler, reported; written at startup, not."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import locale
import logging
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, first_response, free_port, run_in_request, stop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import instrument
from sentinel.testing import Captured, capture_reports, serve

TEST_LOGGER = "sentinel.tests.setters"


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    """Put back everything these tests write to."""
    cwd = os.getcwd()
    umask = os.umask(0o022)
    os.umask(umask)
    timeout = socket.getdefaulttimeout()
    limit, interval = sys.getrecursionlimit(), sys.getswitchinterval()
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    disabled = logging.root.manager.disable
    filters = warnings.filters[:]
    try:
        yield
    finally:
        os.chdir(cwd)
        os.umask(umask)
        socket.setdefaulttimeout(timeout)
        sys.setrecursionlimit(limit)
        sys.setswitchinterval(interval)
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        logging.disable(disabled)
        warnings.filters[:] = filters
        logging.getLogger(TEST_LOGGER).handlers.clear()


def _umask_now() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _basic_config() -> None:
    # basicConfig acts on a root logger with handlers only when forced (clearing them first
    # would be a write of its own, which the probe reports)
    logging.basicConfig(level=logging.WARNING, force=True)


HANDLER = logging.NullHandler()

# (target, action run inside a request); each action writes exactly once.
DEFAULT_WATCHES: list[tuple[str, Callable[[], object]]] = [
    ("os.chdir", lambda: os.chdir(os.getcwd())),
    ("os.umask", lambda: os.umask(UMASK)),
    ("time.tzset", lambda: time.tzset()),
    ("locale.setlocale", lambda: locale.setlocale(locale.LC_NUMERIC, CURRENT_NUMERIC_LOCALE)),
    (
        "locale.setlocale",
        lambda: locale.setlocale(locale.LC_NUMERIC, locale=CURRENT_NUMERIC_LOCALE),
    ),
    ("socket.setdefaulttimeout", lambda: socket.setdefaulttimeout(12.5)),
    ("random.seed", lambda: random.seed(42)),
    ("sys.setrecursionlimit", lambda: sys.setrecursionlimit(sys.getrecursionlimit() + 1)),
    ("sys.setswitchinterval", lambda: sys.setswitchinterval(0.004)),
    ("logging.Logger.setLevel", lambda: logging.getLogger(TEST_LOGGER).setLevel(logging.DEBUG)),
    ("logging.Logger.addHandler", lambda: logging.getLogger(TEST_LOGGER).addHandler(HANDLER)),
    ("logging.disable", lambda: logging.disable(logging.DEBUG)),
    ("logging.basicConfig", _basic_config),
    ("warnings.filters", lambda: warnings.simplefilter("ignore", DeprecationWarning)),
    ("warnings.filters", lambda: warnings.filterwarnings("error", "sentinel-test")),
    ("warnings.filters", lambda: warnings.resetwarnings()),
]
UMASK = _umask_now()
CURRENT_NUMERIC_LOCALE = locale.setlocale(locale.LC_NUMERIC)


@pytest.mark.parametrize(
    ("target", "action"), DEFAULT_WATCHES, ids=lambda v: v if isinstance(v, str) else None
)
def test_a_write_from_a_handler_is_reported(
    captured: Captured, target: str, action: Callable[[], object]
) -> None:
    run_in_request(captured, action, path="/knob")
    [report] = captured.mutations
    assert report["target"] == target
    assert report["attribution"] == "exact"
    assert report["route"] == "/knob"
    assert report["file"] == os.path.abspath(__file__)
    labels = {"location": "unknown", "route": "/knob", "target": target}
    assert captured.metric("sentinel_global_mutations_total", **labels) == 1


def test_remove_handler_is_reported(captured: Captured) -> None:
    logger = logging.getLogger(TEST_LOGGER)
    logger.addHandler(HANDLER)  # outside any request: not reported
    run_in_request(captured, lambda: logger.removeHandler(HANDLER), path="/knob")
    assert [(r["target"], r["key"]) for r in captured.mutations] == [
        ("logging.Logger.removeHandler", TEST_LOGGER)
    ]


def test_queries_and_no_op_calls_are_not_writes(captured: Captured) -> None:
    logger = logging.getLogger(TEST_LOGGER)
    logger.addHandler(HANDLER)

    def reads() -> None:
        locale.setlocale(locale.LC_ALL)  # a query
        logger.addHandler(HANDLER)  # already there
        logger.removeHandler(logging.NullHandler())  # never added
        logging.basicConfig()  # the root logger has handlers: a no-op
        with warnings.catch_warnings():  # scoped to the block
            warnings.simplefilter("ignore")

    run_in_request(captured, reads, path="/knob")
    assert captured.mutations == []


def test_app_state_writes_are_reported_request_state_is_not(captured: Captured) -> None:
    async def handler(request: Request) -> PlainTextResponse:
        request.state.user = "ada"  # request-scoped
        request.app.state.backend = request.query_params["b"]  # process-global
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/state", handler)])
    app.state.backend = "primary"  # before serving: configuration
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/state", params={"b": "replica"})
    [report] = captured.mutations
    assert (report["target"], report["key"], report["old"], report["new"]) == (
        "app.state",
        "backend",
        "primary",
        "replica",
    )


def test_app_state_of_an_app_that_added_the_middleware_is_watched(captured: Captured) -> None:
    from starlette.middleware import Middleware

    from sentinel import SentinelMiddleware

    async def handler(request: Request) -> PlainTextResponse:
        request.app.state.flag = True
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/state", handler)],
        middleware=[Middleware(SentinelMiddleware, sentinel=captured.sentinel)],
    )
    with serve(app) as url:
        httpx.get(f"{url}/state")
    assert [(r["target"], r["key"]) for r in captured.mutations] == [("app.state", "flag")]


@pytest.mark.parametrize("wrapped", ["instrument", "add_middleware"])
def test_app_state_of_a_mounted_app_is_watched(captured: Captured, wrapped: str) -> None:
    """A Starlette app mounted in another (``Mount``, at any depth) has its own
    ``app.state``, as process-global as the outer app's."""
    from starlette.routing import Host, Mount

    from sentinel import SentinelMiddleware

    async def handler(request: Request) -> PlainTextResponse:
        request.app.state.cache = "warm"
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/h", handler)])
    middle = Starlette(routes=[Mount("/inner", app=inner)])
    app = Starlette(routes=[Host("{sub}.localhost", app=Starlette()), Mount("/m", app=middle)])
    if wrapped == "add_middleware":
        app.add_middleware(SentinelMiddleware, sentinel=captured.sentinel)
    served = app if wrapped == "add_middleware" else instrument(app, sentinel=captured.sentinel)
    with serve(served) as url:
        assert httpx.get(f"{url}/m/inner/h").status_code == 200
    assert [(r["target"], r["key"], r["route"]) for r in captured.mutations] == [
        ("app.state", "cache", "/m/inner/h")
    ]


def test_startup_writes_are_not_reported(captured: Captured) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for _, action in DEFAULT_WATCHES:
            action()
        app.state.ready = True
        os.environ["SENTINEL_TEST_LIFESPAN"] = "1"
        yield

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", ok)], lifespan=lifespan)
    try:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            assert httpx.get(url).status_code == 200
    finally:
        os.environ.pop("SENTINEL_TEST_LIFESPAN", None)
    assert captured.mutations == []


def test_raise_mode_refuses_the_write() -> None:
    logger = logging.getLogger(TEST_LOGGER)
    logger.setLevel(logging.WARNING)

    async def handler(request: Request) -> PlainTextResponse:
        logger.setLevel(logging.DEBUG)
        request.app.state.backend = "replica"
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/knob", handler)])
    app.state.backend = "primary"
    with (
        capture_reports(mutation_mode="raise") as captured,
        serve(instrument(app, sentinel=captured.sentinel)) as url,
    ):
        assert httpx.get(f"{url}/knob").status_code == 500
    assert logger.level == logging.WARNING  # refused before it happened
    assert app.state.backend == "primary"
    [report] = captured.mutations
    assert report["action"] == "refused"


def test_signal_handlers_from_a_handler_in_the_main_thread(tmp_path: Path) -> None:
    """signal.signal only works in the main thread: a server running the loop there."""
    (tmp_path / "signalapp.py").write_text(
        textwrap.dedent(
            """
            import signal

            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route


            async def trap(request):
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the write
                return PlainTextResponse("ok")


            app = Starlette(routes=[Route("/trap", trap)])
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sentinel.cli", "run", "signalapp:app", "--port", str(port)],
        env=clean_env(PYTHONPATH=str(tmp_path), SENTINEL_METRICS_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        response = first_response(process, f"http://127.0.0.1:{port}/trap")
        assert response.status_code == 200
    finally:
        stop(process)
    _, stderr = process.communicate(timeout=10)
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    [report] = [r for r in records if r.get("event") == "global_state_mutated"]
    assert (report["target"], report["key"], report["route"]) == (
        "signal.signal",
        "SIGUSR1",
        "/trap",
    )
    assert report["attribution"] == "exact"
    assert report["file"].endswith("signalapp.py")
    assert report["old"] == "<Handlers.SIG_DFL: 0>"


def test_strptime_rebuilding_its_locale_cache_is_not_a_write(captured: Captured) -> None:
    """The stdlib's strptime calls time.tzset() when it (re)builds its locale cache, on its
    first call in a process: that re-reads the same TZ and is not the app's write (it made
    Starlette's own datetime-convertor test fail in raise mode)."""
    import _strptime
    from datetime import datetime

    def parse_a_date() -> object:
        _strptime._TimeRE_cache.locale_time.tzname = ("stale", "stale")  # forces a rebuild
        return datetime.strptime("2026-12-06", "%Y-%m-%d")

    assert run_in_request(captured, parse_a_date, path="/dates").year == 2026  # type: ignore[attr-defined]
    assert captured.mutations == []


def test_stdlib_calls_that_set_and_restore_the_locale_are_not_writes() -> None:
    """locale.getpreferredencoding() sets LC_CTYPE to read the encoding and puts it back, and
    calendar's LocaleTextCalendar sets LC_TIME for its block: queries, not writes, so raise
    mode does not fail the request; a setlocale of the app's own is still reported."""
    import calendar
    import locale

    def query() -> object:
        before = locale.setlocale(locale.LC_CTYPE)
        encoding = locale.getpreferredencoding()
        calendar.LocaleTextCalendar(locale="C").formatweekday(0, 9)
        assert locale.setlocale(locale.LC_CTYPE) == before
        return encoding

    with capture_reports(mutation_mode="raise") as captured:
        assert run_in_request(captured, query, path="/encoding")
        assert captured.mutations == []
    with capture_reports() as captured:
        current = locale.setlocale(locale.LC_TIME)
        run_in_request(captured, lambda: locale.setlocale(locale.LC_TIME, current))
        [record] = captured.mutations
        assert (record["target"], record["key"]) == ("locale.setlocale", "LC_TIME")


LAZY_MODULE = """
import logging, os, warnings

logging.getLogger({logger!r}).addHandler(logging.NullHandler())
warnings.filterwarnings("ignore", "sentinel-test-lazy")
os.environ.setdefault("SENTINEL_TEST_LAZY", "loaded")
LOADED = "all of it"
"""


@pytest.mark.parametrize("mode", ["report", "raise", "isolate"])
def test_a_lazy_import_in_a_handler_is_import_time(
    mode: str, tmp_path: Path, restore_sys_path: None, clean_environ: None
) -> None:
    """A library imported on first use writes as it would at startup: neither reported,
    refused (the import would stop halfway) nor isolated. The handler's own write is still
    the request's."""
    name = f"sentinel_test_lazy_{mode}"
    (tmp_path / f"{name}.py").write_text(LAZY_MODULE.format(logger=TEST_LOGGER))
    sys.path.insert(0, str(tmp_path))

    async def handler(request: Request) -> PlainTextResponse:
        module = importlib.import_module(name)
        if mode != "raise":
            os.environ["SENTINEL_TEST_HANDLER"] = "1"  # the handler's own write
        return PlainTextResponse(module.LOADED)

    app = Starlette(routes=[Route("/lazy", handler)])
    try:
        with capture_reports(mutation_mode=mode) as captured:
            with serve(instrument(app, sentinel=captured.sentinel)) as url:
                assert httpx.get(f"{url}/lazy").text == "all of it"
            reported = [(r["target"], r["key"]) for r in captured.mutations]
    finally:
        sys.modules.pop(name, None)
    assert reported == ([] if mode == "raise" else [("os.environ", "SENTINEL_TEST_HANDLER")])
    assert os.environ["SENTINEL_TEST_LAZY"] == "loaded"  # the import's write reached the process
    assert len(logging.getLogger(TEST_LOGGER).handlers) == 1


SERVE_DURING_IMPORT: list[Callable[[], int]] = []


def test_requests_of_a_server_run_by_an_import_are_not_import_time(
    tmp_path: Path, restore_sys_path: None, clean_environ: None
) -> None:
    """A module whose import runs the server (module-level code, no __main__ guard) serves
    requests with that import's frames further down the stack: their writes, and those of
    the tasks they start, are still the requests'."""

    async def handler(request: Request) -> PlainTextResponse:
        os.environ["SENTINEL_TEST_SERVED"] = "1"

        async def job() -> None:
            os.environ["SENTINEL_TEST_TASK"] = "1"

        await asyncio.create_task(job())
        return PlainTextResponse("ok")

    with capture_reports() as captured:
        app = instrument(Starlette(routes=[Route("/served", handler)]), sentinel=captured.sentinel)

        async def call() -> int:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.get("/served")).status_code

        SERVE_DURING_IMPORT[:] = [lambda: asyncio.run(call())]  # in the importing thread
        name = "sentinel_test_serving"
        (tmp_path / f"{name}.py").write_text(
            f"from {__name__} import SERVE_DURING_IMPORT\nSTATUS = SERVE_DURING_IMPORT[0]()\n"
        )
        sys.path.insert(0, str(tmp_path))
        try:
            assert importlib.import_module(name).STATUS == 200
        finally:
            sys.modules.pop(name, None)
        reported = {(r["key"], r["attribution"], r["route"]) for r in captured.mutations}
    assert reported == {
        ("SENTINEL_TEST_SERVED", "exact", "/served"),
        ("SENTINEL_TEST_TASK", "exact", "/served"),
    }

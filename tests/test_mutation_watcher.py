"""Requests' writes to process-global state: attributed, reported once, refused or isolated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import run_client, run_in_raw_thread, run_in_request
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import GlobalStateMutated, instrument
from sentinel.testing import Captured, capture_reports, serve

THIS_FILE = os.path.abspath(__file__)
pytestmark = pytest.mark.usefixtures("restore_sys_path")  # some tests poke sys.path


def line_of(marker: str) -> int:
    with open(THIS_FILE) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "line_of(" not in line:
                return number
    raise AssertionError(marker)


async def set_backend(request: Request) -> PlainTextResponse:
    os.environ["BACKEND"] = request.query_params["backend"]  # the incident's write
    await asyncio.sleep(float(request.query_params.get("hold", "0")))
    return PlainTextResponse(os.environ["BACKEND"])


async def read_backend(request: Request) -> PlainTextResponse:
    await asyncio.sleep(float(request.query_params.get("wait", "0")))
    return PlainTextResponse(os.environ.get("BACKEND", "<unset>"))


INCIDENT = Starlette(
    routes=[Route("/backend", set_backend), Route("/read", read_backend)],
)


# -- the incident, replayed ------------------------------------------------------------------


def test_incident_report_mode_one_exact_report(captured: Captured, clean_environ: None) -> None:
    """One request sets os.environ["BACKEND"]: one report naming the route, file and line."""
    os.environ["BACKEND"] = "primary"
    with serve(instrument(INCIDENT, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/backend", params={"backend": "replica-7"}).text == "replica-7"
    [report] = captured.mutations
    assert report["target"] == "os.environ"
    assert report["key"] == "BACKEND"
    assert report["old"] == "primary" and report["new"] == "replica-7"
    assert report["route"] == "/backend" and report["method"] == "GET"
    assert report["attribution"] == "exact"
    assert report["file"] == THIS_FILE
    assert report["line"] == line_of("# the incident's write")
    assert report["function"] == "set_backend"
    assert report["after_response"] is False
    assert report["request_id"]
    labels = {"location": "unknown", "route": "/backend", "target": "os.environ"}
    assert captured.metric("sentinel_global_mutations_total", **labels) == 1
    assert os.environ["BACKEND"] == "replica-7"  # report mode reports, it does not undo


def test_incident_isolate_mode(clean_environ: None) -> None:
    """A concurrent request still sees the original; afterwards the process is unchanged."""
    os.environ["BACKEND"] = "primary"
    before = dict(os.environ)
    with capture_reports(mutation_mode="isolate") as captured:
        app = instrument(INCIDENT, sentinel=captured.sentinel)
        with serve(app) as url:

            async def both() -> tuple[str, str]:
                async with httpx.AsyncClient(base_url=url) as client:
                    writer = client.get("/backend", params={"backend": "replica-7", "hold": "0.3"})
                    reader = client.get("/read", params={"wait": "0.15"})
                    written, read = await asyncio.gather(writer, reader)
                    return written.text, read.text

            written, read = run_client(both())
        assert written == "replica-7"  # the writer sees its own write
        assert read == "primary"  # the concurrent request does not
        assert dict(os.environ) == before
        [report] = captured.mutations
        assert report["attribution"] == "exact"
        assert report["action"] == "isolated"
        assert report["route"] == "/backend"


def _write_backend_blocking(value: str) -> str:
    os.environ["BACKEND"] = value  # in the loop's thread pool
    return os.environ["BACKEND"]


async def in_run_in_executor(request: Request) -> PlainTextResponse:
    loop = asyncio.get_running_loop()
    written = await loop.run_in_executor(None, _write_backend_blocking, "replica-7")
    return PlainTextResponse(written)


@pytest.mark.parametrize(
    ("mode", "action", "status", "left"),
    [
        ("report", "reported", 200, "replica-7"),
        ("raise", "refused", 500, "primary"),
        ("isolate", "isolated", 200, "primary"),
    ],
)
def test_run_in_executor_work_is_the_requests(
    mode: str, action: str, status: int, left: str, clean_environ: None
) -> None:
    """A write in ``loop.run_in_executor`` is the request's own, as with asyncio.to_thread."""
    os.environ["BACKEND"] = "primary"
    app = Starlette(routes=[Route("/executor", in_run_in_executor)])
    with capture_reports(mutation_mode=mode) as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            assert httpx.get(f"{url}/executor").status_code == status
        [report] = captured.mutations
    assert (report["attribution"], report["route"], report["action"]) == (
        "exact",
        "/executor",
        action,
    )
    assert report["request_id"]
    assert os.environ["BACKEND"] == left


# -- concurrency -------------------------------------------------------------------------------


def _write_env(tag: str) -> None:
    os.environ[f"SENTINEL_TEST_{tag}"] = tag  # the shared write line


async def from_async(request: Request) -> PlainTextResponse:
    _write_env(request.query_params["tag"])
    return PlainTextResponse("ok")


def from_thread(request: Request) -> PlainTextResponse:  # sync: Starlette's thread pool
    logging.getLogger(f"sentinel.tests.{request.query_params['tag']}").setLevel(logging.DEBUG)
    return PlainTextResponse("ok")


async def from_task(request: Request) -> PlainTextResponse:
    tag = request.query_params["tag"]

    async def job() -> None:
        await asyncio.sleep(0.01)
        setattr(request.app.state, tag, True)

    await asyncio.create_task(job())
    return PlainTextResponse("ok")


async def from_executor(request: Request) -> PlainTextResponse:
    # asyncio.to_thread copies the context, as the thread pool does.
    await asyncio.to_thread(_write_env, request.query_params["tag"])
    return PlainTextResponse("ok")


async def quiet(request: Request) -> PlainTextResponse:
    await asyncio.sleep(0.05)
    return PlainTextResponse(os.environ.get("HOME", ""))


CONCURRENT = Starlette(
    routes=[
        Route("/async", from_async),
        Route("/thread", from_thread),
        Route("/task", from_task),
        Route("/executor", from_executor),
        Route("/quiet", quiet),
    ]
)


def test_fifty_concurrent_requests_each_mutation_once_with_its_route(
    captured: Captured, clean_environ: None
) -> None:
    # tag: (route, target, key); async handlers, the thread pool, a spawned task, to_thread.
    writers = {
        "async1": ("/async", "os.environ", "SENTINEL_TEST_async1"),
        "async2": ("/async", "os.environ", "SENTINEL_TEST_async2"),
        "thread1": ("/thread", "logging.Logger.setLevel", "sentinel.tests.thread1"),
        "thread2": ("/thread", "logging.Logger.setLevel", "sentinel.tests.thread2"),
        "task1": ("/task", "app.state", "task1"),
        "task2": ("/task", "app.state", "task2"),
        "executor1": ("/executor", "os.environ", "SENTINEL_TEST_executor1"),
    }
    with serve(instrument(CONCURRENT, sentinel=captured.sentinel)) as url:

        async def load() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                calls = [client.get(w[0], params={"tag": tag}) for tag, w in writers.items()]
                calls += [client.get("/quiet") for _ in range(50 - len(writers))]
                return [response.status_code for response in await asyncio.gather(*calls)]

        assert run_client(load()) == [200] * 50
    reports = captured.mutations
    found = {(r["target"], r["key"]): r for r in reports}
    assert len(reports) == len(writers) == len(found)
    for route, target, key in writers.values():
        report = found[(target, key)]
        assert report["route"] == route, report
        assert report["attribution"] == "exact"
        assert report["file"] == THIS_FILE
    assert not [r for r in reports if r["route"] == "/quiet"]
    assert {r["function"] for r in reports} == {"_write_env", "from_thread", "job"}
    total = sum(
        captured.metric(
            "sentinel_global_mutations_total", location="unknown", route=route, target=target
        )
        for route, target in {(w[0], w[1]) for w in writers.values()}
    )
    assert total == len(writers)
    for tag in ("thread1", "thread2"):
        logging.getLogger(f"sentinel.tests.{tag}").setLevel(logging.NOTSET)


# -- once per (target, key, code location) ------------------------------------------------------


def test_repeats_are_counted_not_repeated(clean_environ: None) -> None:
    async def again(request: Request) -> PlainTextResponse:
        os.environ["SENTINEL_TEST_REPEAT"] = request.query_params["n"]
        return PlainTextResponse("ok")

    with capture_reports() as captured:
        with serve(
            instrument(Starlette(routes=[Route("/again", again)]), sentinel=captured.sentinel)
        ) as url:
            for n in range(5):
                httpx.get(f"{url}/again", params={"n": str(n)})
        assert len(captured.mutations) == 1
        labels = {"location": "unknown", "route": "/again", "target": "os.environ"}
        assert captured.metric("sentinel_global_mutations_total", **labels) == 5
        captured.sentinel.close()  # the repeats' summary is written at shutdown
        [summary] = [r for r in captured.events("global_state_mutated") if r.get("summary")]
        assert summary["occurrences"] == 4
        assert summary["key"] == "SENTINEL_TEST_REPEAT"


def test_a_line_writing_many_keys_names_a_few_and_counts_the_rest(clean_environ: None) -> None:
    """A handler writing 5,000 cache keys into os.environ from one line: every write counted,
    the first MAX_KEYS_PER_LINE keys named, one record for the rest (and a summary counting
    their writes), so a first exception elsewhere is not crowded out of the queue."""
    from sentinel._mutation._watcher import MAX_KEYS_PER_LINE

    async def cache(request: Request) -> PlainTextResponse:
        for number in range(5000):
            os.environ[f"SENTINEL_TEST_CACHE_{number}"] = "x"
        return PlainTextResponse("ok")

    async def fail(request: Request) -> PlainTextResponse:
        raise KeyError("a first exception")

    routes = [Route("/cache", cache), Route("/fail", fail)]
    try:
        with capture_reports() as captured:
            app = instrument(Starlette(routes=routes), sentinel=captured.sentinel)
            with serve(app) as url:
                assert httpx.get(f"{url}/cache").status_code == 200
                assert httpx.get(f"{url}/fail").status_code == 500
            captured.wait_for(1)
            named = [r for r in captured.mutations if not r.get("more_keys")]
            [rest] = [r for r in captured.mutations if r.get("more_keys")]
            assert len(named) == MAX_KEYS_PER_LINE and rest["key"] is None
            assert captured.metric("sentinel_global_mutations_total", route="/cache") == 5000
            assert [r["route"] for r in captured.reports] == ["/fail"]
            assert captured.metric("sentinel_reports_dropped_total") == 0
            captured.sentinel.close()
            [summary] = [r for r in captured.events("global_state_mutated") if r.get("summary")]
            assert summary["more_keys"] is True
            assert summary["occurrences"] == 5000 - MAX_KEYS_PER_LINE - 1
    finally:
        for number in range(5000):
            os.environ.pop(f"SENTINEL_TEST_CACHE_{number}", None)


def _use_backend(name: str) -> None:
    os.environ["SENTINEL_TEST_SHARED"] = name  # one code line, called by two routes


async def shared_a(request: Request) -> PlainTextResponse:
    _use_backend("a")
    return PlainTextResponse("a")


async def shared_b(request: Request) -> PlainTextResponse:
    _use_backend("b")
    return PlainTextResponse("b")


def test_each_route_and_location_the_metric_counts_has_its_records(clean_environ: None) -> None:
    """One helper written from /a in iad and /b in sin: repeats fold per route and location,
    never under another's record."""
    app = Starlette(routes=[Route("/a", shared_a), Route("/b", shared_b)])
    with capture_reports(location_header="x-location", locations=("iad", "sin")) as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            httpx.get(f"{url}/a", headers={"x-location": "iad"})
            for _ in range(3):
                httpx.get(f"{url}/b", headers={"x-location": "sin"})
        captured.sentinel.close()  # the repeats' summary is written at shutdown
        shown: Counter[tuple[str, str]] = Counter()
        for record in captured.events("global_state_mutated"):
            shown[record["route"], record["location"]] += record.get("occurrences") or 1
        for (route, location), count in shown.items():
            labels = {"location": location, "route": route, "target": "os.environ"}
            assert captured.metric("sentinel_global_mutations_total", **labels) == count
        assert shown == {("/a", "iad"): 1, ("/b", "sin"): 3}


# -- what is not a request's mutation ---------------------------------------------------------


def test_startup_writes_are_not_reported(captured: Captured, clean_environ: None) -> None:
    """Lifespan and import-time writes are configuration, not request mutations."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        os.environ["SENTINEL_TEST_STARTUP"] = "1"
        app.state.pool = "ready"
        yield
        os.environ["SENTINEL_TEST_SHUTDOWN"] = "1"

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    os.environ["SENTINEL_TEST_IMPORT"] = "1"  # before serving: startup
    app = Starlette(routes=[Route("/", ok)], lifespan=lifespan)
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(url)
    assert captured.mutations == []
    assert os.environ["SENTINEL_TEST_SHUTDOWN"] == "1"


def test_allow_list_matches_environb_keys_as_text(clean_environ: None) -> None:
    with capture_reports(mutation_allow=("os.environ:CACHE_*", "os.environb:CACHE_*")) as captured:

        def write() -> None:
            os.environ["CACHE_A"] = "1"
            os.environb[b"CACHE_B"] = b"1"
            os.environb[b"SENTINEL_TEST_B"] = b"1"

        run_in_request(captured, write)
        assert [(r["target"], r["key"]) for r in captured.mutations] == [
            ("os.environb", "SENTINEL_TEST_B")
        ]


def test_warm_up_window_and_allow_list(clean_environ: None) -> None:
    async def write(request: Request) -> PlainTextResponse:
        os.environ[request.query_params["key"]] = "1"
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/w", write)])
    with capture_reports(
        mutation_warmup_seconds=0.5, mutation_allow=("os.environ:CACHE_*",)
    ) as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            httpx.get(f"{url}/w", params={"key": "SENTINEL_TEST_EARLY"})  # in the warm-up
            time.sleep(0.6)
            httpx.get(f"{url}/w", params={"key": "CACHE_DIR"})  # allowed
            httpx.get(f"{url}/w", params={"key": "SENTINEL_TEST_LATE"})
        assert [r["key"] for r in captured.mutations] == ["SENTINEL_TEST_LATE"]


def test_after_response_writes_say_so(captured: Captured, clean_environ: None) -> None:
    def later() -> None:
        os.environ["SENTINEL_TEST_LATER"] = "1"

    async def handler(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(later))

    with serve(
        instrument(Starlette(routes=[Route("/bg", handler)]), sentinel=captured.sentinel)
    ) as url:
        httpx.get(f"{url}/bg")
    [report] = captured.mutations
    assert report["after_response"] is True
    assert report["route"] == "/bg"
    assert report["function"] == "later"


# -- raise mode --------------------------------------------------------------------------------


def test_raise_mode_fails_the_request_and_leaves_state_unchanged(clean_environ: None) -> None:
    os.environ["BACKEND"] = "primary"
    with capture_reports(mutation_mode="raise") as captured:
        with serve(instrument(INCIDENT, sentinel=captured.sentinel)) as url:
            response = httpx.get(f"{url}/backend", params={"backend": "replica-7"})
            assert response.status_code == 500
            assert httpx.get(f"{url}/read").text == "primary"
        assert os.environ["BACKEND"] == "primary"
        [report] = captured.mutations
        assert report["action"] == "refused"
        [error] = captured.reports
        assert error["exception_type"] == "sentinel.GlobalStateMutated"


def test_raise_mode_fails_the_request_when_found_at_its_end() -> None:
    entry = "/nonexistent/sentinel-test-raise"

    async def poke(request: Request) -> PlainTextResponse:
        sys.path.append(entry)
        return PlainTextResponse("ok")

    with capture_reports(mutation_mode="raise") as captured:
        app = instrument(Starlette(routes=[Route("/poke", poke)]), sentinel=captured.sentinel)
        with serve(app) as url:
            assert httpx.get(f"{url}/poke").status_code == 500
        [report] = captured.mutations
        assert report["target"] == "sys.path"


def test_the_exception_names_what_was_written() -> None:
    error = GlobalStateMutated("os.environ", "BACKEND", "/backend")
    assert (
        str(error)
        == "process-global state os.environ 'BACKEND' written by /backend (mutation mode raise)"
    )


# -- what reports contain ---------------------------------------------------------------------


def test_secret_looking_keys_show_length_and_hash(captured: Captured, clean_environ: None) -> None:
    canary = "hunter2-canary-value"

    def login() -> None:
        os.environ["DB_PASSWORD"] = canary
        os.environ["SENTINEL_TEST_URL"] = f"postgres://app:{canary}@db/x"

    run_in_request(captured, login, path="/login")
    reports = {r["key"]: r for r in captured.mutations}
    assert reports["DB_PASSWORD"]["new"].startswith(f"[scrubbed len={len(canary)} hash=")
    assert canary not in captured.stream.getvalue()
    assert all(canary not in str(r) for r in captured.records)


def test_huge_and_unprintable_values_are_capped(captured: Captured, clean_environ: None) -> None:
    def big() -> None:
        os.environ["SENTINEL_TEST_BIG"] = "x" * 100_000 + "\x7f\u2028"

    run_in_request(captured, big, path="/big")
    [report] = captured.mutations
    assert len(report["new"]) < 300


def test_the_testing_helper_names_the_write(captured: Captured, clean_environ: None) -> None:
    with serve(instrument(INCIDENT, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/read")
        captured.assert_no_mutations()
        httpx.get(f"{url}/backend", params={"backend": "x"})
    with pytest.raises(
        AssertionError, match=r"os.environ 'BACKEND' by GET /backend at .*test_mutation_watcher.py"
    ):
        captured.assert_no_mutations()


def test_limit_raw_threads_are_suspects_not_exact(captured: Captured, clean_environ: None) -> None:
    """A thread started with threading.Thread has no request context: while requests are
    in flight, they are the suspects; with none in flight, the write is not a request's."""

    def write(key: str) -> None:
        os.environ[key] = "1"

    async def raw(request: Request) -> PlainTextResponse:
        await run_in_raw_thread(lambda: write("SENTINEL_TEST_RAW"))
        return PlainTextResponse("ok")

    with serve(
        instrument(Starlette(routes=[Route("/raw", raw)]), sentinel=captured.sentinel)
    ) as url:
        httpx.get(f"{url}/raw")
        idle = threading.Thread(target=write, args=("SENTINEL_TEST_IDLE",))
        idle.start()
        idle.join(5)
    [report] = captured.mutations
    assert report["key"] == "SENTINEL_TEST_RAW"
    assert report["attribution"] == "suspects"
    assert report["suspects"] == ["GET /raw"]
    assert report["route"] == "/raw"
    assert captured.events("global_state_mutated") == [report]  # the idle write: not reported


@pytest.mark.parametrize("thread_pool", [False, True], ids=["on-the-loop", "to-thread"])
def test_unattributed_writes_on_the_loop_outside_requests(
    captured: Captured, clean_environ: None, thread_pool: bool
) -> None:
    """A task no request started (from lifespan) writing while requests are in flight, on
    the loop or through the thread pool (asyncio.to_thread carries the lifespan's context
    to the thread): no request's write."""
    go = asyncio.Event()

    def write() -> None:
        os.environ["SENTINEL_TEST_BACKGROUND"] = "1"

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async def background() -> None:
            await go.wait()
            if thread_pool:
                await asyncio.to_thread(write)
            else:
                os.environ["SENTINEL_TEST_BACKGROUND"] = "1"

        task = asyncio.create_task(background())
        yield
        task.cancel()

    async def trigger(request: Request) -> PlainTextResponse:
        go.set()
        await asyncio.sleep(0.2)  # in flight while the background task writes
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/trigger", trigger)], lifespan=lifespan)
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/trigger")
    assert captured.mutations == []
    [report] = captured.events("global_state_mutated")
    assert report["attribution"] == "unattributed"
    assert report["route"] == "<none>"
    assert report["function"] == ("write" if thread_pool else "background")


def test_changes_made_while_nothing_is_served_are_not_a_requests() -> None:
    """A background job pokes sys.path between requests. In raise mode a request starting
    with none in flight checks first for what changed meanwhile: that change is reported,
    as no request's (``unattributed``), and the request is neither named nor failed."""
    entry = "/nonexistent/sentinel-test-idle"

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    with capture_reports(mutation_mode="raise") as captured:
        app = instrument(Starlette(routes=[Route("/ok", ok)]), sentinel=captured.sentinel)
        with serve(app) as url:
            assert httpx.get(f"{url}/ok").status_code == 200
            # The client has its response before the middleware is done with the request.
            captured.flush()
            sys.path.append(entry)  # idle: no request in flight
            assert httpx.get(f"{url}/ok").status_code == 200
        assert captured.mutations == []
        [report] = captured.events("global_state_mutated")
    assert (report["target"], report["key"], report["attribution"]) == (
        "sys.path",
        "added",
        "unattributed",
    )
    assert report["action"] == "reported" and report.get("suspects") is None


def test_raise_mode_does_not_fail_a_request_for_anothers_change() -> None:
    """Found when a response starts with another request in flight: reported with both as
    suspects, refused for neither."""
    entry = "/nonexistent/sentinel-test-guilty"
    poked = threading.Event()

    async def guilty(request: Request) -> PlainTextResponse:
        sys.path.append(entry)
        poked.set()
        await asyncio.sleep(0.3)
        return PlainTextResponse("ok")

    async def innocent(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/guilty", guilty), Route("/innocent", innocent)])
    with capture_reports(mutation_mode="raise") as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:

            async def both() -> list[int]:
                async with httpx.AsyncClient(base_url=url) as client:
                    first = asyncio.ensure_future(client.get("/guilty"))
                    assert await asyncio.to_thread(poked.wait, 5)
                    second = await client.get("/innocent")
                    return [(await first).status_code, second.status_code]

            assert run_client(both()) == [200, 200]
        [report] = captured.mutations
        assert report["suspects"] == ["GET /guilty", "GET /innocent"]
        assert report["action"] == "reported"


def test_lifespan_shutdown_writes_are_not_reported(captured: Captured, clean_environ: None) -> None:
    """The server shuts down right after serving a slow request."""
    started = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        os.environ["SENTINEL_TEST_SHUTDOWN_WRITE"] = "1"

    async def slow(request: Request) -> PlainTextResponse:
        started.set()
        await asyncio.sleep(1.0)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/slow", slow)], lifespan=lifespan)
    results: list[int] = []
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        client = threading.Thread(
            target=lambda: results.append(httpx.get(f"{url}/slow").status_code)
        )
        client.start()
        assert started.wait(5)
    client.join(10)  # uvicorn waited for it before running lifespan's shutdown
    assert os.environ.get("SENTINEL_TEST_SHUTDOWN_WRITE") == "1"
    assert captured.events("global_state_mutated") == []


def test_values_are_scrubbed_before_they_are_cut(captured: Captured, clean_environ: None) -> None:
    secret = "hunter2canarypw"
    value = "x" * 178 + f"postgres://app:{secret}@db/x"

    run_in_request(captured, lambda: os.environ.__setitem__("SENTINEL_TEST_DSN", value))
    [report] = captured.mutations
    assert "hunter2" not in report["new"] and "hunter2" not in captured.stream.getvalue()


def test_limit_raise_mode_reports_a_raw_threads_write(clean_environ: None) -> None:
    """Raising needs the request's context: a raw thread's write is reported, not refused."""

    def write() -> None:
        os.environ["SENTINEL_TEST_RAW_RAISE"] = "1"

    async def raw(request: Request) -> PlainTextResponse:
        await run_in_raw_thread(write)
        return PlainTextResponse("ok")

    with capture_reports(mutation_mode="raise") as captured:
        with serve(
            instrument(Starlette(routes=[Route("/raw", raw)]), sentinel=captured.sentinel)
        ) as url:
            assert httpx.get(f"{url}/raw").status_code == 200
        [report] = captured.mutations
        assert (report["attribution"], report["action"]) == ("suspects", "reported")
    assert os.environ["SENTINEL_TEST_RAW_RAISE"] == "1"


def test_limit_raise_mode_reports_a_change_found_after_the_response() -> None:
    """A background task of the response pokes sys.path: the client already has its 200."""
    entry = "/nonexistent/sentinel-test-after"

    def later() -> None:
        sys.path.append(entry)

    async def handler(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(later))

    with capture_reports(mutation_mode="raise") as captured:
        with serve(
            instrument(Starlette(routes=[Route("/bg", handler)]), sentinel=captured.sentinel)
        ) as url:
            assert httpx.get(f"{url}/bg").status_code == 200
        [report] = captured.mutations
        assert (report["target"], report["action"]) == ("sys.path", "reported")


def test_lifespan_writes_count_only_between_startup_and_shutdown(captured: Captured) -> None:
    """In lifespan's context with a request in flight: startup and shutdown writes are not
    reported, a write from a lifespan task while serving is."""
    from helpers import request_context

    from sentinel._context import current_phase

    watcher = captured.sentinel.mutations
    watcher.serving_started()
    in_flight = request_context()
    captured.sentinel.requests.add(in_flight)
    token = current_phase.set("lifespan")
    try:
        assert watcher.intercept("os.chdir", None, "/a", "/b", None) is None  # startup
        watcher.lifespan_serving = True  # lifespan.startup.complete sent
        note = watcher.intercept("os.chdir", None, "/a", "/b", None)
        assert note is not None and note.attribution == "unattributed"
        watcher.lifespan_serving = False  # lifespan.shutdown received
        assert watcher.intercept("os.chdir", None, "/a", "/b", None) is None
    finally:
        current_phase.reset(token)
        captured.sentinel.requests.discard(in_flight)


@pytest.mark.parametrize("part", ["logging", "warnings"])
def test_a_direct_write_is_reported_though_a_wrapped_write_to_its_part_follows(
    captured: Captured, part: str
) -> None:
    """A write no wrapper sees (a handler appended to the root logger, a filter inserted)
    and then, in the same request, a wrapped write to the same part (another logger's
    level, simplefilter): the wrapped write moves that part's baseline on, so the direct
    write is reported first, not carried away with it."""
    root, other = logging.getLogger(), logging.getLogger("sentinel.test.other")
    handlers, level, filters = list(root.handlers), other.level, list(warnings.filters)
    handler = logging.NullHandler()

    def write() -> None:
        if part == "logging":
            root.handlers.append(handler)
            other.setLevel(logging.INFO)
        else:
            warnings.filters.insert(0, ("error", None, UserWarning, None, 0))
            warnings.simplefilter("default", ResourceWarning)

    try:
        run_in_request(captured, write, path="/both")
    finally:
        root.handlers[:] = handlers
        other.setLevel(level)
        warnings.filters[:] = filters
    found = {(report["target"], report["attribution"]) for report in captured.mutations}
    if part == "logging":
        assert found == {("logging.root", "suspects"), ("logging.Logger.setLevel", "exact")}
    else:
        assert found == {("warnings.filters", "suspects"), ("warnings.filters", "exact")}


def test_a_huge_key_is_capped_like_a_value(captured: Captured, clean_environ: None) -> None:
    def big() -> None:
        os.environ["K" * 5000] = "v"

    run_in_request(captured, big, path="/big-key")
    [report] = captured.mutations
    assert len(report["key"]) <= 203 and report["key"].endswith("...")

"""How writes are found: the end-of-request probe, and the snapshots compared with the state."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from helpers import run_client, run_in_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import instrument
from sentinel._mutation._detect import StateProbe, structural_copy
from sentinel.testing import Captured, serve

pytestmark = pytest.mark.usefixtures("restore_sys_path")  # the probe tests poke sys.path


def test_the_probe_finds_unwrapped_writes_with_suspects(captured: Captured) -> None:
    entry = "/nonexistent/sentinel-test-path"

    async def poke(request: Request) -> PlainTextResponse:
        sys.path.append(entry)  # no wrapper sees this
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/poke", poke)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/poke")
        httpx.get(f"{url}/poke")  # nothing new: no second report
    [report] = captured.mutations
    assert report["target"] == "sys.path"
    assert report["attribution"] == "suspects"
    assert report["suspects"] == ["GET /poke"]
    assert report["route"] == "/poke"
    assert report["new"] == repr([entry])


def test_probe_suspects_are_the_requests_in_flight(captured: Captured) -> None:
    started = threading.Event()
    entry = "/nonexistent/sentinel-test-inflight"

    async def slow(request: Request) -> PlainTextResponse:
        started.set()
        await asyncio.sleep(0.4)
        return PlainTextResponse("ok")

    async def poke(request: Request) -> PlainTextResponse:
        sys.path.insert(0, entry)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/slow", slow), Route("/poke", poke)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:

        async def both() -> None:
            async with httpx.AsyncClient(base_url=url) as client:
                slow_call = asyncio.ensure_future(client.get("/slow"))
                assert await asyncio.to_thread(started.wait, 5)
                await client.get("/poke")
                await slow_call

        run_client(both())
    [report] = captured.mutations
    assert report["suspects"] == ["GET /poke", "GET /slow"]
    assert report["route"] == "<several>"


def test_a_wrapped_write_does_not_hide_a_probe_finding(captured: Captured) -> None:
    """setLevel moves only the logging part of the probe's baseline on, not sys.path's."""
    entry = "/nonexistent/sentinel-test-both"

    async def both(request: Request) -> PlainTextResponse:
        sys.path.append(entry)
        logging.getLogger("sentinel.tests.both").setLevel(logging.INFO)
        return PlainTextResponse("ok")

    try:
        with serve(
            instrument(Starlette(routes=[Route("/both", both)]), sentinel=captured.sentinel)
        ) as url:
            httpx.get(f"{url}/both")
    finally:
        while entry in sys.path:
            sys.path.remove(entry)
        logging.getLogger("sentinel.tests.both").setLevel(logging.NOTSET)
    assert sorted(r["target"] for r in captured.mutations) == [
        "logging.Logger.setLevel",
        "sys.path",
    ]


def test_probe_findings_of_different_routes_are_reported_for_each(captured: Captured) -> None:
    added = ["/nonexistent/sentinel-test-a", "/nonexistent/sentinel-test-b"]

    async def poke(request: Request) -> PlainTextResponse:
        sys.path.append(added[int(request.path_params["n"])])
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/a/{n:int}", poke), Route("/b/{n:int}", poke)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/a/0")
        httpx.get(f"{url}/b/1")
    assert sorted(r["route"] for r in captured.mutations) == ["/a/{n:int}", "/b/{n:int}"]


def test_limit_changes_undone_within_a_request_are_not_seen(captured: Captured) -> None:
    """The probe compares at the end of a request: a poke reverted before it is invisible."""

    def flicker() -> None:
        sys.path.append("/nonexistent/sentinel-test-flicker")
        sys.path.pop()

    run_in_request(captured, flicker)
    assert captured.mutations == []


def test_limit_pokes_under_a_wrapper_are_not_seen(captured: Captured) -> None:
    """app.state._state[...] bypasses State's attribute writes and no probe compares it."""

    async def poke(request: Request) -> PlainTextResponse:
        request.app.state._state["backend"] = "replica"
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/p", poke)])
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        httpx.get(f"{url}/p")
    assert app.state.backend == "replica"
    assert captured.mutations == []


def test_structural_copy_sees_nested_changes() -> None:
    config: dict[str, Any] = {"db": {"hosts": ["a"]}, "n": 1}
    snapshot = structural_copy(config)
    assert snapshot == config
    config["db"]["hosts"].append("b")
    assert snapshot != config


def test_a_library_silencing_its_own_warning_is_not_a_write(captured: Captured) -> None:
    """OpenTelemetry's TracerProvider.get_tracer adds an "ignore" filter for its own module on
    every call, through a filterwarnings it imported before sentinel wrapped it: only the
    probe sees it, and it changes nothing the app sees, so it is not reported (in raise mode
    it failed 110 of FastAPI's own tests)."""
    from opentelemetry.sdk.trace import TracerProvider

    run_in_request(captured, lambda: TracerProvider().get_tracer("app"), path="/traced")
    assert captured.mutations == []


def _append_path() -> None:
    sys.path.append("/nonexistent/sentinel-probe")


def _replace_path_entry() -> None:
    sys.path[-1] = sys.path[-1] + "-replaced"


def _insert_filter() -> None:
    warnings.filters.insert(0, ("ignore", None, Warning, None, 0))


def _root_level() -> None:
    logging.root.level = logging.root.level + 1  # no setLevel: no wrapper sees it


def _root_handler() -> None:
    logging.root.handlers.append(logging.NullHandler())


def _manager_disable() -> None:
    logging.root.manager.disable = logging.CRITICAL


def _socket_timeout() -> None:
    socket.setdefaulttimeout(12.5)


def _replace_environ() -> None:
    os.environ = os._Environ(  # type: ignore[attr-defined]  # noqa: B003 (the write watched)
        os.environ._data,  # type: ignore[attr-defined]
        os.environ.encodekey,  # type: ignore[attr-defined]
        os.environ.decodekey,  # type: ignore[attr-defined]
        os.environ.encodevalue,  # type: ignore[attr-defined]
        os.environ.decodevalue,  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize(
    ("write", "target"),
    [
        (_append_path, "sys.path"),
        (_replace_path_entry, "sys.path"),
        (_insert_filter, "warnings.filters"),
        (_root_level, "logging.root"),
        (_root_handler, "logging.root"),
        (_manager_disable, "logging.root"),
        (_socket_timeout, "socket.defaulttimeout"),
        (_replace_environ, "os.environ"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_the_probe_sees_every_write_it_watches_and_nothing_else(
    write: Callable[[], None], target: str
) -> None:
    root, manager = logging.root, logging.root.manager
    saved = (
        list(sys.path),
        list(warnings.filters),
        root.level,
        list(root.handlers),
        manager.disable,
        socket.getdefaulttimeout(),
        os.environ,
    )
    probe = StateProbe()
    assert not probe.changed()
    try:
        write()
        assert probe.changed()
        assert [found[0] for found in probe.differences()] == [target]
        assert not probe.changed()  # the baseline moved on
    finally:
        sys.path[:] = saved[0]
        warnings.filters[:] = saved[1]
        root.level = saved[2]
        root.handlers[:] = saved[3]
        manager.disable = saved[4]
        socket.setdefaulttimeout(saved[5])
        os.environ = saved[6]  # noqa: B003 (the same object back)


@pytest.fixture
def restore_warnings_filters() -> Any:
    """The warnings filters as they were: the same list object, with the same entries."""
    saved, entries = warnings.filters, list(warnings.filters)
    yield
    warnings.filters = saved  # type: ignore[attr-defined]
    saved[:] = entries
    warnings._filters_mutated()  # type: ignore[attr-defined]


def test_the_warnings_filters_replaced_by_a_new_list_are_reported(
    captured: Captured, restore_warnings_filters: None
) -> None:
    """``warnings.filters = [...]`` in a handler, with no catch_warnings() block open: the
    process's filters are replaced for good. A new list object used to pass for
    catch_warnings() at work."""

    def replace() -> None:
        warnings.filters = [("error", None, Warning, None, 0), *warnings.filters]  # type: ignore[attr-defined]

    run_in_request(captured, replace, path="/replace")
    [report] = captured.mutations
    assert (report["target"], report["route"]) == ("warnings.filters", "/replace")


def test_catch_warnings_blocks_exiting_out_of_order_do_not_hide_later_writes(
    captured: Captured, restore_warnings_filters: None
) -> None:
    """Two requests' catch_warnings() blocks around an await, exiting out of order, leave
    another list object installed than the one the probe knew: a lasting simplefilter a
    later request makes is still reported (it was taken for a write inside a block)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    async def first(request: Request) -> PlainTextResponse:
        with warnings.catch_warnings():
            a_in.set()
            await asyncio.to_thread(b_in.wait, 5)
        a_out.set()
        return PlainTextResponse("ok")

    async def second(request: Request) -> PlainTextResponse:
        await asyncio.to_thread(a_in.wait, 5)
        with warnings.catch_warnings():
            b_in.set()
            await asyncio.to_thread(a_out.wait, 5)
        return PlainTextResponse("ok")

    async def later(request: Request) -> PlainTextResponse:
        warnings.simplefilter("error", RuntimeWarning)
        return PlainTextResponse("ok")

    routes = [Route("/first", first), Route("/second", second), Route("/later", later)]
    app = instrument(Starlette(routes=routes), sentinel=captured.sentinel)
    original = warnings.filters
    with serve(app) as url:

        async def both() -> None:
            async with httpx.AsyncClient(base_url=url) as client:
                await asyncio.gather(client.get("/first"), client.get("/second"))

        run_client(both())
        assert warnings.filters is not original  # the out-of-order exits' doing
        assert httpx.get(f"{url}/later").status_code == 200
    assert [(r["target"], r["key"], r["route"]) for r in captured.mutations] == [
        ("warnings.filters", "error", "/later")
    ]

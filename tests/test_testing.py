"""sentinel.testing: the helpers users rely on in their own tests, used as a user would."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import (
    Config,
    ConfigError,
    SentinelMiddleware,
    _runtime,
    capture,
    capture_exception,
    instrument,
    testing,
)
from sentinel.example.app import app
from sentinel.testing import AsyncClient, Client, Exchange, capture_reports, observe, serve
from sentinel.types import Receive, Scope, Send

HEADERS = {"location_header": "x-location", "request_id_header": "x-request-id"}
"""The trusted headers the tests' sentinels take the location and the request id from."""


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def fail(request: Request) -> PlainTextResponse:
    raise KeyError("missing")


def small_app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/fail", fail)])


@pytest.fixture
def restore_current() -> Iterator[None]:
    """The process's current sentinel as it was: tests that ``instrument`` an app the way an
    app module does install a sentinel of their own, closed afterwards."""
    previous = _runtime.current()
    yield
    installed = _runtime.current()
    if installed is not previous:
        _runtime.set_current(previous)
        if installed is not None:
            installed.close()


@pytest.fixture
def lc_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example app's /locale writes LC_ALL: the process's own value is put back."""
    monkeypatch.setenv("LC_ALL", "C")


def quiet_config(**changes: Any) -> dict[str, Any]:
    """instrument() arguments for an app's own sentinel that stays off stderr and port 9464."""
    return {
        "config": Config(metrics_port=0, **HEADERS).replace(**changes),
        "registry": CollectorRegistry(),
        "stream": io.StringIO(),
    }


# -- capture_reports and serve ------------------------------------------------------------------


def test_capture_reports_isolates_and_restores() -> None:
    """A fresh sentinel during the block, the previous one after it."""
    before = _runtime.current()
    with capture_reports(location="fra") as captured:
        assert _runtime.current() is captured.sentinel
        try:
            raise ValueError("captured")
        except ValueError as exc:
            assert capture_exception(exc) is True
        [report] = captured.handled_reports
        assert report["location"] == "fra"
        assert report["exception_type"] == "ValueError"
        assert (
            captured.metric(
                "sentinel_handled_exceptions_total",
                location="fra",
                route="<none>",
                exception_type="ValueError",
            )
            == 1
        )
        assert captured.metric("sentinel_handled_exceptions_total", location="nowhere") == 0
        assert captured.reports == []  # handled: no unhandled_exception
    assert _runtime.current() is before


def test_serve_runs_a_real_server_and_stops_it() -> None:
    """serve() yields a loopback URL that answers, and stops the server afterwards."""
    with (
        capture_reports() as captured,
        serve(instrument(small_app(), sentinel=captured.sentinel)) as url,
    ):
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url).text == "hello"
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError("the server still answers after serve() returned")


def test_capture_reports_with_a_span_exporter_keeps_traces_of_kept_requests() -> None:
    """capture_reports(span_exporter=...) gives tests the tail-sampled traces."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    with capture_reports(span_exporter=exporter) as captured:
        with serve(instrument(small_app(), sentinel=captured.sentinel)) as url:
            httpx.get(url)  # a new key: kept
        [record] = captured.events("request")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "GET /"]
    assert record["trace_id"] == format(span.context.trace_id, "032x")


# -- the clients --------------------------------------------------------------------------------


def test_client_in_process_sends_location_and_request_id(lc_all: None) -> None:
    """In-process against the example app: each request's location and request id are the
    ones sentinel records; requests that name no id get a generated one."""
    with capture_reports(**HEADERS) as captured:
        with Client(instrument(app, sentinel=captured.sentinel), location="fra") as client:
            assert client.get("/items/1", location="sin", request_id="r-1").json()["id"] == 1
            assert client.get("/items/2").status_code == 200  # the client's own location
            assert client.get("/boom", location="iad").status_code == 500  # as a server
        records = {r["request_id"]: r for r in captured.request_records}
        generated = [e.request_id for e in client.exchanges[1:]]
        assert all(rid and rid.startswith("test-") for rid in generated)
        assert len(set(generated)) == 2
        assert records["r-1"]["location"] == "sin"
        assert records[generated[0]]["location"] == "fra"
        assert records[generated[1]]["status"] == 500
        [report] = captured.reports
        assert (report["location"], report["request_id"]) == ("iad", generated[1])
        assert captured.exchanges == client.exchanges
        assert client.exchanges[0] == Exchange("GET", "/items/1", "sin", "r-1", 200)
        captured.assert_all_5xx_kept()


def test_client_over_a_served_url_takes_the_current_sentinels_headers() -> None:
    """Against a URL from serve(): the headers are those of the current sentinel (the one
    capture_reports installed), and the responses count for the capture."""
    with capture_reports(**HEADERS) as captured:
        with (
            serve(instrument(small_app(), sentinel=captured.sentinel)) as url,
            Client(url) as client,
        ):
            assert client.get("/", location="sin", request_id="r-url").text == "hello"
            assert client.get("/fail", location="sin").status_code == 500
        [ok, failed] = client.exchanges
        records = {r["request_id"]: r for r in captured.request_records}
        assert records["r-url"]["location"] == "sin"
        assert records[failed.request_id]["status"] == 500
        assert captured.exchanges == [ok, failed]
        captured.assert_all_5xx_kept()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_async_client_in_process_and_over_a_url(anyio_backend: str, lc_all: None) -> None:
    """AsyncClient, in-process on the test's own loop and against a served URL, under asyncio
    and trio: locations and ids reach the records, and the mutation is named with its
    location."""
    with capture_reports(**HEADERS) as captured:
        wrapped = instrument(app, sentinel=captured.sentinel)
        async with AsyncClient(wrapped, location="sin") as client:
            assert (await client.get("/items/7", request_id="a-1")).status_code == 200
            await client.get("/locale", params={"lang": "tr_TR"})
        with serve(wrapped) as url:
            async with AsyncClient(url) as remote:
                response = await remote.get("/items/8", location="gru", request_id="a-2")
                assert response.json()["id"] == 8
        records = {r["request_id"]: r for r in captured.request_records}
        assert (records["a-1"]["location"], records["a-2"]["location"]) == ("sin", "gru")
        [mutation] = captured.mutations
        assert (mutation["key"], mutation["location"]) == ("LC_ALL", "sin")
        assert len(captured.exchanges) == 3


def test_client_refuses_a_location_nobody_reads() -> None:
    """A location (or request id) the sentinel takes from no header would be silently lost:
    the client says so, and sends it when told the header."""
    with capture_reports() as captured:
        wrapped = instrument(small_app(), sentinel=captured.sentinel)
        with Client(wrapped) as client:
            with pytest.raises(ValueError, match=r"location 'sin': the app's sentinel takes no"):
                client.get("/", location="sin")
            with pytest.raises(ValueError, match=r"request id 'r-1': the app's sentinel takes"):
                client.get("/", request_id="r-1")
            assert client.get("/").status_code == 200
            assert client.exchanges[0].request_id is None  # nothing to send it in
        with Client(small_app()) as plain, pytest.raises(ValueError, match=r"\(no sentinel\)"):
            plain.get("/", location="sin")
        with Client(wrapped, location_header="x-location") as told:
            assert told.get("/", location="sin").request.headers["x-location"] == "sin"
        with Client(wrapped, **HEADERS) as client, pytest.raises(ValueError, match="'a b'"):
            client.get("/", request_id="a b")


def test_client_bounds_an_app_that_never_answers() -> None:
    """An in-process request is bounded by the client's timeout, as over a socket."""

    async def stuck(request: Request) -> PlainTextResponse:
        await anyio.sleep(60)
        return PlainTextResponse("late")

    with capture_reports() as captured:
        wrapped = instrument(Starlette(routes=[Route("/", stuck)]), sentinel=captured.sentinel)
        with Client(wrapped, timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
            client.get("/")


def lifespan_app(events: list[str]) -> Starlette:
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        yield {"greeting": "hello from the lifespan"}
        events.append("shutdown")

    async def greet(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.greeting)

    return Starlette(routes=[Route("/", greet)], lifespan=lifespan)


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sentinel-testing-client"]


def test_client_runs_the_apps_lifespan() -> None:
    """``with Client(app)`` starts the app's lifespan and ends it, its state reaching the
    requests; an app without a lifespan is served all the same. The client's thread ends
    with the block."""
    before = client_threads()
    events: list[str] = []
    with capture_reports() as captured:
        wrapped = instrument(lifespan_app(events), sentinel=captured.sentinel)
        with Client(wrapped) as client:
            assert events == ["startup"]
            assert client.get("/").text == "hello from the lifespan"
        assert events == ["startup", "shutdown"]

        async def no_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                await PlainTextResponse("plain")(scope, receive, send)

        with Client(instrument(no_lifespan, sentinel=captured.sentinel)) as client:
            assert client.get("/").text == "plain"
        captured.assert_no_unhandled_exceptions()
    assert client_threads() == before
    with pytest.raises(RuntimeError, match="the client is closed"):
        client.get("/")


@pytest.mark.anyio
async def test_async_client_runs_the_apps_lifespan() -> None:
    """``async with AsyncClient(app)`` does the same on the caller's loop."""
    events: list[str] = []
    with capture_reports() as captured:
        wrapped = instrument(lifespan_app(events), sentinel=captured.sentinel)
        async with AsyncClient(wrapped) as client:
            assert (await client.get("/")).text == "hello from the lifespan"
        assert events == ["startup", "shutdown"]
        captured.assert_no_unhandled_exceptions()


def test_clients_say_how_to_install_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without httpx (the ``testing`` extra), the clients name what to install."""
    monkeypatch.setitem(sys.modules, "httpx", None)
    for client_class in (Client, AsyncClient):
        with pytest.raises(ImportError, match=r"pip install 'sentinel-asgi\[testing\]'"):
            client_class(small_app())


# -- observe: the sentinel an app was wrapped with ---------------------------------------------


def test_observe_captures_from_the_sentinel_the_app_was_wrapped_with(
    restore_current: None, lc_all: None
) -> None:
    """An app instrumented as an app module does it: observe(app) captures that sentinel's
    records from the block only, in-process and over a served URL."""
    wrapped = instrument(app, **quiet_config())
    with Client(wrapped) as client:
        client.get("/boom", location="fra")  # before the block: not in the capture
        with observe(wrapped) as seen:
            client.get("/locale", params={"lang": "tr_TR"}, location="sin")
            with serve(wrapped) as url, Client(url) as remote:
                remote.get("/export", location="gru", request_id="r-export")
    assert seen.sentinel is wrapped.sentinel
    assert [m["route"] for m in seen.mutations] == ["/locale"]
    [report] = seen.reports
    assert (report["route"], report["location"]) == ("/export", "gru")
    assert {r["route"] for r in seen.request_records} == {"/locale", "/export"}
    assert [e.path for e in seen.exchanges] == ["/locale?lang=tr_TR", "/export"]
    assert '"route":"/export"' in seen.stream.getvalue()
    seen.assert_all_5xx_kept()


def test_observe_builds_an_add_middleware_stack(restore_current: None) -> None:
    """Starlette's add_middleware builds the layer on the first call: observe() builds it
    then, and a Sentinel may be given directly."""
    starlette_app = small_app()
    starlette_app.add_middleware(SentinelMiddleware, **quiet_config())
    with observe(starlette_app) as seen, Client(starlette_app) as client:
        client.get("/fail", location="sin", request_id="r-fail")
    [report] = seen.reports
    assert (report["request_id"], report["location"]) == ("r-fail", "sin")
    with observe(seen.sentinel) as again, Client(starlette_app) as client:
        client.get("/", location="fra")
    assert [r["location"] for r in again.request_records] == ["fra"]


def test_observe_refuses_an_app_without_sentinel() -> None:
    """Never an empty capture: an app nobody wrapped is named in the error."""
    plain = small_app()
    with pytest.raises(ValueError, match="not wrapped with sentinel") as refused, observe(plain):
        pass
    assert repr(plain) in str(refused.value)
    url = "http://127.0.0.1:1"
    with pytest.raises(TypeError, match=re.escape(f"not a URL: {url!r}")), observe(url):
        pass


# -- the assertions -----------------------------------------------------------------------------


def test_assertions_pass_on_healthy_traffic(lc_all: None) -> None:
    """No exception, no mutation, every 5xx kept: nothing to report."""
    with capture_reports(**HEADERS) as captured:
        with Client(instrument(app, sentinel=captured.sentinel)) as client:
            for location in ("fra", "sin", "iad"):
                client.get("/", location=location)
                client.get("/items/1", location=location)
                client.get("/handled", location=location, params={"x": "1"})
        assert [e.status for e in captured.exchanges].count(503) == 3
        captured.assert_no_global_mutation()
        captured.assert_all_5xx_kept()
        with pytest.raises(AssertionError, match="BackendUnavailable"):
            captured.assert_no_unhandled_exceptions()  # /handled logs its error: a report


def test_assert_no_unhandled_exceptions_shows_each_report() -> None:
    with capture_reports(**HEADERS) as captured:
        with Client(instrument(app, sentinel=captured.sentinel)) as client:
            client.get("/", location="fra")
            captured.assert_no_unhandled_exceptions()
            client.get("/boom", location="sin", request_id="r-boom")
            client.get("/reports/daily", location="fra", request_id="r-quota")
        with pytest.raises(AssertionError) as failed:
            captured.assert_no_unhandled_exceptions()
    message = str(failed.value)
    assert "unhandled exceptions (2)" in message
    assert "BackendUnavailable: backend 'primary' did not answer" in message
    assert "GET /boom, request id r-boom, phase request, location sin" in message
    assert "QuotaStoreUnavailable" in message
    assert "location fra" in message
    assert "example/app.py:" in message and "in ReportQuota.__call__" in message


def test_assert_no_global_mutation_names_the_write(lc_all: None) -> None:
    with capture_reports(**HEADERS) as captured:
        with Client(instrument(app, sentinel=captured.sentinel)) as client:
            client.get("/items/1", location="fra")
            captured.assert_no_global_mutation()
            client.get("/locale", params={"lang": "tr_TR"}, location="sin", request_id="r-lc")
        with pytest.raises(AssertionError) as failed:
            captured.assert_no_global_mutation()
        with pytest.raises(AssertionError):
            captured.assert_no_mutations()  # the older name
    message = str(failed.value)
    assert "os.environ 'LC_ALL' by GET /locale at " in message
    assert "example/app.py:" in message and "in locale (exact" in message
    assert "location sin, request id r-lc; 'C' -> 'tr_TR'" in message


def test_assert_all_5xx_kept_lists_what_was_lost_and_what_was_kept() -> None:
    """A 5xx whose record the sampling hook dropped is shown, beside the records kept."""

    def drop_lost(fields: dict[str, Any]) -> bool | None:
        return False if fields["request_id"] == "r-lost" else None

    with capture_reports(**HEADERS) as captured:
        wrapped = instrument(small_app(), sentinel=captured.sentinel, sampling_hook=drop_lost)
        with Client(wrapped, location="sin") as client:
            client.get("/fail", request_id="r-kept")
            client.get("/fail", request_id="r-lost")
        with pytest.raises(AssertionError) as failed:
            captured.assert_all_5xx_kept()
    message = str(failed.value)
    assert "1 of 2 5xx responses have no kept request record" in message
    assert "GET /fail -> 500 (location sin, request id r-lost)" in message
    assert "kept request records (1):\n- GET /fail -> 500 (location sin, request id r-kept" in (
        message
    )


def test_assert_all_5xx_kept_needs_responses_and_request_ids() -> None:
    """It fails rather than pass on nothing: no responses seen, or none that can be matched."""
    with capture_reports() as captured:
        with pytest.raises(AssertionError, match="saw no responses"):
            captured.assert_all_5xx_kept()
        with Client(instrument(small_app(), sentinel=captured.sentinel)) as client:
            client.get("/fail")
        with pytest.raises(AssertionError, match="sent without a request id") as failed:
            captured.assert_all_5xx_kept()
    assert "request_id_header (SENTINEL_REQUEST_ID_HEADER)" in str(failed.value)


# -- the README's example -------------------------------------------------------------------------

# The README's example, verbatim (imports at the top of this file): the example app's /locale
# has the seed's bug, so the test fails, naming the write and the location it came from.


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="the example app has the bug")
def test_a_request_cannot_set_the_locale_for_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LC_ALL", "C")  # the process's own value, put back after the test
    with testing.capture_reports(location_header="x-location") as captured:
        client = testing.Client(instrument(app, sentinel=captured.sentinel))
        client.get("/locale", params={"lang": "tr_TR"}, location="sin")
    captured.assert_no_global_mutation()


def test_the_readme_example_catches_the_frozen_location(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the README's example shows when it fails: the frozen locale, where it came from."""
    with pytest.raises(AssertionError) as failed:
        test_a_request_cannot_set_the_locale_for_everyone(monkeypatch)
    message = str(failed.value)
    assert "os.environ 'LC_ALL' by GET /locale" in message
    assert "location sin" in message and "'C' -> 'tr_TR'" in message


def test_clients_send_each_request_for_a_tenant() -> None:
    """tenant= on the client or per request goes in the sentinel's tenant header; without
    a tenant header configured, the client says what to configure."""
    import anyio

    with capture_reports(tenant_header="x-tenant") as captured:
        wrapped = instrument(small_app(), sentinel=captured.sentinel)
        with Client(wrapped, tenant="acme") as client:
            client.get("/")
            client.get("/", tenant="globex")

        async def send_async() -> None:
            async with AsyncClient(wrapped) as client:
                await client.get("/", tenant="initech")

        anyio.run(send_async)
        registry = captured.sentinel.registry
        for tenant in ("acme", "globex", "initech"):
            value = registry.get_sample_value(
                "sentinel_tenant_requests_total", {"tenant": tenant, "status_class": "2xx"}
            )
            assert value == 1, tenant
    with capture_reports() as captured:
        plain = instrument(small_app(), sentinel=captured.sentinel)
        with Client(plain) as client, pytest.raises(ValueError, match="takes no tenant header"):
            client.get("/", tenant="acme")


# -- what an app installs inside a capture, and what a capture cannot see -------------------------


def test_an_app_wrapped_in_the_block_reports_to_the_capture() -> None:
    """instrument(app) without sentinel= inside capture_reports() wraps the app with the
    capture's sentinel (never replacing and closing it): the app's exception is captured
    and the assertion fails."""
    with capture_reports() as captured:
        wrapped = instrument(small_app())
        assert wrapped.sentinel is captured.sentinel
        with Client(wrapped) as client:
            assert client.get("/fail").status_code == 500
        assert _runtime.current() is captured.sentinel and not captured.sentinel.closed
        with pytest.raises(AssertionError, match="KeyError: 'missing'"):
            captured.assert_no_unhandled_exceptions()


def test_an_add_middleware_app_reports_to_each_tests_capture(
    restore_current: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that added SentinelMiddleware at import reports to the capture of each test
    that sends it traffic with the testing clients, in any order: its stack built in an
    earlier capture (whose sentinel closed) or outside any capture is built again."""
    monkeypatch.setenv("SENTINEL_METRICS_PORT", "0")
    module_app = small_app()
    module_app.add_middleware(SentinelMiddleware)
    with Client(module_app) as client:  # outside any capture: the app's own sentinel
        assert client.get("/").status_code == 200
    for location in ("fra", "sin"):
        with capture_reports(location=location) as captured:
            with Client(module_app) as client:
                assert client.get("/fail").status_code == 500
            [report] = captured.reports
            assert report["location"] == location
            with pytest.raises(AssertionError, match="KeyError"):
                captured.assert_no_unhandled_exceptions()


def test_an_apps_own_settings_must_be_the_captures() -> None:
    """Settings an app gives that the capture does not have are refused, naming them (an
    add_middleware app fails its lifespan startup, as under a server): never dropped. Given
    to the capture too, the app is served; where it serves metrics is left out."""
    module_app = small_app()
    module_app.add_middleware(SentinelMiddleware, location="fra", metrics_port=9100)
    with capture_reports() as captured:
        with pytest.raises(ConfigError, match=r"\"location\" 'fra' \(the capture's: 'unknown'\)"):
            instrument(small_app(), location="fra")
        with (
            pytest.raises(RuntimeError, match=re.escape("capture_reports(location=...)")),
            Client(module_app),
        ):
            pass
        assert captured.reports == []
    with capture_reports(location="fra") as captured:
        with Client(module_app) as client:
            client.get("/fail")
        assert [r["location"] for r in captured.reports] == ["fra"]


def test_traffic_the_capture_cannot_see_fails_it(restore_current: None) -> None:
    """Responses from an app wrapped with a sentinel of its own before the block, or not
    wrapped, never let a capture pass on nothing: its assertions fail, and so does the
    block, saying what to do. Observed with observe(), the same app is seen."""
    wrapped = instrument(small_app(), **quiet_config())
    with pytest.raises(AssertionError) as at_exit, capture_reports() as captured:
        with Client(wrapped) as client:
            assert client.get("/fail").status_code == 500
        with pytest.raises(AssertionError) as failed:
            captured.assert_no_unhandled_exceptions()
        with pytest.raises(AssertionError):
            captured.assert_no_global_mutation()
        assert captured.reports == []  # what the block's end catches
    message = str(failed.value)
    assert "1 responses the testing clients got during this capture" in message
    assert "a sentinel of its own, installed before the block" in message
    assert "GET /fail -> 500" in message and "sentinel.testing.observe(app)" in message
    assert str(at_exit.value) == message
    with (
        pytest.raises(AssertionError, match="not wrapped with sentinel"),
        capture_reports(),
        Client(small_app()) as client,
    ):
        client.get("/fail")
    with capture_reports() as captured, observe(wrapped) as seen, Client(wrapped) as client:
        client.get("/fail")
    assert len(seen.reports) == 1


def starlette_test_client(target: Any) -> Any:
    """Starlette's own TestClient (which warns, on recent versions, that httpx2 should
    replace httpx), raising no server exception: a 500 is a response."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    return TestClient(target, raise_server_exceptions=False)


def test_a_stack_an_earlier_capture_built_fails_a_capture_it_serves_unseen(
    restore_current: None,
) -> None:
    """A module-level app that added SentinelMiddleware keeps the stack the first test's
    capture built: traffic sent to it in a later test by Starlette's TestClient (which does
    not have it built again) reports to that closed sentinel. The later capture fails,
    listing what that sentinel wrote, rather than pass with no reports and no requests."""
    module_app = small_app()
    module_app.add_middleware(SentinelMiddleware)
    with capture_reports() as first:
        with starlette_test_client(module_app) as client:
            assert client.get("/fail").status_code == 500
        assert len(first.reports) == 1
    with pytest.raises(AssertionError) as at_exit, capture_reports() as captured:
        assert starlette_test_client(module_app).get("/fail").status_code == 500
        assert captured.reports == []  # what the block's end catches
    message = str(at_exit.value)
    assert "written by a sentinel it cannot see" in message
    assert "an earlier capture_reports() block" in message
    assert "unhandled_exception: KeyError: 'missing'" in message
    assert "app.middleware_stack = None" in message
    assert len(first.reports) == 2  # where it went


@pytest.mark.anyio
async def test_an_app_wrapped_before_the_block_fails_it_whatever_sends_the_traffic(
    restore_current: None,
) -> None:
    """Requests sent with plain httpx (or Starlette's TestClient) to an app wrapped with a
    sentinel of its own before the block are unseen by the capture: its assertions and its
    end fail, listing the records that sentinel wrote."""
    wrapped = instrument(small_app(), **quiet_config())
    transport = httpx.ASGITransport(app=wrapped, raise_app_exceptions=False)
    with pytest.raises(AssertionError) as at_exit, capture_reports() as captured:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/fail")).status_code == 500
        with pytest.raises(AssertionError) as failed:
            captured.assert_no_unhandled_exceptions()
    for message in (str(failed.value), str(at_exit.value)):
        assert "the sentinel current when the block began" in message
        assert "unhandled_exception: KeyError: 'missing'" in message
        assert "sentinel.testing.observe(app)" in message
    with capture_reports() as captured:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            pass  # no request, nothing unseen
    with capture_reports() as captured:
        assert starlette_test_client(instrument(small_app())).get("/fail").status_code == 500
        [report] = captured.reports  # wrapped in the block: the capture's
        assert report["exception_type"] == "KeyError"


def test_starlettes_testclient_with_its_lifespan_reports_to_each_tests_capture(
    restore_current: None,
) -> None:
    """``with TestClient(app)`` runs the lifespan first: an add_middleware stack built with
    an earlier capture's sentinel is built again then, so the requests report to this
    capture (needs the middleware's lifespan check)."""
    module_app = small_app()
    module_app.add_middleware(SentinelMiddleware)
    for location in ("fra", "sin"):
        with capture_reports(location=location) as captured:
            with starlette_test_client(module_app) as client:
                assert client.get("/fail").status_code == 500
            assert [r["location"] for r in captured.reports] == [location]


# -- Captured.metric ------------------------------------------------------------------------------


def test_metric_sums_the_samples_with_the_labels_given_and_refuses_typos() -> None:
    """metric() with some labels sums the samples that have them; a metric or label name
    that does not exist is an error naming the close ones, so a typo never reads as 0."""
    with capture_reports(location="fra") as captured:
        wrapped = instrument(small_app(), sentinel=captured.sentinel)
        with Client(wrapped) as client:
            client.get("/")
            client.get("/")
            client.get("/fail")
        total = "sentinel_http_requests_total"
        assert captured.metric(total, location="fra", route="/", method="GET", code="200") == 2
        assert captured.metric(total, route="/") == 2
        assert captured.metric(total, location="fra") == 3
        assert captured.metric(total) == 3
        assert captured.metric(total, route="/nowhere") == 0
        count = "sentinel_http_request_duration_seconds_count"
        assert captured.metric(count, route="/fail") == 1
        unhandled = "sentinel_unhandled_exceptions_total"
        assert captured.metric(unhandled, exception_type="KeyError") == 1
        with pytest.raises(ValueError, match="no metric 'sentinel_http_request_total'; did you"):
            captured.metric("sentinel_http_request_total", route="/")
        with pytest.raises(ValueError, match="has no label rout; its labels are code, location"):
            captured.metric(total, rout="/")
        handled = "sentinel_handled_exceptions_total"  # no sample yet: the family says
        with pytest.raises(ValueError, match="has no label phase"):
            captured.metric(handled, phase="request")
        assert captured.metric(handled, location="fra") == 0
        with pytest.raises(TypeError, match="write code='200'"):
            captured.metric(total, code=200)  # type: ignore[arg-type]


# -- leaving the process as it was ----------------------------------------------------------------


def process_state() -> dict[str, Any]:
    """What a capture could leave behind in the process."""
    import logging
    import os

    return {
        "excepthook": sys.excepthook,
        "threading_excepthook": threading.excepthook,
        "unraisablehook": sys.unraisablehook,
        "environ": type(os.environ),
        "putenv": os.putenv,
        "set_level": logging.Logger.setLevel,
        "filters": {
            name: list(logging.getLogger(name).filters)
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
        "current": _runtime.current(),
    }


def sentinel_threads() -> set[threading.Thread]:
    """The threads a sentinel runs (the testing clients' end with them, or when dropped)."""
    names = ("sentinel-writer", "sentinel-metrics", "sentinel-loop-lag")
    return {thread for thread in threading.enumerate() if thread.name in names}


def test_capture_reports_leaves_the_process_as_it_found_it() -> None:
    """After the block: the hooks, watches and log filters it installed are removed, its
    threads have ended, and tags set outside a request in it are forgotten, so the next
    test's reports do not carry them. Hooks installed before the block stay."""
    _runtime.uninstall_process_wide()
    before, threads_before = process_state(), sentinel_threads()
    with capture_reports() as captured:
        sentinel_module = importlib.import_module("sentinel")
        sentinel_module.set_tag("test_name", "a")
        with Client(instrument(small_app(), sentinel=captured.sentinel)) as client:
            client.get("/fail")
        assert captured.reports[0]["tags"] == {"test_name": "a"}
        assert process_state()["excepthook"] is not before["excepthook"]
    after = process_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert sentinel_threads() <= threads_before
    with capture_reports() as captured:
        with Client(instrument(small_app(), sentinel=captured.sentinel)) as client:
            client.get("/fail")
        [report] = captured.reports
        assert "tags" not in report
    _runtime.install_process_wide()
    installed = process_state()
    with capture_reports():
        pass
    assert process_state() == installed


def test_observe_forgets_tags_set_in_its_block_and_refuses_a_closed_sentinel(
    restore_current: None,
) -> None:
    """observe() puts the process's tags back as they were; a sentinel that was closed (a
    capture's that ended) is refused, never an empty capture."""
    wrapped = instrument(small_app(), **quiet_config())
    sentinel_module = importlib.import_module("sentinel")
    with observe(wrapped):
        sentinel_module.set_tag("test_name", "b")
    with observe(wrapped) as seen, Client(wrapped) as client:
        client.get("/fail")
    assert "tags" not in seen.reports[0]
    with capture_reports() as captured:
        pass
    with pytest.raises(ValueError, match="not closed"), observe(captured.sentinel):
        pass


def test_observe_does_not_blame_its_requests_for_what_the_test_changed_before(
    restore_current: None, restore_sys_path: None
) -> None:
    """A fixture's change to process-global state before the block (sys.path, as
    monkeypatch.syspath_prepend does), and its undoing before the next test's block, are
    the baseline observe() compares the block's requests with, not their doing."""
    wrapped = instrument(small_app(), **quiet_config())
    with Client(wrapped) as client:
        client.get("/")  # the app has served: its startup's baseline is taken
        sys.path.insert(0, "/tmp/sentinel-test-plugin-dir")
        with observe(wrapped) as seen:
            client.get("/")
        seen.assert_no_global_mutation()
        sys.path.remove("/tmp/sentinel-test-plugin-dir")
        with observe(wrapped) as seen:
            client.get("/")
        seen.assert_no_global_mutation()
        with observe(wrapped) as seen:
            client.get("/", params={"lang": "x"})
            sys.path.append("/tmp/sentinel-test-during-the-block")  # the block's own: seen
            client.get("/")
        assert [m["key"] for m in seen.mutations] == ["added"]


# -- waiting in async tests -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_tests_wait_for_reports_without_blocking_their_loop(
    anyio_backend: str,
) -> None:
    """In an async test the report may come from the test's own event loop: wait_for_async()
    and flush_async() let it run (asyncio and trio). The sync ones, which would block it
    and return nothing, refuse and name the async ones."""

    @capture(name="later")
    async def later() -> None:
        await anyio.sleep(0.05)
        raise KeyError("later")

    async def fail_later() -> None:
        with contextlib.suppress(KeyError):
            await later()

    with capture_reports() as captured:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(fail_later)
            with pytest.raises(RuntimeError, match=re.escape("await captured.wait_for_async(")):
                captured.wait_for(1)
            found = await captured.wait_for_async(1, timeout=5)
        assert [r["route"] for r in found] == ["later"]
        assert await captured.wait_for_async(2, timeout=0.1) == found  # what there is
        assert captured.wait_for(1) == found  # already there: nothing to wait for

        release = anyio.Event()

        async def slow(request: Request) -> PlainTextResponse:
            await release.wait()
            return PlainTextResponse("late")

        slow_app = instrument(Starlette(routes=[Route("/slow", slow)]))
        async with AsyncClient(slow_app) as client, anyio.create_task_group() as tasks:
            tasks.start_soon(client.get, "/slow")
            while captured.sentinel.in_flight == 0:  # noqa: ASYNC110 (a count, no event)
                await anyio.sleep(0.005)
            with pytest.raises(RuntimeError, match=re.escape("await captured.flush_async()")):
                captured.flush()
            release.set()
            await captured.flush_async()
            assert captured.sentinel.in_flight == 0
        assert [r["route"] for r in captured.request_records] == ["/slow"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_unawaited_tasks_failure_is_awaited_in_an_async_test(anyio_backend: str) -> None:
    """An endpoint's fire-and-forget asyncio task fails after the response: the report
    comes task_grace_seconds later, from the test's own loop, which wait_for_async() lets
    run."""

    async def later() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("background task failed")

    async def fire(request: Request) -> PlainTextResponse:
        tasks.append(asyncio.get_running_loop().create_task(later()))
        return PlainTextResponse("accepted")

    tasks: list[asyncio.Task[None]] = []
    with capture_reports(task_grace_seconds=0.05) as captured:
        async with AsyncClient(instrument(Starlette(routes=[Route("/fire", fire)]))) as client:
            assert (await client.get("/fire")).text == "accepted"
            [report] = await captured.wait_for_async(1, timeout=5)
        assert (report["phase"], report["message"]) == ("task", "background task failed")


# -- the metrics endpoint -------------------------------------------------------------------------


def scraped_locations(port: int) -> set[str] | None:
    """The locations of sentinel_http_requests_total on the endpoint at ``port``; None when
    nothing answers there."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return None
    return {
        line.split('location="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("sentinel_http_requests_total{")
    }


def test_capture_reports_serves_its_registry_on_the_metrics_port_given(
    restore_current: None,
) -> None:
    """capture_reports(metrics_port=...) serves the block's registry there, and only during
    the block; an endpoint that served before is served again afterwards."""
    from helpers import free_port

    outer_port = free_port()
    instrument(
        small_app(),
        Config(metrics_port=outer_port, metrics_host="127.0.0.1", location="gru"),
        stream=io.StringIO(),
        registry=CollectorRegistry(),
    )
    assert scraped_locations(outer_port) == set()
    for location in ("fra", "iad"):
        port = free_port()
        with capture_reports(
            metrics_port=port, metrics_host="127.0.0.1", location=location
        ) as captured:
            with Client(instrument(small_app(), sentinel=captured.sentinel)) as client:
                client.get("/")
            captured.flush()
            assert scraped_locations(port) == {location}
        assert scraped_locations(port) is None
        assert scraped_locations(outer_port) == set()


def test_capture_reports_serves_no_port_for_a_config_that_names_none() -> None:
    """A Config given to capture_reports() whose metrics_port is the default serves no
    endpoint (a Config cannot tell 9464 given from its default): the metrics_port keyword
    serves one. A config that is no Config is refused, showing it."""
    from helpers import free_port

    before = _runtime.metrics_endpoint()
    with capture_reports(config=Config(location="fra")) as captured:
        assert captured.sentinel.config.metrics_port == 0
        assert captured.sentinel.config.location == "fra"
        assert _runtime.metrics_endpoint() == before
    port = free_port()
    with capture_reports(
        config=Config(location="fra", metrics_host="127.0.0.1"), metrics_port=port
    ):
        assert scraped_locations(port) == set()
    with (
        pytest.raises(TypeError, match=r"\"config\" must be a sentinel.Config: \{'location'"),
        capture_reports(config={"location": "fra"}),  # type: ignore[arg-type]
    ):
        pass


def test_failure_messages_quote_no_secret_of_the_query() -> None:
    """The assertions' failure messages list the responses the clients got: with the query
    as sent, its secrets were in the test's output. The query is scrubbed as a log line's
    is (by key and by value), the harmless parameters kept."""

    async def reset(request: Request) -> PlainTextResponse:
        return PlainTextResponse("down", status_code=503)

    routes = [Route("/reset/{user}", reset)]
    with capture_reports() as captured:
        client = Client(instrument(Starlette(routes=routes), sentinel=captured.sentinel))
        client.get("/reset/alice?password=hunter2-query-q7&page=2")
        captured.flush()
        with pytest.raises(AssertionError) as lost:
            captured.assert_all_5xx_kept()  # no request id to match it by
    assert "hunter2" not in str(lost.value)
    assert "GET /reset/alice?password=[scrubbed len=" in str(lost.value)
    assert "&page=2 -> 503" in str(lost.value)

    outside = instrument(Starlette(routes=routes))  # wrapped before the block: unseen
    with pytest.raises(AssertionError) as unseen, capture_reports():
        Client(outside).get("/reset/bob?api_key=hunter2-unseen-q7")
    assert "hunter2" not in str(unseen.value)
    assert "GET /reset/bob?api_key=[scrubbed len=" in str(unseen.value)


def test_a_write_found_by_comparison_is_named_without_unknown_fields(
    restore_sys_path: None,
) -> None:
    """A write the end-of-request comparison finds has no code line, and a suspect rather
    than a request id: the failure leaves out what is unknown instead of printing None."""

    async def extend_path(request: Request) -> PlainTextResponse:
        sys.path.append("/tmp/sentinel-test-written-by-a-request")
        return PlainTextResponse("done")

    with capture_reports() as captured:
        client = Client(instrument(Starlette(routes=[Route("/extend", extend_path)])))
        client.get("/extend")
        with pytest.raises(AssertionError) as failed:
            captured.assert_no_global_mutation()
    message = str(failed.value)
    assert "sys.path 'added'" in message and "suspects ['GET /extend']" in message
    assert "None" not in message


def test_events_refuse_an_event_sentinel_never_writes() -> None:
    """events() and wait_for() name the closest events for a misspelt one: a typo never
    reads as "no such records" (nor waits out its timeout)."""
    with capture_reports() as captured:
        with pytest.raises(ValueError, match="did you mean unhandled_exception"):
            captured.events("unhandled_exceptions")
        with pytest.raises(ValueError, match="did you mean unhandled_exception"):
            captured.wait_for(1, event="unhandled_exceptions", timeout=5)
        with pytest.raises(TypeError, match="event name: 5"):
            captured.events(5)  # type: ignore[arg-type]
        assert captured.events("spans_dropped") == []


def test_the_known_events_are_every_event_sentinel_writes() -> None:
    """Each event name sentinel's code writes a record with is one events() knows."""
    from pathlib import Path

    import sentinel

    package = Path(sentinel.__file__).parent
    # emit(level, "event", ...), write(level, "event", ...) and ("level", "event", fields)
    # tuples; read as text (ast.parse can fail spuriously on Python 3.11.7 with threads).
    written_as = re.compile(
        r'(?:\.(?:emit|write)\(\s*[\w."]+|\(\s*"(?:debug|info|warning|error|critical)"),'
        r'\s*"([a-z_]+)"'
    )
    written = {"unhandled_exception", "handled_exception"}  # the reporter's, by constant
    for path in package.rglob("*.py"):
        if path.parent.name in ("gate", "mixin") or path.name in ("testing.py", "_demo.py"):
            continue
        written.update(written_as.findall(path.read_text(encoding="utf-8")))
    assert written == set(testing._EVENTS)


def test_clients_and_serve_refuse_invalid_arguments_showing_them() -> None:
    """A timeout that is not a positive, finite number of seconds, and an app serve() cannot
    run, are refused up front with the value, not as a TypeError from deep inside."""
    with pytest.raises(TypeError, match=r"\"timeout\" must be a positive number of seconds: '5'"):
        Client(small_app(), timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seconds: inf"):
        AsyncClient(small_app(), timeout=float("inf"))
    with pytest.raises(TypeError, match=r"\"app\" must be an ASGI app .*: 42$"), serve(42):
        pass


def test_a_captures_sentinel_is_freed_after_its_block() -> None:
    """A suite runs one capture per test: each block's sentinel (its registry, records and
    reports) is freed once the block and its app are gone, not kept for the process's
    life."""
    import gc
    import weakref

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    gone = []
    for _ in range(3):
        with capture_reports() as captured:
            with Client(instrument(Starlette(routes=[Route("/", hello)]))) as client:
                assert client.get("/").status_code == 200
            gone.append(weakref.ref(captured.sentinel))
        del captured, client
    # Freed once its threads have ended (a writer or timer thread of the last block may
    # still be finishing on a loaded machine).
    deadline = time.monotonic() + 10
    while gc.collect() >= 0 and any(ref() is not None for ref in gone):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [ref() for ref in gone] == [None, None, None]

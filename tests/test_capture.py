"""``@sentinel.capture`` and ``sentinel.capture_exception``: jobs, consumers, handled errors."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import types
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import sentinel
from sentinel.testing import Captured, capture_reports, serve

PHASES = {"request", "response", "lifespan", "background", "task", "thread", "process", "import"}
EXC_TOTAL = "sentinel_unhandled_exceptions_total"


@pytest.fixture
def captured_with_headers() -> Iterator[Captured]:
    """A fresh sentinel that takes the location and request id from request headers."""
    with capture_reports(location_header="x-location", request_id_header="x-request-id") as cap:
        yield cap


class JobError(Exception):
    """The error the captured jobs raise."""


JOB_ERROR = f"{JobError.__module__}.{JobError.__qualname__}"


def settled_reports(captured: Captured, count: int, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Wait for ``count`` reports, then a quiet period in which a duplicate would show up."""
    captured.wait_for(count)
    time.sleep(quiet)
    return captured.reports


@contextmanager
def client_for(captured: Captured, routes: list[Route]) -> Iterator[httpx.Client]:
    app = sentinel.instrument(Starlette(routes=routes), sentinel=captured.sentinel)
    headers = {"connection": "close"}  # uvicorn drops a connection after an app exception
    with (
        serve(app) as base_url,
        httpx.Client(base_url=base_url, timeout=10, headers=headers) as client,
    ):
        yield client


def exception_count(captured: Captured, route: str, phase: str, exc_type: str = JOB_ERROR) -> float:
    return captured.metric(
        EXC_TOTAL, location="unknown", route=route, exception_type=exc_type, phase=phase
    )


# -- jobs defined at module level, so their default names are predictable ------------------


def nightly_job(error: BaseException) -> None:
    """Raise ``error``."""
    raise error


async def async_nightly_job(error: BaseException) -> None:
    """Await, then raise ``error``."""
    await asyncio.sleep(0)
    raise error


class Consumer:
    def handle(self, error: BaseException) -> None:
        raise error


class NightlyJob:
    """A job object: callable, without a ``__name__`` or ``__qualname__`` of its own."""

    def __call__(self, error: BaseException | None = None) -> str:
        if error is not None:
            raise error
        return "done"


class AsyncNightlyJob:
    """A job object whose ``__call__`` is async."""

    async def __call__(self, error: BaseException) -> None:
        await asyncio.sleep(0)
        raise error


def default_name(func: Any) -> str:
    return f"{func.__module__}.{func.__qualname__}"


# -- outside a request ---------------------------------------------------------------------


def test_bare_sync_capture_reraises_the_same_object_and_reports_background(
    captured: Captured,
) -> None:
    """Bare @capture on a sync function re-raises the very same exception and reports it as
    "background" with the function's module.qualname as route."""
    job = sentinel.capture(nightly_job)
    error = JobError("sync job failed")
    with pytest.raises(JobError) as raised:
        job(error)
    assert raised.value is error

    reports = settled_reports(captured, 1)
    assert len(reports) == 1
    report = reports[0]
    assert report["phase"] == "background"
    assert report["route"] == default_name(nightly_job)
    assert report["exception_type"] == JOB_ERROR
    assert report["message"] == "sync job failed"
    assert exception_count(captured, default_name(nightly_job), "background") == 1


def test_bare_async_capture_reraises_the_same_object_and_reports_background(
    captured: Captured,
) -> None:
    """Bare @capture on an async function re-raises the same exception and reports it once."""
    job = sentinel.capture(async_nightly_job)
    error = JobError("async job failed")
    with pytest.raises(JobError) as raised:
        asyncio.run(job(error))
    assert raised.value is error

    reports = settled_reports(captured, 1)
    assert [(r["phase"], r["route"]) for r in reports] == [
        ("background", default_name(async_nightly_job))
    ]
    assert exception_count(captured, default_name(async_nightly_job), "background") == 1


def test_named_capture_uses_the_name_as_route(captured: Captured) -> None:
    """@capture(name="nightly-sync") reports with route "nightly-sync", sync and async alike."""

    @sentinel.capture(name="nightly-sync")
    def sync_job() -> None:
        raise JobError("named sync")

    @sentinel.capture(name="nightly-sync-async")
    async def async_job() -> None:
        raise JobError("named async")

    with pytest.raises(JobError):
        sync_job()
    with pytest.raises(JobError):
        asyncio.run(async_job())

    reports = settled_reports(captured, 2)
    assert sorted((r["route"], r["phase"], r["message"]) for r in reports) == [
        ("nightly-sync", "background", "named sync"),
        ("nightly-sync-async", "background", "named async"),
    ]
    assert exception_count(captured, "nightly-sync", "background") == 1
    assert exception_count(captured, "nightly-sync-async", "background") == 1


def test_capture_with_empty_parentheses_and_explicit_phase(captured: Captured) -> None:
    """@capture() works like bare @capture, and phase= overrides "background"."""

    @sentinel.capture()
    def plain() -> None:
        raise JobError("parenthesised")

    @sentinel.capture(name="consumer", phase="thread")
    def consumer() -> None:
        raise JobError("explicit phase")

    with pytest.raises(JobError):
        plain()
    with pytest.raises(JobError):
        consumer()

    reports = settled_reports(captured, 2)
    by_message = {r["message"]: r for r in reports}
    assert len(reports) == 2
    assert by_message["parenthesised"]["phase"] == "background"
    assert by_message["parenthesised"]["route"] == default_name(plain)
    assert by_message["explicit phase"]["phase"] == "thread"
    assert by_message["explicit phase"]["route"] == "consumer"


def test_capture_on_a_method_names_the_class(captured: Captured) -> None:
    """A captured method's default route is module.Class.method."""
    handle = sentinel.capture(Consumer.handle)
    with pytest.raises(JobError):
        handle(Consumer(), JobError("in a method"))
    reports = settled_reports(captured, 1)
    assert [r["route"] for r in reports] == [f"{Consumer.__module__}.Consumer.handle"]


def test_capture_above_staticmethod_or_classmethod_keeps_the_method(captured: Captured) -> None:
    """@capture above @staticmethod or @classmethod wraps the function inside and keeps the
    descriptor: called on the class or an instance, the method gets the arguments it did
    without capture, and what it raises is reported under its qualified name."""

    class Service:
        """Static and class methods captured in either decorator order."""

        @sentinel.capture
        @staticmethod
        def outer_static(error: BaseException) -> None:
            raise error

        @staticmethod
        @sentinel.capture
        def inner_static(error: BaseException) -> None:
            raise error

        @sentinel.capture
        @classmethod
        def outer_class(cls, error: BaseException | None) -> str:
            if error is None:
                return cls.__name__
            raise error

        @sentinel.capture(name="service-async")
        @classmethod
        async def outer_class_async(cls, error: BaseException) -> None:
            raise error

    for method in (Service.outer_static, Service().outer_static, Service.inner_static):
        with pytest.raises(JobError, match="static"):
            method(JobError("static"))
    for bound in (Service.outer_class, Service().outer_class):
        with pytest.raises(JobError, match="class"):
            bound(JobError("class"))
    assert Service.outer_class(None) == "Service"
    with pytest.raises(JobError):
        asyncio.run(Service().outer_class_async(JobError("async class")))
    assert isinstance(inspect.getattr_static(Service, "outer_static"), staticmethod)
    assert isinstance(inspect.getattr_static(Service, "outer_class"), classmethod)
    assert inspect.iscoroutinefunction(Service.outer_class_async)
    prefix = f"{__name__}.{Service.__qualname__}"
    reports = settled_reports(captured, 6)
    assert sorted(r["route"] for r in reports) == sorted(
        [
            f"{prefix}.outer_static",
            f"{prefix}.outer_static",
            f"{prefix}.inner_static",
            f"{prefix}.outer_class",
            f"{prefix}.outer_class",
            "service-async",
        ]
    )


def test_capture_on_a_callable_object_names_its_class(captured: Captured) -> None:
    """A callable object, bare or named, re-raises what escapes its __call__ as is and
    reports it, by default under module.Class; its return value and signature pass through."""
    job_object = NightlyJob()
    job = sentinel.capture(job_object)
    named = sentinel.capture(name="job-object")(NightlyJob())
    assert job() == "done"
    assert inspect.unwrap(job) is job_object
    assert inspect.signature(job) == inspect.signature(job_object)
    assert not inspect.iscoroutinefunction(job)
    error = JobError("object failed")
    with pytest.raises(JobError) as raised:
        job(error)
    assert raised.value is error
    with pytest.raises(JobError):
        named(JobError("named object failed"))

    reports = settled_reports(captured, 2)
    assert sorted((r["route"], r["phase"], r["message"]) for r in reports) == sorted(
        [
            (default_name(NightlyJob), "background", "object failed"),
            ("job-object", "background", "named object failed"),
        ]
    )


def test_capture_on_a_partial_names_its_function(captured: Captured) -> None:
    """A functools.partial is reported under the function (or object class) it calls, or
    under the name given."""
    with pytest.raises(JobError):
        sentinel.capture(functools.partial(nightly_job, JobError("partial failed")))()
    with pytest.raises(JobError):
        sentinel.capture(name="partial-job")(functools.partial(nightly_job))(JobError("named"))
    with pytest.raises(JobError):
        sentinel.capture(functools.partial(NightlyJob(), JobError("partial object failed")))()

    reports = settled_reports(captured, 3)
    assert sorted((r["route"], r["message"]) for r in reports) == sorted(
        [
            (default_name(nightly_job), "partial failed"),
            ("partial-job", "named"),
            (default_name(NightlyJob), "partial object failed"),
        ]
    )


def test_capture_on_an_async_callable_object_or_partial_stays_async(captured: Captured) -> None:
    """An object with an async __call__, and a partial of one or of an async function, are
    wrapped as coroutine functions: what escapes when awaited is reported once."""
    jobs = [
        sentinel.capture(AsyncNightlyJob()),
        sentinel.capture(name="async-partial")(functools.partial(async_nightly_job)),
        sentinel.capture(functools.partial(AsyncNightlyJob())),
    ]
    for index, job in enumerate(jobs):
        assert inspect.iscoroutinefunction(job)
        error = JobError(f"async object {index}")
        with pytest.raises(JobError) as raised:
            asyncio.run(job(error))
        assert raised.value is error

    reports = settled_reports(captured, 3)
    assert sorted((r["route"], r["message"]) for r in reports) == sorted(
        [
            (default_name(AsyncNightlyJob), "async object 0"),
            ("async-partial", "async object 1"),
            (default_name(AsyncNightlyJob), "async object 2"),
        ]
    )


def test_capture_refuses_what_is_not_callable_showing_it() -> None:
    """Decorating something that cannot be called is a TypeError naming it, bare or named."""
    with pytest.raises(TypeError, match=r"callable.*: 42$"):
        sentinel.capture(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"callable.*: 'nightly'$"):
        sentinel.capture(name="x")("nightly")  # type: ignore[call-overload]


def test_capture_refuses_a_name_that_is_not_text_showing_it() -> None:
    """The name is the report's route: a name that is not text, or is empty, is refused
    when decorating, never written as route 5 or silently replaced by the default."""
    with pytest.raises(TypeError, match=r'"name" must be a non-empty string: 5$'):
        sentinel.capture(name=5)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r'"name" must be a non-empty string: \' \'$'):
        sentinel.capture(name=" ")


def test_return_values_pass_through_and_nothing_is_reported(captured: Captured) -> None:
    """Return values of sync and async captured functions pass through unchanged, no report."""
    marker = object()

    @sentinel.capture
    def sync_ok(value: object, *, twice: bool = False) -> tuple[object, bool]:
        return value, twice

    @sentinel.capture(name="async-ok")
    async def async_ok(value: object) -> object:
        await asyncio.sleep(0)
        return value

    assert sync_ok(marker, twice=True) == (marker, True)
    assert sync_ok(marker)[0] is marker
    assert asyncio.run(async_ok(marker)) is marker
    captured.flush()
    assert captured.reports == []


def test_wraps_keeps_metadata_and_coroutine_nature() -> None:
    """The wrappers keep name, qualname, module, docstring, signature, __wrapped__, and an
    async function stays a coroutine function."""
    for original, decorated in (
        (nightly_job, sentinel.capture(nightly_job)),
        (async_nightly_job, sentinel.capture(async_nightly_job)),
        (nightly_job, sentinel.capture(name="named")(nightly_job)),
    ):
        assert decorated.__name__ == original.__name__
        assert decorated.__qualname__ == original.__qualname__
        assert decorated.__module__ == original.__module__
        assert decorated.__doc__ == original.__doc__
        assert decorated.__wrapped__ is original
        assert inspect.signature(decorated) == inspect.signature(original)
        assert inspect.iscoroutinefunction(decorated) == inspect.iscoroutinefunction(original)


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt(), SystemExit(2), asyncio.CancelledError()],
    ids=lambda error: type(error).__name__,
)
def test_control_flow_exceptions_pass_through_unreported(
    captured: Captured, error: BaseException
) -> None:
    """KeyboardInterrupt, SystemExit and CancelledError are re-raised as is and not reported."""
    job = sentinel.capture(nightly_job)
    with pytest.raises(type(error)) as raised:
        job(error)
    assert raised.value is error
    captured.flush()
    assert captured.reports == []


def test_nested_captured_functions_report_once(captured: Captured) -> None:
    """An exception escaping two nested captured functions is reported once (by the inner)."""

    @sentinel.capture(name="inner")
    def inner() -> None:
        raise JobError("nested")

    @sentinel.capture(name="outer")
    def outer() -> None:
        inner()

    with pytest.raises(JobError):
        outer()
    reports = settled_reports(captured, 1)
    assert [r["route"] for r in reports] == ["inner"]
    assert exception_count(captured, "outer", "background") == 0


def test_same_job_failing_repeatedly_reports_each_occurrence(captured: Captured) -> None:
    """Each failing run of a captured job is its own occurrence: counted every time."""
    job = sentinel.capture(name="flaky")(nightly_job)
    for attempt in range(3):
        with pytest.raises(JobError):
            job(JobError(f"attempt {attempt}"))
    reports = settled_reports(captured, 3)
    assert len(reports) == 3
    assert exception_count(captured, "flaky", "background") == 3


# -- generators: consumers that yield ---------------------------------------------------------


class Retry(Exception):
    """Thrown into a consumer by its caller: the consumer answers it and goes on."""


def test_a_generator_reports_what_escapes_while_it_is_iterated(captured: Captured) -> None:
    """On a generator or an async generator (a consumer), an exception raised while it is
    iterated escapes to the caller unchanged and is reported once, under the name given."""
    sync_error, async_error = JobError("sync consumer broke"), JobError("async consumer broke")

    @sentinel.capture(name="consume")
    def consume() -> Iterator[int]:
        yield 1
        raise sync_error

    @sentinel.capture(name="consume-async")
    async def consume_async() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0)
        raise async_error

    async def drain() -> list[int]:
        return [value async for value in consume_async()]

    with pytest.raises(JobError) as raised:
        list(consume())
    assert raised.value is sync_error
    with pytest.raises(JobError) as raised:
        asyncio.run(drain())
    assert raised.value is async_error

    reports = settled_reports(captured, 2)
    assert sorted((r["route"], r["phase"], r["message"]) for r in reports) == [
        ("consume", "background", "sync consumer broke"),
        ("consume-async", "background", "async consumer broke"),
    ]
    assert exception_count(captured, "consume", "background") == 1
    assert exception_count(captured, "consume-async", "background") == 1


def test_a_captured_generator_is_driven_exactly_like_the_original(captured: Captured) -> None:
    """What the consumer sends, throws and closes reaches the generator as it would without
    capture (asend and athrow too, for an async one), the return value comes back, and none
    of it (a Retry the generator answers, GeneratorExit, its clean-up) is reported."""
    seen: list[object] = []

    @sentinel.capture
    def echo() -> Generator[str, str, str]:
        try:
            received = yield "ready"
            while received != "stop":
                try:
                    received = yield f"got {received}"
                except Retry:
                    received = yield "retrying"
            return "stopped"
        finally:
            seen.append("sync clean-up")

    @sentinel.capture
    async def echo_async() -> AsyncGenerator[str, str]:
        try:
            received = yield "ready"
            while True:
                try:
                    received = yield f"got {received}"
                except Retry:
                    received = yield "retrying"
        finally:
            await asyncio.sleep(0)
            seen.append("async clean-up")

    assert inspect.isgeneratorfunction(echo)
    assert inspect.isasyncgenfunction(echo_async)
    generator = echo()
    assert next(generator) == "ready"
    assert generator.send("a") == "got a"
    assert generator.throw(Retry()) == "retrying"
    with pytest.raises(StopIteration) as stopped:
        generator.send("stop")
    assert stopped.value.value == "stopped"
    unfinished = echo()
    next(unfinished)
    unfinished.close()

    async def drive() -> list[str]:
        agen = echo_async()
        answers = [await agen.asend(None), await agen.asend("b"), await agen.athrow(Retry())]
        await agen.aclose()
        return answers

    assert asyncio.run(drive()) == ["ready", "got b", "retrying"]
    assert seen == ["sync clean-up", "sync clean-up", "async clean-up"]
    captured.flush()
    assert captured.reports == []


def test_an_exception_thrown_into_a_generator_is_the_consumers(captured: Captured) -> None:
    """What the consumer throws into a captured generator (a ``with`` block's error through
    ``@contextmanager``, or ``athrow``) and gets back unhandled is the consumer's: not
    reported, and back as the same object. What the generator raises instead, while handling
    it or in its clean-up on close(), is its own and is reported."""
    handled_by_caller = KeyError("the with block's own")
    cleanup_error = JobError("clean-up failed")

    @contextmanager
    @sentinel.capture(name="session")
    def session() -> Iterator[str]:
        yield "connection"

    @asynccontextmanager
    @sentinel.capture(name="session-async")
    async def session_async() -> AsyncIterator[str]:
        yield "connection"

    @sentinel.capture(name="translating")
    def translating() -> Generator[int, None, None]:
        try:
            yield 1
        except KeyError as error:
            raise JobError("translated") from error

    @sentinel.capture(name="failing-clean-up")
    def failing_clean_up() -> Generator[int, None, None]:
        try:
            yield 1
        finally:
            raise cleanup_error

    with pytest.raises(KeyError) as raised, session():
        raise handled_by_caller
    assert raised.value is handled_by_caller

    async def use_async() -> None:
        async with session_async():
            raise handled_by_caller

    with pytest.raises(KeyError) as raised:
        asyncio.run(use_async())
    assert raised.value is handled_by_caller

    generator = translating()
    next(generator)
    with pytest.raises(JobError, match="translated"):
        generator.throw(KeyError("from the consumer"))
    unfinished = failing_clean_up()
    next(unfinished)
    with pytest.raises(JobError) as failed:
        unfinished.close()
    assert failed.value is cleanup_error

    reports = settled_reports(captured, 2)
    assert sorted((r["route"], r["message"]) for r in reports) == [
        ("failing-clean-up", "clean-up failed"),
        ("translating", "translated"),
    ]


def test_a_fastapi_yield_dependency_does_not_report_the_endpoints_http_exception() -> None:
    """FastAPI throws an endpoint's HTTPException into its yield dependencies: a captured
    dependency (async, or sync in the threadpool) gives it back, and the 404 the app meant
    is neither reported nor counted as an unhandled exception."""
    from fastapi import Depends, FastAPI, HTTPException

    from sentinel.testing import Client

    @sentinel.capture
    async def database() -> AsyncIterator[str]:
        yield "connection"

    @sentinel.capture
    def sync_database() -> Iterator[str]:
        yield "connection"

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int, db: str = Depends(database)) -> None:
        raise HTTPException(status_code=404, detail="no such item")

    @app.get("/sync/{item_id}")
    def sync_item(item_id: int, db: str = Depends(sync_database)) -> None:
        raise HTTPException(status_code=404, detail="no such item")

    with capture_reports() as captured:
        with Client(sentinel.instrument(app)) as client:
            assert client.get("/items/1").status_code == 404
            assert client.get("/sync/1").status_code == 404
        captured.assert_no_unhandled_exceptions()
        assert captured.metric(EXC_TOTAL) == 0


def test_closing_a_captured_generator_behaves_as_the_original(captured: Captured) -> None:
    """close() before the start, at a yield, and on a generator that yields again when told
    to close: the same outcome as without capture, and only the last is reported (it is the
    generator's own RuntimeError)."""

    def stubborn() -> Generator[int, None, None]:
        try:
            yield 1
        except GeneratorExit:
            yield 2  # once: the collector's close() later ends it

    def outcome(generator: Generator[int, None, None], start: bool) -> str:
        if start:
            next(generator)
        try:
            generator.close()
        except RuntimeError as error:
            return f"RuntimeError: {error}"
        return "closed"

    wrapped = sentinel.capture(name="stubborn")(stubborn)
    for start in (False, True):
        assert outcome(wrapped(), start) == outcome(stubborn(), start)
    reports = settled_reports(captured, 1)
    assert [(r["route"], r["exception_type"]) for r in reports] == [("stubborn", "RuntimeError")]


# -- sync functions returning a coroutine ----------------------------------------------------


def test_a_coroutine_returned_by_a_sync_function_is_reported_where_awaited(
    captured: Captured,
) -> None:
    """A sync function returning a coroutine (a wrapper, a lambda) fails where the coroutine
    is awaited: that exception is re-raised as is and reported once, under the sync
    function's name (or under the inner one when the coroutine is itself captured); what is
    not a coroutine is returned as is."""
    error = JobError("awaited later")

    @sentinel.capture(name="returns-coroutine")
    def job() -> Coroutine[Any, Any, None]:
        return async_nightly_job(error)

    lambda_job: Callable[[], Coroutine[Any, Any, None]] = sentinel.capture(
        lambda: async_nightly_job(JobError("from a lambda"))
    )
    inner = sentinel.capture(name="inner-async")(async_nightly_job)
    outer: Callable[[], Coroutine[Any, Any, None]] = sentinel.capture(name="outer-sync")(
        lambda: inner(JobError("captured twice"))
    )

    coroutine = job()
    assert inspect.iscoroutine(coroutine)
    with pytest.raises(JobError) as raised:
        asyncio.run(coroutine)
    assert raised.value is error
    for other in (lambda_job, outer):
        with pytest.raises(JobError):
            asyncio.run(other())
    awaitable = asyncio.sleep  # a function, not a coroutine: returned untouched
    returns_awaitable: Callable[[], object] = sentinel.capture(lambda: awaitable)
    assert returns_awaitable() is awaitable

    reports = settled_reports(captured, 3)
    assert sorted((r["route"], r["phase"], r["message"]) for r in reports) == sorted(
        [
            ("returns-coroutine", "background", "awaited later"),
            (default_name(lambda_job), "background", "from a lambda"),
            ("inner-async", "background", "captured twice"),
        ]
    )
    assert exception_count(captured, "outer-sync", "background") == 0


@types.coroutine
def suspend(value: str) -> Generator[str, str, str]:
    """Suspend the awaiting coroutine with ``value``; what the driver sends comes back."""
    return (yield value)


def test_a_returned_coroutine_is_driven_exactly_like_the_original(captured: Captured) -> None:
    """The coroutine a captured sync function returns keeps its name, and what the driver
    sends, throws and closes reaches it as without capture; its return value comes back.
    None of that is reported (a Retry it answers, close, its clean-up); an exception thrown
    in that it does not answer escapes as is and is reported once."""
    seen: list[str] = []

    async def echo() -> str:
        try:
            received = await suspend("ready")
            while received != "stop":
                try:
                    received = await suspend(f"got {received}")
                except Retry:
                    received = await suspend("retrying")
            return "stopped"
        finally:
            seen.append("clean-up")

    @sentinel.capture(name="echo")
    def start() -> Coroutine[Any, Any, str]:
        return echo()

    coroutine = start()
    assert inspect.iscoroutine(coroutine)
    assert (coroutine.__name__, coroutine.__qualname__) == (echo.__name__, echo.__qualname__)
    assert coroutine.send(None) == "ready"
    assert coroutine.send("a") == "got a"
    assert coroutine.throw(Retry()) == "retrying"
    with pytest.raises(StopIteration) as stopped:
        coroutine.send("stop")
    assert stopped.value.value == "stopped"
    unfinished = start()
    unfinished.send(None)
    unfinished.close()
    answer: Callable[[], Coroutine[Any, Any, str]] = sentinel.capture(
        lambda: asyncio.sleep(0, result="answered")
    )
    assert asyncio.run(answer()) == "answered"
    assert seen == ["clean-up", "clean-up"]
    captured.flush()
    assert captured.reports == []

    failing = start()
    failing.send(None)
    error = JobError("thrown in")
    with pytest.raises(JobError) as raised:
        failing.throw(error)
    assert raised.value is error
    reports = settled_reports(captured, 1)
    assert [(r["route"], r["message"]) for r in reports] == [("echo", "thrown in")]


# -- capture_exception ---------------------------------------------------------------------

HANDLED_TOTAL = "sentinel_handled_exceptions_total"


def handled_reports(captured: Captured, count: int, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Wait for ``count`` handled reports, then a quiet period for a duplicate to show."""
    captured.wait_for(count, event="handled_exception")
    time.sleep(quiet)
    return captured.events("handled_exception")


def test_capture_exception_reports_a_handled_exception_once(captured: Captured) -> None:
    """capture_exception() reports a handled exception as a ``handled_exception`` with
    ``handled: true`` and returns True; the second time it returns False and writes nothing.
    It is counted as handled, never as unhandled."""
    try:
        raise JobError("handled but worth seeing")
    except JobError as exc:
        assert sentinel.capture_exception(exc) is True
        assert sentinel.capture_exception(exc) is False
    reports = handled_reports(captured, 1)
    assert len(reports) == 1
    report = reports[0]
    assert report["message"] == "handled but worth seeing"
    assert report["handled"] is True
    assert (report["level"], report["route"], report["phase"]) == ("error", "<none>", "process")
    assert captured.reports == []
    labels = {"location": "unknown", "route": "<none>", "exception_type": JOB_ERROR}
    assert captured.metric(HANDLED_TOTAL, **labels) == 1
    assert exception_count(captured, "<none>", "process") == 0


def test_capture_exception_with_explicit_phase(captured: Captured) -> None:
    """capture_exception(exc, phase=...) writes that phase."""
    error = JobError("explicit")
    assert sentinel.capture_exception(error, phase="background") is True
    reports = handled_reports(captured, 1)
    assert [(r["phase"], r["handled"]) for r in reports] == [("background", True)]


def test_a_phase_outside_the_fixed_set_is_refused_with_its_value(captured: Captured) -> None:
    """The phase label has a bounded set of values: @capture refuses another one when it
    decorates, capture_exception when it is called, both showing the value; nothing is
    reported or counted under it."""
    with pytest.raises(ValueError, match=r'"phase" must be one of request, .*: \'nightly\''):
        sentinel.capture(phase="nightly")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"\'whatever\'"):
        sentinel.capture_exception(JobError("x"), phase="whatever")  # type: ignore[arg-type]
    assert sorted(PHASES) == sorted(
        ("request", "response", "lifespan", "background", "task", "thread", "process", "import")
    )
    for phase in PHASES:
        sentinel.capture(phase=phase)  # type: ignore[call-overload]
    assert captured.records == []


def test_capture_exception_after_capture_decorator_returns_false(captured: Captured) -> None:
    """An exception already reported by @capture (unhandled there) is not reported again by
    capture_exception."""
    job = sentinel.capture(name="already")(nightly_job)
    error = JobError("once")
    with pytest.raises(JobError):
        job(error)
    assert sentinel.capture_exception(error) is False
    assert len(settled_reports(captured, 1)) == 1
    assert captured.events("handled_exception") == []


def test_handled_then_escaping_is_reported_as_both(captured: Captured) -> None:
    """Captured as handled, then re-raised out of a captured job: one handled report, then
    one unhandled report of the same fingerprint, each counted in its own metric (the
    unhandled count stays exact)."""

    @sentinel.capture(name="reraising")
    def job() -> None:
        try:
            raise JobError("handled, then escaped")
        except JobError as exc:
            assert sentinel.capture_exception(exc) is True
            raise

    with pytest.raises(JobError):
        job()
    [handled] = handled_reports(captured, 1)
    [unhandled] = settled_reports(captured, 1)
    assert (handled["handled"], unhandled["handled"]) == (True, False)
    assert (handled["route"], unhandled["route"]) == ("<none>", "reraising")
    assert handled["fingerprint"] == unhandled["fingerprint"]
    assert exception_count(captured, "reraising", "background") == 1
    labels = {"location": "unknown", "route": "<none>", "exception_type": JOB_ERROR}
    assert captured.metric(HANDLED_TOTAL, **labels) == 1


def test_handled_reports_fold_apart_from_unhandled_ones() -> None:
    """Repeats of one handled exception fold into summaries that say ``handled: true``,
    counted apart from the unhandled repeats of the same line."""
    with capture_reports(fold_full_reports=1) as cap:
        for handled in (True, False, True, False, True):
            error = caught_job_error()
            if handled:
                sentinel.capture_exception(error)
            else:
                cap.sentinel.capture_exception(error, "background")
        cap.sentinel.flush(final=True)
        summaries = cap.events("exception_summary")
        assert len(cap.events("handled_exception")) == 1
        assert len(cap.reports) == 1
    by_kind = {summary["handled"]: summary["occurrences"] for summary in summaries}
    assert by_kind == {True: 2, False: 1}


def caught_job_error() -> JobError:
    """A JobError raised from one line (one fingerprint), with its traceback."""
    try:
        nightly_job(JobError("again"))
    except JobError as exc:
        return exc
    raise AssertionError("did not raise")


# -- inside a request ----------------------------------------------------------------------


def test_captured_sync_function_failing_in_a_handler_is_reported_once(
    captured: Captured,
) -> None:
    """A handler calling a captured sync function that raises, and letting it propagate, gives
    exactly one report, with the request's route and phase "request"."""
    job = sentinel.capture(name="sync-helper")(nightly_job)

    async def endpoint(request: Request) -> PlainTextResponse:
        job(JobError("inside a request"))
        return PlainTextResponse("unreachable")

    with client_for(captured, [Route("/items/{item_id}", endpoint)]) as client:
        assert client.get("/items/3").status_code == 500
        reports = settled_reports(captured, 1)
    assert len(reports) == 1
    assert reports[0]["phase"] == "request"
    assert reports[0]["route"] == "/items/{item_id}"
    assert reports[0]["path"] == "/items/3"
    assert exception_count(captured, "/items/{item_id}", "request") == 1
    assert exception_count(captured, "sync-helper", "background") == 0


def test_captured_async_function_failing_in_a_handler_is_reported_once(
    captured: Captured,
) -> None:
    """A handler awaiting a captured async function that raises (propagating) is one report."""
    job = sentinel.capture(async_nightly_job)

    async def endpoint(request: Request) -> PlainTextResponse:
        await job(JobError("async inside a request"))
        return PlainTextResponse("unreachable")

    with client_for(captured, [Route("/async", endpoint)]) as client:
        assert client.get("/async").status_code == 500
        reports = settled_reports(captured, 1)
    assert [(r["route"], r["phase"]) for r in reports] == [("/async", "request")]
    assert exception_count(captured, "/async", "request") == 1


def test_captured_function_in_a_sync_endpoint_is_reported_once(captured: Captured) -> None:
    """A sync (threadpool) endpoint calling a failing captured function: one "request" report."""
    job = sentinel.capture(nightly_job)

    def endpoint(request: Request) -> PlainTextResponse:
        job(JobError("in the threadpool"))
        return PlainTextResponse("unreachable")

    with client_for(captured, [Route("/sync", endpoint)]) as client:
        assert client.get("/sync").status_code == 500
        reports = settled_reports(captured, 1)
    assert [(r["route"], r["phase"]) for r in reports] == [("/sync", "request")]


def test_captured_failure_handled_by_the_handler_is_still_reported_once(
    captured: Captured,
) -> None:
    """A captured function's failure that the handler catches is reported once, for the route."""
    job = sentinel.capture(nightly_job)

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            job(JobError("caught by the handler"))
        except JobError:
            return PlainTextResponse("degraded", status_code=200)
        return PlainTextResponse("unreachable")

    with client_for(captured, [Route("/degraded", endpoint)]) as client:
        response = client.get("/degraded")
        assert (response.status_code, response.text) == (200, "degraded")
        reports = settled_reports(captured, 1)
    assert [(r["route"], r["phase"]) for r in reports] == [("/degraded", "request")]


def test_a_returned_coroutine_failing_in_a_handler_is_reported_once(captured: Captured) -> None:
    """A handler awaiting the coroutine a captured sync function returned, and catching its
    failure, gives one report, for the request's route and phase "request"."""
    job: Callable[[], Coroutine[Any, Any, None]] = sentinel.capture(name="coroutine-helper")(
        lambda: async_nightly_job(JobError("awaited in the handler"))
    )

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            await job()
        except JobError:
            return PlainTextResponse("degraded", status_code=200)
        return PlainTextResponse("unreachable")

    with client_for(captured, [Route("/awaited", endpoint)]) as client:
        response = client.get("/awaited")
        assert (response.status_code, response.text) == (200, "degraded")
        reports = settled_reports(captured, 1)
    assert [(r["route"], r["phase"]) for r in reports] == [("/awaited", "request")]
    assert exception_count(captured, "coroutine-helper", "background") == 0


def test_captured_background_task_after_the_response_is_reported_once(
    captured: Captured,
) -> None:
    """A captured function run as a Starlette BackgroundTask after the response is one
    "background" report carrying the request's route."""
    job = sentinel.capture(name="send-receipt")(nightly_job)

    async def endpoint(request: Request) -> PlainTextResponse:
        task = BackgroundTask(job, JobError("after the response"))
        return PlainTextResponse("accepted", status_code=202, background=task)

    with client_for(captured, [Route("/orders", endpoint, methods=["POST"])]) as client:
        response = client.post("/orders")
        assert (response.status_code, response.text) == (202, "accepted")
        reports = settled_reports(captured, 1)
    assert [(r["route"], r["phase"]) for r in reports] == [("/orders", "background")]
    assert exception_count(captured, "/orders", "background") == 1


def test_capture_exception_in_a_handler_carries_the_request(
    captured_with_headers: Captured,
) -> None:
    """capture_exception() on a handled exception inside a request reports it once as
    handled, with the request's route, location and request id and phase "request"; it is
    counted as handled (not unhandled), and the response is the app's own 200."""
    captured = captured_with_headers
    results: list[bool] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            raise JobError("handled in the handler")
        except JobError as exc:
            results.append(sentinel.capture_exception(exc))
            results.append(sentinel.capture_exception(exc))
        return PlainTextResponse("fine")

    headers = {"x-location": "sin", "x-request-id": "req-77"}
    with client_for(captured, [Route("/items/{item_id}", endpoint)]) as client:
        response = client.get("/items/7", headers=headers)
        assert (response.status_code, response.text) == (200, "fine")
        reports = handled_reports(captured, 1)
    assert results == [True, False]
    [report] = reports
    assert report["handled"] is True
    assert (report["route"], report["path"], report["phase"]) == (
        "/items/{item_id}",
        "/items/7",
        "request",
    )
    assert (report["location"], report["request_id"]) == ("sin", "req-77")
    assert captured.reports == []
    labels = {"location": "sin", "route": "/items/{item_id}", "exception_type": JOB_ERROR}
    assert captured.metric(HANDLED_TOTAL, **labels) == 1
    assert captured.metric(EXC_TOTAL, phase="request", **labels) == 0
    [record] = captured.request_records
    assert (record["status"], record["request_id"]) == (200, "req-77")


def test_capture_exception_leaves_the_span_ok(captured: Captured) -> None:
    """On a traced request, a handled exception is an ``exception`` event that did not
    escape, carrying the report's fingerprint; the span's status is not an error."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            raise JobError("handled on a traced request")
        except JobError as exc:
            sentinel.capture_exception(exc)
        return PlainTextResponse("fine")

    with capture_reports(span_exporter=exporter) as traced:
        app = sentinel.instrument(
            Starlette(routes=[Route("/ok", endpoint)]), sentinel=traced.sentinel
        )
        with serve(app) as url:
            assert httpx.get(f"{url}/ok", timeout=10).status_code == 200
        [report] = handled_reports(traced, 1)
        traced.sentinel.flush(final=True)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "GET /ok"]
    [event] = [e for e in span.events if e.name == "exception"]
    assert (event.attributes or {})["exception.escaped"] is False
    assert (event.attributes or {})["exception.fingerprint"] == report["fingerprint"]
    assert span.status.status_code is not StatusCode.ERROR
    assert report["trace_id"] == format(span.context.trace_id, "032x")

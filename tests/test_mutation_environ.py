"""The environment: every write reported, and isolated per request in ``isolate`` mode."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
from helpers import run_in_raw_thread, run_in_request
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from sentinel import instrument
from sentinel._mutation import _environ
from sentinel._mutation._watcher import MAX_KEYS_PER_LINE
from sentinel.testing import Captured, capture_reports, serve

pytestmark = pytest.mark.usefixtures("clean_environ")


def keys_reported(captured: Captured) -> list[tuple[str, str]]:
    return [(r["target"], r["key"]) for r in captured.mutations]


def test_reads_run_the_standard_librarys_own_code(captured: Captured) -> None:
    """In report mode only writes are wrapped: reading os.environ costs what it always did."""
    environ_class = type(os.environ)
    assert environ_class is not _environ._Environ  # watched...
    for name in ("__getitem__", "__iter__", "__len__", "__contains__", "get", "copy", "keys"):
        assert getattr(environ_class, name) is getattr(_environ._Environ, name), name


@pytest.mark.parametrize(
    ("name", "action", "expected"),
    [
        (
            "setitem",
            lambda: os.environ.__setitem__("SENTINEL_T", "1"),
            [("os.environ", "SENTINEL_T")],
        ),
        (
            "update",
            lambda: os.environ.update({"SENTINEL_T1": "1", "SENTINEL_T2": "2"}),
            [("os.environ", "SENTINEL_T1"), ("os.environ", "SENTINEL_T2")],
        ),
        (
            "setdefault",
            lambda: os.environ.setdefault("SENTINEL_T", "1"),
            [("os.environ", "SENTINEL_T")],
        ),
        ("setdefault present", lambda: os.environ.setdefault("HOME", "/elsewhere"), []),
        ("ior", lambda: os.environ.__ior__({"SENTINEL_T": "1"}), [("os.environ", "SENTINEL_T")]),
        (
            "environb",
            lambda: os.environb.__setitem__(b"SENTINEL_T", b"1"),
            [("os.environb", "SENTINEL_T")],
        ),
        ("putenv", lambda: os.putenv("SENTINEL_T", "1"), [("os.putenv", "SENTINEL_T")]),
        ("unsetenv", lambda: os.unsetenv("SENTINEL_T"), [("os.unsetenv", "SENTINEL_T")]),
    ],
)
def test_every_mutating_method_is_reported(
    captured: Captured, name: str, action: Callable[[], object], expected: list[tuple[str, str]]
) -> None:
    run_in_request(captured, action)
    assert sorted(keys_reported(captured)) == expected


def test_pop_del_and_clear_are_reported(captured: Captured) -> None:
    os.environ["SENTINEL_GONE"] = "1"
    os.environ["SENTINEL_POPPED"] = "1"
    before = dict(os.environ)

    def remove() -> None:
        del os.environ["SENTINEL_GONE"]
        os.environ.pop("SENTINEL_POPPED")
        os.environ.pop("SENTINEL_NEVER_SET", None)  # nothing to remove: not a write
        os.environ.clear()

    try:
        run_in_request(captured, remove)
    finally:
        os.environ.update(before)
    reported = keys_reported(captured)
    assert ("os.environ", "SENTINEL_GONE") in reported
    assert ("os.environ", "SENTINEL_POPPED") in reported
    assert ("os.environ", "SENTINEL_NEVER_SET") not in reported
    # clear() removes every variable, each counted; its line names the first keys, and one
    # record stands for the rest.
    assert len(before) > MAX_KEYS_PER_LINE + 2
    assert len(reported) == 2 + MAX_KEYS_PER_LINE + 1
    [rest] = [record for record in captured.mutations if record.get("more_keys")]
    assert rest["key"] is None and rest["old"] is None
    assert captured.metric("sentinel_global_mutations_total", target="os.environ") == len(before)


def test_invalid_writes_raise_as_before_and_are_not_reported(captured: Captured) -> None:
    def bad() -> str:
        try:
            os.environ["SENTINEL_T"] = 5  # type: ignore[assignment]
        except TypeError as error:
            return str(error)
        return "no error"

    assert run_in_request(captured, bad) == "str expected, not int"
    assert captured.mutations == []


# -- isolate mode ------------------------------------------------------------------------------


@pytest.fixture
def isolating() -> Iterator[Captured]:
    with capture_reports(mutation_mode="isolate") as captured:
        yield captured


def test_isolated_writes_are_seen_by_the_request_its_threads_and_its_children(
    isolating: Captured,
) -> None:
    os.environ["SENTINEL_ISO"] = "process"

    async def handler(request: Request) -> JSONResponse:
        os.environ["SENTINEL_ISO"] = "request"
        os.environ["SENTINEL_ISO_NEW"] = "new"
        del os.environ["HOME"]
        seen = {
            "task": await asyncio.create_task(_read("SENTINEL_ISO")),
            "thread": await run_in_threadpool(os.environ.get, "SENTINEL_ISO"),
            "environb": os.environb.get(b"SENTINEL_ISO", b"").decode(),
            "home": os.environ.get("HOME", "<deleted>"),
            "in": "SENTINEL_ISO_NEW" in os.environ and "HOME" not in os.environ,
            "copy": os.environ.copy().get("SENTINEL_ISO_NEW"),
            "iterated": "SENTINEL_ISO_NEW" in list(os.environ) and "HOME" not in list(os.environ),
            # Started from the thread pool, which carries the request's context along.
            "child": (
                await run_in_threadpool(
                    subprocess.run,
                    [
                        sys.executable,
                        "-c",
                        "import os; print(os.environ['SENTINEL_ISO'], 'HOME' in os.environ)",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            ).stdout.strip(),
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import os; print(os.environ['SENTINEL_ISO'])",
            stdout=asyncio.subprocess.PIPE,
        )
        seen["asyncio child"] = (await child.communicate())[0].decode().strip()
        return JSONResponse(seen)

    home = os.environ["HOME"]
    app = Starlette(routes=[Route("/iso", handler)])
    with serve(instrument(app, sentinel=isolating.sentinel)) as url:
        seen = httpx.get(f"{url}/iso", timeout=30).json()
    assert seen == {
        "task": "request",
        "thread": "request",
        "environb": "request",
        "home": "<deleted>",
        "in": True,
        "copy": "new",
        "iterated": True,
        "child": "request False",
        "asyncio child": "request",
    }
    # Discarded when the request ended: the process never saw any of it.
    assert os.environ["SENTINEL_ISO"] == "process"
    assert "SENTINEL_ISO_NEW" not in os.environ
    assert os.environ["HOME"] == home
    assert {r["action"] for r in isolating.mutations} == {"isolated"}


async def _read(key: str) -> str | None:
    return os.environ.get(key)


def test_isolate_mode_writes_outside_requests_are_real(isolating: Captured) -> None:
    os.environ["SENTINEL_ISO_OUTSIDE"] = "1"
    assert (
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ['SENTINEL_ISO_OUTSIDE'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == "1"
    )


async def set_then_read(request: Request) -> PlainTextResponse:
    key = request.query_params["key"]
    os.environ[key] = "request"
    return PlainTextResponse(os.environ[key])


async def read_key(request: Request) -> PlainTextResponse:
    return PlainTextResponse(os.environ.get(request.query_params["key"], "<unset>"))


def test_isolated_also_when_not_reported() -> None:
    """In the warm-up and for ``mutation_allow`` keys a write is not reported, yet still kept
    to its request."""
    app = Starlette(routes=[Route("/set", set_then_read), Route("/get", read_key)])
    with capture_reports(
        mutation_mode="isolate",
        mutation_warmup_seconds=60.0,
        mutation_allow=("os.environ:CACHE_*",),
    ) as captured:
        with serve(instrument(app, sentinel=captured.sentinel)) as url:
            for key in ("SENTINEL_ISO_WARMUP", "CACHE_SENTINEL_ISO"):
                assert httpx.get(f"{url}/set", params={"key": key}).text == "request"
                assert httpx.get(f"{url}/get", params={"key": key}).text == "<unset>"
                assert key not in os.environ
        assert captured.events("global_state_mutated") == []


INVALID_WRITES: list[tuple[Callable[[], object], type[Exception]]] = [
    (lambda: os.environ.__setitem__("SENTINEL_ISO_NUL", "a\0b"), ValueError),
    (lambda: os.environ.__setitem__("SENTINEL\0ISO", "v"), ValueError),
    (lambda: os.environ.__setitem__("SENTINEL=ISO", "v"), ValueError),
    (lambda: os.environ.__setitem__("", "v"), OSError),
    (lambda: os.environb.__setitem__(b"SENTINEL=ISO", b"v"), ValueError),
    (lambda: os.environ.__delitem__("SENTINEL=ISO"), OSError),
    (lambda: os.environ.__delitem__(""), OSError),
    (lambda: os.environ.__delitem__("SENTINEL\0ISO"), ValueError),
]


def _outcomes() -> list[str]:
    outcomes = []
    for write, _ in INVALID_WRITES:
        try:
            write()
            outcomes.append("accepted")
        except Exception as error:
            outcomes.append(f"{type(error).__name__}: {error}")
    return outcomes


@pytest.mark.parametrize("mode", ["report", "raise", "isolate"])
def test_invalid_writes_fail_as_the_standard_library_makes_them(mode: str) -> None:
    """A NUL byte, "=" in a name, an empty name: refused with the standard library's own
    exception in every mode, never kept in an overlay; nothing reported."""
    expected = _outcomes()  # no request: the standard library's own answers
    assert [outcome.split(":")[0] for outcome in expected] == [
        kind.__name__ for _, kind in INVALID_WRITES
    ]
    with capture_reports(mutation_mode=mode) as captured:
        assert run_in_request(captured, _outcomes) == expected
        assert captured.events("global_state_mutated") == []


# -- the documented limits are the real ones ---------------------------------------------------


def test_limit_aliases_taken_before_install_are_reported_as_putenv(captured: Captured) -> None:
    """``from os import environ`` before install holds the standard object: its writes are
    seen through the wrapped os.putenv and os.unsetenv, not as os.environ."""
    alias = _environ.original_environ()
    assert alias is not os.environ and type(alias) is _environ._Environ

    def write() -> None:
        alias["SENTINEL_ALIAS"] = "1"
        del alias["SENTINEL_ALIAS"]

    run_in_request(captured, write)
    assert keys_reported(captured) == [
        ("os.putenv", "SENTINEL_ALIAS"),
        ("os.unsetenv", "SENTINEL_ALIAS"),
    ]


def test_limit_function_aliases_taken_before_install_are_not_watched(captured: Captured) -> None:
    """A reference to os.putenv taken before sentinel wrapped it bypasses the wrapper."""
    original_putenv = _environ._original_putenv  # what `from os import putenv` held before
    run_in_request(captured, lambda: original_putenv("SENTINEL_ALIASED_PUTENV", "1"))
    assert captured.mutations == []


def test_limit_c_level_setenv_is_not_seen(captured: Captured) -> None:
    """A C extension calling setenv() changes the C environment behind Python's back."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        pytest.skip("no C library to call setenv() from")
    libc = ctypes.CDLL(libc_name)
    try:
        run_in_request(captured, lambda: libc.setenv(b"SENTINEL_FROM_C", b"1", 1))
        assert captured.mutations == []
        assert "SENTINEL_FROM_C" not in os.environ  # os.environ never learns of it either
    finally:
        libc.unsetenv(b"SENTINEL_FROM_C")


def test_isolate_env_none_children_get_the_overlay_too(isolating: Captured) -> None:
    async def handler(request: Request) -> PlainTextResponse:
        os.environ["SENTINEL_ISO_CHILD"] = "request"
        script = "import os; print(os.environ.get('SENTINEL_ISO_CHILD'))"
        done = await run_in_threadpool(
            subprocess.run, [sys.executable, "-c", script], env=None, capture_output=True, text=True
        )
        return PlainTextResponse(done.stdout.strip())

    app = Starlette(routes=[Route("/c", handler)])
    with serve(instrument(app, sentinel=isolating.sentinel)) as url:
        assert httpx.get(f"{url}/c", timeout=30).text == "request"


def test_isolate_writes_without_a_request_context_say_they_reached_the_process(
    isolating: Captured,
) -> None:
    """A raw thread has no request to isolate its write in: reported as what it was."""

    def write() -> None:
        os.environ["SENTINEL_ISO_RAW"] = "leaked"

    async def handler(request: Request) -> PlainTextResponse:
        await run_in_raw_thread(write)
        return PlainTextResponse("ok")

    with serve(
        instrument(Starlette(routes=[Route("/raw", handler)]), sentinel=isolating.sentinel)
    ) as url:
        httpx.get(f"{url}/raw")
    assert os.environ["SENTINEL_ISO_RAW"] == "leaked"
    [report] = isolating.mutations
    assert (report["attribution"], report["mode"], report["action"]) == (
        "suspects",
        "report",
        "reported",
    )


def test_limit_isolate_does_not_reach_os_system_or_putenv(isolating: Captured) -> None:
    """os.system starts its child from the C environment; os.putenv is reported, not isolated."""

    async def handler(request: Request) -> JSONResponse:
        os.environ["SENTINEL_ISO_SYSTEM"] = "request"
        script = "import os, sys; sys.exit(3 if 'SENTINEL_ISO_SYSTEM' in os.environ else 4)"
        command = f'{sys.executable} -c "{script}"'
        status = await run_in_threadpool(os.system, command)
        os.putenv("SENTINEL_ISO_PUTENV", "1")
        return JSONResponse({"exit": os.waitstatus_to_exitcode(status)})

    with serve(
        instrument(Starlette(routes=[Route("/s", handler)]), sentinel=isolating.sentinel)
    ) as url:
        assert httpx.get(f"{url}/s", timeout=30).json() == {"exit": 4}
    actions = {r["target"]: r["action"] for r in isolating.mutations}
    assert actions == {"os.environ": "isolated", "os.putenv": "reported"}
    os.unsetenv("SENTINEL_ISO_PUTENV")

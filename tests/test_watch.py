"""Opt-in watches: the app's modules, settings objects and config containers."""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import _watch, instrument, watch
from sentinel.testing import Captured, serve

THIS_FILE = os.path.abspath(__file__)


@pytest.fixture(autouse=True)
def forget_watches() -> Iterator[None]:
    yield
    _watch.clear()


def serve_actions(captured: Captured, actions: dict[str, Callable[[], object]]) -> str:
    """A server whose route /<name> runs actions[name]; yields nothing, returns the URL."""

    def make(action: Callable[[], object]) -> Any:
        async def handler(request: Request) -> PlainTextResponse:
            action()
            return PlainTextResponse("ok")

        return handler

    routes = [Route(f"/{name}", make(action)) for name, action in actions.items()]
    return instrument(Starlette(routes=routes), sentinel=captured.sentinel)  # type: ignore[return-value]


def make_module() -> types.ModuleType:
    module = types.ModuleType("sentinel_test_settings")
    exec(  # a function of the module itself, rebinding with `global`
        "BACKEND = 'primary'\ndef rebind(value):\n    global BACKEND\n    BACKEND = value\n",
        module.__dict__,
    )
    return module


def test_module_attribute_writes_are_exact(captured: Captured) -> None:
    settings = watch(make_module())

    def write() -> None:
        settings.BACKEND = "replica"  # from elsewhere: exact

    with serve(serve_actions(captured, {"set": write})) as url:
        httpx.get(f"{url}/set")
        httpx.get(f"{url}/set")  # the same write again: a repeat, not a new report
    [report] = captured.mutations
    assert (report["target"], report["key"], report["old"], report["new"]) == (
        "sentinel_test_settings",
        "BACKEND",
        "primary",
        "replica",
    )
    assert report["attribution"] == "exact"
    assert report["file"] == THIS_FILE and report["function"] == "write"
    assert settings.BACKEND == "replica"
    assert isinstance(settings, types.ModuleType)


def test_global_rebinding_inside_the_module_is_found_at_the_end(captured: Captured) -> None:
    settings = watch(make_module())
    with serve(serve_actions(captured, {"rebind": lambda: settings.rebind("replica")})) as url:
        httpx.get(f"{url}/rebind")
    [report] = captured.mutations
    assert (report["target"], report["key"], report["new"]) == (
        "sentinel_test_settings",
        "BACKEND",
        "replica",
    )
    assert report["attribution"] == "suspects"
    assert report["suspects"] == ["GET /rebind"]
    assert report["route"] == "/rebind"


class Settings:
    def __init__(self) -> None:
        self.debug = False
        self.timeout = 5.0


class Slotted:
    __slots__ = ("level",)

    def __init__(self) -> None:
        self.level = 1


def test_object_attribute_writes_are_exact(captured: Captured) -> None:
    settings = watch(Settings(), name="app.settings")
    slotted = watch(Slotted(), name="app.slotted")
    assert isinstance(settings, Settings) and type(settings).__name__ == "Settings"

    def write() -> None:
        settings.debug = True
        slotted.level = 2
        del settings.timeout

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    found = {(r["target"], r["key"], r["old"], r["new"]) for r in captured.mutations}
    assert found == {
        ("app.settings", "debug", False, True),
        ("app.settings", "timeout", 5.0, None),
        ("app.slotted", "level", 1, 2),
    }
    assert {r["attribution"] for r in captured.mutations} == {"exact"}
    assert settings.debug is True and slotted.level == 2


CONFIG: dict[str, Any] = {}
ALLOWED: list[str] = []


def test_containers_changed_in_place_are_found_at_the_end(captured: Captured) -> None:
    CONFIG.clear()
    CONFIG.update({"db": {"host": "a", "port": 5432}, "flags": [1, 2]})
    ALLOWED[:] = ["x"]
    watch(CONFIG)  # named after the variable the caller's module binds it to
    watch(ALLOWED)

    def nested() -> None:
        CONFIG["db"]["host"] = "b"

    with serve(
        serve_actions(captured, {"nested": nested, "append": lambda: ALLOWED.append("y")})
    ) as url:
        httpx.get(f"{url}/nested")
        httpx.get(f"{url}/append")
    by_target = {r["target"]: r for r in captured.mutations}
    assert set(by_target) == {f"{__name__}.CONFIG", f"{__name__}.ALLOWED"}
    config = by_target[f"{__name__}.CONFIG"]
    assert config["key"] == "db" and config["route"] == "/nested"
    assert by_target[f"{__name__}.ALLOWED"]["route"] == "/append"


def test_large_configs_can_be_compared_every_n_requests(captured: Captured) -> None:
    big = {f"key{i}": i for i in range(500)}
    watch(big, name="big", every=3)
    with serve(
        serve_actions(captured, {"write": lambda: big.update(key7=-1), "read": lambda: big["key1"]})
    ) as url:
        httpx.get(f"{url}/write")  # the first request's end: not compared
        assert captured.mutations == []
        httpx.get(f"{url}/read")
        httpx.get(f"{url}/read")  # every third request compares
    [report] = captured.mutations
    assert report["key"] == "key7"
    assert report["attribution"] == "suspects"


def test_a_watch_can_raise_while_the_rest_reports(captured: Captured) -> None:
    strict = watch(Settings(), name="app.strict", mode="raise")

    def write() -> None:
        strict.debug = True

    with serve(serve_actions(captured, {"write": write})) as url:
        assert httpx.get(f"{url}/write").status_code == 500
    assert strict.debug is False  # refused before it happened
    [report] = captured.mutations
    assert report["action"] == "refused"


def test_a_watch_can_be_off(captured: Captured) -> None:
    quiet = watch(Settings(), name="app.quiet", mode="off")

    def write() -> None:
        quiet.debug = True

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    assert captured.mutations == []


def test_bad_arguments_show_the_value() -> None:
    with pytest.raises(ValueError, match=r"\"mode\" must be one of report, raise, off: 'isolate'"):
        watch({}, name="x", mode="isolate")
    with pytest.raises(ValueError, match=r"\"every\" must be >= 1: 0"):
        watch({}, name="x", every=0)
    with pytest.raises(TypeError, match=r"cannot watch int objects"):
        watch(5, name="x")

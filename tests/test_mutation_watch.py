"""Opt-in watches: the app's modules, settings objects and config containers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sentinel import instrument, watch
from sentinel._mutation import _watch
from sentinel.testing import Captured, capture_reports, serve

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


def test_watching_again_without_a_mode_takes_the_sentinels_mode_again(captured: Captured) -> None:
    """An app factory called twice: ``watch(x, mode="raise")`` then ``watch(x)``; the last
    call's word holds (no mode: the sentinel's own, report here), not the first's."""
    settings = Settings()
    watch(settings, name="app.twice", mode="raise")
    watch(settings, name="app.twice")

    def write() -> None:
        settings.debug = True

    with serve(serve_actions(captured, {"write": write})) as url:
        assert httpx.get(f"{url}/write").status_code == 200
    [report] = captured.mutations
    assert (report["mode"], report["action"]) == ("report", "reported")


def test_in_isolate_mode_a_watched_objects_write_is_reported_not_isolated() -> None:
    """isolate gives each request its own environment, nothing else: a watched object's write
    reaches the process, and its record says so (mode report, action reported)."""
    settings = watch(Settings(), name="app.isolated")

    def write() -> None:
        settings.debug = True

    with capture_reports(mutation_mode="isolate") as captured:
        with serve(serve_actions(captured, {"write": write})) as url:
            assert httpx.get(f"{url}/write").status_code == 200
        [report] = captured.mutations
    assert (report["mode"], report["action"]) == ("report", "reported")
    assert settings.debug is True


def test_bad_arguments_show_the_value() -> None:
    with pytest.raises(ValueError, match=r"\"mode\" must be one of report, raise, off: 'isolate'"):
        watch({}, name="x", mode="isolate")
    with pytest.raises(ValueError, match=r"\"every\" must be an integer >= 1: 0"):
        watch({}, name="x", every=0)
    with pytest.raises(TypeError, match=r"cannot watch int objects"):
        watch(5, name="x")


@pytest.mark.parametrize(
    ("arguments", "refused"),
    [
        ({"every": "2"}, "\"every\" must be an integer >= 1: '2'"),
        ({"every": 2.5}, '"every" must be an integer >= 1: 2.5'),
        ({"every": True}, '"every" must be an integer >= 1: True'),
        ({"name": 5}, '"name" must be a non-empty string or None: 5'),
        ({"name": "  "}, "\"name\" must be a non-empty string or None: '  '"),
    ],
)
def test_arguments_of_the_wrong_kind_are_refused_showing_them(
    arguments: dict[str, Any], refused: str
) -> None:
    """every="2" failed with a bare comparison error; every=2.5 and name=5 were taken (a
    target label 5)."""
    with pytest.raises(ValueError) as error:
        watch({}, **arguments)
    assert str(error.value) == refused


def test_a_mode_is_taken_in_any_case_as_the_settings_take_it(captured: Captured) -> None:
    """watch(mode="RAISE") was refused, where SENTINEL_MUTATION_MODE=RAISE is taken."""
    strict = watch(Settings(), name="app.strict", mode=" RAISE ")

    def write() -> None:
        strict.debug = True

    with serve(serve_actions(captured, {"write": write})) as url:
        assert httpx.get(f"{url}/write").status_code == 500
    assert [m["target"] for m in captured.mutations] == ["app.strict"]


def test_importing_a_submodule_of_a_watched_package_is_not_a_mutation(
    captured: Captured, tmp_path: Any
) -> None:
    package = tmp_path / "sentinel_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("SETTING = 1\n")
    (package / "lazy.py").write_text("VALUE = 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import sentinel_test_pkg  # type: ignore[import-not-found]

        watch(sentinel_test_pkg)

        def lazy_import() -> None:
            import sentinel_test_pkg.lazy  # type: ignore[import-not-found]  # noqa: F401

        with serve(serve_actions(captured, {"import": lazy_import})) as url:
            assert httpx.get(f"{url}/import").status_code == 200
        assert captured.mutations == []
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("sentinel_test_pkg", "sentinel_test_pkg.lazy"):
            sys.modules.pop(name, None)


def test_a_watch_made_before_sentinel_follows_its_mode() -> None:
    """watch() at import time, raise mode set later: the write is refused."""
    _watch.clear()
    settings = watch(Settings(), name="app.early")
    config = watch({"a": 1}, name="app.early_config")

    def write() -> None:
        settings.debug = True

    with capture_reports(mutation_mode="raise") as captured:
        with serve(
            serve_actions(captured, {"write": write, "config": lambda: config.update(a=2)})
        ) as url:
            assert httpx.get(f"{url}/write").status_code == 500
            assert httpx.get(f"{url}/config").status_code == 500  # found at response start
        assert settings.debug is False
        assert {r["action"] for r in captured.mutations} == {"refused"}


def test_other_mutable_containers_are_compared(captured: Captured) -> None:
    from collections import UserDict, deque

    queue: deque[int] = watch(deque([1, 2]), name="app.queue")
    mapping: UserDict[str, int] = watch(UserDict({"a": 1}), name="app.mapping")
    nested = watch({"hosts": ("a", ["b"])}, name="app.nested")

    def change() -> None:
        queue.append(3)
        mapping["a"] = 2
        nested["hosts"][1].append("c")

    with serve(serve_actions(captured, {"change": change})) as url:
        httpx.get(f"{url}/change")
    assert sorted(r["target"] for r in captured.mutations) == [
        "app.mapping",
        "app.nested",
        "app.queue",
    ]


@dataclasses.dataclass
class Frozenish:
    level: int = 1


def test_a_watched_object_keeps_its_type_equality_and_pickling(captured: Captured) -> None:
    settings = watch(Frozenish(), name="app.frozenish")
    watch(settings, name="app.frozenish")  # twice: still one report per write
    other = Frozenish()
    assert type(settings) is Frozenish and settings == Frozenish()
    assert pickle.loads(pickle.dumps(settings)) == settings

    def write() -> None:
        settings.level = 2
        other.level = 3  # not watched

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    assert [(r["target"], r["key"], r["new"]) for r in captured.mutations] == [
        ("app.frozenish", "level", 2)
    ]


# -- startup is the baseline -------------------------------------------------------------------


def _startup_app(fill: Callable[[], None]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        fill()  # startup loads the configuration: not a request's write
        yield

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/ok", ok)], lifespan=lifespan)


def test_startup_writes_to_watched_state_are_the_baseline(captured: Captured) -> None:
    config = watch({"limits": {}}, name="app.config")
    settings = watch(make_module())
    big = watch({"rps": 0}, name="app.big", every=3)

    def fill() -> None:
        config["limits"]["rps"] = 100
        settings.rebind("loaded")  # `global` rebinding: found by comparison only
        big["rps"] = 100

    app = instrument(_startup_app(fill), sentinel=captured.sentinel)
    with serve(app) as url:
        assert [httpx.get(f"{url}/ok").status_code for _ in range(4)] == [200] * 4
    assert captured.events("global_state_mutated") == []


def test_startup_writes_do_not_fail_a_later_request_in_raise_mode() -> None:
    """A watch compared every third request would find startup's write at the third."""
    config = watch({"limits": {}}, name="app.config", every=3)

    def fill() -> None:
        config["limits"]["rps"] = 100

    with capture_reports(mutation_mode="raise") as captured:
        with serve(instrument(_startup_app(fill), sentinel=captured.sentinel)) as url:
            assert [httpx.get(f"{url}/ok").status_code for _ in range(4)] == [200] * 4
        assert captured.events("global_state_mutated") == []


# -- values are shown without the app's code ---------------------------------------------------


class Lazy:
    """A value whose repr would run the app's code (a lazy proxy querying a database)."""

    reprs = 0

    def __repr__(self) -> str:
        Lazy.reprs += 1
        time.sleep(1.0)
        return "<Lazy>"


def test_a_values_repr_is_not_run(captured: Captured) -> None:
    """A slow ``__repr__`` would stall the event loop: the value is shown by its class."""
    Lazy.reprs = 0
    settings = watch(Settings(), name="app.settings")
    config = watch({"client": None}, name="app.config")

    def write() -> None:
        settings.debug = Lazy()
        config["client"] = {"pool": Lazy(), "size": 5}

    with serve(serve_actions(captured, {"write": write})) as url:
        started = time.monotonic()
        httpx.get(f"{url}/write")
        took = time.monotonic() - started
    shown = f"<{__name__}.Lazy object>"
    assert {(r["target"], r["new"]) for r in captured.mutations} == {
        ("app.settings", shown),
        ("app.config", f"{{'pool': {shown}, 'size': 5}}"),
    }
    assert Lazy.reprs == 0 and took < 1.0


# -- secrets -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Credentials:
    password: object = None
    api_key: object = None
    port: object = None


def test_numbers_under_secret_looking_names_are_scrubbed(captured: Captured) -> None:
    credentials = watch(Credentials(), name="app.credentials")

    def write() -> None:
        credentials.password = 482913557
        credentials.api_key = 7731234598.5
        credentials.port = 5432  # not secret: shown as it is

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    new = {r["key"]: r["new"] for r in captured.mutations}
    assert new["port"] == 5432
    assert new["password"].startswith("[scrubbed len=9 hash=")
    assert new["api_key"].startswith("[scrubbed len=12 hash=")
    assert "482913557" not in captured.stream.getvalue()
    assert "7731234598" not in captured.stream.getvalue()


def test_a_secret_in_a_long_string_inside_a_container_is_scrubbed(captured: Captured) -> None:
    """A long form body kept in a watched dict: shown cut, but scrubbed before the cut (a
    cut in the middle would break the ``client_secret=`` pattern and show the secret)."""
    state = watch({}, name="app.state")
    # Cut to 200 characters in the middle, a string keeps its last 99: from "t=" on.
    tail = "client_secret=hunter2-s3cr3t-7f3a&redirect_uri=" + "y" * 63
    body = "grant_type=x&" + "scope=read&" * 30 + tail

    def write() -> None:
        state["last_call"] = {"body": body}

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    (record,) = captured.mutations
    assert record["key"] == "last_call"
    assert record["new"].startswith("{'body': 'grant_type=x&scope=read&")
    assert "s3cr3t" not in captured.stream.getvalue()


# -- one watch per target ----------------------------------------------------------------------


def test_a_target_watched_twice_counts_each_write_once(captured: Captured) -> None:
    """An app factory called twice watches the same container and module again."""
    config = {"limits": {"rps": 100}}
    module = make_module()
    for name in ("app.CONFIG", "app.CONFIG"):
        watch(config, name=name)
    watch(module, name="app.first")
    watch(module, name="app.settings")  # the last name applies

    def write() -> None:
        config["limits"]["rps"] = 5
        module.rebind("replica")

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    assert sorted((r["target"], r["key"]) for r in captured.mutations) == [
        ("app.CONFIG", "limits"),
        ("app.settings", "BACKEND"),
    ]
    for target in ("app.CONFIG", "app.settings"):
        labels = {"location": "unknown", "route": "/write", "target": target}
        assert captured.metric("sentinel_global_mutations_total", **labels) == 1


class Base:
    def __init__(self) -> None:
        self.backend = "primary"


class Derived(Base):
    pass


class OwnSetter(Base):
    def __setattr__(self, attribute: str, value: Any) -> None:
        super().__setattr__(attribute, value)  # reaches the wrapper of a watched Base


def test_a_subclass_of_a_watched_class_counts_each_write_once(captured: Captured) -> None:
    watch(Base(), name="app.base")
    derived = watch(Derived(), name="app.derived")
    own = watch(OwnSetter(), name="app.own")
    plain = Derived()  # not watched

    def write() -> None:
        derived.backend = "replica"
        own.backend = "replica"
        plain.backend = "replica"

    with serve(serve_actions(captured, {"write": write})) as url:
        httpx.get(f"{url}/write")
    assert sorted(r["target"] for r in captured.mutations) == ["app.derived", "app.own"]
    for target in ("app.derived", "app.own"):
        labels = {"location": "unknown", "route": "/write", "target": target}
        assert captured.metric("sentinel_global_mutations_total", **labels) == 1
    _watch.clear()
    assert "__setattr__" not in vars(Base) and "__setattr__" not in vars(Derived)
    assert vars(OwnSetter)["__setattr__"].__qualname__ == "OwnSetter.__setattr__"

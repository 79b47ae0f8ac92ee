"""Loading `sentinel run`'s MODULE:APP, and the one sentence that says why it failed."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_env, first_response, free_port

from sentinel._run_factory import (
    TargetError,
    asgi_apps,
    describe_failure,
    load_and_report,
    load_target,
    looks_like_asgi_app,
    parse_target,
    search_path,
)
from sentinel._scrub import Scrubber

CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"
SENTINEL = [sys.executable, "-m", "sentinel.cli"]

APP_MODULE = """
from starlette.applications import Starlette


class Middleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


async def apu(request):  # a request handler: not an app
    ...


async def asgi(scope, receive, send):
    ...


def create_app():
    return Starlette()


def helper(value):
    return value


api = Starlette()
apq = Middleware(api)
settings = {"debug": False}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory on sys.path, as `sentinel run` has it; modules imported from it
    are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _write(project: Path, relative: str, source: str) -> None:
    path = project / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


def _failure(target: str, *, factory: bool = False, **kwargs: Any) -> str:
    with pytest.raises(BaseException) as caught:
        load_target(target, factory=factory)
    return describe_failure(target, caught.value, factory=factory, **kwargs)


def test_a_missing_module_names_the_working_directory_and_what_to_do(project: Path) -> None:
    """The module is not anywhere: the sentence names it, the working directory and the
    other directories Python searched (not the standard library), and PYTHONPATH."""
    sentence = _failure("nosuch_xq.mod:app")
    assert "no module named 'nosuch_xq'" in sentence
    assert f"the working directory {project}" in sentence
    assert "PYTHONPATH" in sentence
    assert "\n" not in sentence
    searched = search_path()
    assert str(project) in searched
    assert sysconfig.get_paths()["stdlib"] not in searched


def test_a_near_module_name_is_suggested(project: Path) -> None:
    """A typo in the module's name: the module in the working directory is suggested."""
    _write(project, "shopapp.py", "app = None\n")
    assert "did you mean 'shopapp'?" in _failure("shopap:app")


def test_a_missing_module_of_a_package_names_the_package_and_its_modules(project: Path) -> None:
    """A typo below a package: the package's directory, and its module with a near name."""
    _write(project, "shop/__init__.py", "")
    _write(project, "shop/main.py", "app = None\n")
    sentence = _failure("shop.mian:app")
    assert f"the package 'shop' ({project / 'shop'}) has no module 'mian'" in sentence
    assert "did you mean 'shop.main'?" in sentence


def test_a_module_is_not_a_package(project: Path) -> None:
    """`app.sub:app` where app is a plain module says so."""
    _write(project, "plainmod.py", "app = None\n")
    sentence = _failure("plainmod.sub:app")
    assert "'plainmod'" in sentence and "is a module, not a package" in sentence


def test_a_file_path_is_answered_with_the_module_to_give(project: Path) -> None:
    """`src/app.py:app` is a file name: the dotted module name is what to give."""
    _write(project, "src/app.py", "app = None\n")
    sentence = _failure("src/app.py:app")
    assert "src.app:app" in sentence


def test_an_attribute_typo_suggests_the_modules_asgi_apps(project: Path) -> None:
    """Only what looks like an ASGI app is suggested: Starlette instances and callables
    taking scope, receive, send; not request handlers, classes or other values."""
    _write(project, "shopweb.py", APP_MODULE)
    sentence = _failure("shopweb:apx")
    assert f"'shopweb' ({project / 'shopweb.py'}) has no attribute 'apx'" in sentence
    suggestion = sentence.rpartition("did you mean ")[2]
    assert sorted(suggestion.rstrip("?").split(" or ")) == ["'api'", "'apq'"]
    assert "'apu'" not in sentence


def test_without_a_near_name_every_asgi_app_is_listed(project: Path) -> None:
    """No name is close: the module's ASGI apps are listed instead."""
    _write(project, "shopweb.py", APP_MODULE)
    assert "its ASGI apps: 'api', 'apq', 'asgi'" in _failure("shopweb:application")


def test_a_module_without_any_asgi_app_says_so(project: Path) -> None:
    """Nothing to suggest: the sentence says what an ASGI app would have been."""
    _write(project, "noapps.py", "value = 1\n")
    assert "it defines no ASGI app" in _failure("noapps:app")


def test_with_factory_the_functions_without_arguments_are_suggested(project: Path) -> None:
    """--factory: the attribute is a function to call, so those are what is suggested."""
    _write(project, "shopweb.py", APP_MODULE)
    sentence = _failure("shopweb:create_ap", factory=True)
    assert "did you mean 'create_app'?" in sentence


def test_a_value_that_is_not_callable_suggests_the_apps(project: Path) -> None:
    """MODULE:APP names a value that cannot be called: its type, and the apps there are."""
    _write(project, "shopweb.py", APP_MODULE)
    sentence = _failure("shopweb:settings")
    assert "is not an ASGI callable: dict" in sentence
    assert "its ASGI apps: 'api', 'apq', 'asgi'" in sentence


def test_an_exception_while_importing_names_its_line_with_the_message_scrubbed(
    project: Path,
) -> None:
    """The app's own error: its type, its scrubbed message and the app's line that raised."""
    _write(
        project,
        "brokenweb.py",
        f"""
        import os

        DSN = "postgres://admin:{CANARY}@db/shop"
        raise RuntimeError(f"cannot connect to {{DSN}}")
        """,
    )
    sentence = _failure("brokenweb:app", scrub=Scrubber().text)
    assert "importing 'brokenweb:app' raised RuntimeError: cannot connect to" in sentence
    assert f"{project / 'brokenweb.py'}:5" in sentence
    assert 'phase "import"' in sentence
    assert CANARY not in sentence


def test_a_missing_dependency_is_an_import_failure_with_advice(project: Path) -> None:
    """A module the app imports is missing: that is the app's failure, not a wrong target."""
    _write(project, "needsdep.py", "import not_installed_dependency_xq\n")
    sentence = _failure("needsdep:app")
    assert "raised ModuleNotFoundError" in sentence
    assert "install it" in sentence and "'not_installed_dependency_xq'" in sentence


@pytest.mark.parametrize("target", ["module", ":app", "module:"])
def test_malformed_targets_are_refused_showing_the_value(target: str) -> None:
    """Anything but MODULE:APP is refused before any import, showing the value."""
    with pytest.raises(TargetError, match="MODULE:APP") as caught:
        parse_target(target)
    assert str(caught.value).endswith(repr(target))


class _Reporter:
    def __init__(self) -> None:
        self.reported: list[tuple[str, str]] = []

    def report(self, error: BaseException, phase: str, *, sync: bool = False) -> None:
        self.reported.append((type(error).__name__, phase))


@pytest.mark.parametrize(
    ("target", "factory", "reported"),
    [
        ("shopwbe:api", False, []),
        ("shop.mian:api", False, []),
        ("shopweb.sub:api", False, []),
        ("shopweb:apx", False, []),
        ("shopweb:settings", False, []),
        ("shopweb:create_ap", True, []),
        ("shopweb:helper", True, [("TypeError", "import")]),
        ("needsdep:app", False, [("ModuleNotFoundError", "import")]),
        ("brokenweb:app", False, [("AttributeError", "import")]),
        ("shop.broken:app", False, [("KeyError", "import")]),
    ],
)
def test_only_the_apps_own_exceptions_are_reported(
    project: Path, target: str, factory: bool, reported: list[tuple[str, str]]
) -> None:
    """A module, package or attribute that is not there, or a value that is no app, is the
    command's mistake, said in one line and not reported as the app's exception; what the
    app's code raises (a factory called wrongly, a dependency missing, an AttributeError of
    its own at import time) is."""
    _write(project, "shopweb.py", APP_MODULE)
    _write(project, "shop/__init__.py", "")
    _write(project, "shop/main.py", "api = None\n")
    _write(project, "shop/broken.py", "import os\nos.environ['NO_SUCH_VARIABLE_XQ']\n")
    _write(project, "needsdep.py", "import not_installed_dependency_xq\n")
    _write(project, "brokenweb.py", "import os\nos.no_such_function_xq()\n")
    sentinel: Any = type("FakeSentinel", (), {"reporter": _Reporter()})()
    with pytest.raises((ImportError, AttributeError, TypeError, KeyError, TargetError)):
        load_and_report(sentinel, target, factory=factory)
    assert sentinel.reporter.reported == reported


async def _scope_receive_send(scope: Any, receive: Any, send: Any) -> None: ...


async def _handler(request: Any) -> None: ...


class _Callable:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


@pytest.mark.parametrize(
    ("value", "is_app"),
    [
        (_scope_receive_send, True),
        (_Callable(), True),
        (_Callable, False),
        (_handler, False),
        (print, False),
        ("app", False),
    ],
    ids=["function", "instance", "class", "handler", "builtin", "string"],
)
def test_what_looks_like_an_asgi_app(value: object, is_app: bool) -> None:
    """Callables taking scope, receive, send are apps; classes, handlers and others not."""
    assert looks_like_asgi_app(value) is is_app


def test_a_starlette_instance_is_an_asgi_app() -> None:
    """A Starlette instance counts by its type, whatever its __call__ looks like."""
    from starlette.applications import Starlette

    holder = type("Holder", (), {"web": Starlette(), "other": 3})
    assert asgi_apps(holder) == ["web"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_factory_that_raises_ends_sentinel_run_with_one_sentence(
    workers: str, tmp_path: Path
) -> None:
    """`sentinel run --factory` whose factory raises: the command ends by itself, status 1,
    saying why once. With workers, each exits with uvicorn's startup-failure status, the
    only one on which its supervisor stops instead of starting them again forever."""
    (tmp_path / "badfactory.py").write_text(
        "def make():\n    raise RuntimeError('database url missing')\n"
    )
    process = subprocess.Popen(
        [
            *SENTINEL,
            "run",
            "badfactory:make",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--workers",
            workers,
        ],
        env=clean_env(PYTHONPATH=str(tmp_path), SENTINEL_METRICS_PORT="0"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        pytest.fail("sentinel run never ended: the workers were started again and again")
    said = [line for line in stderr.splitlines() if line.startswith("sentinel run:")]
    assert process.returncode == 1, stderr
    assert len(said) == 1, stderr
    assert (
        "calling the factory 'badfactory:make' raised RuntimeError: database url missing"
        in (said[0])
    )


STARTUP_FAILURES = {
    "add_middleware with an invalid setting": (
        """
        import sentinel
        from starlette.applications import Starlette

        app = Starlette()
        app.add_middleware(sentinel.SentinelMiddleware, location="bad location!")
        """,
        [],
    ),
    "a Starlette lifespan that raises": (
        """
        import contextlib
        from starlette.applications import Starlette

        @contextlib.asynccontextmanager
        async def lifespan(app):
            raise ConnectionError("database unreachable")
            yield

        app = Starlette(lifespan=lifespan)
        """,
        [],
    ),
    "an ASGI lifespan that raises, under --lifespan on": (
        """
        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                await receive()
                raise ConnectionError("database unreachable")
        """,
        ["--lifespan", "on"],
    ),
}


def _run_to_the_end(
    tmp_path: Path, source: str, *options: str
) -> tuple[subprocess.Popen[str], str]:
    """`sentinel run startupapp:app OPTIONS` with the app ``source``, until it ends."""
    (tmp_path / "startupapp.py").write_text(textwrap.dedent(source))
    process = subprocess.Popen(
        [*SENTINEL, "run", "startupapp:app", "--port", str(free_port()), *options],
        env=clean_env(PYTHONPATH=str(tmp_path), SENTINEL_METRICS_PORT="0"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        pytest.fail("sentinel run went on serving an app whose startup failed")
    return process, stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", list(STARTUP_FAILURES))
def test_a_startup_that_fails_ends_sentinel_run_with_uvicorns_status(
    case: str, workers: str, tmp_path: Path
) -> None:
    """An app whose lifespan startup fails makes `sentinel run` exit with uvicorn's
    startup-failure status, 3, with workers as with one process (uvicorn's supervisor
    stops on it with status 0: the worker's sentinel tells the command)."""
    source, options = STARTUP_FAILURES[case]
    process, stderr = _run_to_the_end(tmp_path, source, *options, "--workers", workers)
    assert process.returncode == 3, stderr
    assert "Application startup failed. Exiting." in stderr
    assert "sentinel run:" not in stderr  # uvicorn said why; no sentence blames the import


def test_an_asgi_lifespan_that_raises_under_lifespan_auto_is_served_by_the_workers(
    tmp_path: Path,
) -> None:
    """Under --lifespan auto (the default) uvicorn takes a lifespan that raises for
    "lifespan unsupported" and serves: so do the workers, and Ctrl-C ends it with 0."""
    source, _ = STARTUP_FAILURES["an ASGI lifespan that raises, under --lifespan on"]
    (tmp_path / "startupapp.py").write_text(
        textwrap.dedent(source)
        + textwrap.dedent(
            """
            async def served(scope, receive, send):
                if scope["type"] == "http":
                    await send({"type": "http.response.start", "status": 200, "headers": []})
                    await send({"type": "http.response.body", "body": b"ok"})
                else:
                    await app(scope, receive, send)
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [*SENTINEL, "run", "startupapp:served", "--port", str(port), "--workers", "2"],
        env=clean_env(PYTHONPATH=str(tmp_path), SENTINEL_METRICS_PORT="0"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert first_response(process, f"http://127.0.0.1:{port}/").text == "ok"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr

"""The app factory `sentinel run` hands to uvicorn: each worker installs sentinel, imports
the app (reporting an import-time error) and wraps it.

When the app cannot be loaded, :func:`describe_failure` says why in one sentence for a
person: the module that was not found and where Python looked, the attribute that is
missing and the module's ASGI apps with a similar name, or the exception importing raised.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import multiprocessing
import os
import pkgutil
import sys
import sysconfig
import traceback
from collections.abc import Callable
from typing import Any

from ._current import current
from ._middleware import SentinelMiddleware, find_sentinel
from ._run_failure import first_failure
from ._runtime import Sentinel, install
from .types import ASGIApp

TARGET_VARIABLE = "SENTINEL_RUN_TARGET"
FACTORY_VARIABLE = "SENTINEL_RUN_FACTORY"
_MAX_LISTED = 6
"""Directories or names a sentence lists before it says how many more there are."""
_MAX_MESSAGE_CHARS = 200


class TargetError(ValueError):
    """The MODULE:APP argument is malformed or does not name an ASGI app."""


def parse_target(target: str) -> tuple[str, str]:
    """``"mypkg.main:app"`` as ``("mypkg.main", "app")``; TargetError when malformed."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        msg = f'the app must be given as "MODULE:APP", e.g. "mypkg.main:app": {target!r}'
        raise TargetError(msg)
    return module, attribute


def load_target(target: str, *, factory: bool) -> Any:
    """Import ``MODULE:APP`` (and call it when it is a factory); import errors propagate."""
    module_name, attribute = parse_target(target)
    module = importlib.import_module(module_name)
    app: Any = module
    for part in attribute.split("."):
        app = getattr(app, part)
    if factory:
        app = app()
    if not callable(app):
        msg = f"{target!r} is not an ASGI callable: {type(app).__name__}"
        raise TargetError(msg)
    return app


def load_and_report(sentinel: Sentinel, target: str, *, factory: bool) -> Any:
    """Load the app; an exception while importing it is reported with phase ``import``.
    Not KeyboardInterrupt (Ctrl-C during a slow import is the operator's), nor an app that
    is not there (see :func:`is_not_there`): neither is an exception of the app's."""
    try:
        return load_target(target, factory=factory)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if not is_not_there(target, exc, factory=factory):
            sentinel.reporter.report(exc, "import", sync=True)
        raise


def is_not_there(target: str, error: BaseException, *, factory: bool = False) -> bool:
    """Whether :func:`load_target` failed with ``error`` because ``target`` names no app: its
    module (or a parent package) or attribute does not exist, or it is no ASGI callable.
    That is the command line's mistake, which :func:`describe_failure` says in one line,
    rather than an exception the app's own code raised."""
    if isinstance(error, TargetError):
        return True
    module_name, attribute = parse_target(target)
    if isinstance(error, ModuleNotFoundError):
        return _is_part_of(error.name, module_name)
    module = sys.modules.get(module_name)
    return module is not None and (
        _missing_attribute(target, module, attribute, factory=factory) is not None
    )


def create_app() -> ASGIApp:
    """Called by uvicorn in each worker: install sentinel, import the app, wrap it (unless
    the app brings its own sentinel: one per app, so every request is counted once)."""
    target = os.environ[TARGET_VARIABLE]
    module_name = parse_target(target)[0]
    # Served in the process that imported the app already (`sentinel run` without
    # --workers or --reload): the sentinel current now is the one the import left, the
    # app's own if it installed one. Installing again from the environment would close
    # that one, and with it the mutation watches and settings of the app being served.
    sentinel = current() if module_name in sys.modules else None
    if sentinel is None or sentinel.closed:
        sentinel = install(service_fallback=module_name)
    factory = os.environ.get(FACTORY_VARIABLE) == "1"
    try:
        app = load_and_report(sentinel, target, factory=factory)
    except KeyboardInterrupt:
        raise  # the server is being stopped: nothing to blame the app for
    except BaseException as error:
        sentence = describe_failure(target, error, factory=factory, scrub=sentinel.scrubber.text)
        if first_failure(sentence):
            print(f"sentinel run: {sentence}", file=sys.stderr, flush=True)
        sentinel.close()
        raise SystemExit(_failure_status()) from None
    if find_sentinel(app) is not None:
        return app  # type: ignore[no-any-return]
    return SentinelMiddleware(app, sentinel=sentinel)


def _failure_status() -> int:
    """1, as for an import error; in a worker process uvicorn's startup-failure status,
    the only one on which its supervisor stops rather than start the worker again."""
    if multiprocessing.parent_process() is None:
        return 1
    from uvicorn.config import STARTUP_FAILURE

    return STARTUP_FAILURE


# -- why the app could not be loaded -----------------------------------------------------------


def describe_failure(
    target: str,
    error: BaseException,
    *,
    factory: bool = False,
    scrub: Callable[[str], str] = str,
) -> str:
    """One sentence on why :func:`load_target` failed with ``error``, and what to do.

    A module or attribute that is not there is described with where it was looked for
    (``sys.path`` as it is now, the working directory) and the near names that do exist;
    an exception raised by the app's own code is named with the line that raised it, its
    message passed through ``scrub`` first.
    """
    module_name, attribute = parse_target(target)
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        return _file_instead_of_module(target, module_name, attribute)
    if isinstance(error, ModuleNotFoundError) and _is_part_of(error.name, module_name):
        return _module_not_found(target, error.name or module_name)
    module = sys.modules.get(module_name)
    if module is not None:
        missing = _missing_attribute(target, module, attribute, factory=factory)
        if missing is not None:
            return missing
        if isinstance(error, TargetError):
            return f"{error}; {_candidates_sentence(module, attribute, factory=factory)}"
    action = "calling the factory" if factory and module is not None else "importing"
    advice = "fix that error, then start again"
    if isinstance(error, ModuleNotFoundError) and error.name:
        advice = (
            f"the app needs {error.name.partition('.')[0]!r}: install it into the environment "
            f"sentinel runs in ({sys.prefix})"
        )
    return (
        f"{action} {target!r} raised {_exception_line(error, module_name, scrub)} "
        f'(reported with phase "import"); {advice}'
    )


def _is_part_of(name: str | None, module_name: str) -> bool:
    """Whether the missing module ``name`` is ``module_name`` or one of its parents, i.e.
    what was asked for is missing, rather than something the app imports."""
    return bool(name) and (name == module_name or module_name.startswith(f"{name}."))


def _file_instead_of_module(target: str, module_name: str, attribute: str) -> str:
    path = module_name.removesuffix(".py").replace("\\", "/").removeprefix("./").strip("/")
    dotted = path.replace("/", ".")
    return (
        f"{target!r} names a file, and sentinel run imports a module: give the module's "
        f"dotted name, {dotted}:{attribute}, from the directory that contains it"
    )


def _module_not_found(target: str, missing: str) -> str:
    parent_name, _, name = missing.rpartition(".")
    if parent_name:
        parent = sys.modules.get(parent_name)
        where = _origin(parent)
        if parent is not None and not hasattr(parent, "__path__"):
            return (
                f"cannot import {target!r}: {parent_name!r}{where} is a module, not a package, "
                f"so it has no module {name!r}"
            )
        directories = list(getattr(parent, "__path__", []))
        names = sorted(info.name for info in pkgutil.iter_modules(directories))
        hint = _did_you_mean(name, names, prefix=f"{parent_name}.")
        public = [module for module in names if not module.startswith("_")]
        return (
            f"cannot import {target!r}: the package {parent_name!r}{where} has no module "
            f"{name!r}{hint or _listing(' (its modules: ', public, ')')}"
        )
    cwd = os.getcwd()
    directories = search_path()
    elsewhere = [directory for directory in directories if directory != cwd]
    looked = "the working directory " + cwd if cwd in directories else ""
    if elsewhere:
        looked += (" and in " if looked else "") + _listing("", elsewhere, "")
    if not looked:
        looked = "no directory: sys.path is empty"
    local = [d for d in directories if not _is_installed_packages(d)]
    hint = _did_you_mean(name, sorted({i.name for i in pkgutil.iter_modules(local)}))
    advice = hint or (
        f"; start sentinel run from the directory that contains {name}/ or {name}.py, or "
        "add that directory to PYTHONPATH"
    )
    return f"cannot import {target!r}: no module named {name!r} in {looked}{advice}"


def search_path() -> list[str]:
    """The directories on ``sys.path`` where an app's module may be, absolute and each once:
    the standard library's and the running script's own directory are left out."""
    paths = sysconfig.get_paths()
    stdlib = {os.path.abspath(paths[key]) for key in ("stdlib", "platstdlib")}
    script = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    cwd = os.getcwd()
    found: list[str] = []
    for entry in sys.path:
        directory = os.path.abspath(entry or cwd)
        if directory in found or not os.path.isdir(directory):
            continue  # zip files of the standard library, entries that do not exist
        if directory == script and directory != cwd:
            continue
        inside_stdlib = any(
            directory == lib or directory.startswith(lib + os.sep) for lib in stdlib
        )
        if inside_stdlib and not _is_installed_packages(directory):
            continue
        found.append(directory)
    return found


def _is_installed_packages(directory: str) -> bool:
    return os.path.basename(directory) in ("site-packages", "dist-packages")


def _missing_attribute(target: str, module: Any, attribute: str, *, factory: bool) -> str | None:
    """The sentence for the first part of ``attribute`` that ``module`` does not have, or
    None when the whole dotted path is there."""
    owner = module
    walked = module.__name__
    for part in attribute.split("."):
        try:
            owner_next = getattr(owner, part)
        except AttributeError:
            return (
                f"cannot load {target!r}: {walked!r}{_origin(owner)} has no attribute "
                f"{part!r}; {_candidates_sentence(owner, part, factory=factory)}"
            )
        except Exception:
            return None  # a property that raised: the app's own error, described as such
        owner = owner_next
        walked = f"{walked}.{part}"
    return None


def _candidates_sentence(owner: Any, wanted: str, *, factory: bool) -> str:
    names = app_factories(owner) if factory else asgi_apps(owner)
    kind = "app factories" if factory else "ASGI apps"
    hint = _did_you_mean(wanted, names)
    if hint:
        return hint.removeprefix("; ")
    if names:
        return _listing(f"its {kind}: ", [repr(name) for name in names], "")
    if factory:
        return "it defines no function that takes no arguments to call as the app factory"
    return (
        "it defines no ASGI app (a Starlette or FastAPI instance, or a callable taking "
        "scope, receive, send)"
    )


def asgi_apps(namespace: Any) -> list[str]:
    """The names in ``namespace`` (a module, or any object with attributes) of the objects
    that look like ASGI apps: Starlette (and FastAPI) instances, and callables taking
    ``scope, receive, send``. Classes are left out: a middleware class is not an app."""
    return [name for name, value in _public_items(namespace) if looks_like_asgi_app(value)]


def app_factories(namespace: Any) -> list[str]:
    """The functions ``namespace`` defines itself that can be called without arguments."""
    module = getattr(namespace, "__name__", None)
    return [
        name
        for name, value in _public_items(namespace)
        if inspect.isfunction(value)
        and value.__module__ == module
        and _required_parameters(value) == []
    ]


def looks_like_asgi_app(value: object) -> bool:
    """Whether ``value`` is a Starlette instance or a callable taking scope, receive, send."""
    if isinstance(value, type) or not callable(value):
        return False
    applications = sys.modules.get("starlette.applications")
    if applications is not None and isinstance(value, applications.Starlette):
        return True
    try:
        parameters = list(inspect.signature(value).parameters.values())
    except (TypeError, ValueError):
        return False
    names = [p.name for p in parameters if p.kind in _POSITIONAL]
    required = _required_parameters(value)
    return names[:3] == ["scope", "receive", "send"] and required is not None and len(required) == 3


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _required_parameters(function: Callable[..., Any]) -> list[str] | None:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _public_items(namespace: Any) -> list[tuple[str, Any]]:
    try:
        items = list(vars(namespace).items())  # not dir(): no property runs
    except TypeError:
        return []
    return sorted((name, value) for name, value in items if not name.startswith("__"))


def _did_you_mean(wanted: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(f"{prefix}{name}") for name in close) + "?"


def _listing(before: str, items: list[str], after: str) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{before}{shown}{f' and {more} more' if more > 0 else ''}{after}"


def _origin(module: Any) -> str:
    """`` (where/it/is.py)``, a package's directory, or nothing when unknown."""
    origin = next(iter(getattr(module, "__path__", [])), None) or getattr(module, "__file__", None)
    return f" ({origin})" if isinstance(origin, str) else ""


def _exception_line(error: BaseException, module_name: str, scrub: Callable[[str], str]) -> str:
    """``KeyError: 'X' at app.py:4``: the type, the scrubbed message, and the innermost line
    of the app's own package (else the innermost line)."""
    message = scrub(str(error))
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    text = name + (f": {message}" if message else "")
    frames = [
        (frame.f_globals.get("__name__", ""), frame.f_code.co_filename, line)
        for frame, line in traceback.walk_tb(error.__traceback__)
        if frame.f_globals.get("__name__") != __name__
    ]
    package = module_name.partition(".")[0]
    own = [f for f in frames if f[0] == package or f[0].startswith(f"{package}.")]
    real = [f for f in frames if not f[1].startswith("<frozen")]
    if not (own or real):
        return text
    _, filename, line = (own or real)[-1]
    return f"{text} at {filename}:{line}"

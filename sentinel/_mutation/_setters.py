"""The process-wide setters watched by default (``os.chdir``, ``os.umask``, logging,
``signal.signal``...), wrapped at write time.

Each wrapper asks the current sentinel whether the write is a request's mutation before
calling the original (so ``raise`` mode can refuse it) and reports it once the original
succeeded. Queries (``locale.setlocale(LC_ALL)``) and calls that write nothing (adding a
handler a logger already has, ``basicConfig`` once the root logger has handlers) are not
writes; setting a value to the one it already has is (the code that does it is the bug).
Whatever a watched call does inside (``basicConfig`` adding a handler) is part of that
one call.
"""

from __future__ import annotations

import functools
import locale as _locale
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from starlette.datastructures import State

from .._current import current
from . import _environ
from ._detect import open_catch_warnings, reentry

Described = tuple[object, object, object] | None
"""(key, old value, new value) of a write, or None when the call writes nothing."""

_patched: list[tuple[Any, str, Any]] = []
_lock = threading.Lock()
_app_states: weakref.WeakSet[Any] = weakref.WeakSet()
_LOCALE_CATEGORIES = {
    getattr(_locale, name): name
    for name in (
        "LC_ALL",
        "LC_COLLATE",
        "LC_CTYPE",
        "LC_MESSAGES",
        "LC_MONETARY",
        "LC_NUMERIC",
        "LC_TIME",
    )
    if hasattr(_locale, name)
}


def _wrap(
    original: Callable[..., Any],
    target: str,
    describe: Callable[..., Described],
    *,
    probe_sees: str | None = None,
    old_from_result: bool = False,
) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if reentry.depth:
            return original(*args, **kwargs)
        sentinel = current()
        if sentinel is None:
            return original(*args, **kwargs)
        watcher = sentinel.mutations
        try:
            described = describe(*args, **kwargs)
        except Exception:
            described = None  # arguments the original will refuse: not a write
        note = None
        if described is not None:
            if probe_sees is not None:
                watcher.before_exact_write(probe_sees)
            key, old, new = described
            note = watcher.intercept(target, key, old, new, sys._getframe(1))
        reentry.depth += 1
        try:
            result = original(*args, **kwargs)
        finally:
            reentry.depth -= 1
        if described is not None:
            if note is not None:
                if old_from_result:
                    note.old = result
                note.mode = "report" if note.mode == "isolate" else note.mode
                watcher.commit(note)
            if probe_sees is not None:
                watcher.after_exact_write(probe_sees)
        return result

    wrapper.__sentinel_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _patch(owner: Any, name: str, *args: Any, **kwargs: Any) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return  # not on this platform (time.tzset on Windows)
    _patched.append((owner, name, original))
    setattr(owner, name, _wrap(original, *args, **kwargs))


# -- what each call writes ----------------------------------------------------------------------


def _chdir(path: Any) -> Described:
    try:
        old: object = os.getcwd()
    except OSError:
        old = None
    return None, old, os.fspath(path) if not isinstance(path, int) else path


def _umask(mask: int) -> Described:
    return None, None, mask


def _tzset() -> Described:
    # The stdlib's strptime calls tzset() when it builds its locale cache (its first call in
    # the process): that re-reads the same TZ and is not the app's write.
    if sys._getframe(2).f_globals.get("__name__") == "_strptime":
        return None
    return "TZ", None, os.environ.get("TZ")


_LOCALE_SET_AND_RESTORED = frozenset(
    {("locale", "getpreferredencoding"), ("calendar", "__enter__"), ("calendar", "__exit__")}
)
"""Standard library callers of setlocale that put the locale back before they return:
``locale.getpreferredencoding()`` sets LC_CTYPE to read the encoding, and ``calendar``'s
``different_locale`` (LocaleTextCalendar's month and day names) sets LC_TIME for its block.
Queries, not writes."""


def _setlocale(category: int, locale: Any = None) -> Described:  # setlocale's own names
    if locale is None:
        return None  # a query
    caller = sys._getframe(2)
    if (caller.f_globals.get("__name__"), caller.f_code.co_name) in _LOCALE_SET_AND_RESTORED:
        return None
    old = _original(_locale, "setlocale")(category)
    return _LOCALE_CATEGORIES.get(category, category), old, locale


def _signal(signalnum: int, handler: Any) -> Described:
    try:
        key: object = signal.Signals(signalnum).name
    except ValueError:
        key = signalnum
    return key, signal.getsignal(signalnum), handler


def _setdefaulttimeout(timeout: float | None) -> Described:
    return None, socket.getdefaulttimeout(), timeout


def _seed(a: Any = None, *_args: Any, **_kwargs: Any) -> Described:
    return None, None, a


def _setrecursionlimit(limit: int) -> Described:
    return None, sys.getrecursionlimit(), limit


def _setswitchinterval(interval: float) -> Described:
    return None, sys.getswitchinterval(), interval


def _set_level(logger: logging.Logger, level: Any) -> Described:
    return logger.name, logging.getLevelName(logger.level), level


def _add_handler(logger: logging.Logger, handler: Any) -> Described:
    if handler in logger.handlers:
        return None
    return logger.name, None, handler


def _remove_handler(logger: logging.Logger, handler: Any) -> Described:
    if handler not in logger.handlers:
        return None
    return logger.name, handler, None


def _disable(level: int = logging.CRITICAL) -> Described:
    return None, logging.root.manager.disable, level


def _basic_config(**kwargs: Any) -> Described:
    if logging.root.handlers and not kwargs.get("force"):
        return None  # a no-op once the root logger has handlers
    return None, None, ", ".join(sorted(kwargs)) or "defaults"


def _inside_catch_warnings() -> bool:
    # catch_warnings() swaps in a copy of the filter list and restores it at exit: writes
    # inside the block are scoped to it (as far as catch_warnings itself is).
    sentinel = current()
    return sentinel is not None and not sentinel.mutations.probe.owns_filters()


def _filterwarnings(
    action: str, message: str = "", category: Any = Warning, *_a: Any, **_k: Any
) -> Described:
    if _inside_catch_warnings():
        return None
    return action, None, f"{action} {getattr(category, '__name__', category)} {message!r}"


def _simplefilter(action: str, category: Any = Warning, *_a: Any, **_k: Any) -> Described:
    if _inside_catch_warnings():
        return None
    return action, None, f"{action} {getattr(category, '__name__', category)}"


def _resetwarnings() -> Described:
    if _inside_catch_warnings():
        return None
    return None, len(warnings.filters), 0


def _state_set(state: Any, key: str, value: Any) -> Described:
    if state not in _app_states:
        return None  # request.state and other State objects are request-scoped
    return key, state._state.get(key), value


def _state_del(state: Any, key: str) -> Described:
    if state not in _app_states:
        return None
    return key, state._state.get(key), None


def _counting_blocks(enter: Any, exit_: Any) -> tuple[Any, Any]:
    """catch_warnings' ``__enter__`` and ``__exit__``, noting the list each open block
    installed."""

    @functools.wraps(enter)
    def __enter__(self: Any) -> Any:
        result = enter(self)
        open_catch_warnings.entered(self, getattr(self, "_module", warnings).filters)
        return result

    @functools.wraps(exit_)
    def __exit__(self: Any, *exc_info: Any) -> Any:
        try:
            return exit_(self, *exc_info)
        finally:
            open_catch_warnings.exited(self)

    return __enter__, __exit__


def _original(owner: Any, name: str) -> Any:
    value = getattr(owner, name)
    return getattr(value, "__sentinel_original__", value)


# -- installing -------------------------------------------------------------------------------


def install_default_watches(isolating: bool = False) -> None:
    """Wrap every default watch once per process; ``isolating`` also isolates the environment."""
    with _lock:
        _environ.install(isolating)
        if _patched:
            return
        _patch(os, "chdir", "os.chdir", _chdir)
        _patch(os, "umask", "os.umask", _umask, old_from_result=True)
        _patch(time, "tzset", "time.tzset", _tzset)
        _patch(_locale, "setlocale", "locale.setlocale", _setlocale)
        _patch(signal, "signal", "signal.signal", _signal)
        _patch(
            socket,
            "setdefaulttimeout",
            "socket.setdefaulttimeout",
            _setdefaulttimeout,
            probe_sees="socket",
        )
        _patch(random, "seed", "random.seed", _seed)
        _patch(sys, "setrecursionlimit", "sys.setrecursionlimit", _setrecursionlimit)
        _patch(sys, "setswitchinterval", "sys.setswitchinterval", _setswitchinterval)
        _patch(
            logging.Logger, "setLevel", "logging.Logger.setLevel", _set_level, probe_sees="logging"
        )
        _patch(
            logging.Logger,
            "addHandler",
            "logging.Logger.addHandler",
            _add_handler,
            probe_sees="logging",
        )
        _patch(
            logging.Logger,
            "removeHandler",
            "logging.Logger.removeHandler",
            _remove_handler,
            probe_sees="logging",
        )
        _patch(logging, "disable", "logging.disable", _disable, probe_sees="logging")
        _patch(logging, "basicConfig", "logging.basicConfig", _basic_config, probe_sees="logging")
        _patch(
            warnings, "filterwarnings", "warnings.filters", _filterwarnings, probe_sees="warnings"
        )
        _patch(warnings, "simplefilter", "warnings.filters", _simplefilter, probe_sees="warnings")
        _patch(warnings, "resetwarnings", "warnings.filters", _resetwarnings, probe_sees="warnings")
        block = warnings.catch_warnings
        enter, exit_ = _counting_blocks(block.__enter__, block.__exit__)
        _patched.extend(
            ((block, "__enter__", block.__enter__), (block, "__exit__", block.__exit__))
        )
        block.__enter__, block.__exit__ = enter, exit_  # type: ignore[method-assign]
        _patch(State, "__setattr__", "app.state", _state_set)
        _patch(State, "__delattr__", "app.state", _state_del)


def default_watches_installed() -> bool:
    """Whether :func:`install_default_watches` has replaced anything (the environment's
    functions included) that :func:`uninstall_default_watches` has not put back."""
    with _lock:
        return bool(_patched) or _environ.installed()


def uninstall_default_watches() -> None:
    """Restore every original (for tests)."""
    with _lock:
        while _patched:
            owner, name, original = _patched.pop()
            setattr(owner, name, original)
        _environ.uninstall()


_MAX_APPS_VISITED = 256


def watch_app_state(app: Any) -> None:
    """Report attribute writes on ``app.state`` of this app, the apps it wraps (middleware)
    and the apps its router mounts (``Mount``, ``Host``), at any depth."""
    seen: set[int] = set()
    waiting = [app]
    while waiting and len(seen) < _MAX_APPS_VISITED:
        app = waiting.pop()
        if app is None or id(app) in seen:
            continue
        seen.add(id(app))
        attributes = getattr(app, "__dict__", {})
        state = attributes.get("state")
        if isinstance(state, State):
            _app_states.add(state)
        waiting.append(attributes.get("app"))
        router = attributes.get("router", app)
        routes = getattr(router, "routes", None)
        if isinstance(routes, list):
            waiting.extend(getattr(route, "app", None) for route in routes[:_MAX_APPS_VISITED])

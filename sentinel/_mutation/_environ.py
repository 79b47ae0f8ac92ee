"""The process environment, watched at write time and, in ``isolate`` mode, per request.

``os.environ`` and ``os.environb`` become objects of subclasses of the standard mapping,
over the same data: reads run the standard library's own code, writes are reported. Only
``isolate`` mode uses objects whose reads consult the current request's overlay. An alias
of the original taken before sentinel was installed (``from os import environ``) writes
through ``os.putenv``, which is wrapped too: its writes are reported as ``os.putenv``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from .._context import current_request
from .._current import current
from ._detect import reentry
from ._watcher import MutationWatcher

_Environ: Any = type(os.environ)
_original_putenv = os.putenv
_original_unsetenv = os.unsetenv
_original_popen_init = subprocess.Popen.__init__
_POPEN_ENV_INDEX = 10  # env's position in Popen(args, bufsize, ..., cwd, env, ...)


def _watcher() -> MutationWatcher | None:
    sentinel = current()
    return sentinel.mutations if sentinel is not None else None


class WatchedEnviron(_Environ):  # type: ignore[misc]
    """``os.environ`` with every write (``[]=``, ``del``, and through them ``update``, ``pop``,
    ``setdefault``, ``clear``, ``|=``) reported when a request makes it."""

    _target = "os.environ"
    _isolates = False
    """Whether reads consult the request's overlay (``isolate`` mode), so writes may go there."""

    def __setitem__(self, key: Any, value: Any) -> None:
        watcher = _watcher()
        if watcher is None or reentry.depth:
            super().__setitem__(key, value)
            return
        encoded_key, encoded_value = self.encodekey(key), self.encodevalue(value)  # type checks
        _check_putenv(encoded_key, encoded_value)
        frame = sys._getframe(1)
        request = watcher.isolating(self._target, frame) if self._isolates else None
        note = watcher.intercept(self._target, key, self._current(encoded_key), value, frame)
        if request is not None:
            _overlay(request)[encoded_key] = encoded_value
        else:
            if note is not None and note.mode == "isolate":
                note.mode = "report"  # not kept to a request: it reaches the process
            reentry.depth += 1
            try:
                super().__setitem__(key, value)
            finally:
                reentry.depth -= 1
        if note is not None:
            watcher.commit(note)

    def __delitem__(self, key: Any) -> None:
        watcher = _watcher()
        if watcher is None or reentry.depth:
            super().__delitem__(key)
            return
        encoded_key = self.encodekey(key)
        _check_unsetenv(encoded_key)
        old = self._current(encoded_key)
        if old is None:
            raise KeyError(key)
        frame = sys._getframe(1)
        request = watcher.isolating(self._target, frame) if self._isolates else None
        note = watcher.intercept(self._target, key, old, None, frame)
        if request is not None:
            _overlay(request)[encoded_key] = None
        else:
            if note is not None and note.mode == "isolate":
                note.mode = "report"
            reentry.depth += 1
            try:
                super().__delitem__(key)
            finally:
                reentry.depth -= 1
        if note is not None:
            watcher.commit(note)

    def _current(self, encoded_key: Any) -> Any:
        value = self._data.get(encoded_key)
        return None if value is None else self.decodevalue(value)


def _check_putenv(key: Any, value: Any) -> None:
    """Refuse what ``os.putenv`` refuses (a NUL byte, ``=`` in the name, no name) with its
    own exception, before a write kept in an overlay could accept it."""
    nul = "\0" if isinstance(key, str) else b"\0"  # str keys on Windows
    if nul in key or nul in value or _bad_name(key):
        _original_putenv(key, value)  # raises
        msg = f"invalid environment variable: {key!r}"  # should the platform accept it
        raise ValueError(msg)


def _check_unsetenv(key: Any) -> None:
    """Refuse what ``os.unsetenv`` refuses, with its own exception."""
    if ("\0" if isinstance(key, str) else b"\0") in key or _bad_name(key):
        _original_unsetenv(key)  # raises
        msg = f"invalid environment variable name: {key!r}"
        raise ValueError(msg)


def _bad_name(key: Any) -> bool:
    # Windows keeps names such as "=C:" (the current directory of drive C).
    name = key[1:] if sys.platform == "win32" else key
    return not key or ("=" if isinstance(key, str) else b"=") in name


class WatchedEnvironB(WatchedEnviron):
    _target = "os.environb"


def _overlay(request: Any) -> dict[bytes, bytes | None]:
    overlay: dict[bytes, bytes | None] | None = request.env_overlay
    if overlay is None:
        overlay = request.env_overlay = {}
    return overlay


def _active_overlay() -> dict[bytes, bytes | None] | None:
    request = current_request.get()
    return request.env_overlay if request is not None else None


class IsolatingEnviron(WatchedEnviron):
    """``isolate`` mode: a request's writes go to its own overlay, shared by the tasks and
    threads it starts (they hold the same request context), discarded when it ends."""

    _isolates = True

    def __getitem__(self, key: Any) -> Any:
        overlay = _active_overlay()
        if overlay:
            encoded = self.encodekey(key)
            if encoded in overlay:
                value = overlay[encoded]
                if value is None:
                    raise KeyError(key)
                return self.decodevalue(value)
        return super().__getitem__(key)

    def _current(self, encoded_key: Any) -> Any:
        overlay = _active_overlay()
        if overlay and encoded_key in overlay:
            value = overlay[encoded_key]
            return None if value is None else self.decodevalue(value)
        return super()._current(encoded_key)

    def _merged_keys(self) -> list[Any]:
        overlay = _active_overlay()
        keys = list(self._data)
        if not overlay:
            return keys
        merged = [key for key in keys if overlay.get(key, b"") is not None]
        merged.extend(
            key for key, value in overlay.items() if value is not None and key not in self._data
        )
        return merged

    def __iter__(self) -> Iterator[Any]:
        for key in self._merged_keys():
            yield self.decodekey(key)

    def __len__(self) -> int:
        return len(self._merged_keys())

    def __repr__(self) -> str:
        return f"environ({dict(self)!r})"

    def copy(self) -> dict[Any, Any]:
        return dict(self)


class IsolatingEnvironB(IsolatingEnviron):
    _target = "os.environb"


def _wrapped_putenv(name: str, original: Any, target: str) -> Any:
    def wrapper(key: Any, *args: Any) -> Any:
        watcher = _watcher()
        if watcher is None or reentry.depth:
            return original(key, *args)
        new = args[0] if args else None
        note = watcher.intercept(target, key, None, new, sys._getframe(1))
        reentry.depth += 1
        try:
            result = original(key, *args)
        finally:
            reentry.depth -= 1
        if note is not None:
            note.mode = "report" if note.mode == "isolate" else note.mode
            watcher.commit(note)
        return result

    wrapper.__name__ = name
    wrapper.__qualname__ = name
    wrapper.__doc__ = original.__doc__
    return wrapper


def _popen_init(self: Any, *args: Any, **kwargs: Any) -> None:
    # A child started by a request in isolate mode gets the environment that request sees.
    overlay = _active_overlay()
    if overlay:
        # The merged view (the overlay over the process's), where the caller passed none.
        if len(args) > _POPEN_ENV_INDEX:
            if args[_POPEN_ENV_INDEX] is None:
                args = (*args[:_POPEN_ENV_INDEX], dict(os.environ), *args[_POPEN_ENV_INDEX + 1 :])
        elif kwargs.get("env") is None:
            kwargs["env"] = dict(os.environ)
    _original_popen_init(self, *args, **kwargs)


_state: dict[Any, Any] = {}


def _copy_of(original: Any, cls: type) -> Any:
    # A new object over the same data: a class assigned to the existing object afterwards
    # would cost every attribute lookup on it its fast path (os.environ.get was ~6 % slower).
    return cls(
        original._data,
        original.encodekey,
        original.decodekey,
        original.encodevalue,
        original.decodevalue,
    )


def install(isolating: bool) -> None:
    """Watch the environment; ``isolating`` uses the overlay-aware objects, otherwise reads
    run the standard library's own code."""
    if "environ" not in _state and type(os.environ) is _Environ:
        _state["environ"] = os.environ
        environb = getattr(os, "environb", None)
        if environb is not None and type(environb) is _Environ:
            _state["environb"] = environb
    sync_environ(isolating)
    if "putenv" not in _state:
        _state["putenv"] = os.putenv
        _state["unsetenv"] = os.unsetenv
        os.putenv = _wrapped_putenv("putenv", _original_putenv, "os.putenv")
        os.unsetenv = _wrapped_putenv("unsetenv", _original_unsetenv, "os.unsetenv")
    if "popen" not in _state:
        _state["popen"] = subprocess.Popen.__init__
        subprocess.Popen.__init__ = _popen_init  # type: ignore[method-assign]


def sync_environ(isolating: bool) -> None:
    """Make ``os.environ`` (and ``os.environb``) the watched objects the mode needs.

    All of them share the original's data, so a write through any of them (or through an
    alias of the original, which calls the wrapped ``os.putenv``) is one and the same.
    """
    for name, watched, isolated in (
        ("environ", WatchedEnviron, IsolatingEnviron),
        ("environb", WatchedEnvironB, IsolatingEnvironB),
    ):
        original = _state.get(name)
        if original is None:
            continue
        cls = isolated if isolating else watched
        replacement = _state.get((name, cls))
        if replacement is None:
            replacement = _state[(name, cls)] = _copy_of(original, cls)
        if getattr(os, name) is not replacement:
            setattr(os, name, replacement)


def original_environ() -> Any:
    """The ``os.environ`` object from before sentinel: what aliases taken earlier hold."""
    return _state.get("environ", os.environ)


def installed() -> bool:
    """Whether :func:`install` replaced the environment's functions (not put back yet)."""
    return "putenv" in _state


def uninstall() -> None:
    """Give the environment its standard objects and functions back (for tests)."""
    for name in ("environ", "environb"):
        original = _state.get(name)
        if original is not None:
            setattr(os, name, original)
    for key in [key for key in _state if key not in ("putenv", "unsetenv", "popen")]:
        del _state[key]
    if "putenv" in _state:
        os.putenv = _state.pop("putenv")
        os.unsetenv = _state.pop("unsetenv")
    if "popen" in _state:
        subprocess.Popen.__init__ = _state.pop("popen")  # type: ignore[method-assign]

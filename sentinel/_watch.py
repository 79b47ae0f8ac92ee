"""Opt-in watches: the app's own modules, settings objects and config containers."""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import MutableMapping, MutableSequence, MutableSet
from typing import Any, TypeVar

from . import _runtime
from ._mutations import _DELETED, Compared, check_watch_mode, compared, watch_modes

T = TypeVar("T")
_lock = threading.Lock()
_module_watches: dict[str, Compared] = {}
_object_names: dict[int, tuple[Any, str]] = {}  # id -> (object, kept alive; target name)


def watch(target: T, *, name: str | None = None, mode: str | None = None, every: int = 1) -> T:
    """Report requests' writes to ``target`` as global-state mutations; returns ``target``.

    - A module: ``module.X = v`` from anywhere is attributed exactly (file and line);
      ``global X`` rebinding inside the module is found at the end of the request.
    - An object (a settings instance): attribute writes are attributed exactly.
    - A container (dict, list, set): in-place changes at any depth are found by comparing
      with a copy at the end of each request (every ``every`` requests when that is too
      costly for a large config).

    ``name`` is the ``target`` label (default: the module's name, or the variable the
    caller's module binds the object to); ``mode`` is ``report``, ``raise`` or ``off``
    (default: the sentinel's mode).
    """
    check_watch_mode(mode)
    if every < 1:
        msg = f'"every" must be >= 1: {every!r}'
        raise ValueError(msg)
    label = name or _default_name(target, sys._getframe(1))
    with _lock:
        if mode is not None:
            watch_modes[label] = mode
        if isinstance(target, types.ModuleType):
            _watch_module(target, label, mode, every)
        elif isinstance(target, dict | list | set | MutableMapping | MutableSequence | MutableSet):
            compared.append(Compared(label, lambda: target, mode or _mode(), every))
        else:
            _watch_object(target, label, mode, every)
    return target


def _mode() -> str:
    sentinel = _runtime.current()
    mode = sentinel.mutations.mode if sentinel is not None else "report"
    return "report" if mode == "isolate" else mode


def _default_name(target: object, frame: types.FrameType | None) -> str:
    if isinstance(target, types.ModuleType):
        return target.__name__
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    if frame is not None:
        for variable, value in frame.f_globals.items():
            if value is target:
                return f"{module}.{variable}"
    if not isinstance(target, dict | list | set):
        kind = type(target)
        return f"{kind.__module__}.{kind.__qualname__}"
    return f"{module}.<{type(target).__name__}>"


class _WatchedModule(types.ModuleType):
    """A watched module: attribute writes from outside are attributed exactly."""

    def __setattr__(self, attribute: str, value: Any) -> None:
        _intercept_attribute(
            self,
            attribute,
            value,
            lambda: super(_WatchedModule, self).__setattr__(attribute, value),
        )

    def __delattr__(self, attribute: str) -> None:
        _intercept_attribute(
            self, attribute, _DELETED, lambda: super(_WatchedModule, self).__delattr__(attribute)
        )


def _intercept_attribute(owner: Any, attribute: str, value: Any, write: Any) -> None:
    sentinel = _runtime.current()
    label = _label_of(owner)
    note = None
    if sentinel is not None and label is not None and not attribute.startswith("__"):
        try:
            old = getattr(owner, attribute, None)
        except Exception:
            old = None
        new = None if value is _DELETED else value
        note = sentinel.mutations.intercept(label, attribute, old, new, sys._getframe(2))
    write()
    if note is not None and sentinel is not None:
        sentinel.mutations.commit(note)
    if label is not None:
        watch = _module_watches.get(label)
        if watch is not None:
            watch.refresh_key(attribute, value)


def _label_of(owner: Any) -> str | None:
    if isinstance(owner, types.ModuleType):
        entry = _object_names.get(id(owner))
        return entry[1] if entry is not None and entry[0] is owner else None
    entry = _object_names.get(id(owner))
    return entry[1] if entry is not None and entry[0] is owner else None


def _watch_module(module: types.ModuleType, label: str, mode: str | None, every: int) -> None:
    _object_names[id(module)] = (module, label)
    if type(module) is types.ModuleType:
        module.__class__ = _WatchedModule
    if label not in _module_watches:
        watch = Compared(label, lambda: module.__dict__, mode or _mode(), every, shallow=True)
        _module_watches[label] = watch
        compared.append(watch)


def _watch_object(target: Any, label: str, mode: str | None, every: int) -> None:
    _object_names[id(target)] = (target, label)
    cls = type(target)
    try:
        watched = type(
            cls.__name__,
            (cls,),
            {
                "__slots__": (),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__setattr__": _object_setattr,
                "__delattr__": _object_delattr,
            },
        )
        target.__class__ = watched
    except (TypeError, ValueError, AttributeError):
        # Classes that cannot be subclassed or swapped (builtins, some metaclasses): their
        # attributes are compared at the end of each request instead.
        if not hasattr(target, "__dict__"):
            msg = f"cannot watch {cls.__qualname__} objects: no attributes to compare: {target!r}"
            raise TypeError(msg) from None
        compared.append(Compared(label, lambda: vars(target), mode or _mode(), every))


def _object_setattr(self: Any, attribute: str, value: Any) -> None:
    base: Any = type(self).__mro__[1]
    _intercept_attribute(self, attribute, value, lambda: base.__setattr__(self, attribute, value))


def _object_delattr(self: Any, attribute: str) -> None:
    base: Any = type(self).__mro__[1]
    _intercept_attribute(self, attribute, _DELETED, lambda: base.__delattr__(self, attribute))


def clear() -> None:
    """Forget every opt-in watch and give watched modules and objects their classes back."""
    with _lock:
        for target, _label in _object_names.values():
            cls = type(target)
            if cls is _WatchedModule:
                target.__class__ = types.ModuleType
            elif cls.__dict__.get("__setattr__") is _object_setattr:
                target.__class__ = cls.__mro__[1]
        _object_names.clear()
        _module_watches.clear()
        compared.clear()
        watch_modes.clear()

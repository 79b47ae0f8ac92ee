"""Opt-in watches (``sentinel.watch``): the app's own modules, settings objects and config
containers."""

from __future__ import annotations

import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Mapping, MutableSequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from .._current import current
from ._detect import DELETED, Compared, compared
from ._watcher import check_watch_mode, watch_modes

T = TypeVar("T")
_lock = threading.Lock()
_compared_by_id: dict[int, tuple[Any, Compared]] = {}  # id -> (target, kept alive; its watch)
_watched: dict[int, tuple[Any, str]] = {}  # id -> (object, kept alive so the id stays; label)
_MISSING = object()
_wrapped_classes: dict[type, dict[str, Any]] = {}
"""Class -> what sentinel replaced in it: its own ``__setattr__``/``__delattr__``, or
``_MISSING`` where it inherited them."""
_writing = threading.local()  # .ids: the watched objects whose attribute write is under way


def watch(target: T, *, name: str | None = None, mode: str | None = None, every: int = 1) -> T:
    """Report requests' writes to ``target`` as global-state mutations; returns ``target``.

    - A module: ``module.X = v`` from anywhere is attributed exactly (file and line);
      ``global X`` rebinding inside the module is found at the end of the request.
    - An object (a settings instance): attribute writes are attributed exactly.
    - A container (dict, list, set, or any mapping or sequence): in-place changes at any
      depth are found by comparing with a copy at the end of each request (every
      ``every`` requests when that is too costly for a large config).

    ``name`` is the ``target`` label (default: the module's name, or the variable the
    caller's module binds the object to); ``mode`` is ``report``, ``raise`` or ``off``
    (default: the current sentinel's mode, whatever it is when a write happens).
    """
    if isinstance(mode, str):
        mode = mode.strip().lower()  # as the settings take it
    check_watch_mode(mode)
    if type(every) is not int or every < 1:
        msg = f'"every" must be an integer >= 1: {every!r}'
        raise ValueError(msg)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        msg = f'"name" must be a non-empty string or None: {name!r}'
        raise ValueError(msg)
    label = name or _default_name(target, sys._getframe(1))
    with _lock:
        if mode is None:
            watch_modes.pop(label, None)  # the last call's word: the sentinel's own mode
        else:
            watch_modes[label] = mode
        if isinstance(target, types.ModuleType):
            _watch_module(target, label, mode, every)
        elif isinstance(target, Mapping | MutableSequence | AbstractSet | deque):
            _compare(target, lambda: target, label, mode, every)
        else:
            _watch_object(target, label, mode, every)
    return target


def _compare(
    target: Any,
    read: Callable[[], Any],
    label: str,
    mode: str | None,
    every: int,
    shallow: bool = False,
) -> None:
    """One comparison per target, however often it is watched (an app factory called twice):
    the last call's name, mode and ``every`` apply."""
    entry = _compared_by_id.get(id(target))
    if entry is not None and entry[0] is target:
        watch = entry[1]
        watch.name, watch.mode, watch.every = label, mode, every
        watch.countdown = min(watch.countdown, every)
        return
    watch = Compared(label, read, mode, every, shallow)
    _compared_by_id[id(target)] = (target, watch)
    compared.append(watch)


def _default_name(target: object, frame: types.FrameType | None) -> str:
    if isinstance(target, types.ModuleType):
        return target.__name__
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    if frame is not None:
        for variable, value in frame.f_globals.items():
            if value is target:
                return f"{module}.{variable}"
    if not isinstance(target, Mapping | MutableSequence | AbstractSet | deque):
        kind = type(target)
        return f"{kind.__module__}.{kind.__qualname__}"
    return f"{module}.<{type(target).__name__}>"


class _WatchedModule(types.ModuleType):
    """A watched module: attribute writes from outside are attributed exactly."""

    def __setattr__(self, attribute: str, value: Any) -> None:
        _intercept(
            self, attribute, value, lambda: types.ModuleType.__setattr__(self, attribute, value)
        )

    def __delattr__(self, attribute: str) -> None:
        _intercept(self, attribute, DELETED, lambda: types.ModuleType.__delattr__(self, attribute))


def _intercept(owner: Any, attribute: str, value: Any, write: Callable[[], None]) -> None:
    label = _label_of(owner)
    sentinel = current()
    note = None
    if sentinel is not None and label is not None and not _ignored(owner, attribute, value):
        try:
            old = getattr(owner, attribute, None)
        except Exception:
            old = None
        new = None if value is DELETED else value
        note = sentinel.mutations.intercept(label, attribute, old, new, sys._getframe(2))
    write()
    if note is not None and sentinel is not None:
        # isolate is the environment's alone: a watched object's write reached the process.
        note.mode = "report" if note.mode == "isolate" else note.mode
        sentinel.mutations.commit(note)
    if label is not None:
        entry = _compared_by_id.get(id(owner))
        if entry is not None and entry[0] is owner and entry[1].shallow:
            entry[1].refresh_key(attribute, value)


def _ignored(owner: Any, attribute: str, value: Any) -> bool:
    if attribute.startswith("__"):
        return True
    # Importing pkg.sub binds the submodule on its package: an import, not a mutation.
    return isinstance(owner, types.ModuleType) and (
        isinstance(value, types.ModuleType)
        and sys.modules.get(f"{owner.__name__}.{attribute}") is value
    )


def _label_of(owner: Any) -> str | None:
    entry = _watched.get(id(owner))
    return entry[1] if entry is not None and entry[0] is owner else None


def _watch_module(module: types.ModuleType, label: str, mode: str | None, every: int) -> None:
    _watched[id(module)] = (module, label)
    if type(module) is types.ModuleType:
        module.__class__ = _WatchedModule
    _compare(module, lambda: module.__dict__, label, mode, every, shallow=True)


def _watch_object(target: Any, label: str, mode: str | None, every: int) -> None:
    """Attribute writes through the object's class, which checks the object's identity:
    the object keeps its type, equality and pickling; other instances are not watched."""
    cls = type(target)
    if id(target) in _watched:
        _watched[id(target)] = (target, label)
        return
    if cls not in _wrapped_classes:
        try:
            _wrap_class(cls)
        except (TypeError, AttributeError):
            # Builtin and extension types refuse new attributes: compare instead.
            if not hasattr(target, "__dict__"):
                msg = (
                    f"cannot watch {cls.__qualname__} objects: no attributes to compare: {target!r}"
                )
                raise TypeError(msg) from None
            _compare(target, lambda: vars(target), label, mode, every)
            return
    _watched[id(target)] = (target, label)


def _wrap_class(cls: type) -> None:
    inherited_set: Any = cls.__setattr__
    inherited_del: Any = cls.__delattr__

    def __setattr__(self: Any, attribute: str, value: Any) -> None:
        if id(self) in _watched and not _under_way(self):
            _intercept(
                self, attribute, value, lambda: _write(self, inherited_set, attribute, value)
            )
        else:
            inherited_set(self, attribute, value)

    def __delattr__(self: Any, attribute: str) -> None:
        if id(self) in _watched and not _under_way(self):
            _intercept(self, attribute, DELETED, lambda: _write(self, inherited_del, attribute))
        else:
            inherited_del(self, attribute)

    replaced: dict[str, Any] = {}
    # A subclass of a watched class inherits the wrapper already: wrapped again, each of
    # its writes would count twice.
    wrappers: tuple[tuple[str, Any, Any], ...] = (
        ("__setattr__", inherited_set, __setattr__),
        ("__delattr__", inherited_del, __delattr__),
    )
    for name, inherited, wrapper in wrappers:
        if getattr(inherited, "__sentinel_watch__", False):
            continue
        wrapper.__sentinel_watch__ = True
        replaced[name] = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, wrapper)
    _wrapped_classes[cls] = replaced


def _under_way(owner: Any) -> bool:
    ids: set[int] | None = getattr(_writing, "ids", None)
    return ids is not None and id(owner) in ids


def _write(owner: Any, method: Any, *args: Any) -> None:
    """The class's own write, during which the object's nested writes (a ``__setattr__``
    that calls ``super()``'s, a wrapped base class's) are part of this one."""
    ids: set[int] | None = getattr(_writing, "ids", None)
    if ids is None:
        ids = _writing.ids = set()
    ids.add(id(owner))
    try:
        method(owner, *args)
    finally:
        ids.discard(id(owner))


def clear() -> None:
    """Forget every opt-in watch; modules and classes get their own behaviour back."""
    with _lock:
        for target, _label in _watched.values():
            if type(target) is _WatchedModule:
                target.__class__ = types.ModuleType  # type: ignore[assignment]
        for cls, replaced in _wrapped_classes.items():
            for name, own in replaced.items():
                if own is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, own)
        _wrapped_classes.clear()
        _watched.clear()
        _compared_by_id.clear()
        compared.clear()
        watch_modes.clear()

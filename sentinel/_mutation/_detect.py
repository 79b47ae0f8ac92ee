"""How a write to process-global state is found: intercepted, or compared afterwards.

A watched write is intercepted where Python allows it (see ``_setters`` and ``_environ``):
the request in the current context and the code line are known exactly. What no wrapper
sees (a poke at ``sys.path``, ``global X`` in a watched module) is found by a comparison
at the end of each request: :class:`StateProbe` for the process state sentinel watches by
default, :class:`Compared` for each opt-in watch. What is done about a write is the
watcher's business (``_watcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import sys
import sysconfig
import threading
import warnings
from collections import Counter, deque
from collections.abc import Callable, Mapping, MutableSequence
from collections.abc import Set as AbstractSet
from types import FrameType
from typing import Any

from .._context import RequestContext
from .._exceptions import is_sentinel_file
from ._render import show

_STDLIB_DIRS = tuple(
    {
        os.path.abspath(sysconfig.get_paths()[name]) + os.sep
        for name in ("stdlib", "platstdlib")
        if name in sysconfig.get_paths()
    }
)
_getdefaulttimeout = socket.getdefaulttimeout
_LOOP_CALLBACK = asyncio.events.Handle._run.__code__
_IMPORT_SYSTEM_FILES = frozenset(
    # "<frozen importlib._bootstrap>" and its _external, or their source files when Python
    # runs without frozen modules.
    function.__code__.co_filename
    for function in (
        importlib._bootstrap._call_with_frames_removed,  # type: ignore[attr-defined]
        importlib._bootstrap_external.spec_from_file_location,
    )
)


class _Reentry(threading.local):
    depth = 0  # > 0 while a watched call runs: what it writes inside is part of that call


reentry = _Reentry()


class _OpenCatchWarnings:
    """The filter lists of the ``warnings.catch_warnings()`` blocks open in the process: each
    block swaps in its own copy of the filters and puts back, at its exit, the list it
    found (which, when blocks exit out of order, is another block's copy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lists: dict[int, object] = {}  # by block; the list is kept while it is open

    def entered(self, block: object, filters: object) -> None:
        with self._lock:
            self._lists[id(block)] = filters

    def exited(self, block: object) -> None:
        with self._lock:
            self._lists.pop(id(block), None)

    def installed(self, filters: object) -> bool:
        """Whether ``filters`` is the list an open block installed."""
        with self._lock:
            return any(filters is installed for installed in self._lists.values())


open_catch_warnings = _OpenCatchWarnings()


def code_location(frame: FrameType | None) -> tuple[str | None, int | None, str | None]:
    """The first frame outside sentinel and the standard library: where the write was made."""
    first = frame
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (
            is_sentinel_file(filename)
            or filename.startswith("<frozen ")
            or (
                filename.startswith(_STDLIB_DIRS)
                and "site-packages" not in filename
                and "dist-packages" not in filename
            )
        ):
            return filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    if first is not None:  # only library frames (a write from a stdlib thread)
        return first.f_code.co_filename, first.f_lineno, first.f_code.co_name
    return None, None, None


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import: a module's code (a lazy import in a handler
    included) is executed from the import system's frames.

    The walk stops at sentinel's own frames (the middleware's, below a request's code) and
    at the event loop's callbacks: a server started from a module's import runs requests
    with that import's frames further down, and they are not the request's imports.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_filename in _IMPORT_SYSTEM_FILES:
            return True
        if code is _LOOP_CALLBACK or is_sentinel_file(code.co_filename):
            return False
        frame = frame.f_back
    return False


class Note:
    """One intercepted write, known before it happens and reported after it succeeded."""

    __slots__ = (
        "after_response",
        "attribution",
        "file",
        "function",
        "key",
        "line",
        "mode",
        "new",
        "old",
        "request",
        "suspects",
        "target",
    )

    def __init__(
        self,
        target: str,
        key: object,
        old: object,
        new: object,
        request: RequestContext | None,
        attribution: str,
        suspects: list[RequestContext],
        mode: str,
        where: tuple[str | None, int | None, str | None],
    ) -> None:
        self.target = target
        self.key = key
        self.old = old
        self.new = new
        self.request = request
        self.attribution = attribution
        self.suspects = suspects
        self.mode = mode
        self.file, self.line, self.function = where
        self.after_response = bool(request is not None and request.body_complete)


class StateProbe:
    """Process state that can be changed without any call sentinel wraps, compared cheaply.

    ``changed()`` runs at the end of every request: a handful of identity and list
    comparisons (lists of the same objects compare by identity first).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._path = list(sys.path)
        self._reset_part("logging")
        self._reset_part("warnings")
        self._reset_part("socket")
        self._environ = os.environ
        self._rebaseline()

    def reset_part(self, part: str) -> None:
        """Move the baseline of one part on (a wrapper reported a write to it exactly); the
        rest keeps what changed for the end of the request."""
        self._reset_part(part)
        self._rebaseline()

    def _reset_part(self, part: str) -> None:
        if part == "logging":
            root = logging.root
            self._level = root.level
            self._handlers = list(root.handlers)
            self._disable = root.manager.disable
        elif part == "warnings":
            self._filters_list = warnings.filters
            self._filters = list(warnings.filters)
        elif part == "socket":
            self._timeout = _getdefaulttimeout()

    def _rebaseline(self) -> None:
        # What changed() compares, in its order (os.environ apart, by identity).
        self._baseline = (
            self._path,
            self._filters,
            self._level,
            self._handlers,
            self._disable,
            self._timeout,
        )

    def part_changed(self, part: str) -> bool:
        """Whether ``part`` (logging, warnings, socket) differs from its baseline: a write
        no wrapper saw, which a wrapped write to the same part must not carry away."""
        if part == "logging":
            root = logging.root
            return (root.level, root.handlers, root.manager.disable) != (
                self._level,
                self._handlers,
                self._disable,
            )
        if part == "warnings":
            return warnings.filters != self._filters and self.owns_filters()
        if part == "socket":
            return _getdefaulttimeout() != self._timeout
        return False

    def owns_filters(self) -> bool:
        """False inside catch_warnings(), which swaps in its own copy of the filters. A list
        other than the baseline's that no open block installed is the process's filters,
        replaced (``warnings.filters = [...]``, or two blocks that exited out of order)."""
        filters = warnings.filters
        return filters is self._filters_list or not open_catch_warnings.installed(filters)

    def changed(self) -> bool:
        # One tuple, one comparison in C (lists of the same objects compare by identity
        # first): it runs at the end of every request. The manager's ``disable`` is a
        # property over ``_disable`` (its setter validates, then stores there): read
        # directly, a Python call less, whose code is out of the caches by then.
        root = logging.root
        return (
            sys.path,
            warnings.filters,
            root.level,
            root.handlers,
            root.manager._disable,  # type: ignore[attr-defined]  # typeshed has the property only
            _getdefaulttimeout(),
        ) != self._baseline or os.environ is not self._environ

    def differences(self) -> list[tuple[str, object, object, object]]:
        """(target, key, old, new) for each thing that changed; the baseline moves on."""
        root = logging.root
        found: list[tuple[str, object, object, object]] = []
        if sys.path != self._path:
            before, after = Counter(self._path), Counter(sys.path)
            added, removed = list((after - before).elements()), list((before - after).elements())
            if added or removed:
                key = "added" if not removed else "removed" if not added else "replaced"
                found.append(("sys.path", key, removed, added))
            else:
                found.append(("sys.path", "reordered", self._path, list(sys.path)))
        if warnings.filters != self._filters and self.owns_filters():
            # The list an open block installed is catch_warnings() at work, restored at its
            # exit.
            new_filters = [entry for entry in warnings.filters if entry not in self._filters]
            if len(new_filters) != len(warnings.filters) - len(self._filters) or not all(
                _silences_one_module(entry) for entry in new_filters
            ):
                found.append(("warnings.filters", None, len(self._filters), len(warnings.filters)))
        if root.level != self._level:
            found.append(("logging.root", "level", self._level, root.level))
        if root.handlers != self._handlers:
            found.append(("logging.root", "handlers", self._handlers, list(root.handlers)))
        if root.manager.disable != self._disable:
            found.append(("logging.root", "disable", self._disable, root.manager.disable))
        timeout = _getdefaulttimeout()
        if timeout != self._timeout:
            found.append(("socket.defaulttimeout", None, self._timeout, timeout))
        if os.environ is not self._environ:
            found.append(("os.environ", "replaced", type(self._environ), type(os.environ)))
        self.reset()
        return found


def _silences_one_module(entry: tuple[Any, ...]) -> bool:
    # ("ignore", message, category, module, lineno) with a module: a library hiding its own
    # warning, which changes nothing the app sees. OpenTelemetry's TracerProvider.get_tracer
    # adds one on every call, through a filterwarnings imported before sentinel wrapped it.
    return entry[0] == "ignore" and entry[3] is not None


class Compared:
    """A watch found by comparison at the end of requests: a container, or the globals of a
    module (``global X``), or an object whose class cannot be wrapped.

    ``mode`` None follows the current sentinel's mode (read when a change is found).
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], Any],
        mode: str | None,
        every: int,
        shallow: bool = False,
    ) -> None:
        self.name = name
        self.read = read
        self.mode = mode
        self.every = every
        self.shallow = shallow
        self.countdown = every
        value = read()
        # dicts, lists and sets compare with their copy directly; other containers (a
        # deque, a UserDict) are copied into those shapes before each comparison.
        self._direct = shallow or type(value) in (dict, list, set)
        self.snapshot = self._copy(value)

    def _copy(self, value: Any) -> Any:
        return dict(value) if self.shallow else structural_copy(value)

    def _current(self) -> Any:
        value = self.read()
        return value if self._direct else structural_copy(value)

    @property
    def due(self) -> bool:
        """Whether the comparison runs at the end of this request (``every`` requests)."""
        return self.countdown <= 1

    def tick(self) -> bool:
        """Count one request; True when it is this watch's turn and the value changed."""
        self.countdown -= 1
        if self.countdown > 0:
            return False
        self.countdown = self.every
        return self.changed()

    def changed(self) -> bool:
        try:
            return bool(self._current() != self.snapshot)
        except Exception:
            return False

    def differences(self) -> list[tuple[str, object, object, object]]:
        current = self._current()
        found = [
            (self.name, key, old, new)
            for key, old, new in diff(self.snapshot, current)
            # A module's dunders change on their own (__warningregistry__, __spec__).
            if not (self.shallow and isinstance(key, str) and key.startswith("__"))
        ]
        self.snapshot = current if not self._direct else self._copy(current)
        return found

    def resync(self) -> None:
        """Take the current value as the baseline (what startup wrote) and count ``every``
        requests from now."""
        self.countdown = self.every
        with contextlib.suppress(Exception):
            self.snapshot = self._copy(self.read())

    def refresh_key(self, key: object, value: object) -> None:
        """A write already reported exactly: the comparison must not find it again."""
        if isinstance(self.snapshot, dict):
            if value is DELETED:
                self.snapshot.pop(key, None)
            else:
                self.snapshot[key] = value if self.shallow else structural_copy(value)


DELETED = object()
"""Stands for a key or attribute that is absent (deleted, or not yet set)."""
compared: list[Compared] = []
"""The opt-in watches found by comparison (process-wide, like the state they watch)."""


def structural_copy(value: Any, depth: int = 0) -> Any:
    """Containers copied into plain dicts, lists, tuples and sets, everything else shared:
    a later ``==`` finds in-place changes at any depth, and unchanged leaves compare by
    identity first."""
    if depth > 20:
        return value
    if isinstance(value, Mapping):
        return {k: structural_copy(v, depth + 1) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(structural_copy(v, depth + 1) for v in value)
    if isinstance(value, list | MutableSequence | deque):
        return [structural_copy(v, depth + 1) for v in value]
    if isinstance(value, AbstractSet):
        return set(value)
    return value


def diff(old: Any, new: Any) -> list[tuple[object, object, object]]:
    """(key, old, new) for what differs between two snapshots, at the top level."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[tuple[object, object, object]] = []
        for key in old.keys() | new.keys():
            before, after = old.get(key, DELETED), new.get(key, DELETED)
            if before is after:
                continue
            try:
                if before == after:
                    continue
            except Exception:
                pass
            changes.append(
                (key, None if before is DELETED else before, None if after is DELETED else after)
            )
        return sorted(changes, key=lambda change: show(change[0]))[:20]
    if isinstance(old, list) and isinstance(new, list):
        for index in range(max(len(old), len(new))):
            before = old[index] if index < len(old) else None
            after = new[index] if index < len(new) else None
            if index >= len(old) or index >= len(new) or before != after:
                return [(index, old, new)]
        return []
    if isinstance(old, set) and isinstance(new, set):
        added, removed = sorted(map(show, new - old)), sorted(map(show, old - new))
        return [
            change
            for change in (("added", None, added), ("removed", removed, None))
            if change[1] or change[2]
        ]
    return [(None, old, new)]

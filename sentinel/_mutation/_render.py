"""Mutation keys and values shown as text without running the app's code.

Reports are built on the event loop (or the thread that wrote), where a slow ``__repr__``
would stall every request. Plain builtin values and the builtin containers holding them are
shown as ``repr`` shows them (bounded by :mod:`reprlib`); enum members, classes and
functions by their names; anything else by its class alone: ``<mypkg.Client object>``.
"""

from __future__ import annotations

import enum
import reprlib
import types
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Any

MAX_CHARS = 200
_PLAIN = frozenset({str, bytes, int, float, complex, bool, type(None)})
"""Exact types whose repr runs no code of the app (a subclass may override it)."""
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset, deque})
_FUNCTIONS = frozenset({types.FunctionType, types.BuiltinFunctionType})
_MAX_SORTED = 1000
# Read through type's own descriptors: a metaclass cannot run code for them.
_type_module: Any = type.__dict__["__module__"]
_type_qualname: Any = type.__dict__["__qualname__"]
_type_mro: Any = type.__dict__["__mro__"]
_object_dict: Any = object.__getattribute__


def class_name(kind: type) -> str:
    """``module.Qualname`` of a class (``Qualname`` alone for builtins)."""
    module = _type_module.__get__(kind)
    qualname = _type_qualname.__get__(kind)
    if type(module) is not str or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"


class _Repr(reprlib.Repr):
    def repr1(self, x: Any, level: int) -> str:
        kind = type(x)
        if kind in _PLAIN or kind in _CONTAINERS:
            return str(super().repr1(x, level))  # reprlib dispatches on the exact type's name
        if kind in _FUNCTIONS:
            module, qualname = getattr(x, "__module__", None), getattr(x, "__qualname__", "?")
            shown = f"{module}.{qualname}" if type(module) is str else str(qualname)
            return f"<function {shown}>"
        mro = _type_mro.__get__(kind)
        if type in mro:
            return f"<class '{class_name(x)}'>"
        if enum.Enum in mro:
            members = _object_dict(x, "__dict__")
            if "_name_" in members and "_value_" in members:
                shown = self.repr1(members["_value_"], level - 1)
                return f"<{_type_qualname.__get__(kind)}.{members['_name_']}: {shown}>"
        return f"<{class_name(kind)} object>"

    def repr_int(self, x: int, level: int) -> str:
        try:
            return str(super().repr_int(x, level))
        except ValueError:  # past sys.get_int_max_str_digits()
            return f"<int of {x.bit_length()} bits>"

    def repr_bytes(self, x: bytes, level: int) -> str:
        text = repr(x[: self.maxstring])
        return text if len(x) <= self.maxstring else text + self.fillvalue

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{" + self.fillvalue + "}"
        items = _possibly_sorted(x.items(), len(x), key=True)
        pieces = [
            f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
            for key, value in islice(items, self.maxdict)
        ]
        if len(x) > self.maxdict:
            pieces.append(self.fillvalue)
        return "{" + ", ".join(pieces) + "}"

    def repr_set(self, x: set[Any], level: int) -> str:
        if not x:
            return "set()"
        return self._join(_possibly_sorted(x, len(x)), len(x), level, "{", "}", self.maxset)

    def repr_frozenset(self, x: frozenset[Any], level: int) -> str:
        if not x:
            return "frozenset()"
        items = _possibly_sorted(x, len(x))
        return self._join(items, len(x), level, "frozenset({", "})", self.maxfrozenset)

    def _join(
        self, items: list[Any], size: int, level: int, left: str, right: str, most: int
    ) -> str:
        if level <= 0:
            return left + self.fillvalue + right
        pieces = [self.repr1(item, level - 1) for item in islice(items, most)]
        if size > most:
            pieces.append(self.fillvalue)
        return left + ", ".join(pieces) + right


def _possibly_sorted(items: Iterable[Any], size: int, *, key: bool = False) -> list[Any]:
    # Sorting compares the items: only plain ones, whose comparisons run no code of the app.
    if size > _MAX_SORTED:
        return list(islice(items, _MAX_SORTED))
    listed = list(items)
    if not all(type(item[0] if key else item) in _PLAIN for item in listed):
        return listed
    try:
        return sorted(listed, key=(lambda item: item[0]) if key else None)
    except TypeError:  # mixed types (1 and "a")
        return listed


_reprs: dict[int, _Repr] = {}


def show(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as text, each string and number in it up to ``limit`` characters, without
    calling its class's code."""
    shown = _reprs.get(limit)
    if shown is None:
        shown = _reprs.setdefault(limit, _Repr())
        shown.maxstring = shown.maxother = shown.maxlong = limit
    try:
        return shown.repr(value)
    except Exception:  # a recursion too deep, say
        return f"<unrepresentable {class_name(type(value))}>"

"""Turning an exception into data: its frames, its chain, and a stable fingerprint."""

from __future__ import annotations

import builtins
import functools
import hashlib
import linecache
import os
import reprlib
import sys
import sysconfig
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

from ._scrub import Scrubber

_SENTINEL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_EXAMPLE_DIR = _SENTINEL_DIR + "example" + os.sep
_MAX_CHAIN = 5
_MAX_GROUP_MEMBERS = 10
_MAX_MESSAGE_CHARS = 8192


@functools.cache
def _library_prefixes() -> tuple[str, ...]:
    """Where Python and installed packages live (computed on first use, not at import)."""
    paths = sysconfig.get_paths()
    prefixes = {
        os.path.abspath(paths[name]) + os.sep
        for name in ("stdlib", "platstdlib", "purelib", "platlib")
        if name in paths
    }
    prefixes.update(
        os.path.abspath(path) + os.sep
        for path in sys.path
        if path.endswith(("site-packages", "dist-packages"))
    )
    return tuple(sorted(prefixes))


def type_name(exc_type: type[BaseException]) -> str:
    """``ValueError`` for builtins, ``package.module.Qualname`` otherwise."""
    module = exc_type.__module__
    if module in ("builtins", "__builtin__"):
        return exc_type.__qualname__
    return f"{module}.{exc_type.__qualname__}"


def safe_message(exc: BaseException) -> str:
    """``str(exc)``, bounded in length, never raising."""
    try:
        message = str(exc)
    except Exception as error:
        return f"<str() failed: {type(error).__name__}>"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + f"... [truncated {len(message)} chars]"
    return message


class FrameClassifier:
    """Decides which frames belong to the app (as opposed to Python, libraries or sentinel)."""

    def __init__(self, app_modules: tuple[str, ...] = ()) -> None:
        self._app_modules = app_modules
        self._app_packages: tuple[str, ...] = ()
        self._cache: dict[tuple[str, str], bool] = {}

    def add_app_package(self, package: str) -> None:
        """Count ``package``'s frames as the app's even when it is installed in
        site-packages (as in most container images)."""
        if package and package not in self._app_packages:
            self._app_packages = (*self._app_packages, package)
            self._cache = {}

    def is_sentinel(self, filename: str) -> bool:
        return filename.startswith(_SENTINEL_DIR) and not filename.startswith(_EXAMPLE_DIR)

    def in_app(self, filename: str, module: str) -> bool:
        key = (filename, module)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._classify(filename, module)
            if len(self._cache) < 65536:
                self._cache[key] = cached
        return cached

    def _classify(self, filename: str, module: str) -> bool:
        if self._app_modules:
            return any(
                module == prefix or module.startswith(prefix + ".") for prefix in self._app_modules
            )
        if filename.startswith("<") or self.is_sentinel(filename):
            return False
        if any(module == p or module.startswith(p + ".") for p in self._app_packages):
            return True
        path = os.path.abspath(filename)
        return not path.startswith(_library_prefixes())


def walk_tb(tb: TracebackType | None) -> Iterator[tuple[FrameType, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def chain(exc: BaseException) -> list[tuple[str, BaseException]]:
    """The exception, then its causes and contexts (``raise ... from``), without cycles."""
    result: list[tuple[str, BaseException]] = [("exception", exc)]
    seen = {id(exc)}
    current = exc
    while len(result) < _MAX_CHAIN:
        if current.__cause__ is not None:
            relation, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            relation, nxt = "context", current.__context__
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        result.append((relation, nxt))
        current = nxt
    return result


def fingerprint(
    exc: BaseException, classifier: FrameClassifier, tb: TracebackType | None = None
) -> str:
    """A stable id for "the same bug": type plus the code path, never the message.

    Frames contribute their module, qualified function name and the text of the line
    (so shifting code up or down keeps the fingerprint; a different call site changes it).
    Only app frames count when there are any, so library and server frames above the app
    do not split one bug into several groups. ``tb`` is the traceback as it was when the
    exception was caught (it grows as the exception travels further up).
    """
    digest = hashlib.sha256()
    for relation, member in chain(exc):
        digest.update(relation.encode())
        member_tb = tb if member is exc and tb is not None else member.__traceback__
        _fingerprint_one(member, member_tb, classifier, digest)
    return digest.hexdigest()[:16]


def _fingerprint_one(
    exc: BaseException, tb: TracebackType | None, classifier: FrameClassifier, digest: Any
) -> None:
    digest.update(type_name(type(exc)).encode())
    if isinstance(exc, BaseExceptionGroup):
        members = sorted({type_name(type(e)) for e in exc.exceptions[:_MAX_GROUP_MEMBERS]})
        digest.update(("|".join(members)).encode())
    entries = []
    app_entries = []
    for frame, lineno in walk_tb(tb):
        code = frame.f_code
        filename = code.co_filename
        if classifier.is_sentinel(filename):
            continue
        module = frame.f_globals.get("__name__") or "?"
        source = linecache.getline(filename, lineno).strip()
        where = source if source else f"+{lineno - code.co_firstlineno}"
        entry = f"{module}:{code.co_qualname}:{where}"
        entries.append(entry)
        if classifier.in_app(filename, str(module)):
            app_entries.append(entry)
    for entry in app_entries or entries:
        digest.update(b"\n")
        digest.update(entry.encode("utf-8", "surrogatepass"))


class _StrictRepr(reprlib.Repr):
    """reprlib's bounded reprs, but a failing ``__repr__`` raises instead of being hidden
    behind ``<X instance at 0x...>`` (which would also leak a memory address)."""

    def repr_instance(self, x: Any, level: int) -> str:
        text = builtins.repr(x)
        if len(text) > self.maxother:
            return text[: self.maxother] + "..."
        return text


class LocalsBudget:
    """Length and time budget for reprs of local variables in one report."""

    def __init__(self, max_chars: int, seconds: float) -> None:
        self.repr = _StrictRepr()
        self.repr.maxstring = max_chars
        self.repr.maxother = max_chars
        self.repr.maxlong = max_chars
        self.max_chars = max_chars
        self.deadline = time.monotonic() + seconds

    def exhausted(self) -> bool:
        return time.monotonic() > self.deadline

    def render(self, value: Any) -> str:
        """reprlib's bounded repr (strings elided in the middle, quotes kept), not yet cut
        to ``max_chars``: scrubbing must see the whole of it first (see :meth:`shorten`)."""
        try:
            return str(self.repr.repr(value))
        except Exception as error:
            return f"<repr() failed: {type(error).__name__}>"

    def shorten(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + "..."


def frames(
    exc: BaseException,
    classifier: FrameClassifier,
    max_frames: int,
    scrubber: Scrubber,
    locals_budget: LocalsBudget | None,
    tb: TracebackType | None = None,
) -> list[dict[str, Any]]:
    """The exception's traceback as data, innermost ``max_frames`` kept, outermost first."""
    entries = [
        (frame, lineno)
        for frame, lineno in walk_tb(tb if tb is not None else exc.__traceback__)
        if not classifier.is_sentinel(frame.f_code.co_filename)
    ]
    skipped = max(0, len(entries) - max_frames)
    result: list[dict[str, Any]] = []
    if skipped:
        result.append({"skipped_frames": skipped})
    kept = entries[skipped:]
    items: list[dict[str, Any]] = []
    for frame, lineno in kept:
        code = frame.f_code
        module = str(frame.f_globals.get("__name__") or "?")
        items.append(
            {
                "file": code.co_filename,
                "module": module,
                "function": code.co_qualname,
                "line": lineno,
                "source": scrubber.text(linecache.getline(code.co_filename, lineno).strip()),
                "in_app": classifier.in_app(code.co_filename, module),
            }
        )
    if locals_budget is not None:
        # Innermost first: when time runs short, the frame that raised keeps its locals.
        for (frame, _), item in reversed(list(zip(kept, items, strict=True))):
            if item["in_app"]:
                item["locals"] = _frame_locals(frame, scrubber, locals_budget)
    result.extend(items)
    return result


def _frame_locals(frame: FrameType, scrubber: Scrubber, budget: LocalsBudget) -> dict[str, str]:
    captured: dict[str, str] = {}
    try:
        names = list(frame.f_locals.items())
    except Exception:
        return {"<locals>": "<unavailable>"}
    for name, value in names[:50]:
        if budget.exhausted():
            captured["<skipped>"] = "time budget for locals exhausted"
            break
        name = str(name)
        if scrubber.is_secret_key(name):
            captured[name] = scrubber.mask(budget.render(value))
        else:
            # Scrubbed before shortened: a cut could drop the closing quote that the
            # key-value rule needs to see the whole secret.
            captured[name] = budget.shorten(scrubber.text(budget.render(value)))
    return captured


def describe(
    exc: BaseException,
    classifier: FrameClassifier,
    max_frames: int,
    scrubber: Scrubber,
    locals_budget: LocalsBudget | None,
    depth: int = 0,
    tb: TracebackType | None = None,
) -> dict[str, Any]:
    """Type, scrubbed message and frames of ``exc``, with members of exception groups."""
    described: dict[str, Any] = {
        "exception_type": type_name(type(exc)),
        "message": scrubber.text(safe_message(exc)),
        "frames": frames(exc, classifier, max_frames, scrubber, locals_budget, tb),
    }
    if isinstance(exc, BaseExceptionGroup) and depth < 3:
        members = exc.exceptions
        described["exceptions"] = [
            describe(member, classifier, max_frames, scrubber, locals_budget, depth + 1)
            for member in members[:_MAX_GROUP_MEMBERS]
        ]
        if len(members) > _MAX_GROUP_MEMBERS:
            described["exceptions_skipped"] = len(members) - _MAX_GROUP_MEMBERS
    return described


def is_reportable(exc: BaseException) -> bool:
    """Errors are reportable; control flow is not.

    Every ``Exception`` is an error. What derives from ``BaseException`` only (cancellation
    in asyncio and trio, KeyboardInterrupt, SystemExit, GeneratorExit) is control flow,
    unless it is a group that holds an error.
    """
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(is_reportable(member) for member in exc.exceptions)
    return False

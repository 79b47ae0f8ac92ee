"""Turning an exception into data: its frames, its chain, and a stable fingerprint."""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import linecache
import math
import os
import queue
import re
import reprlib
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, TypeVar

from ._scrub import Scrubber, cut_scrubbed

_SENTINEL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_EXAMPLE_DIR = _SENTINEL_DIR + "example" + os.sep
_MAX_CHAIN = 5
"""How many exceptions of a chain (``raise ... from``, implicit context) are reported and
fingerprinted: the exception, its nearest causes and, when there are more, the root cause."""
_MAX_CHAIN_WALK = 1000
"""How many links of a chain are followed to find its root cause."""
_MAX_GROUP_MEMBERS = 10
_MAX_GROUP_DEPTH = 3
"""How deep in nested exception groups members are described."""
_MAX_DESCRIBED = 256
"""How many exceptions (members and causes, at any depth) one report describes in all."""
_MAX_MESSAGE_CHARS = 8192
"""How much of an exception's message is scrubbed and written; the rest is masked whole."""
_MAX_NOTES = 10
"""How many notes (``add_note``) of one exception are written."""
_MAX_NOTE_CHARS = 1024
"""How much of a note is scrubbed and written; the rest is masked whole."""
_MAX_GROUP_NODES = 10_000
"""How many exceptions of one group tree are looked at (groups can nest without limit)."""
_SCRUB_BOUND_FACTOR = 16
"""A string local (or an object's repr) is scrubbed up to this many times the locals'
``max_chars``; the rest is masked whole."""
MESSAGE_TIME_BUDGET_SECONDS = 0.05
"""How long one report may wait for the app's own ``__str__`` of its exceptions."""
_HELPER_IDLE_SECONDS = 2.0
_MAX_HELPERS = 2
_MAX_UNFINISHED_KINDS = 64
"""How many kinds of value whose rendering did not finish a renderer remembers."""
_UNFINISHED_SECONDS = 1.0
"""A value still rendering at its deadline that takes longer than this in all (or never
returns) keeps its kind from being rendered again; one that finishes sooner was only caught
by a short budget, and its kind is rendered again."""
_PLAIN_TYPES = frozenset({str, int, float, bool, complex, bytes, type(None)})
"""Values whose repr runs no code of the app (exact types: a subclass may override it)."""
_PLAIN_STR = frozenset({BaseException.__str__, KeyError.__str__})
_NOT_FINISHED = "<str() did not finish within the time budget>"
_REPR_NOT_FINISHED = "<repr() did not finish within the time budget>"
_ARGS: Any = BaseException.__dict__["args"]
_INSTANCE_DICT: Any = BaseException.__dict__["__dict__"]
_GROUP_MESSAGE: Any = BaseExceptionGroup.__dict__["message"]
_T = TypeVar("_T")


@functools.cache
def _library_prefixes() -> tuple[str, ...]:
    """Where Python, installed packages and their console scripts (``bin/uvicorn``) live
    (computed on first use, not at import)."""
    paths = sysconfig.get_paths()
    prefixes = {
        os.path.abspath(paths[name]) + os.sep
        for name in ("stdlib", "platstdlib", "purelib", "platlib", "scripts")
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


def scrubbed_message(
    exc: BaseException,
    scrubber: Scrubber,
    renderer: Renderer | None = None,
    deadline: float = math.inf,
) -> str:
    """``str(exc)`` scrubbed, and bounded: its first 8192 characters are scrubbed, the rest
    is masked whole (see :meth:`Scrubber.text`). Scrubbed before it is bounded, so a cut
    can never take a secret's context away (a URL's ``@``, a closing quote): an echoed
    input could otherwise pad a message until the cut fell there. See :func:`safe_message`
    for ``renderer`` and ``deadline``."""
    return scrubber.text(safe_message(exc, renderer, deadline), limit=_MAX_MESSAGE_CHARS)


def safe_message(
    exc: BaseException, renderer: Renderer | None = None, deadline: float = math.inf
) -> str:
    """``str(exc)``, never raising; not bounded (what is written goes through
    :func:`scrubbed_message`, which bounds it after scrubbing).

    With a ``renderer``, an exception whose ``__str__`` is the app's own (or whose
    arguments are not plain builtins) is rendered by it, and not waited for past
    ``deadline`` (``time.monotonic()``).
    """
    if renderer is None or _plain_message(exc):
        return _message(exc)
    [message] = renderer.run(_message, [exc], deadline, unfinished=_NOT_FINISHED)
    return _NOT_FINISHED if message is None else message


def _message(exc: BaseException) -> str:
    try:
        method = type(exc).__str__
        if method in _PLAIN_STR:
            args = _ARGS.__get__(exc, type(exc))
            if any(_long_binary(arg, _MAX_MESSAGE_CHARS) for arg in args):
                return _bounded_message(method, args)
        return str(exc)
    except Exception as error:
        return f"<str() failed: {type(error).__name__}>"


def _long_binary(value: object, limit: int) -> bool:
    """Whether ``value`` is bytes or a bytearray (exactly) longer than ``limit``."""
    return (type(value) is bytes or type(value) is bytearray) and len(value) > limit


def _bounded_message(method: object, args: tuple[Any, ...]) -> str:
    """What the builtin ``__str__`` makes of ``args``, with long bytes read only as far as a
    message is written: the repr of 100 MB of bytes would cost the reporter 400 MB and a
    second, to be masked whole past its first 8192 characters anyway. One byte more than
    that is kept, so the repr always runs past the bound and its rest is masked (a sign
    that there was more)."""
    shown = tuple(
        arg[: _MAX_MESSAGE_CHARS + 1] if _long_binary(arg, _MAX_MESSAGE_CHARS) else arg
        for arg in args
    )
    if len(shown) == 1:
        return repr(shown[0]) if method is KeyError.__str__ else str(shown[0])
    return str(shown)


def _plain_message(exc: BaseException) -> bool:
    """Whether ``str(exc)`` runs no code of the app: a builtin ``__str__`` over builtin
    scalars (read from the C field, not through a property the class may define)."""
    method = type(exc).__str__
    if method is BaseExceptionGroup.__str__:
        # The message and the member count; a str subclass could bring its own __str__.
        return type(_GROUP_MESSAGE.__get__(exc, type(exc))) is str
    if method not in _PLAIN_STR:
        return False
    args = _ARGS.__get__(exc, type(exc))
    return all(type(arg) in _PLAIN_TYPES for arg in args)


def _render_kind(item: object) -> type | None:
    """The class to blame when rendering ``item`` does not finish: its own class, or for an
    exception whose ``__str__`` and ``__repr__`` are the builtin ones, the class of its one
    kind of argument that is not a plain builtin. None when that is a builtin class (a list
    is slow for what it holds, which its class does not name) or cannot be told."""
    kind = type(item)
    if isinstance(item, BaseException) and kind.__repr__ is BaseException.__repr__:
        method = kind.__str__
        if method is BaseExceptionGroup.__str__:  # the message's own class, not the members'
            blamed = {type(_GROUP_MESSAGE.__get__(item, kind))} - _PLAIN_TYPES
        elif method in _PLAIN_STR:
            blamed = {type(arg) for arg in _ARGS.__get__(item, kind)} - _PLAIN_TYPES
        else:
            blamed = {kind}
        if len(blamed) != 1:
            return None
        [kind] = blamed
    return None if kind.__module__ == "builtins" else kind


class _Job:
    __slots__ = (
        "blamed",
        "deadline",
        "done",
        "func",
        "items",
        "results",
        "running",
        "started",
        "stop",
    )

    def __init__(self, func: Callable[[Any], str], items: Sequence[Any], deadline: float) -> None:
        self.func = func
        self.items = items
        self.deadline = deadline
        self.results: list[str] = []
        self.done = threading.Event()
        self.stop = False
        self.running = False
        """Whether the helper is inside ``func`` for ``items[len(results)]``."""
        self.started = 0.0
        self.blamed: tuple[object, type] | None = None


class Renderer:
    """Runs the app's own ``__repr__`` and ``__str__`` for reports on helper threads, so one
    that is slow cannot hold the reporter's thread (and the reports behind it).

    Python cannot interrupt a ``__repr__`` that is running, so the caller stops waiting at
    its deadline and the helper finishes that one value on its own time. At most
    ``max_helpers`` exist: while all of them are still busy with values nobody waits for any
    more, nothing more is started and callers get no results at once. Idle helpers end
    after a while; none is started before the first value that needs one.

    So that one class whose ``__str__`` never returns cannot hold every helper (one per
    occurrence), the class of a value still rendering at its deadline is remembered (a
    bounded number of them, by what renders it: ``__str__`` and ``__repr__`` apart), and
    later values of it get the caller's ``unfinished`` text at once instead of a helper;
    one that turns out to finish within ``_UNFINISHED_SECONDS`` is forgotten again.
    ``on_unfinished`` is called (what it raises is ignored) for each call that gave up on a
    value still rendering at its deadline, or found every helper busy: sentinel counts those
    as internal errors.
    """

    def __init__(
        self,
        max_helpers: int = _MAX_HELPERS,
        on_unfinished: Callable[[], None] | None = None,
    ) -> None:
        self._max = max_helpers
        self._on_unfinished = on_unfinished
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Job]] = []
        self._helpers = 0
        self._pid = os.getpid()
        self._unfinished: dict[tuple[object, type], None] = {}
        """Insertion-ordered set of (what renders, class) that did not finish."""

    def run(
        self,
        func: Callable[[_T], str],
        items: Sequence[_T],
        deadline: float,
        *,
        unfinished: str | None = None,
    ) -> list[str | None]:
        """``func`` of each item, in order, on a helper; None for the items not done by
        ``deadline`` (``time.monotonic()``), or when every helper is still busy; and for
        items of a class whose rendering by ``func`` did not finish before, ``unfinished``
        (None unless given) at once."""
        if not items:
            return []
        renders = _what_renders(func)
        with self._lock:
            # Classes are looked at only once one did not finish (most processes: never).
            known = [
                bool(self._unfinished)
                and renders is not None
                and (renders, _render_kind(item)) in self._unfinished
                for item in items
            ]
        if not any(known):
            return self._run(func, renders, items, deadline)
        left = [index for index, skip in enumerate(known) if not skip]
        results: list[str | None] = [unfinished] * len(items)
        rendered = self._run(func, renders, [items[index] for index in left], deadline)
        for index, text in zip(left, rendered, strict=True):
            results[index] = text
        return results

    def _run(
        self,
        func: Callable[[_T], str],
        renders: object | None,
        items: Sequence[_T],
        deadline: float,
    ) -> list[str | None]:
        if not items:
            return []
        now = time.monotonic()
        if now >= deadline:
            return [None] * len(items)  # the caller's budget was spent before: nothing lost here
        jobs = self._take()
        if jobs is None:
            self._note_unfinished()
            return [None] * len(items)
        job = _Job(func, items, deadline)
        jobs.put(job)
        stuck = False
        if not job.done.wait(None if deadline == math.inf else deadline - now):
            with self._lock:
                job.stop = True
                # A value still rendering at the deadline (not a budget spent between values).
                stuck = job.running
                kind = (
                    _render_kind(items[len(job.results)]) if stuck and renders is not None else None
                )
                if kind is not None and len(self._unfinished) < _MAX_UNFINISHED_KINDS:
                    job.blamed = (renders, kind)
                    self._unfinished[job.blamed] = None
        done: list[str | None] = list(job.results)
        if stuck:
            self._note_unfinished()
        return done + [None] * (len(items) - len(done))

    def _note_unfinished(self) -> None:
        if self._on_unfinished is not None:
            with contextlib.suppress(Exception):  # counting must not break the report
                self._on_unfinished()

    def _take(self) -> queue.SimpleQueue[_Job] | None:
        with self._lock:
            if self._pid != os.getpid():  # forked: the helpers stayed in the parent
                self._pid, self._idle, self._helpers = os.getpid(), [], 0
            if self._idle:
                return self._idle.pop()
            if self._helpers >= self._max:
                return None
            self._helpers += 1
        jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        try:
            threading.Thread(
                target=self._serve, args=(jobs,), name="sentinel-render", daemon=True
            ).start()
        except Exception:
            with self._lock:
                self._helpers -= 1
            return None
        return jobs

    def _serve(self, jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            try:
                job = jobs.get(timeout=_HELPER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if jobs in self._idle:  # else it was just taken: a job is on its way
                        self._idle.remove(jobs)
                        self._helpers -= 1
                        return
                continue
            for item in job.items:
                with self._lock:
                    if job.stop or time.monotonic() > job.deadline:
                        break
                    job.running, job.started = True, time.monotonic()
                try:
                    text = job.func(item)
                except BaseException as error:  # the app's code: what it raises stays here
                    text = f"<failed: {type(error).__name__}>"
                with self._lock:
                    job.running = False
                    job.results.append(text)
                    if job.blamed is not None:
                        # Late, but not stuck: it was the budget that was short.
                        if time.monotonic() - job.started <= _UNFINISHED_SECONDS:
                            self._unfinished.pop(job.blamed, None)
                        job.blamed = None
            job.done.set()
            with self._lock:
                self._idle.append(jobs)


def _what_renders(func: Callable[..., str]) -> object | None:
    """What ``func`` runs, the same for every call (a bound method's function, a closure's
    code), so the classes it could not render are remembered for it alone; None for a
    callable without code of its own (nothing is remembered for it)."""
    return getattr(getattr(func, "__func__", func), "__code__", None)


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
        return is_sentinel_file(filename)

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
        return is_app_file(filename)


def is_sentinel_file(filename: str) -> bool:
    """Whether ``filename`` is sentinel's own code (the bundled example app is not)."""
    return filename.startswith(_SENTINEL_DIR) and not filename.startswith(_EXAMPLE_DIR)


def is_app_file(filename: str) -> bool:
    """Whether ``filename`` is the app's own code by where it lives: a real file outside the
    standard library, site-packages, console scripts and sentinel."""
    if filename.startswith("<") or is_sentinel_file(filename):
        return False
    return not os.path.abspath(filename).startswith(_library_prefixes())


def display_path(filename: str, module: str) -> str:
    """``filename`` from its import root, as a reader finds it in the project:
    ``mypkg/main.py`` for module ``mypkg.main``; the path as it is when the module name does
    not lead to it (``__main__``, ``<string>``)."""
    path = filename.replace(os.sep, "/")
    if module and module != "__main__" and not filename.startswith("<"):
        stem = module.replace(".", "/")
        for tail in (f"{stem}.py", f"{stem}/__init__.py"):
            if path == tail or path.endswith("/" + tail):
                return tail
    return path


def culprit_frame(frames: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Of a report's frames (outermost first), the one it blames: the innermost frame in the
    app's own code, else the innermost frame there is; None without frames."""
    located: list[Mapping[str, Any]] = [item for item in frames if "line" in item]
    in_app = [item for item in located if item.get("in_app")]
    chosen = in_app or located
    return chosen[-1] if chosen else None


def culprit(frames: Sequence[Mapping[str, Any]]) -> str | None:
    """The :func:`culprit_frame` as ``"mypkg/main.py:52 in checkout"`` (the file as
    :func:`display_path` gives it); None for an exception without frames (never raised)."""
    chosen = culprit_frame(frames)
    if chosen is None:
        return None
    where = display_path(str(chosen.get("file", "?")), str(chosen.get("module", "")))
    return f"{where}:{chosen['line']} in {chosen.get('function', '?')}"


def walk_tb(tb: TracebackType | None) -> Iterator[tuple[FrameType, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def chain(exc: BaseException) -> list[tuple[str, BaseException]]:
    """The exception, then its causes and contexts (``raise ... from``), without cycles; of
    a chain longer than ``_MAX_CHAIN``, the nearest links and the root cause (see
    :func:`chain_and_skipped`)."""
    return chain_and_skipped(exc)[0]


def chain_and_skipped(exc: BaseException) -> tuple[list[tuple[str, BaseException]], int]:
    """:func:`chain`, and how many links it left out.

    A chain longer than ``_MAX_CHAIN`` keeps its first ``_MAX_CHAIN - 1`` exceptions and its
    last, the root cause (what went wrong first is what a reader looks for); the links
    between are counted. The chain is followed for ``_MAX_CHAIN_WALK`` links at most (the
    last one reached stands for the root beyond).
    """
    result: list[tuple[str, BaseException]] = [("exception", exc)]
    seen = {id(exc)}
    current = exc
    root: tuple[str, BaseException] | None = None
    skipped = 0
    for _ in range(_MAX_CHAIN_WALK):
        if current.__cause__ is not None:
            relation, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            relation, nxt = "context", current.__context__
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        if len(result) < _MAX_CHAIN - 1:
            result.append((relation, nxt))
        else:
            if root is not None:
                skipped += 1
            root = (relation, nxt)
        current = nxt
    if root is not None:
        result.append(root)
    return result, skipped


def fingerprint(
    exc: BaseException, classifier: FrameClassifier, tb: TracebackType | None = None
) -> str:
    """A stable id for "the same bug": type plus the code path, never the message of an
    exception that was raised.

    Frames contribute their module, qualified function name and the text of the line
    (so shifting code up or down keeps the fingerprint; a different call site changes it).
    Only app frames count when there are any, so library and server frames above the app
    do not split one bug into several groups. A run of recursion counts once, so the depth
    it reached does not split it either. ``tb`` is the traceback as it was when the
    exception was caught (it grows as the exception travels further up). An exception
    that was never raised has no code path: its message stands in for it, with the values
    in it (numbers, ids, quoted text) left out.
    """
    digest = hashlib.sha256()
    _fingerprint_chain(exc, classifier, tb, digest, 0, [_MAX_MEMBER_FINGERPRINTS])
    if (tb if tb is not None else exc.__traceback__) is None:
        message = _fingerprint_message(exc)
        if message:  # without one, the type alone (as before messages counted)
            digest.update(b"\nmessage:")
            digest.update(message.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


_MAX_MEMBER_FINGERPRINTS = 32
"""How many members of an exception group tree fingerprint by their own code path (the
rest by their type)."""
_MAX_MEMBER_DEPTH = 3
"""How deep in nested exception groups members fingerprint by their own code path."""


def _fingerprint_chain(
    exc: BaseException,
    classifier: FrameClassifier,
    tb: TracebackType | None,
    digest: Any,
    depth: int,
    budget: list[int],
) -> None:
    for relation, member in chain(exc):
        digest.update(relation.encode())
        member_tb = tb if member is exc and tb is not None else member.__traceback__
        _fingerprint_one(member, member_tb, classifier, digest, depth, budget)


def _fingerprint_one(
    exc: BaseException,
    tb: TracebackType | None,
    classifier: FrameClassifier,
    digest: Any,
    depth: int,
    budget: list[int],
) -> None:
    digest.update(type_name(type(exc)).encode())
    if isinstance(exc, BaseExceptionGroup):
        members = exc.exceptions[:_MAX_GROUP_MEMBERS]
        if len(exc.exceptions) > 1:
            keys = {_member_key(member, classifier, depth, budget) for member in members}
        else:
            keys = {type_name(type(member)) for member in members}
        digest.update(("|".join(sorted(keys))).encode())
    entries = []
    app_entries = []
    for frame, lineno in walk_tb(tb):
        code = frame.f_code
        filename = code.co_filename
        if classifier.is_sentinel(filename):
            continue
        module = frame.f_globals.get("__name__") or "?"
        source = _source_line(filename, lineno, frame.f_globals)
        where = source if source else f"+{lineno - code.co_firstlineno}"
        entry = f"{module}:{code.co_qualname}:{where}"
        entries.append(entry)
        if classifier.in_app(filename, str(module)):
            app_entries.append(entry)
    hashed = app_entries or entries
    if isinstance(exc, RecursionError):
        hashed = _through_last_repeat(hashed)
    for entry in _collapse_repeats(hashed):
        digest.update(b"\n")
        digest.update(entry.encode("utf-8", "surrogatepass"))


def _member_key(
    member: BaseException, classifier: FrameClassifier, depth: int, budget: list[int]
) -> str:
    """How a member of a group with several counts in the group's fingerprint: its own
    fingerprint when it was raised (two failures of one type are two bugs), else (built
    into the group where the group was raised, or past the bounds) its type."""
    if member.__traceback__ is None or depth >= _MAX_MEMBER_DEPTH or budget[0] <= 0:
        return type_name(type(member))
    budget[0] -= 1
    digest = hashlib.sha256()
    _fingerprint_chain(member, classifier, None, digest, depth + 1, budget)
    return digest.hexdigest()[:16]


def _source_line(filename: str, lineno: int, module_globals: dict[str, Any]) -> str:
    """The stripped text of a line, read as the traceback module reads it: with the module's
    globals, linecache asks the module's loader when the file is not on disk (a zipapp, an
    egg, a pex), so the text does not depend on whether anything formatted a traceback
    before. Empty when there is none (or the loader fails)."""
    try:
        return linecache.getline(filename, lineno, module_globals).strip()
    except Exception:  # a loader of the app's: get_source may raise anything
        return ""


_MAX_CYCLE = 32
"""The longest cycle of frames (mutual recursion: a calls b calls a) folded to one copy."""
_MAX_COLLAPSE_PASSES = 4


def _collapse_repeats(entries: list[str]) -> list[str]:
    """``entries`` with each run of repeats kept once: the same entry over and over, or a
    cycle of up to ``_MAX_CYCLE`` entries over and over (the last copy may be cut short), so
    one recursion bug fingerprints the same at any depth. Entries that do not repeat (no
    recursion) are left as they are; linear in the number of entries."""
    for _ in range(_MAX_COLLAPSE_PASSES):
        index: dict[str, int] = {}
        ids = [index.setdefault(entry, len(index)) for entry in entries]
        if len(index) == len(ids):
            break
        collapsed = _collapse_once(entries, ids)
        if len(collapsed) == len(entries):
            break
        entries = collapsed  # a run inside a run (a a b a a b) folds on the next pass
    return entries


def _collapse_once(entries: list[str], ids: list[int]) -> list[str]:
    count = len(ids)
    result: list[str] = []
    start = 0
    while start < count:
        current = ids[start]
        for period in range(1, min(_MAX_CYCLE, (count - start) // 2) + 1):
            if ids[start + period] != current:
                continue
            middle = start + period
            if ids[start:middle] != ids[middle : middle + period]:
                continue
            end = middle + period
            while end < count and ids[end] == ids[end - period]:
                end += 1
            result.extend(entries[start:middle])
            start = end
            break
        else:
            result.append(entries[start])
            start += 1
    return result


def _through_last_repeat(entries: list[str]) -> list[str]:
    """A RecursionError's entries up to the innermost one that repeats an outer one: past it
    are the calls of one unfinished round of the recursion, which depend only on where the
    limit happened to fall (unchanged when nothing repeats)."""
    seen: set[str] = set()
    last = -1
    for position, entry in enumerate(entries):
        if entry in seen:
            last = position
        seen.add(entry)
    return entries if last < 0 else entries[: last + 1]


_MAX_FINGERPRINT_MESSAGE_CHARS = 200
"""How much of a never-raised exception's message (its values left out) is fingerprinted."""
_NORMALISED_CHARS = 2000
"""How much of the message is read to leave its values out (before that is cut)."""
_MESSAGE_VALUES = (
    # Quoted text: 'alice', "sku-1" (an apostrophe inside a word, as in can't, is no quote).
    (re.compile(r"""(?<!\w)'[^'\n]*'(?!\w)|(?<!\w)"[^"\n]*"(?!\w)"""), "<str>"),
    (
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        "<uuid>",
    ),
    # 0x7f3a2c, or a run of 8+ hex digits with a letter and a digit (a hash, an object id).
    (
        re.compile(
            r"\b0[xX][0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b"
        ),
        "<hex>",
    ),
    (re.compile(r"\d+(?:\.\d+)*"), "<num>"),
)


def _fingerprint_message(exc: BaseException) -> str:
    """The message of an exception that was never raised as its fingerprint reads it: the
    values in it (quoted text, uuids, hex ids, numbers) replaced by placeholders, bounded.
    Runs none of the app's code: for an exception whose ``__str__`` is the app's own, its
    plain arguments stand in for the message."""
    if _plain_message(exc):
        text = _message(exc)
    else:
        text = " ".join(
            (arg if type(arg) is str else repr(_head(arg)))
            if type(arg) in _PLAIN_TYPES
            else f"<{type(arg).__qualname__}>"
            for arg in _ARGS.__get__(exc, type(exc))
        )
    text = text[:_NORMALISED_CHARS]
    for pattern, placeholder in _MESSAGE_VALUES:
        text = pattern.sub(placeholder, text)
    return text[:_MAX_FINGERPRINT_MESSAGE_CHARS]


def _head(value: Any) -> Any:
    """``value``, or of long bytes as much as the fingerprint reads of a message."""
    return value[:_NORMALISED_CHARS] if _long_binary(value, _NORMALISED_CHARS) else value


class _StrictRepr(reprlib.Repr):
    """reprlib's bounded reprs, but a failing ``__repr__`` raises instead of being hidden
    behind ``<X instance at 0x...>`` (which would also leak a memory address); and with a
    ``scrubber``, strings and objects' reprs are scrubbed before they are cut or elided, also
    inside lists and mappings: a cut could take a secret's key or a URL's ``@`` away."""

    scrubber: Scrubber | None = None

    def repr_instance(self, x: Any, level: int) -> str:
        text = builtins.repr(x)
        if self.scrubber is not None:
            text = self.scrubber.text(text, limit=_SCRUB_BOUND_FACTOR * self.maxother)
        return cut_scrubbed(text, self.maxother)

    def repr_bytes(self, x: Any, level: int) -> str:
        # reprlib has no bound of its own for bytes: the repr of 100 MB would cost 400 MB
        # here, to be masked past what is scrubbed anyway. Only what is scrubbed is read.
        bound = _SCRUB_BOUND_FACTOR * self.maxother
        if _long_binary(x, bound):
            x = x[:bound]
        return self.repr_instance(x, level)

    repr_bytearray = repr_bytes

    def repr_str(self, x: str, level: int) -> str:
        if self.scrubber is None:
            return super().repr_str(x, level)
        text = builtins.repr(self.scrubber.text(x, limit=_SCRUB_BOUND_FACTOR * self.maxstring))
        if len(text) <= self.maxstring:
            return text
        # reprlib's elision (the middle left out), of the scrubbed text.
        head = max(0, (self.maxstring - 3) // 2)
        tail = max(0, self.maxstring - 3 - head)
        return text[:head] + self.fillvalue + text[len(text) - tail :]


class LocalsBudget:
    """Length and time budget for reprs of local variables in one report.

    With a ``renderer``, reprs that may run the app's code run there: the report waits for
    them until the deadline at most (see :class:`Renderer`).
    """

    def __init__(self, max_chars: int, seconds: float, renderer: Renderer | None = None) -> None:
        self.repr = _StrictRepr()
        self.repr.maxstring = max_chars
        self.repr.maxother = max_chars
        self.repr.maxlong = max_chars
        self.max_chars = max_chars
        self.deadline = time.monotonic() + seconds
        self.renderer = renderer

    def exhausted(self) -> bool:
        return time.monotonic() > self.deadline

    def render(self, value: Any) -> str:
        """reprlib's bounded repr (strings elided in the middle, quotes kept), not yet cut
        to ``max_chars``: scrubbing must see the whole of it first (see :meth:`shorten`)."""
        try:
            return str(self.repr.repr(value))
        except Exception as error:
            return f"<repr() failed: {type(error).__name__}>"

    def render_all(self, values: Sequence[Any]) -> list[str | None]:
        """:meth:`render` of each value, None for those the time budget left out."""
        if self.renderer is not None and any(type(value) not in _PLAIN_TYPES for value in values):
            return self.renderer.run(
                self.render, values, self.deadline, unfinished=_REPR_NOT_FINISHED
            )
        rendered: list[str | None] = []
        for value in values:
            if self.exhausted():
                break
            rendered.append(self.render(value))
        return rendered + [None] * (len(values) - len(rendered))

    def shorten(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + "..."

    def elide(self, text: str) -> str:
        """``text`` cut to fit ``max_chars`` once quoted, its middle left out as reprlib
        does (``'head...tail'``)."""
        room = max(1, self.max_chars - 2)
        if len(text) <= room:
            return text
        head = max(0, (room - 3) // 2)
        tail = max(0, room - 3 - head)
        return text[:head] + "..." + text[len(text) - tail :]


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
                "source": scrubber.text(_source_line(code.co_filename, lineno, frame.f_globals)),
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
        names = list(frame.f_locals.items())[:50]
    except Exception:
        return {"<locals>": "<unavailable>"}
    budget.repr.scrubber = scrubber  # strings inside containers, objects' reprs
    # A string is scrubbed as itself, before its repr (whose escaped quotes the scrubber also
    # reads), then elided to size: eliding first could cut a key from its value. Past what
    # scrubbing is bounded to, the rest of a string is masked whole. Other values are
    # scrubbed as their repr (their parts already were, before reprlib cut them).
    secret = [scrubber.is_secret_key(str(name)) for name, _ in names]
    text_first = [
        type(value) is str and not is_secret
        for (_, value), is_secret in zip(names, secret, strict=True)
    ]
    prepared: list[Any] = []
    for (_, value), first in zip(names, text_first, strict=True):
        if first:
            # Scrubbing a long string is the locals' work too: within their time budget.
            if budget.exhausted():
                break
            value = budget.elide(scrubber.text(value, limit=_SCRUB_BOUND_FACTOR * budget.max_chars))
        prepared.append(value)
    rendered = budget.render_all(prepared) + [None] * (len(names) - len(prepared))
    for index, ((name, _), text) in enumerate(zip(names, rendered, strict=True)):
        if text is None:
            captured["<skipped>"] = "time budget for locals exhausted"
            break
        name = str(name)
        if secret[index]:
            captured[name] = scrubber.mask(text)
        elif text_first[index]:
            captured[name] = budget.shorten(text)
        else:
            # Scrubbed before shortened: a cut could drop the closing quote that the
            # key-value rule needs to see the whole secret.
            captured[name] = budget.shorten(scrubber.text(text))
    return captured


def describe(
    exc: BaseException,
    classifier: FrameClassifier,
    max_frames: int,
    scrubber: Scrubber,
    locals_budget: LocalsBudget | None,
    depth: int = 0,
    tb: TracebackType | None = None,
    *,
    renderer: Renderer | None = None,
    deadline: float = math.inf,
    with_causes: bool = True,
    budget: list[int] | None = None,
) -> dict[str, Any]:
    """Type, scrubbed message, notes and frames of ``exc``, with its ``causes`` (its chain,
    see :func:`chain_and_skipped`; ``causes_skipped`` counts the links left out) and the
    members of exception groups (``exceptions``; ``exceptions_skipped`` counts those left
    out), each member described the same way, its own causes included.

    Bounded: ``_MAX_GROUP_MEMBERS`` members of a group, ``_MAX_GROUP_DEPTH`` levels of
    nested groups, and ``_MAX_DESCRIBED`` exceptions in all (``budget``, shared by the
    calls for one report). Locals are captured for ``exc`` and its members, not for causes.
    ``with_causes`` false: ``exc`` is a link of a chain already being described.
    ``renderer`` and ``deadline`` bound the wait for the app's ``__str__`` (see
    :func:`safe_message`).
    """
    if budget is None:
        budget = [_MAX_DESCRIBED]
    budget[0] -= 1
    described: dict[str, Any] = {
        "exception_type": type_name(type(exc)),
        "message": scrubbed_message(exc, scrubber, renderer, deadline),
        "frames": frames(exc, classifier, max_frames, scrubber, locals_budget, tb),
    }
    notes, notes_skipped = _notes(exc, scrubber)
    if notes:
        described["notes"] = notes
    if notes_skipped:
        described["notes_skipped"] = notes_skipped
    if isinstance(exc, BaseExceptionGroup) and depth < _MAX_GROUP_DEPTH:
        members = exc.exceptions
        listed = []
        for member in members[:_MAX_GROUP_MEMBERS]:
            if budget[0] <= 0:
                break
            listed.append(
                describe(
                    member,
                    classifier,
                    max_frames,
                    scrubber,
                    locals_budget,
                    depth + 1,
                    renderer=renderer,
                    deadline=deadline,
                    budget=budget,
                )
            )
        if listed:
            described["exceptions"] = listed
        if len(members) > len(listed):
            described["exceptions_skipped"] = len(members) - len(listed)
    if with_causes:
        links, skipped = chain_and_skipped(exc)
        causes = []
        for relation, link in links[1:]:
            if budget[0] <= 0:
                skipped += 1
                continue
            # A link's place in the tree is its exception's: its own members nest below.
            cause = describe(
                link,
                classifier,
                max_frames,
                scrubber,
                None,
                depth,
                renderer=renderer,
                deadline=deadline,
                with_causes=False,
                budget=budget,
            )
            cause["relation"] = relation
            causes.append(cause)
        if causes:
            described["causes"] = causes
        if skipped:
            described["causes_skipped"] = skipped
    return described


def _notes(exc: BaseException, scrubber: Scrubber) -> tuple[list[str], int]:
    """The exception's notes (``add_note``), scrubbed and bounded, and how many were left
    out. Read from the instance itself and never through its class (which runs no code of
    the app); a note that is not text is written as its type."""
    try:
        notes = _INSTANCE_DICT.__get__(exc, type(exc)).get("__notes__")
    except Exception:
        return [], 0
    if type(notes) not in (list, tuple):
        return [], 0
    written = [
        scrubber.text(str.__str__(note), limit=_MAX_NOTE_CHARS)
        if isinstance(note, str)
        else f"<{type(note).__qualname__}>"
        for note in notes[:_MAX_NOTES]
    ]
    return written, max(0, len(notes) - _MAX_NOTES)


def is_reportable(exc: BaseException, *, in_request: bool = False) -> bool:
    """Errors are reportable; control flow is not.

    Every ``Exception`` is an error. What derives from ``BaseException`` only (cancellation
    in asyncio and trio, KeyboardInterrupt, SystemExit, GeneratorExit) is control flow,
    unless it is a group that holds an error. ``in_request``: raised out of a request's
    handling, where only cancellation (the client went away) is control flow, and a
    ``sys.exit()`` or KeyboardInterrupt raised by a handler failed the request.
    """
    errors = _REQUEST_ERRORS if in_request else Exception
    if isinstance(exc, errors):
        return True
    if not isinstance(exc, BaseExceptionGroup):
        return False
    # Iterative: groups nest as deep as the app made them, far past the recursion limit.
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    for _ in range(_MAX_GROUP_NODES):
        if not stack:
            return False
        node = stack.pop()
        if isinstance(node, errors):
            return True
        if isinstance(node, BaseExceptionGroup) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.exceptions)
    return True  # too large to look through: better counted than lost


_REQUEST_ERRORS = (Exception, KeyboardInterrupt, SystemExit)


def error_path(exc: BaseException) -> list[BaseException]:
    """``exc``, then each group inside it down to the one error they wrap.

    A group whose members are one error and otherwise control flow (cancellation of the
    sibling tasks) is a task group's wrapping: the bug is the error inside. The path stops
    at anything else (a group with several errors, or none). Bounded however deep the
    groups nest.
    """
    path = [exc]
    if not isinstance(exc, BaseExceptionGroup):
        return path
    reportable = _reportability(exc)
    if reportable is None:
        return path  # too large to look through: reported whole
    node: BaseException = exc
    while isinstance(node, BaseExceptionGroup) and len(path) <= _MAX_GROUP_NODES:
        errors = 0
        for member in node.exceptions:
            if _holds_error(member, reportable):
                errors += 1
                if errors > 1:
                    break
                error = member
        if errors != 1:
            break
        node = error
        path.append(node)
    return path


def raised_at(path: Sequence[BaseException]) -> TracebackType | None:
    """Where the innermost exception of an :func:`error_path` was raised: its own traceback,
    or for one that was never raised (built into a group), that of the nearest group."""
    for member in reversed(path):
        if member.__traceback__ is not None:
            return member.__traceback__
    return None


def _reportability(exc: BaseExceptionGroup[Any]) -> dict[int, bool] | None:
    """Whether each group in the tree under ``exc`` that is not an ``Exception`` (those hold
    control flow) holds an error, by id; None when there are more than
    ``_MAX_GROUP_NODES`` such groups."""
    found: list[BaseExceptionGroup[Any]] = []
    seen: set[int] = set()
    stack = [exc]
    while stack:
        group = stack.pop()
        if id(group) in seen:
            continue
        if len(found) >= _MAX_GROUP_NODES:
            return None
        seen.add(id(group))
        found.append(group)
        for member in group.exceptions:
            if isinstance(member, BaseExceptionGroup) and not isinstance(member, Exception):
                stack.append(member)
    # Members were found after their group: the reverse order settles members first (a
    # member shared with a group found earlier is not settled yet, and counts as an error).
    result: dict[int, bool] = {}
    for group in reversed(found):
        holds_error = False
        for member in group.exceptions:
            if _holds_error(member, result):
                holds_error = True
                break
        result[id(group)] = holds_error
    return result


def _holds_error(exc: BaseException, reportability: dict[int, bool]) -> bool:
    if isinstance(exc, Exception):
        return True
    return isinstance(exc, BaseExceptionGroup) and reportability.get(id(exc), True)

"""The metrics endpoint: its own thread and port, answering even when the event loop is stuck.

Also measures event-loop lag from that side: a probe is scheduled on each watched loop and
the time until it runs is the lag; while a probe is still pending the lag keeps growing, so
a loop that is stuck right now shows up in the very next scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from operator import itemgetter
from stat import S_ISDIR
from typing import Any, NamedTuple
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict

from ._config import DEFAULT_MAX_SERIES, MAX_MAX_TENANTS
from ._location import (
    DEFAULT_MAX_LOCATIONS,
    LOCATIONS_ADMITTED,
    OTHER_LOCATION,
    LocationSet,
    SharedAdmissions,
    admissions_file,
    current_bound,
)
from ._metrics import (
    BUDGETED_LABELS,
    EXPOSED_NAMES,
    FOLDED_LABELS,
    INTERNAL_ERRORS_HELP,
    LOCATION_FAMILIES,
    REQUESTS,
    SERIES_PER_LABEL_SET,
    RequestTotals,
    rejected_family,
    tenant_family,
)
from ._tenants import OTHER_TENANT, TENANT_PROBLEMS, TenantFold
from ._vocabulary import STATUS_CLASSES, status_class

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, when this process writes to one."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or os.environ.get(MULTIPROC_DIR_VARIABLE.lower())


def multiprocess_dir_problem() -> str | None:
    """Why the multiprocess directory cannot be served, as a sentence that names the
    variable, the directory and what to do; None when it can."""
    variable = MULTIPROC_DIR_VARIABLE
    if not os.environ.get(variable) and os.environ.get(variable.lower()):
        variable = variable.lower()
    path = os.environ.get(variable)
    if not path:
        return (
            f"{MULTIPROC_DIR_VARIABLE} is not set: set it to the directory the workers write "
            "their metrics to, the same value the workers have (e.g. "
            f"{MULTIPROC_DIR_VARIABLE}=/tmp/sentinel-metrics for both); `sentinel run "
            "--workers N` needs no sidecar"
        )
    if not os.path.exists(path):
        return (
            f"{variable} names {path!r}, which does not exist: create it (mkdir -p) before "
            "the workers start, or set the variable to the directory they write to"
        )
    if not os.path.isdir(path):
        return (
            f"{variable} names {path!r}, which is not a directory: set it to the directory "
            "the workers write their metrics to"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        return (
            f"{variable} names {path!r}, which this user (uid {os.getuid()}) cannot read: "
            "run the sidecar as the workers' user, or make the directory readable"
        )
    return None


def bind_failure_advice(
    error: OSError, host: str, port: int, *, host_option: str, port_option: str
) -> str:
    """``cannot bind HOST:PORT``, why, and what to do, naming the options that choose the
    address (``host_option``, ``port_option``: a flag or variable, or both)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno == errno.EADDRINUSE:
        advice = (
            "another process listens there (another sidecar, or a server with its own "
            f"/metrics): stop it, or choose a free port with {port_option}"
        )
    elif error.errno == errno.EACCES:
        advice = f"ports below 1024 need privileges: choose a higher one with {port_option}"
    elif error.errno == errno.EADDRNOTAVAIL:
        advice = (
            f"{host} is not an address of this host: choose 0.0.0.0 (every interface), "
            f"127.0.0.1 or one of its addresses with {host_option}"
        )
    elif error.errno == errno.EAFNOSUPPORT:
        advice = f"this host has no IPv6: choose an IPv4 address with {host_option}"
    else:
        advice = f"check the address ({host_option}) and the port ({port_option})"
    return f"cannot bind {address} ({reason}): {advice}"


def directory_problem(path: str) -> str | None:
    """Why the merged view cannot read the multiprocess directory ``path`` now, as one line
    that names it; None when it can. A stat and an access check, cheap enough for every
    health probe (the directory is not listed)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return (
            f"the multiprocess directory {path!r} is gone, and the workers' metric files "
            "with it: recreate it and restart the workers"
        )
    except OSError as error:
        return (
            f"the multiprocess directory {path!r} cannot be reached "
            f"({error.strerror or error}): make it reachable again"
        )
    if not S_ISDIR(mode):
        return (
            f"the multiprocess directory {path!r} is not a directory any more: put the "
            "directory back and restart the workers"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        return (
            f"the multiprocess directory {path!r} cannot be read by this user "
            f"(uid {os.getuid()}): make it readable again"
        )
    return None


class MergedRegistry(CollectorRegistry):
    """The registry of a merged view (:func:`merged_registry`), which also says whether its
    directory can be read: :class:`MetricsServer` answers ``/healthz`` with it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def problem(self) -> str | None:
        """Why the directory cannot be read now (see :func:`directory_problem`), or None."""
        return directory_problem(self.path)


def merged_registry(
    path: str,
    max_tenants: int | None = None,
    max_series: int | None = None,
    max_locations: int | None = None,
) -> MergedRegistry:
    """A registry that reads every worker's metric files in ``path`` (multiprocess mode),
    with the workers' tenant counts folded into one bounded set (``max_tenants``; by
    default the workers' own setting, from their newest file), each budgeted family's
    label series bounded by ``max_series`` and the locations by ``max_locations``
    (likewise). While ``path`` cannot be listed (removed, replaced by a file, unreadable)
    it serves nothing read from there: no worker's series, and the tenant families empty
    rather than as last seen."""
    registry = MergedRegistry(path)
    registry.register(_MergedRuns(path, max_tenants, max_series, max_locations))
    return registry


class _MergedRuns:
    """The merged view of the run whose files ``path`` holds, started again when they are
    all replaced (the directory emptied between two runs, as docs/operating.md asks, while
    a sidecar keeps running): what the last run's workers named (tenants, locations, label
    sets) and the settings they published then are not this run's."""

    def __init__(
        self,
        path: str,
        max_tenants: int | None,
        max_series: int | None,
        max_locations: int | None,
    ) -> None:
        self._path = path
        self._limits = (max_tenants, max_series, max_locations)
        self._files: tuple[frozenset[tuple[str, int]], frozenset[str]] = (frozenset(), frozenset())
        """The metric files (name, inode) and the tenant files (name) read last."""
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        max_tenants, max_series, max_locations = self._limits
        processes = Liveness(self._path)
        self._tenants = TenantFiles(self._path, max_tenants, processes)
        self._merged = MergedFiles(self._path, max_series, processes, max_locations)

    def describe(self) -> list[Metric]:
        return list(self._tenants.describe())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._follow_the_run()
            tenants, merged = self._tenants, self._merged
        # The tenants first: a worker publishes only requests its counter files hold
        # already, so counters read after them are never behind them (read before, a
        # publication in between would put the tenants' sum ahead of the request counter).
        yield from tenants.collect()
        families = merged.collect()
        requests = [family for family in families if family.name == "sentinel_http_requests"]
        yield from families
        # Derived from the same reading of the files: each file is read once a scrape.
        yield from RequestTotals(lambda: requests).collect()

    def _follow_the_run(self) -> None:
        """Start again when none of the metric files, or none of the tenant files, read
        before is there: the metric files by name and inode, though a new run's worker with
        the same pid (a container's) may get the same inode back (ext4 reuses them); the
        tenant files by name, which holds the worker's start (``<pid>_<started>``)."""
        metrics, tenants = set(), set()
        try:
            with os.scandir(self._path) as entries:
                for entry in entries:
                    if entry.name.endswith(".db"):
                        metrics.add((entry.name, entry.inode()))
                    elif entry.name.startswith(TENANT_FILE_PREFIX) and entry.name.endswith(
                        ".json"
                    ):  # (not a publication's temporary file, renamed to one)
                        tenants.add(entry.name)
        except OSError:
            return  # cannot be listed: each part serves nothing read from there
        known_metrics, known_tenants = self._files
        if (known_metrics and not known_metrics & metrics) or (
            known_tenants and not known_tenants & tenants
        ):
            self._start()
            print(
                f"sentinel: the files the merged view read in {self._path} are gone: "
                "a new run, merged from its own files only",
                file=sys.stderr,
                flush=True,
            )
        self._files = (frozenset(metrics), frozenset(tenants))


LIVENESS_PREFIX = "sentinel_alive_"
LIVENESS_SUFFIX = ".lock"
"""``sentinel_alive_<pid>.lock``: each worker holds an exclusive ``flock`` on its own for
its whole life. The kernel releases it when the process ends, however it ends (SIGKILL
too), so a reader that can lock the file knows the process is gone, from any pid
namespace that shares the directory and with no pid that could have been reused."""

_held: dict[str, int] = {}
"""Directory -> descriptor of the liveness file this process holds there."""
_held_lock = threading.Lock()


def _forget_held() -> None:
    """In a forked child: its copies of the descriptors would keep the parent's locks
    after the parent ended."""
    global _held_lock
    _held_lock = threading.Lock()  # another thread may have held it at the fork
    for descriptor in _held.values():
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held)


def hold_liveness(path: str) -> bool:
    """Hold this process's liveness file in ``path`` locked until it ends (once per
    process); False where it cannot (no ``fcntl``, a file system without locks): such a
    process is never taken for ended."""
    try:
        import fcntl
    except ImportError:
        return False
    with _held_lock:
        if path in _held:
            return True
        name = os.path.join(path, f"{LIVENESS_PREFIX}{os.getpid()}{LIVENESS_SUFFIX}")
        descriptor = locked_file(name, f"{name}.{threading.get_ident()}.tmp", fcntl)
        if descriptor is None:
            return False
        _held[path] = descriptor
        return True


def locked_file(
    name: str, temporary: str, fcntl: Any, content: bytes = b"", *, lock_required: bool = True
) -> int | None:
    """Write ``content`` to ``temporary``, lock it exclusively (with the ``fcntl`` module,
    or not at all when it is None), and only then name it ``name``: a reader never finds it
    unlocked while this process runs. Its descriptor, to hold for as long as the lock
    should; None when it could not be made, or locked unless not ``lock_required``."""
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:
        return None
    try:
        if content:
            os.write(descriptor, content)
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if lock_required:
                    raise
        os.replace(temporary, name)
    except OSError:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return None
    return descriptor


def process_of(name: str) -> str:
    """The process id in a multiprocess file's name: ``gauge_all_123.db`` is ``123``."""
    return name.removesuffix(".db").rpartition("_")[2]


class Liveness:
    """Which workers writing to ``path`` have ended: those whose liveness file (see
    :func:`hold_liveness`) can be locked. A process without one is never called ended."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._ended: dict[str, tuple[int, int]] = {}
        """pid -> identity of the liveness file found released (a reused pid makes a new one)."""
        self._lock = threading.Lock()

    def ended(self) -> frozenset[str]:
        """The pids (as in the files' names) of the processes that have ended."""
        try:
            import fcntl
        except ImportError:
            return frozenset()
        try:
            names = os.listdir(self._path)
        except OSError:
            return frozenset()
        ended = set()
        listed = set()
        with self._lock:
            for name in names:
                if not (name.startswith(LIVENESS_PREFIX) and name.endswith(LIVENESS_SUFFIX)):
                    continue
                pid = name[len(LIVENESS_PREFIX) : -len(LIVENESS_SUFFIX)]
                listed.add(pid)
                full = os.path.join(self._path, name)
                try:
                    stat = os.stat(full)
                except OSError:
                    continue
                if self._ended.get(pid) == (stat.st_ino, stat.st_dev):
                    ended.add(pid)
                    continue
                try:
                    descriptor = os.open(full, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    stat = os.fstat(descriptor)
                except OSError:
                    continue  # held: running (or locks unsupported here: not known to be gone)
                finally:
                    os.close(descriptor)  # releases the probe's own lock
                self._ended[pid] = (stat.st_ino, stat.st_dev)
                ended.add(pid)
            for pid in [pid for pid in self._ended if pid not in listed]:
                del self._ended[pid]  # its file is gone: nothing to remember it by
        return frozenset(ended)

    def ended_files(self) -> dict[str, list[str]]:
        """The names of the metric and tenant files of each process that has ended."""
        ended = self.ended()
        try:
            names = os.listdir(self._path)
        except OSError:
            return {}
        found: dict[str, list[str]] = {}
        for name in sorted(names):
            if name.endswith(".db"):
                pid = process_of(name)
            elif name.startswith(TENANT_FILE_PREFIX):
                pid = name.removeprefix(TENANT_FILE_PREFIX).partition("_")[0]
            else:
                continue
            if pid in ended:
                found.setdefault(pid, []).append(name)
        return found


_VALUE = struct.Struct("d")
_USED = struct.Struct("i")
_READ_FROM_SCRATCH = ("gauge", "summary")
"""File types merged by prometheus_client itself on every scrape (few values: sentinel's
gauges; an app's own summaries)."""
PER_PROCESS = ("sentinel_event_loop_lag_seconds", "sentinel_build_info")
"""sentinel's gauges that describe a running process: the merged view leaves out the
values of processes that have ended (a killed worker's last lag, a replaced release)."""


class _File:
    """What is known of one ``.db`` file: where each value is and which merged slot(s) it
    adds to. prometheus_client's files only grow (a key is never moved or removed), so the
    keys are parsed once and later scrapes read only the values."""

    __slots__ = (
        "damaged",
        "getter",
        "identity",
        "parsed",
        "positions",
        "slots",
        "used_slots",
        "values",
    )

    def __init__(self, identity: tuple[int, int]) -> None:
        self.identity = identity
        self.parsed = 8  # the first 8 bytes are the used size and padding
        self.positions: list[int] = []  # index of each value, in 8-byte words
        self.slots: list[int] = []
        self.used_slots: frozenset[int] = frozenset()
        self.values: tuple[float, ...] = ()
        """Each value as last read (what the file keeps adding if it is damaged later)."""
        self.getter: Callable[[memoryview[float]], tuple[float, ...]] | None = None
        self.damaged = False

    def read(self, words: memoryview[float]) -> tuple[float, ...]:
        """The values at :attr:`positions` (all of them within ``words``)."""
        getter = self.getter
        if getter is None:
            positions = self.positions
            if len(positions) > 1:
                getter = itemgetter(*positions)
            elif positions:
                only = positions[0]

                def getter(words: memoryview[float]) -> tuple[float, ...]:
                    return (words[only],)

            else:

                def getter(words: memoryview[float]) -> tuple[float, ...]:
                    return ()

            self.getter = getter
        return getter(words)


class MergedFiles:
    """The counters and histograms of every worker's files in ``path``, merged as
    prometheus_client's ``MultiProcessCollector`` merges them (summed over processes,
    histogram buckets accumulated), read in prometheus_client's own file format.

    It re-reads every value of every file on each scrape, so the view is exact, but parses
    each file's keys (JSON) only once: a scrape costs one read and one addition per value.
    Gauges and summaries are few and merged by prometheus_client itself.

    Locations are bounded here as in one process: at most ``max_locations`` values (the
    workers' setting, from their tenant files, unless given) in all the families with a
    ``location`` label, the rest folded into ``other``; the values the workers named
    together (:class:`SharedAdmissions`) first, in their order, then any other in the
    order first seen; with an allow-list (published by the workers), its values only.
    The families sentinel budgets (:data:`FOLDED_LABELS`) are bounded again here: the
    label sets the workers named together first, then any other in the order first seen,
    while ``max_series`` has room. A value's or label set's place (named or folded) never
    changes for the life of this object, so every merged series only grows. Values folded
    by the budget here are added to ``sentinel_series_overflow_total`` too.

    A file whose new part cannot be parsed (an entry torn or foreign) or that is shorter
    than its used size (cut) keeps what was parsed and the values last read where it
    cannot be read now, so no merged counter goes back; each such file is said once on
    stderr and counted in ``sentinel_internal_errors_total{component="sidecar"}``.
    """

    def __init__(
        self,
        path: str,
        max_series: int | None = None,
        liveness: Liveness | None = None,
        max_locations: int | None = None,
    ) -> None:
        self._path = path
        self._max_series = max_series
        self._max_locations = max_locations
        self._liveness = liveness or Liveness(path)
        self._files: dict[str, _File] = {}
        self._slot_of: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
        self._slot_info: list[tuple[str, str, str, tuple[tuple[str, str], ...], str]] = []
        """(family, type, sample name, labels, help) of each merged slot."""
        self._admitted: dict[str, dict[tuple[tuple[str, str], ...], bool]] = {}
        """Per budgeted family: label set (without le) -> named (True) or folded (False)."""
        self._named: dict[str, int] = {}
        self._locations: dict[str, bool] = {OTHER_LOCATION: True}
        """Location value -> named (True) or folded into ``other`` (False)."""
        self._locations_named = 0
        self._shared: dict[str, SharedAdmissions] = {}
        self._published: dict[str, Any] | None = None
        """The workers' newest published settings (once found)."""
        self._published_looked = -1
        self._scrapes = 0
        self._problems = 0
        self._unreadable: set[str] = set()
        """Gauge and summary files said to be unreadable (once each, while present)."""
        self._key_slots: dict[tuple[str, bytes], list[int]] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self, only: Iterable[str] | None = None) -> list[Metric]:
        """The merged families (``only``: just these family names)."""
        with self._lock:
            return self._merge(None if only is None else set(only))

    def _settings(self) -> dict[str, Any]:
        """What the workers published last (their newest tenant file), looked for at most
        once a scrape until found."""
        if self._published is None and self._published_looked != self._scrapes:
            self._published_looked = self._scrapes
            self._published = _published_settings(self._path)
        return self._published or {}

    def _shared_file(self, what: str) -> SharedAdmissions:
        shared = self._shared.get(what)
        if shared is None:
            shared = self._shared[what] = SharedAdmissions(admissions_file(self._path, what))
        return shared

    def _limit(self, exposed: str) -> int:
        """``max_series``: given, else the workers' (published, else the bound their shared
        admissions were made under), else the default."""
        published = self._settings().get("max_series")
        if self._max_series:
            return self._max_series
        if isinstance(published, int) and published > 0:
            return published
        return self._shared_file(exposed).limit or DEFAULT_MAX_SERIES

    def _merge(self, only: set[str] | None) -> list[Metric]:
        self._scrapes += 1
        try:
            names = sorted(os.listdir(self._path))
        except OSError:
            return []
        scratch: list[str] = []
        totals: list[float] = []
        present = set()
        in_use: set[int] = set()
        for name in names:
            if not name.endswith(".db"):
                continue
            kind = name.split("_", 1)[0]
            full = os.path.join(self._path, name)
            if kind in _READ_FROM_SCRATCH:
                if only is None:
                    scratch.append(full)
                continue
            present.add(name)
            cached = self._read(name, full)
            if cached is None:
                continue
            in_use.update(cached.used_slots)
            if len(totals) < len(self._slot_info):
                totals.extend([0.0] * (len(self._slot_info) - len(totals)))
            for slot, value in zip(cached.slots, cached.values, strict=True):
                totals[slot] += value
        for gone in set(self._files) - present:
            del self._files[gone]
        # Before the internal errors are counted: a file found unreadable counts now.
        gauges = self._gauges(scratch) if scratch else []
        if only is None:
            self._unreadable &= {os.path.basename(path) for path in scratch}
        if self._problems:
            slot = self._slot(
                "sentinel_internal_errors",
                "counter",
                "sentinel_internal_errors_total",
                (("component", "sidecar"),),
                INTERNAL_ERRORS_HELP,
            )
            if len(totals) < len(self._slot_info):
                totals.extend([0.0] * (len(self._slot_info) - len(totals)))
            totals[slot] += self._problems
            in_use.add(slot)
        if len(totals) < len(self._slot_info):
            totals.extend([0.0] * (len(self._slot_info) - len(totals)))
        families = self._families(totals, in_use, only)
        families.extend(gauges)
        return families

    def _gauges(self, files: list[str]) -> list[Metric]:
        """Gauges and summaries as prometheus_client merges them, less the files it cannot
        read (:meth:`_merges`): a scrape never fails for one file."""
        try:
            return self._merged_gauges(files)
        except Exception:  # prometheus_client raises whatever its parse meets
            readable = [path for path in files if self._merges(path)]
        try:
            return self._merged_gauges(readable)
        except Exception:  # changed again since: read at the next scrape
            return []

    def _merges(self, path: str) -> bool:
        """Whether prometheus_client can merge ``path``. One that cannot, but for being
        created (not yet sized), is said once and counted."""
        try:
            multiprocess.MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
        except Exception as error:  # see _gauges
            name = os.path.basename(path)
            try:
                created = os.path.getsize(path) < 8
            except OSError:
                created = True  # gone since: nothing to say
            if not created and name not in self._unreadable:
                self._unreadable.add(name)
                self._problems += 1
                print(
                    f"sentinel: the merged metrics view cannot read {name} in {self._path} "
                    f"({type(error).__name__}: {error}); its gauges are left out while it "
                    "cannot be read, counted in "
                    'sentinel_internal_errors_total{component="sidecar"}',
                    file=sys.stderr,
                    flush=True,
                )
            return False
        return True

    def _merged_gauges(self, files: list[str]) -> list[Metric]:
        """``files`` merged, less what ended processes left behind: their ``live*`` gauges
        (as ``mark_process_dead`` would remove them) and their values of sentinel's
        per-process gauges (:data:`PER_PROCESS`)."""
        merge = multiprocess.MultiProcessCollector.merge
        ended = self._liveness.ended()
        if not ended:
            return merge(files)  # type: ignore[no-any-return,no-untyped-call]
        running = [f for f in files if process_of(os.path.basename(f)) not in ended]
        kept = running + [
            f
            for f in files
            if process_of(os.path.basename(f)) in ended
            and not os.path.basename(f).startswith("gauge_live")
        ]
        families = [m for m in merge(kept) if m.name not in PER_PROCESS]  # type: ignore[no-untyped-call]
        gauges = [f for f in running if os.path.basename(f).startswith("gauge_")]
        families.extend(m for m in merge(gauges) if m.name in PER_PROCESS)  # type: ignore[no-untyped-call]
        return families

    def _read(self, name: str, full: str) -> _File | None:
        """One file's entry, its new keys parsed and its values read; None when it holds
        nothing to merge (gone, or not a file prometheus_client wrote).

        A file read before that cannot be read in full now (cut below its used size, its
        header overwritten, unreadable) keeps the values last read where it cannot be read,
        and one whose new part does not parse keeps what parsed before it: its counts never
        go back (they are counters and histograms). Said once per file."""
        cached = self._files.get(name)
        try:
            with open(full, "rb") as file:
                stat = os.fstat(file.fileno())
                identity = (stat.st_ino, stat.st_dev)
                if cached is not None and cached.identity != identity:
                    cached = None  # another file under the same name
                head = file.read(8)
                used = _USED.unpack_from(head)[0] if len(head) == 8 else 0
                if used < 8 or used % 8:
                    if cached is None:
                        return None  # not a file prometheus_client wrote (or being created)
                    self._damaged(name, cached, "its used size is not one prometheus_client writes")
                    return cached
                if cached is not None and used < cached.parsed:
                    cached = None  # its used size went back: a new file in the old one's place
                data = head + file.read(min(used, stat.st_size) - 8)
        except FileNotFoundError:
            return None  # removed: its counts go with it, as prometheus_client merges
        except OSError as error:
            if cached is None:
                return None
            self._damaged(name, cached, f"it cannot be read ({error.strerror or error})")
            return cached
        if cached is None:
            cached = self._files[name] = _File(identity)
        end = len(data) - len(data) % 8
        if end < used:
            self._damaged(name, cached, f"it holds {end} of its {used} used bytes")
        if cached.parsed < end and not self._parse(name, cached, data, end):
            self._damaged(name, cached, f"an entry at byte {cached.parsed} does not parse")
        words = memoryview(data)[:end].cast("d")
        positions = cached.positions
        if not positions or positions[-1] < end // 8:
            cached.values = cached.read(words)
            return cached
        # Cut below values read before: those keep their last values, the others the
        # highest of now and before.
        readable = end // 8
        last = cached.values
        cached.values = tuple(
            (max(words[position], last[index]) if index < len(last) else words[position])
            if position < readable
            else last[index]
            for index, position in enumerate(positions)
        )
        return cached

    def _damaged(self, name: str, cached: _File, why: str) -> None:
        """Count and say (once per file) that ``name`` cannot be read in full."""
        if cached.damaged:
            return
        cached.damaged = True
        self._problems += 1
        print(
            f"sentinel: the merged metrics view cannot read all of {name} in {self._path}: "
            f"{why}; its counts are kept as last read (no merged counter goes back), "
            'counted in sentinel_internal_errors_total{component="sidecar"}',
            file=sys.stderr,
            flush=True,
        )

    def _parse(self, name: str, cached: _File, data: bytes, used: int) -> bool:
        """Parse the entries from ``cached.parsed`` to ``used``; False when one does not
        parse (torn or foreign): those before it are kept, it is tried again next time."""
        kind = name.split("_", 1)[0]
        position = cached.parsed
        positions, slots = [], []
        complete = True
        while position < used:
            length = _USED.unpack_from(data, position)[0]
            following = position + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or following + 16 > used:
                complete = False
                break
            key = data[position + 4 : position + 4 + length]
            # Every worker writes the same keys: each is parsed once, for all files.
            known = self._key_slots.get((kind, key))
            if known is None:
                try:
                    family, sample, labels, help_text = json.loads(key.decode("utf-8"))
                    labels_key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
                    known = self._slots(str(family), kind, str(sample), labels_key, str(help_text))
                except (ValueError, TypeError, AttributeError, KeyError, IndexError):
                    complete = False
                    break
                self._key_slots[kind, key] = known
            for slot in known:
                positions.append(following // 8)
                slots.append(slot)
            position = following + 16
        if positions:
            cached.positions.extend(positions)
            cached.slots.extend(slots)
            cached.used_slots = cached.used_slots.union(slots)
            cached.getter = None
        cached.parsed = position
        return complete

    def _slots(
        self,
        family: str,
        kind: str,
        sample: str,
        labels: tuple[tuple[str, str], ...],
        help_text: str,
    ) -> list[int]:
        """Where one file value adds to: its own slot, or its folded one (and the overflow
        when the series budget folded it)."""
        if family in LOCATION_FAMILIES:
            labels = self._bound_location(labels)
        folds = FOLDED_LABELS.get(family)
        if folds is None:
            return [self._slot(family, kind, sample, labels, help_text)]
        plain = tuple(item for item in labels if item[0] != "le")
        if self._series_named(family, plain, folds):
            return [self._slot(family, kind, sample, labels, help_text)]
        folded = tuple(sorted(_fold(labels, folds).items()))
        slots = [self._slot(family, kind, sample, folded, help_text)]
        if sample.endswith(("_total", "_bucket")):
            overflow = (("metric", EXPOSED_NAMES[family]),)
            slots.append(
                self._slot(
                    "sentinel_series_overflow",
                    "counter",
                    "sentinel_series_overflow_total",
                    overflow,
                    "Observations counted under folded labels, by family.",
                )
            )
        return slots

    def _bound_location(self, labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """``labels`` with a location beyond the bound folded into ``other``."""
        for index, (name, value) in enumerate(labels):
            if name == "location":
                if self._location_named(value):
                    return labels
                return (*labels[:index], (name, OTHER_LOCATION), *labels[index + 1 :])
        return labels

    def _location_named(self, value: str) -> bool:
        named = self._locations.get(value)
        if named is None:
            # The values the workers named together, in their order, take their places first.
            for shared in self._shared_file(LOCATIONS_ADMITTED).read():
                if isinstance(shared, str) and shared not in self._locations:
                    self._admit_location(shared)
            named = self._locations.get(value)
            if named is None:
                named = self._admit_location(value)
        return named

    def _admit_location(self, value: str) -> bool:
        settings = self._settings()
        limit = settings.get("max_locations")
        if self._max_locations:
            limit = self._max_locations
        elif not (isinstance(limit, int) and limit > 0):
            limit = self._shared_file(LOCATIONS_ADMITTED).limit or DEFAULT_MAX_LOCATIONS
        given = settings.get("locations")
        if isinstance(given, list) and value in given:
            named = True  # the allow-list and the workers' own location, whatever the bound
        elif settings.get("allow_list") is True:
            named = False
        else:
            named = self._locations_named < limit
        self._locations_named += named
        self._locations[value] = named
        return named

    def _series_named(
        self,
        family: str,
        plain: tuple[tuple[str, str], ...],
        folds: tuple[tuple[str, str], ...],
    ) -> bool:
        admitted = self._admitted.setdefault(family, {})
        named = admitted.get(plain)
        if named is None:
            # The label sets the workers named together, in their order, take their places
            # first (their locations bound as in the files).
            exposed = EXPOSED_NAMES[family]
            names = BUDGETED_LABELS[exposed]
            for entry in self._shared_file(exposed).read():
                if not (isinstance(entry, tuple) and len(entry) == len(names)):
                    continue
                labels = tuple(sorted(zip(names, map(str, entry), strict=True)))
                labels = self._bound_location(labels)
                if labels not in admitted:
                    self._admit_series(family, labels, folds)
            named = admitted.get(plain)
            if named is None:
                named = self._admit_series(family, plain, folds)
        return named

    def _admit_series(
        self,
        family: str,
        plain: tuple[tuple[str, str], ...],
        folds: tuple[tuple[str, str], ...],
    ) -> bool:
        if dict(plain) == _fold(plain, folds):
            named = True  # folded by its worker already: bounded, not counted
        else:
            exposed = EXPOSED_NAMES[family]
            count = self._named.get(family, 0)
            cost = SERIES_PER_LABEL_SET.get(exposed, 1)
            named = (count + 1) * cost <= self._limit(exposed)
            self._named[family] = count + named
        self._admitted[family][plain] = named
        return named

    def _slot(
        self,
        family: str,
        kind: str,
        sample: str,
        labels: tuple[tuple[str, str], ...],
        help_text: str,
    ) -> int:
        key = (family, sample, labels)
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._slot_of[key] = len(self._slot_info)
            self._slot_info.append((family, kind, sample, labels, help_text))
        return slot

    def _families(
        self, totals: list[float], in_use: set[int], only: set[str] | None
    ) -> list[Metric]:
        """The families of the slots some present file adds to. A histogram's samples go
        out label set by label set (OpenMetrics requires each label set's samples together):
        its buckets, accumulated, then ``_count``, then ``_sum``, as prometheus_client
        writes them."""
        families: dict[str, Metric] = {}
        # (family, labels without le) -> its buckets (le, le as written, value) and its
        # other samples (_sum), label sets in the order first seen.
        histograms: dict[
            tuple[str, tuple[tuple[str, str], ...]],
            tuple[list[tuple[float, str, float]], list[tuple[str, float]]],
        ] = {}
        for slot, (family, kind, sample, labels, help_text) in enumerate(self._slot_info):
            if slot not in in_use or (only is not None and family not in only):
                continue
            metric = families.get(family)
            if metric is None:
                metric = families[family] = Metric(family, help_text, kind)
            if kind == "histogram":
                plain = tuple(item for item in labels if item[0] != "le")
                buckets, others = histograms.setdefault((family, plain), ([], []))
                if sample.endswith("_bucket"):
                    le = dict(labels).get("le", "+Inf")
                    buckets.append((float(le), le, totals[slot]))
                else:
                    others.append((sample, totals[slot]))
            else:
                metric.add_sample(sample, dict(labels), totals[slot])
        for (family, plain), (buckets, others) in histograms.items():
            metric = families[family]
            if buckets:
                accumulated = 0.0
                for _, le, value in sorted(buckets):
                    accumulated += value
                    metric.add_sample(f"{family}_bucket", {**dict(plain), "le": le}, accumulated)
                metric.add_sample(f"{family}_count", dict(plain), accumulated)
            for sample, value in others:
                metric.add_sample(sample, dict(plain), value)
        return list(families.values())


def _fold(
    labels: tuple[tuple[str, str], ...], folds: tuple[tuple[str, str], ...]
) -> dict[str, str]:
    return {**dict(labels), **dict(folds)}


def _published_settings(path: str) -> dict[str, Any] | None:
    """The settings the workers published in their tenant files (the newest file that
    says ``max_series``): ``max_series``, ``max_locations``, ``locations``, ``allow_list``."""
    for name in _newest_first(path):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as file:
                document = json.load(file)
            value = document.get("max_series")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and value > 0:
            return {
                key: document[key]
                for key in ("max_series", "max_locations", "locations", "allow_list")
                if key in document
            }
    return None


def _newest_first(path: str) -> list[str]:
    """The tenant files in ``path``, the most recently written first."""
    try:
        names = [n for n in os.listdir(path) if n.startswith(TENANT_FILE_PREFIX)]
    except OSError:
        return []
    found = []
    for name in names:
        if name.endswith(".json"):
            try:
                found.append((os.stat(os.path.join(path, name)).st_mtime_ns, name))
            except OSError:
                continue
    return [name for _, name in sorted(found, reverse=True)]


TENANT_FILE_PREFIX = "sentinel_tenants_"
"""Each worker's tenant counts: ``sentinel_tenants_<pid>_<token>.json`` in the
multiprocess directory (prometheus_client reads only ``*.db`` there)."""
MAX_TENANT_FILES = 4096
"""Worker files folded per scrape; more (a server that restarted workers thousands of
times without a fresh directory) are left out, oldest first."""


class TenantPublisher:
    """Writes this worker's tenant counts to its file, replaced atomically (the fold must
    never see ``other`` raised before the evicted tenant is gone), when they changed."""

    def __init__(self, path: str, metrics: Any, locations: LocationSet | None = None) -> None:
        # Once it has ended, its requests not published yet are folded in as ``other``.
        hold_liveness(path)
        self._metrics = metrics
        self._locations = locations
        """This worker's location set (by default the one it made last), whose bound is
        published with the counts."""
        process = f"{os.getpid()}_{time.time_ns()}"
        self._path = os.path.join(path, f"{TENANT_FILE_PREFIX}{process}.json")
        self._process = process
        self._last: object = None

    def publish(self) -> None:
        """Write the counts now (a no-op when nothing changed since the last write)."""
        metrics = self._metrics
        metrics.flush()
        with metrics.count_lock:
            metrics.apply()
            counts = metrics.tenant_counts()
            rejected = metrics.tenant_rejections()
        if (counts, rejected) == self._last:
            return
        document = {
            "process": self._process,
            "max_tenants": metrics.tenants.max_tenants,
            "max_series": metrics.budgets[REQUESTS].limit,
            # max_locations, the allow-list and this process's own location, that the
            # merged view bounds the locations of every worker as one process does.
            **(self._locations.bound() if self._locations is not None else current_bound() or {}),
            "counts": {label: list(values) for label, values in counts.items()},
            "rejected": rejected,
        }
        temporary = f"{self._path}.{threading.get_ident()}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(document, file, separators=(",", ":"))
        os.replace(temporary, self._path)
        self._last = (counts, rejected)


class _Retired(NamedTuple):
    """What stays of an ended worker once its last counts are folded: all of it is in the
    merged view, so only what a later process with the same pid needs is kept."""

    folded: tuple[int, int, int, int]
    """Its requests per status class folded in (published, and added to ``other``)."""
    token: int
    """The start token of the newest of its processes folded: a later one is a new worker."""
    requests: tuple[int, int, int] | None
    """The identity of its request counter file then (read again only once it changes)."""


def _process_of_tenant_file(name: str) -> tuple[str, int | None]:
    """The pid and start token in a tenant file's name (``sentinel_tenants_<pid>_<token>``)."""
    pid, _, token = name.removeprefix(TENANT_FILE_PREFIX).removesuffix(".json").partition("_")
    return pid, int(token) if token.isdigit() else None


class TenantFiles:
    """``sentinel_tenant_requests_total`` and ``sentinel_tenants_rejected_total`` for the
    merged view: each worker's published counts folded (:class:`TenantFold`) into one set
    of at most ``max_tenants`` tenants plus ``other``, whose sums per status class are the
    workers' request totals as of their last publication (twice a second, and at exit).

    A worker that ended without publishing its last counts (killed) has its requests
    counted since then added to ``other`` once it is seen to have ended (:class:`Liveness`),
    so the sums equal the request totals again. Once an ended worker's last counts are
    folded in, what was kept about it is dropped, but for its folded totals (a later worker
    with the same pid continues its request file): a server that replaces its workers
    keeps a few hundred bytes per ended worker whose files are still in the directory,
    and none once they are removed."""

    def __init__(
        self, path: str, max_tenants: int | None = None, liveness: Liveness | None = None
    ) -> None:
        self._path = path
        self._max_tenants = max_tenants
        self._liveness = liveness or Liveness(path)
        self._fold: TenantFold | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._rejected: dict[str, dict[str, int]] = {}
        self._rejected_ended: dict[str, int] = dict.fromkeys(TENANT_PROBLEMS, 0)
        """The rejections of the processes forgotten (ended, folded in)."""
        self._published: dict[str, dict[str, list[int]]] = {}
        """Per pid, per process (pid_token) of that pid: the highest total per status class
        it published."""
        self._requests: dict[str, tuple[tuple[int, int, int], list[int]]] = {}
        """Per ended pid: its request file's identity and its requests per status class."""
        self._unpublished_seen: dict[str, list[int]] = {}
        self._retired: dict[str, _Retired] = {}
        """Per ended pid whose last counts are folded in (see :class:`_Retired`)."""
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return [tenant_family({}), rejected_family({})]

    def collect(self) -> Iterable[Any]:
        with self._lock:
            if not self._read():
                # Nothing to go by: the counts as last seen would no longer add up to the
                # request totals, which are gone with the directory's files.
                return [tenant_family({}), rejected_family({})]
            counts = self._fold.counts() if self._fold is not None else {}
            rejected: dict[str, int] = {
                reason: self._rejected_ended.get(reason, 0)
                + sum(by_reason.get(reason, 0) for by_reason in self._rejected.values())
                for reason in TENANT_PROBLEMS
            }
        return [tenant_family(counts), rejected_family(rejected)]

    def processes(self) -> int:
        """How many worker processes are remembered in full (running, or ended and not yet
        folded in): what the merged view's memory grows with."""
        with self._lock:
            return sum(len(processes) for processes in self._published.values())

    def _read(self) -> bool:
        """Fold in what the workers published since the last scrape; False when the
        directory cannot be listed (gone, not a directory, unreadable)."""
        # Before the documents: an ended worker's last publication is on disk by now.
        ended = self._liveness.ended()
        try:
            listed = os.listdir(self._path)
        except OSError:
            return False
        files = []
        for name in listed:
            if not (name.startswith(TENANT_FILE_PREFIX) and name.endswith(".json")):
                continue
            pid, token = _process_of_tenant_file(name)
            retired = self._retired.get(pid)
            if retired is not None and token is not None and token <= retired.token:
                continue  # folded in and forgotten
            try:
                stat = os.stat(os.path.join(self._path, name))
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, name))
        published = []
        newest_limit = None
        unread: set[str] = set()  # pids with a file not (yet) folded in as it is now
        for mtime, size, name in sorted(files)[-MAX_TENANT_FILES:]:
            if self._seen.get(name) == (mtime, size):
                continue
            try:
                with open(os.path.join(self._path, name), encoding="utf-8") as file:
                    document = json.load(file)
                process = str(document["process"])
                counts = {str(k): [int(x) for x in v] for k, v in document["counts"].items()}
                rejected = {str(k): int(v) for k, v in document.get("rejected", {}).items()}
                newest_limit = int(document.get("max_tenants", 50))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                # Half-written by a foreign writer, or gone: read at the next scrape.
                unread.add(_process_of_tenant_file(name)[0])
                continue
            published.append((process, counts))
            self._rejected[process] = rejected
            self._seen[name] = (mtime, size)
            by_process = self._published.setdefault(process.partition("_")[0], {})
            highest = by_process.setdefault(process, [0, 0, 0, 0])
            for index in range(len(STATUS_CLASSES)):
                total = sum(max(0, v[index]) for v in counts.values() if len(v) > index)
                highest[index] = max(highest[index], total)
        for _mtime, _size, name in sorted(files)[:-MAX_TENANT_FILES]:
            unread.add(_process_of_tenant_file(name)[0])  # left out: not folded in
        published.extend(self._unpublished(ended))
        if published and self._fold is None:
            # Files are read oldest first: the newest says this run's setting (bounded as
            # a worker's own is, whatever a file says).
            limit = self._max_tenants or newest_limit or 50
            self._fold = TenantFold.of_workers(min(max(1, limit), MAX_MAX_TENANTS))
        if published and self._fold is not None:
            # One change between two scrapes, so that a tenant one worker's counts promote
            # and the next worker's evict was never exposed and need not wait to come back.
            with self._fold.publications():
                for process, counts in published:
                    self._fold.update(process, counts)
        self._forget(ended - unread, set(listed))
        return True

    def _unpublished(self, ended: frozenset[str]) -> list[tuple[str, dict[str, list[int]]]]:
        """For each ended worker, its requests it had not published (as ``other``)."""
        found = []
        for pid in sorted(ended):
            retired = self._retired.get(pid)
            if (
                retired is not None
                and pid not in self._published
                and self._request_file(pid) == retired.requests
            ):
                continue  # nothing since its last counts were folded in
            requests = self._requests_of(pid)
            if requests is None:
                continue
            published = list(retired.folded) if retired is not None else [0, 0, 0, 0]
            for totals in self._published.get(pid, {}).values():
                published = [a + b for a, b in zip(published, totals, strict=True)]
            missing = [max(0, r - p) for r, p in zip(requests, published, strict=True)]
            if any(missing) and self._unpublished_seen.get(pid) != missing:
                self._unpublished_seen[pid] = missing
                # Its own id, never a worker's (pid_token): folded as cumulative counts, so
                # counted once and never decreasing.
                found.append((f"{pid}_unpublished", {OTHER_TENANT: missing}))
        return found

    def _forget(self, ended: frozenset[str] | set[str], listed: set[str]) -> None:
        """Drop what is kept about the ended workers whose last counts are folded in, and
        about the retired pids none of whose files is left."""
        fold = self._fold
        for pid in ended:
            if pid not in self._published and pid not in self._requests:
                continue  # nothing kept, or retired already and nothing new since
            retired = self._retired.get(pid)
            folded = list(retired.folded) if retired is not None else [0, 0, 0, 0]
            token = retired.token if retired is not None else -1
            for process, totals in self._published.pop(pid, {}).items():
                folded = [a + b for a, b in zip(folded, totals, strict=True)]
                _, started = _process_of_tenant_file(process)
                if started is not None:
                    token = max(token, started)
                for reason, count in self._rejected.pop(process, {}).items():
                    self._rejected_ended[reason] = self._rejected_ended.get(reason, 0) + count
                if fold is not None:
                    fold.forget(process)
            missing = self._unpublished_seen.pop(pid, None)
            if missing is not None:
                folded = [a + b for a, b in zip(folded, missing, strict=True)]
                if fold is not None:
                    fold.forget(f"{pid}_unpublished")
            cached = self._requests.pop(pid, None)
            self._retired[pid] = _Retired(
                (folded[0], folded[1], folded[2], folded[3]),
                token,
                cached[0] if cached is not None else self._request_file(pid),
            )
        for name in list(self._seen):
            pid, started = _process_of_tenant_file(name)
            retired = self._retired.get(pid)
            if name not in listed or (
                retired is not None and started is not None and started <= retired.token
            ):
                del self._seen[name]
        on_disk = {process_of(name) for name in listed if name.endswith(".db")}
        on_disk.update(
            _process_of_tenant_file(name)[0]
            for name in listed
            if name.startswith(TENANT_FILE_PREFIX)
        )
        for pid in [pid for pid in self._retired if pid not in on_disk]:
            del self._retired[pid]

    def _request_file(self, pid: str) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(os.path.join(self._path, f"counter_{pid}.db"))
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _requests_of(self, pid: str) -> list[int] | None:
        """An ended worker's requests per status class, from its request counter file."""
        full = os.path.join(self._path, f"counter_{pid}.db")
        identity = self._request_file(pid)
        if identity is None:
            return None
        cached = self._requests.get(pid)
        if cached is not None and cached[0] == identity:
            return cached[1]
        by_class = [0, 0, 0, 0]
        try:
            values = MmapedDict.read_all_values_from_file(full)  # type: ignore[no-untyped-call]
            for key, value, *_ in values:
                _, sample, labels, _ = json.loads(key)
                if sample == "sentinel_http_requests_total":
                    code = str(labels.get("code", ""))
                    klass = status_class(int(code)) if code.isdigit() else "5xx"
                    by_class[STATUS_CLASSES.index(klass)] += int(value)
        except (OSError, ValueError, TypeError, AttributeError, IndexError, struct.error):
            return None  # not a file prometheus_client wrote
        self._requests[pid] = (identity, by_class)
        return by_class


MAX_CONNECTIONS = 16
"""Connections the metrics endpoint serves at once, each on a thread of its own in the
app's process. Prometheus holds one per scrape; more than 16 at once is a flood, not a
scraper, and threads beyond it would take CPU and memory from the app."""
REQUEST_TIMEOUT = 5.0
"""Seconds a connection has to send its whole request line and headers (Prometheus sends
them at once), and that one read or write of it may block: an idle or trickling client
is closed then, and its thread ends."""
LISTEN_BACKLOG = 128
"""Connections the kernel holds until they are accepted (the standard library's default,
5, makes a burst of scrapes wait a second or more for their SYN to be answered)."""
SLOT_WAIT = 0.5
"""Seconds a new connection waits for one of :data:`MAX_CONNECTIONS` to end when every
one is answering a request (none is idle): then it is closed unanswered."""
RENDER_WAIT = 10.0
"""Seconds a scrape waits while another is rendered (one rendering at a time, so that
concurrent scrapes do not multiply the CPU taken from the app): then it is answered 503."""


class _ResponseWriter(ServerHandler):
    """wsgiref's response writer, silent about a client that timed out or went away: the
    app's stderr is not the endpoint's error log."""

    def log_exception(self, exc_info: Any) -> None:
        if not isinstance(exc_info[1], OSError):
            super().log_exception(exc_info)


class _Handler(WSGIRequestHandler):
    """One request per connection, no access log."""

    server: _EndpointServer

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with the silent writer and a timed-out, reset or
        # evicted connection ended quietly (there is no one left to answer).
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.parse_request():
                return
            writer = _ResponseWriter(
                self.rfile,
                self.wfile,  # type: ignore[arg-type]  # a buffered socket writer, as wsgiref passes it
                self.get_stderr(),
                self.get_environ(),
                multithread=False,
            )
            writer.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back-pointer
            writer.run(self.server.get_app())  # type: ignore[arg-type]
        except OSError:
            pass

    def parse_request(self) -> bool:
        # False (nothing rendered) for a request whose connection was closed under it.
        return super().parse_request() and self.server.request_read(self.request)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class _EndpointServer(WSGIServer):
    """A WSGI server that serves at most ``max_connections`` connections at once, each on
    a thread, and gives each ``request_timeout`` seconds to send its request.

    When every slot is taken, the connection that has waited longest for its request is
    closed to make room (an idle or trickling client, never one being answered), so a
    flood of idle connections costs at most ``max_connections`` threads and a scrape that
    sends its request at once is still answered. When none is idle, a new connection waits
    up to :data:`SLOT_WAIT` seconds for one to end, and is closed unanswered after that.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}
        """Each connection served and not closed yet -> the monotonic time by which its
        request must have arrived (infinity once it has)."""
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take_slot():
            self.shutdown_request(request)
            return
        request.settimeout(self.request_timeout)  # each read and write of it
        with self._lock:
            self._open[request] = time.monotonic() + self.request_timeout
        try:
            threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name="sentinel-metrics-connection",
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: the app's need is greater
            self._forget(request)
            self.shutdown_request(request)
            self._slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._forget(request)  # before it is closed: never shut down once closed
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silent: a client's failure is no news for the app's stderr."""

    def request_read(self, connection: socket.socket) -> bool:
        """Note that ``connection``'s request has arrived; False when it was closed
        meanwhile (timed out or evicted)."""
        with self._lock:
            if connection not in self._open:
                return False
            self._open[connection] = math.inf
            return True

    def service_actions(self) -> None:
        # Called by serve_forever at least every half second: close the connections whose
        # request did not arrive in time (a socket timeout alone lets a byte every few
        # seconds keep one open forever).
        now = time.monotonic()
        with self._lock:
            late = [connection for connection, due in self._open.items() if due <= now]
            for connection in late:
                self._close(connection)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            for connection in list(self._open):
                self._close(connection)

    def _take_slot(self) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            # The oldest still waiting for its request (the first in order of arrival).
            idle = next((c for c, due in self._open.items() if due < math.inf), None)
            if idle is not None:
                self._close(idle)  # its thread ends at once and frees its slot
        return self._slots.acquire(timeout=SLOT_WAIT)

    def _close(self, connection: socket.socket) -> None:
        """Wake the thread reading ``connection`` (it ends); call with the lock held."""
        del self._open[connection]
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)

    def _forget(self, connection: socket.socket) -> None:
        with self._lock:
            self._open.pop(connection, None)


class _IPv6EndpointServer(_EndpointServer):
    """wsgiref binds IPv4 only; an IPv6 address (``::1``, ``::``) needs its own family."""

    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` (text or OpenMetrics, as the scraper asks) and ``/healthz`` on a thread.

    Bounded, since it runs in the app's process: at most ``max_connections`` connections
    served at once, each given ``request_timeout`` seconds to send its request, and one
    rendering of the metrics at a time (see :class:`_EndpointServer`).

    ``/healthz`` answers 200 ``ok``; for a merged view (:class:`MergedRegistry`) it answers
    503 with the reason, in one line, while its directory cannot be read (checked at each
    probe), and 200 again once it can."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._problem = registry.problem if isinstance(registry, MergedRegistry) else None
        self._rendering = threading.Lock()
        server_class = _IPv6EndpointServer if ":" in host else _EndpointServer
        self._server = server_class(
            (host, port), max_connections=max_connections, request_timeout=request_timeout
        )
        self._server.set_app(self._app)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sentinel-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.ident is not None:  # shutdown() waits for a loop that never ran
            self._server.shutdown()
        self._server.server_close()
        if self._thread.ident is not None:
            self._thread.join(5)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return self._answer(environ, start_response)
        # The headers GET would have (its length too), and no body.
        answered: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], *_: Any) -> Callable[..., Any]:
            answered.append((status, headers))
            return lambda data: None

        body = b"".join(self._answer({**environ, "REQUEST_METHOD": "GET"}, keep))
        status, headers = answered[0]
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return []

    def _answer(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if environ.get("REQUEST_METHOD") != "GET":
                return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if not self._rendering.acquire(timeout=RENDER_WAIT):
                start_response(
                    "503 Service Unavailable",
                    [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "1")],
                )
                return [b"another scrape is being rendered: try again\n"]
            try:
                return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
            finally:
                self._rendering.release()
        if path == "/healthz":
            problem = self._problem() if self._problem is not None else None
            if problem is not None:
                start_response(
                    "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
                )
                return [f"{problem}\n".encode()]
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"sentinel serves /metrics and /healthz\n"]


class LoopLagMonitor:
    """Measures, from its own thread, how late each watched asyncio loop runs a callback."""

    def __init__(self, gauge: Gauge, interval: float = 0.25) -> None:
        self._gauge = gauge
        self._interval = interval
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def thread(self) -> threading.Thread | None:
        """The probe thread, once started (it ends when the monitor is stopped)."""
        return self._thread

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        path = multiprocess_dir()
        if path:
            # This process's lag series is shown while it runs, and left out once it ended.
            hold_liveness(path)
        with self._lock:
            self._loops.add(loop)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sentinel-loop-lag", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                loops = [loop for loop in self._loops if not loop.is_closed()]
            worst = 0.0
            for loop in loops:
                worst = max(worst, self._probe(loop))
            self._gauge.set(worst)
            self._stop.wait(self._interval)

    def _probe(self, loop: asyncio.AbstractEventLoop) -> float:
        ran = threading.Event()
        sent = time.perf_counter()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:
            return 0.0  # the loop closed meanwhile
        # Wait up to one interval; a stuck loop is reported as stuck while it still is.
        while not ran.wait(self._interval):
            if loop.is_closed() or self._stop.is_set():
                return 0.0
            self._gauge.set(time.perf_counter() - sent)
        return time.perf_counter() - sent

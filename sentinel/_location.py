"""Bounding the set of location values, so a hostile header cannot explode label cardinality.

Also the file through which the worker processes of one multiprocess directory agree on
which values (and which label sets of the budgeted families) they name:
:class:`SharedAdmissions`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._config import OTHER_LOCATION as OTHER_LOCATION
from ._config import is_valid_location

DEFAULT_MAX_LOCATIONS = 64
"""``max_locations`` when nothing says otherwise (``Config.max_locations``'s default)."""
ADMISSIONS_PREFIX = "sentinel_admitted_"
ADMISSIONS_SUFFIX = ".jsonl"
"""``sentinel_admitted_<what>.jsonl`` in the multiprocess directory (prometheus_client reads
only ``*.db`` there): the values the workers named, in the order they named them."""
LOCATIONS_ADMITTED = "location"
"""``<what>`` of the file of location values."""


def shared_directory() -> str | None:
    """The multiprocess directory this process writes its metric files to (None when
    prometheus_client is not in multiprocess mode here): where its workers agree on the
    values they name."""
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    variable = "PROMETHEUS_MULTIPROC_DIR"  # or in lower case, as prometheus_client reads it
    return os.environ.get(variable) or os.environ.get(variable.lower())


def admissions_file(directory: str, what: str) -> str:
    """The path of the shared admissions of ``what`` in ``directory``."""
    return os.path.join(directory, f"{ADMISSIONS_PREFIX}{what}{ADMISSIONS_SUFFIX}")


class SharedAdmissions:
    """An append-only file of admitted entries (JSON, one a line) shared by the processes
    of one multiprocess directory, so that they all name the same first values: each
    process keeps its own set and reads what the others appended only when it meets a
    value it does not know (at most once per value and process, never per request).

    A writer appends under an exclusive ``flock`` (:meth:`locked`), after reading what
    the others appended, so the entries never exceed the writers' bound. A reader (the
    merged view) reads without the lock, up to the last complete line. Lines that are not
    JSON (a writer killed in the middle of one) are skipped; the next writer ends such a
    line first. An object line is a header: the bound (``limit``) the next entries were
    admitted under, written before the first entry and again when a writer's bound
    differs.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.limit: int | None = None
        """The bound of the latest header read."""
        self._offset = 0
        self._identity: tuple[int, int] | None = None
        self._ends_line = True
        self._writing: tuple[int, int] | None = None
        """(descriptor, bound) while :meth:`locked` holds the lock."""
        self._lock = threading.Lock()

    def read(self) -> list[Any]:
        """The entries appended since the last read (all of them when the file was
        replaced); none while the file does not exist or cannot be read."""
        with self._lock:
            try:
                descriptor = os.open(self.path, os.O_RDONLY)
            except OSError:
                return []
            try:
                return self._read_new(descriptor)
            except OSError:
                return []
            finally:
                os.close(descriptor)

    @contextlib.contextmanager
    def locked(self, limit: int) -> Iterator[list[Any]]:
        """Hold the file's lock, with the entries appended since the last read; append
        with :meth:`append` before it is released. Raises OSError where the file cannot be
        created, read or locked (the caller then decides alone)."""
        try:
            import fcntl
        except ImportError:  # no file locks here: each process decides alone
            raise OSError("file locks are not available") from None
        with self._lock:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                new = self._read_new(descriptor)
                self._writing = (descriptor, limit)
                try:
                    yield new
                finally:
                    self._writing = None
            finally:
                os.close(descriptor)  # releases the lock

    def append(self, entry: Any) -> None:
        """Append ``entry`` (inside :meth:`locked`)."""
        if self._writing is None:
            raise RuntimeError("append() is for inside locked()")
        descriptor, limit = self._writing
        line = b""
        if not self._ends_line:
            line = b"\n"  # ends a line a killed writer left unfinished: skipped when read
        if self.limit != limit:
            line += json.dumps({"limit": limit}).encode() + b"\n"
        line += json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        written = os.write(descriptor, line)
        if written != len(line):
            raise OSError(f"short write to {self.path}")
        self._offset += written
        self._ends_line = True
        self.limit = limit

    def _read_new(self, descriptor: int) -> list[Any]:
        stat = os.fstat(descriptor)
        identity = (stat.st_ino, stat.st_dev)
        if identity != self._identity:
            self._identity, self._offset = identity, 0
        size = stat.st_size
        if size < self._offset:
            self._offset = 0  # truncated: whatever it holds now is new
        data = b""
        if size > self._offset:
            os.lseek(descriptor, self._offset, os.SEEK_SET)
            data = os.read(descriptor, size - self._offset)
        end = data.rfind(b"\n") + 1
        self._offset += end
        self._ends_line = self._offset == size
        entries = []
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                limit = entry.get("limit")
                if isinstance(limit, int) and limit > 0:
                    self.limit = limit
                continue
            entries.append(tuple(entry) if isinstance(entry, list) else entry)
        return entries


_current: weakref.ref[LocationSet] | None = None
"""The location set this process made last: what its tenant publication says of its bound."""


def current_bound() -> dict[str, Any] | None:
    """The bound of this process's location set (the one made last), as its workers
    publish it for the merged view: ``max_locations``, the values named whatever the
    bound (``locations``: the allow-list and the process's own location) and whether
    those are all it names (``allow_list``)."""
    locations = _current() if _current is not None else None
    return locations.bound() if locations is not None else None


class LocationSet:
    """Maps raw location values to a bounded set: an allow-list, or the first ``limit`` seen.

    Invalid values (wrong alphabet, too long, unprintable), values the ``secret`` rule calls a
    credential (a token sent in the location header) and values beyond the bound become
    ``other``.

    In a worker of a multiprocess server (``shared``, by default the directory
    prometheus_client writes to in multiprocess mode), the first ``limit`` values are the
    first of all the workers sharing the directory, recycled ones included
    (:class:`SharedAdmissions`): every worker names the same values, so a named value's
    merged count is every request with it.
    """

    def __init__(
        self,
        allowed: Iterable[str] = (),
        limit: int = DEFAULT_MAX_LOCATIONS,
        secret: Callable[[str], bool] | None = None,
        shared: str | None = None,
    ) -> None:
        global _current
        self._allowed = frozenset(allowed)
        self._limit = limit
        self._secret = secret
        self._seen: set[str] = set(self._allowed)
        self._static: set[str] = set()
        self._lock = threading.Lock()
        self._shared_dir = shared
        self._shared: SharedAdmissions | None = None
        self._shared_resolved = False
        _current = weakref.ref(self)

    def resolve(self, raw: str) -> str:
        if raw in self._seen:
            return raw
        if (
            self._allowed
            or raw == OTHER_LOCATION  # the overflow's own value takes no place
            or not is_valid_location(raw)
            or len(self._seen) >= self._limit
        ):
            return OTHER_LOCATION
        # Screened only while there is room: a flood of new values past the bound costs
        # no scrubbing (and fills no cache).
        if self._secret is not None and self._secret(raw):
            return OTHER_LOCATION
        with self._lock:
            if raw in self._seen:
                return raw
            if len(self._seen) >= self._limit:
                return OTHER_LOCATION
            shared = self._shared_admissions()
            if shared is not None:
                try:
                    with shared.locked(self._limit) as new:
                        # What the other workers named first takes its places (once the
                        # bound is reached, this set is the whole shared one: no more reads).
                        self._seen.update(
                            value
                            for value in new
                            if isinstance(value, str) and value != OTHER_LOCATION
                        )
                        if raw in self._seen:
                            return raw
                        if len(self._seen) >= self._limit:
                            return OTHER_LOCATION
                        shared.append(raw)
                except OSError:
                    pass  # the file cannot be used: this process's own first values
            self._seen.add(raw)
        return raw

    def add_static(self, location: str) -> None:
        """Admit the process's own location regardless of the bound."""
        with self._lock:
            self._seen.add(location)
            self._static.add(location)

    def bound(self) -> dict[str, Any]:
        """``max_locations``, the values named whatever the bound and whether they are all
        (an allow-list): what a worker publishes for the merged view."""
        return {
            "max_locations": self._limit,
            "locations": sorted(self._allowed | self._static),
            "allow_list": bool(self._allowed),
        }

    def _shared_admissions(self) -> SharedAdmissions | None:
        if not self._shared_resolved:
            self._shared_resolved = True
            directory = self._shared_dir or shared_directory()
            if directory:
                self._shared = SharedAdmissions(admissions_file(directory, LOCATIONS_ADMITTED))
        return self._shared

    def __len__(self) -> int:
        return len(self._seen)

"""Bounding the set of location values, so a hostile header cannot explode label cardinality."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from ._config import is_valid_location

OTHER_LOCATION = "other"


class LocationSet:
    """Maps raw location values to a bounded set: an allow-list, or the first ``limit`` seen.

    Invalid values (wrong alphabet, too long, unprintable), values the ``secret`` rule calls a
    credential (a token sent in the location header) and values beyond the bound become
    ``other``.
    """

    def __init__(
        self,
        allowed: Iterable[str] = (),
        limit: int = 64,
        secret: Callable[[str], bool] | None = None,
    ) -> None:
        self._allowed = frozenset(allowed)
        self._limit = limit
        self._secret = secret
        self._seen: set[str] = set(self._allowed)
        self._lock = threading.Lock()

    def resolve(self, raw: str) -> str:
        if raw in self._seen:
            return raw
        if self._allowed or not is_valid_location(raw) or len(self._seen) >= self._limit:
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
            self._seen.add(raw)
        return raw

    def add_static(self, location: str) -> None:
        """Admit the process's own location regardless of the bound."""
        with self._lock:
            self._seen.add(location)

    def __len__(self) -> int:
        return len(self._seen)

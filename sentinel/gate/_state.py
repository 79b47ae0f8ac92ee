"""The gate's state file: the last known-good release per location of one environment, when
it was last seen healthy and the evidence, so that a rollback has its target at hand from
a file alone (``sentinel gate rollback-target``), with no network and no Prometheus.

Only a decision to continue records; a stop or an undecided run never touches the file.
A write is atomic (a temporary file beside it, fsync, rename, fsync of the directory), so a
crash mid-write leaves the old file or the new one, whole; and it happens under a lock
(``FILE.lock``, where the platform has ``fcntl``) with the file read again, so that two
gates recording different locations at once lose neither. A file that is not sentinel's,
is corrupt, or belongs to another environment is refused with a :class:`StateError` naming
the file and the problem.

The format (JSON)::

    {
      "kind": "sentinel-gate-state",
      "schema": 1,
      "environment": "production",
      "updated_at": "2026-06-01T12:00:00Z",
      "locations": {
        "fra": {
          "known_good": "v2",
          "last_seen_healthy": "2026-06-01T12:00:00Z",
          "evidence": {...},
          "history": [
            {"version": "v2", "last_seen_healthy": "2026-06-01T12:00:00Z"},
            {"version": "v1", "last_seen_healthy": "2026-05-28T09:30:00Z"}
          ]
        }
      }
    }

``history`` holds the distinct known-good releases of the location, the most recent first
(at most :data:`HISTORY_LIMIT`), so that a rollback away from the current one still finds
the one before it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from .._config import is_valid_location
from ..mixin._options import write_file_atomically
from ._model import GateDecision, Verdict
from ._traffic import GateInputError, check_environment, check_version

KIND = "sentinel-gate-state"
SCHEMA = 1
HISTORY_LIMIT = 10
_MAX_BYTES = 16 * 1024 * 1024


class StateError(ValueError):
    """The state file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class KnownGood:
    """One release that was seen healthy in a location, and when, last."""

    version: str
    last_seen_healthy: str
    """ISO 8601, UTC."""


@dataclass(frozen=True)
class LocationState:
    """What the file records for one location."""

    known_good: str
    last_seen_healthy: str
    evidence: Mapping[str, Any]
    history: tuple[KnownGood, ...]
    """Distinct known-good releases, the most recent first (``known_good`` first)."""


@dataclass(frozen=True)
class GateState:
    """The contents of a state file."""

    environment: str
    locations: Mapping[str, LocationState]
    updated_at: str | None = None

    def to_json(self) -> str:
        """The file's text."""
        document = {
            "kind": KIND,
            "schema": SCHEMA,
            "environment": self.environment,
            "updated_at": self.updated_at,
            "locations": {
                location: {
                    "known_good": entry.known_good,
                    "last_seen_healthy": entry.last_seen_healthy,
                    "evidence": dict(entry.evidence),
                    "history": [
                        {"version": item.version, "last_seen_healthy": item.last_seen_healthy}
                        for item in entry.history
                    ],
                }
                for location, entry in sorted(self.locations.items())
            },
        }
        return json.dumps(document, indent=2, sort_keys=False) + "\n"


def utc_text(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC to the second, e.g. ``2026-06-01T12:00:00Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_writable(path: Path) -> None:
    """Refuse a state file path whose directory does not exist or that is a directory."""
    if path.is_dir():
        msg = f"{path}: the state file is a directory"
        raise StateError(msg)
    if not path.parent.is_dir():
        msg = f"{path}: the state file's directory {str(path.parent)!r} does not exist"
        raise StateError(msg)


def load_state(path: Path, environment: str | None = None) -> GateState | None:
    """The state in ``path`` (None when there is no such file). Raises StateError for a file
    that cannot be read, is not sentinel's, is corrupt, or (with ``environment``) records
    another environment."""
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        msg = f"{path}: cannot read the state file: {error.strerror or error}"
        raise StateError(msg) from None
    state = parse_state(data, str(path))
    if environment is not None and state.environment != environment:
        msg = (
            f"{path}: the state file records environment {state.environment!r}, not "
            f"{environment!r} (use a state file per environment)"
        )
        raise StateError(msg)
    return state


def parse_state(data: bytes, name: str) -> GateState:
    """A state file's contents, checked; ``name`` is the file in messages."""
    if len(data) > _MAX_BYTES:
        msg = f"{name}: not a sentinel gate state file: larger than {_MAX_BYTES} bytes"
        raise StateError(msg)
    if not data.strip():
        msg = f"{name}: corrupt state file: it is empty"
        raise StateError(msg)
    try:
        document = json.loads(data)
    except UnicodeDecodeError:
        msg = f"{name}: not a sentinel gate state file: not UTF-8 text: {data[:60]!r}"
        raise StateError(msg) from None
    except json.JSONDecodeError as error:
        looks_like_ours = KIND.encode() in data
        what = "corrupt state file" if looks_like_ours else "not a sentinel gate state file"
        msg = f"{name}: {what}: not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        raise StateError(msg) from None
    except RecursionError:  # thousands of "[": no file the gate writes nests that deep
        msg = f"{name}: not a sentinel gate state file: JSON nested too deeply: {data[:20]!r}"
        raise StateError(msg) from None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        found = document.get("kind") if isinstance(document, dict) else type(document).__name__
        msg = f'{name}: not a sentinel gate state file (no "kind": "{KIND}"; found {found!r})'
        raise StateError(msg)
    schema = document.get("schema")
    if schema != SCHEMA:
        msg = f"{name}: state file schema {schema!r} is not the one this sentinel reads ({SCHEMA})"
        raise StateError(msg)
    corrupt = f"{name}: corrupt state file"
    environment = document.get("environment")
    try:
        environment = check_environment(
            environment if isinstance(environment, str) else "", "environment"
        )
    except GateInputError:
        msg = f'{corrupt}: "environment" must be an environment name: {environment!r}'
        raise StateError(msg) from None
    updated = document.get("updated_at")
    if updated is not None and not _is_time(updated):
        msg = f'{corrupt}: "updated_at" must be an ISO 8601 time: {updated!r}'
        raise StateError(msg)
    locations = document.get("locations")
    if not isinstance(locations, dict):
        msg = f'{corrupt}: "locations" must be a mapping: {locations!r:.100}'
        raise StateError(msg)
    parsed = {}
    for location, entry in locations.items():
        if not isinstance(location, str) or not is_valid_location(location):
            msg = f"{corrupt}: {location!r} is not a location"
            raise StateError(msg)
        parsed[location] = _parse_entry(entry, f"{corrupt}: locations.{location}")
    return GateState(environment, parsed, updated)


def _parse_entry(entry: Any, where: str) -> LocationState:
    if not isinstance(entry, dict):
        msg = f"{where} must be a mapping: {entry!r:.100}"
        raise StateError(msg)
    version = _version(entry.get("known_good"), f"{where}.known_good")
    seen = entry.get("last_seen_healthy")
    if not _is_time(seen):
        msg = f"{where}.last_seen_healthy must be an ISO 8601 time: {seen!r}"
        raise StateError(msg)
    evidence = entry.get("evidence", {})
    if not isinstance(evidence, dict):
        msg = f"{where}.evidence must be a mapping: {evidence!r:.100}"
        raise StateError(msg)
    items = entry.get("history", [])
    if not isinstance(items, list):
        msg = f"{where}.history must be a list: {items!r:.100}"
        raise StateError(msg)
    history = []
    for index, item in enumerate(items):
        place = f"{where}.history[{index}]"
        if not isinstance(item, dict):
            msg = f"{place} must be a mapping: {item!r:.100}"
            raise StateError(msg)
        item_seen = item.get("last_seen_healthy")
        if not _is_time(item_seen):
            msg = f"{place}.last_seen_healthy must be an ISO 8601 time: {item_seen!r}"
            raise StateError(msg)
        history.append(KnownGood(_version(item.get("version"), f"{place}.version"), item_seen))
    if not history or history[0].version != version:
        history.insert(0, KnownGood(version, seen))
    return LocationState(version, seen, evidence, tuple(history))


def _version(value: Any, where: str) -> str:
    try:
        return check_version(value if isinstance(value, str) else "", where)
    except GateInputError:
        msg = f"{where} must be a release name: {value!r}"
        raise StateError(msg) from None


def _is_time(value: Any) -> TypeGuard[str]:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# -- recording ------------------------------------------------------------------------------


def record(
    path: Path,
    environment: str,
    decision: GateDecision,
    evidence: Mapping[str, Mapping[str, Any]],
    at: float,
) -> GateState:
    """Record ``decision`` (a continue) in ``path``: its new version becomes the known-good
    one of every location it judged, seen healthy at ``at``, with that location's
    ``evidence``; other locations keep theirs. Raises StateError (the file became unusable,
    or the decision holds a location, release or environment the file could not be read
    back with: nothing is written) and OSError (it cannot be written)."""
    if decision.verdict is not Verdict.CONTINUE:
        msg = f"only a decision to continue is recorded: {decision.verdict.value!r}"
        raise ValueError(msg)
    for result in decision.locations:
        if not is_valid_location(result.location):
            msg = f"{path}: not recorded: {result.location!r} is not a location sentinel reports"
            raise StateError(msg)
    seen = utc_text(at)
    with _locked(path):
        state = load_state(path, environment) or GateState(environment, {})
        locations = dict(state.locations)
        for result in decision.locations:
            previous = locations.get(result.location)
            history = [KnownGood(decision.new_version, seen)]
            if previous is not None:
                history.extend(
                    item for item in previous.history if item.version != decision.new_version
                )
            locations[result.location] = LocationState(
                known_good=decision.new_version,
                last_seen_healthy=seen,
                evidence=dict(evidence.get(result.location, {})),
                history=tuple(history[:HISTORY_LIMIT]),
            )
        updated = GateState(environment, locations, seen)
        text = updated.to_json()
        # What is written must read back: a file the gate and rollback-target would refuse
        # is worse than none.
        parse_state(text.encode(), f"{path} (not recorded)")
        write_file_atomically(path, text)
    return updated


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``FILE.lock`` (where ``fcntl`` exists), beside the file a
    symbolic link ``path`` points to: gates that name the file through different links
    share one lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the write is still atomic
        yield
        return
    real = Path(os.path.realpath(path))
    lock = real.with_name(f"{real.name}.lock")
    with lock.open("a") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


# -- the rollback target --------------------------------------------------------------------


def rollback_target(
    state: GateState, name: str, location: str | None = None, exclude: str | None = None
) -> tuple[str, dict[str, KnownGood]]:
    """The release to roll back to, and per location the record it comes from: in
    ``location``, or the one every location agrees on; never ``exclude`` (the release being
    rolled back). Raises StateError (``name`` is the file) when there is none."""
    if not state.locations:
        msg = f"{name}: no known-good release is recorded yet (no gate decided to continue)"
        raise StateError(msg)
    wanted = [location] if location is not None else sorted(state.locations)
    chosen: dict[str, KnownGood] = {}
    for where in wanted:
        entry = state.locations.get(where)
        if entry is None:
            known = ", ".join(sorted(state.locations))
            msg = f"{name}: no known-good release is recorded for {where!r} (recorded: {known})"
            raise StateError(msg)
        found = next((item for item in entry.history if item.version != exclude), None)
        if found is None:
            msg = f"{name}: no known-good release other than {exclude!r} is recorded for {where!r}"
            raise StateError(msg)
        chosen[where] = found
    versions = {item.version for item in chosen.values()}
    if len(versions) > 1:
        listed = ", ".join(f"{where}: {item.version}" for where, item in chosen.items())
        msg = (
            f"{name}: the known-good releases differ by location ({listed}); "
            "name one with --location"
        )
        raise StateError(msg)
    return versions.pop(), chosen

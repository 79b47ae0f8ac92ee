"""What the gate asks Prometheus: requests and server errors per location and app release
over the window, joined from ``sentinel_build_info`` on the job and instance labels exactly
as ``SentinelReleaseErrorRatioRegression`` joins them (the expressions come from
``mixin._promql``), and the releases the instances in scope reported.

The counts are Prometheus's ``increase()``: extrapolated to the window's edges, so close to
what was served (within about a scrape interval's worth of traffic), not exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .._config import is_valid_location
from ..mixin import _promql
from ..mixin._config import MonitoringConfig, parse_duration
from ._decision import Counts
from ._prometheus import Sample

VERSION_LABEL = _promql.VERSION
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+@/~-]{0,127}")


class GateInputError(ValueError):
    """A version or location given to the gate is not a value sentinel can report."""


def check_version(value: str, option: str = "--new") -> str:
    """``value`` if it is a release name that is safe in a PromQL string (letters, digits
    and ``_.:+@/~-``, starting with a letter or digit, at most 128 characters)."""
    if not _VERSION_RE.fullmatch(value):
        msg = (
            f'"{option}" must be a release of 1 to 128 letters, digits or _.:+@/~- starting '
            f"with a letter or digit: {value!r}"
        )
        raise GateInputError(msg)
    return value


def check_location(value: str, option: str = "--location") -> str:
    """``value`` if sentinel could report it as a location."""
    if not is_valid_location(value):
        msg = (
            f'"{option}" must be a location of 1 to 63 letters, digits or _.:- starting with a '
            f"letter or digit: {value!r}"
        )
        raise GateInputError(msg)
    return value


class Querier(Protocol):
    """What answers instant queries: :class:`PrometheusClient`, or a stand-in in tests."""

    def query(self, expression: str, at: float | None = None) -> list[Sample]: ...


@dataclass(frozen=True)
class Traffic:
    """Counts per (location, version) over the window, and every version reported in it."""

    counts: Mapping[tuple[str, str], Counts]
    versions: frozenset[str]


def requests_query(config: MonitoringConfig, window: str) -> str:
    """Requests over ``window`` per job, location and version: the regression alert's rate
    of the raw series, joined the same way, times the window."""
    seconds = _promql.number(parse_duration(window))
    return f"{_promql.version_requests_rate_expr(config, window)} * {seconds}"


def errors_query(config: MonitoringConfig, window: str) -> str:
    """Server errors over ``window`` per job, location and version: 5xx and invalid
    statuses, and responses that failed mid-stream (0 where there were none)."""
    seconds = _promql.number(parse_duration(window))
    return f"{_promql.version_errors_rate_expr(config, window)} * {seconds}"


def versions_query(config: MonitoringConfig, window: str) -> str:
    """The versions the instances in scope reported at any time in ``window``."""
    build_info = _promql.series(config, _promql.BUILD_INFO)
    return f"count by ({VERSION_LABEL}) (max_over_time({build_info}[{window}]))"


def fetch_traffic(client: Querier, config: MonitoringConfig, window: str, at: float) -> Traffic:
    """Ask ``client`` for the traffic over ``window`` ending at ``at`` (Unix seconds); every
    query is evaluated at the same instant. Raises PrometheusError."""
    location_label = config.location_label
    totals: dict[str, dict[tuple[str, str], float]] = {}
    for kind, query in (
        ("requests", requests_query(config, window)),
        ("errors", errors_query(config, window)),
    ):
        # One service should be in scope; should the selector cover several jobs, their
        # counts in a location add up.
        summed = totals[kind] = {}
        for sample in client.query(query, at):
            key = (sample.labels.get(location_label, ""), sample.labels.get(VERSION_LABEL, ""))
            summed[key] = summed.get(key, 0.0) + sample.value
    versions = frozenset(
        sample.labels[VERSION_LABEL]
        for sample in client.query(versions_query(config, window), at)
        if sample.labels.get(VERSION_LABEL)
    )
    counts = {}
    for key, value in totals["requests"].items():
        # Extrapolated to the window's edges, so fractional: rounded to whole requests.
        requests = max(0, round(value))
        errors = min(requests, max(0, round(totals["errors"].get(key, 0.0))))
        counts[key] = Counts(requests, errors)
    return Traffic(counts, versions)

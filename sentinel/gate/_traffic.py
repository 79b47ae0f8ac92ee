"""What the gate asks Prometheus, and how it reads the answers: per process (job, instance)
and location, the responses per status code and the responses that failed mid-stream over
a period, and each process's release and environment from ``sentinel_build_info``; the
join of the two happens here, per process, as ``SentinelReleaseErrorRatioRegression`` joins
them in PromQL (on the job and instance labels, the release a process reports last).

Counts are increases over the period, a counter series that counts from 0 within it (a new
instance, the first 401 of a code the app never answered before) counted by its whole
value (:func:`sentinel.mixin._promql.recent_increase_expr`): close to what was served
(within about a scrape interval's worth of traffic at the period's start), not exact.

The versions, locations and environments the gate is given are checked here before they
are used (:func:`check_version`, :func:`check_location`, :func:`check_environment`): the
values sentinel could report. None goes into a query; the answers' labels are compared
with them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .._config import is_valid_location, unmet_requirement
from ..mixin import _promql
from ..mixin._config import MonitoringConfig, format_duration, parse_duration
from ._model import Counts, EnvironmentMismatch
from ._prometheus import Sample

VERSION_LABEL = _promql.VERSION
ENVIRONMENT_LABEL = "environment"
"""The label of ``sentinel_build_info`` that holds the deployment environment."""
CODE_LABEL = "code"
_SUCCESS_RE = re.compile(r"[123]\d\d")
_CLIENT_ERROR_RE = re.compile(r"4\d\d")
_SERVER_ERROR_RE = re.compile(r"5\d\d|invalid")
_SUBQUERY_STEPS = 100


class GateInputError(ValueError):
    """A version, location or environment given to the gate is not one sentinel can
    report."""


def _check_reported(setting: str, noun: str, value: str, option: str) -> str:
    """``value`` if sentinel accepts it as its ``setting`` (by the same rule): the gate only
    compares it with the label values sentinel exports, never puts it in a query."""
    unmet = unmet_requirement(setting, value)
    if unmet is not None:
        requirement = unmet.removeprefix("must be ")
        msg = f'"{option}" must be {noun} sentinel can report ({requirement}): {value!r}'
        raise GateInputError(msg)
    return value


def check_version(value: str, option: str = "--new") -> str:
    """``value`` if sentinel could report it as a release (1 to 128 printable characters)."""
    return _check_reported("version", "a release", value, option)


def check_location(value: str, option: str = "--location") -> str:
    """``value`` if sentinel could report it as a location."""
    if not is_valid_location(value):
        msg = (
            f'"{option}" must be a location of 1 to 63 letters, digits or _.:- starting with a '
            f"letter or digit: {value!r}"
        )
        raise GateInputError(msg)
    return value


def check_environment(value: str, option: str = "--environment") -> str:
    """``value`` if sentinel could report it as an environment (1 to 128 printable
    characters)."""
    return _check_reported("environment", "an environment", value, option)


class Querier(Protocol):
    """What answers instant queries: :class:`PrometheusClient`, or a stand-in in tests."""

    def query(self, expression: str, at: float | None = None) -> list[Sample]: ...


# -- the queries ----------------------------------------------------------------------------


def _process_labels(config: MonitoringConfig) -> str:
    return f"{config.job_label}, {config.instance_label}"


def responses_query(config: MonitoringConfig, period: str) -> str:
    """Responses over ``period`` per job, instance, location and status code, a series that
    appeared within it counted by its whole value."""
    requests = _promql.series(config, _promql.REQUESTS)
    by = f"{_promql.instance_location_labels(config)}, {CODE_LABEL}"
    return f"sum by ({by}) ({_promql.recent_increase_expr(requests, period)})"


def failed_mid_stream_query(config: MonitoringConfig, period: str) -> str:
    """Responses that started but failed while streaming, over ``period`` per job, instance
    and location: server errors the status code does not show."""
    failed = _promql.series(config, _promql.EXCEPTIONS, _promql.FAILED_MID_STREAM)
    by = _promql.instance_location_labels(config)
    return f"sum by ({by}) ({_promql.recent_increase_expr(failed, period)})"


def build_info_query(config: MonitoringConfig, period: str) -> str:
    """When each process last reported each release and environment within ``period`` (Unix
    seconds; a subquery of ``sentinel_build_info``'s sample timestamps)."""
    info = _promql.series(config, _promql.BUILD_INFO)
    by = f"{_process_labels(config)}, {VERSION_LABEL}, {ENVIRONMENT_LABEL}"
    step = format_duration(max(1.0, parse_duration(period) / _SUBQUERY_STEPS))
    return f"max by ({by}) (max_over_time(timestamp({info})[{period}:{step}]))"


def scrapes_query(config: MonitoringConfig, period: str) -> str:
    """How many times each process was scraped within ``period``, per release and
    environment: how long it was up, in scrapes."""
    info = _promql.series(config, _promql.BUILD_INFO)
    by = f"{_process_labels(config)}, {VERSION_LABEL}, {ENVIRONMENT_LABEL}"
    return f"sum by ({by}) (count_over_time({info}[{period}]))"


# -- the answers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One release of one process in scope, as ``sentinel_build_info`` reported it."""

    job: str
    instance: str
    version: str
    environment: str
    last_seen: float
    """When it last reported this release (Unix seconds)."""
    scrapes: int = 0
    """How many times it was scraped with this release in the period."""


@dataclass(frozen=True)
class Served:
    """What one process served in one location over the period."""

    job: str
    instance: str
    location: str
    responses: Mapping[str, float] = field(default_factory=dict, hash=False)
    """Responses per status code (``"200"``, ``"401"``, ``"invalid"``)."""
    failed_mid_stream: float = 0.0


@dataclass(frozen=True)
class Observation:
    """Everything the gate learnt about one period: the processes in scope with their
    releases, and what each served in each location."""

    period: str
    at: float
    processes: tuple[Process, ...] = ()
    served: tuple[Served, ...] = ()

    @property
    def versions(self) -> frozenset[str]:
        """Every release an instance in scope reported in the period."""
        return frozenset(process.version for process in self.processes)

    def current(self) -> dict[tuple[str, str], Process]:
        """Each process's release: the one it reported last in the period."""
        latest: dict[tuple[str, str], Process] = {}
        for process in self.processes:
            key = (process.job, process.instance)
            known = latest.get(key)
            if known is None or (process.last_seen, process.version) > (
                known.last_seen,
                known.version,
            ):
                latest[key] = process
        return latest

    def counts(
        self, new_version: str, environment: str | None = None
    ) -> dict[tuple[str, str], Counts]:
        """Counts per (location, version). The new version's are every instance's in scope
        that runs it; another version's only those of instances that report
        ``environment`` (when given), since only they can be its baseline."""
        processes = self.current()
        by_key: dict[tuple[str, str], list[tuple[Process, Served]]] = defaultdict(list)
        for served in self.served:
            process = processes.get((served.job, served.instance))
            if process is None:
                continue  # no build info: its release is unknown
            if (
                environment is not None
                and process.version != new_version
                and process.environment != environment
            ):
                continue
            by_key[(served.location, process.version)].append((process, served))
        return {key: _counts(rows) for key, rows in by_key.items()}

    def mismatches(self, new_version: str, environment: str) -> tuple[EnvironmentMismatch, ...]:
        """The instances in scope running ``new_version`` that report another environment,
        with the locations they served in the period."""
        found = []
        served_by: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for served in self.served:
            total = sum(served.responses.values())
            if total > 0:
                served_by[(served.job, served.instance)][served.location] = total
        for (job, instance), process in sorted(self.current().items()):
            if process.version != new_version or process.environment == environment:
                continue
            locations = served_by.get((job, instance), {})
            found.append(
                EnvironmentMismatch(
                    instance=instance,
                    job=job,
                    version=new_version,
                    environment=process.environment,
                    expected=environment,
                    locations=tuple(sorted(locations)),
                    requests=round(sum(locations.values())),
                )
            )
        return tuple(found)


def _counts(rows: Iterable[tuple[Process, Served]]) -> Counts:
    """The counts of one version in one location, from its processes' answers (summed, then
    rounded: the increases are extrapolated, so fractional)."""
    codes: dict[str, float] = defaultdict(float)
    failed = exposure = 0.0
    instances: dict[str, float] = defaultdict(float)
    for process, served in rows:
        for code, value in served.responses.items():
            codes[code] += value
        failed += served.failed_mid_stream
        total = sum(served.responses.values())
        if total > 0:
            instances[process.instance] += total
            exposure += process.scrapes
    requests = max(0, round(sum(codes.values())))
    server_errors = sum(value for code, value in codes.items() if _SERVER_ERROR_RE.fullmatch(code))
    client = {
        code: min(requests, max(0, round(value)))
        for code, value in sorted(codes.items())
        if _CLIENT_ERROR_RE.fullmatch(code) and round(value) > 0
    }
    successes = sum(value for code, value in codes.items() if _SUCCESS_RE.fullmatch(code))
    return Counts(
        requests=requests,
        errors=min(requests, max(0, round(server_errors + failed))),
        codes=client,
        successes=min(requests, max(0, round(successes))),
        instances={name: round(value) for name, value in sorted(instances.items())},
        exposure=exposure,
    )


def observe(client: Querier, config: MonitoringConfig, period: str, at: float) -> Observation:
    """Ask ``client`` about ``period`` ending at ``at`` (Unix seconds); every query is
    evaluated at the same instant. Raises PrometheusError."""
    job, instance, location = config.job_label, config.instance_label, config.location_label
    last_seen: dict[tuple[str, str, str, str], float] = {}
    for sample in client.query(build_info_query(config, period), at):
        key = _process_key(sample.labels, job, instance)
        if key is not None:
            last_seen[key] = max(last_seen.get(key, 0.0), sample.value)
    scrapes: dict[tuple[str, str, str, str], int] = {}
    for sample in client.query(scrapes_query(config, period), at):
        key = _process_key(sample.labels, job, instance)
        if key is not None:
            scrapes[key] = scrapes.get(key, 0) + round(sample.value)
    processes = tuple(
        Process(*key, last_seen=seen, scrapes=scrapes.get(key, 0))
        for key, seen in sorted(last_seen.items())
    )
    responses: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for sample in client.query(responses_query(config, period), at):
        labels = sample.labels
        where = (labels.get(job, ""), labels.get(instance, ""), labels.get(location, ""))
        code = labels.get(CODE_LABEL, "")
        responses[where][code] = responses[where].get(code, 0.0) + sample.value
    failed: dict[tuple[str, str, str], float] = defaultdict(float)
    for sample in client.query(failed_mid_stream_query(config, period), at):
        labels = sample.labels
        where = (labels.get(job, ""), labels.get(instance, ""), labels.get(location, ""))
        failed[where] += sample.value
    served = tuple(
        Served(*where, responses=codes, failed_mid_stream=failed.get(where, 0.0))
        for where, codes in sorted(responses.items())
    )
    return Observation(period, at, processes, served)


def _process_key(
    labels: Mapping[str, str], job: str, instance: str
) -> tuple[str, str, str, str] | None:
    version = labels.get(VERSION_LABEL)
    if not version:
        return None
    return (
        labels.get(job, ""),
        labels.get(instance, ""),
        version,
        labels.get(ENVIRONMENT_LABEL, ""),
    )

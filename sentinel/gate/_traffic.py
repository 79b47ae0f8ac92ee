"""What the gate asks Prometheus, and how it reads the answers: per process (job, instance)
and location, the responses per status code and the responses that failed mid-stream over
a period, and each process's release and environment from ``sentinel_build_info``; the
join of the two happens here, per process, as ``SentinelReleaseErrorRatioRegression`` joins
them in PromQL (on the job and instance labels, the release a process reports last).

Counts are increases over the period, a counter series that counts from 0 within it (a new
instance, the first 401 of a code the app never answered before) counted from 0, resets
within the period included (:func:`sentinel.mixin._promql.recent_increase_expr`, as the
alerts count): close to what was served (within about a scrape interval's worth of traffic
at the period's start), not exact. How long each process was up in the period (its
exposure, in seconds) comes from the timestamps of its ``sentinel_build_info`` samples (and,
for a process that started within the period, ``process_start_time_seconds``), so that
targets scraped at different intervals compare.

What the gate cannot count is said, never silently dropped (:class:`Traffic`): requests
with a location value sentinel could not have reported are left out; instances that served
nothing anywhere in the period count as instances with no requests; and a Prometheus with
no sample of the scope from before the period's start (started on empty storage, or not
scraping these targets then) cannot tell a process's lifetime from the period's traffic,
nor can a period shorter than two scrape intervals, or one longer than
:data:`LONGEST_PERIOD`, be counted.

The versions, locations and environments the gate is given are checked here before they
are used (:func:`check_version`, :func:`check_location`, :func:`check_environment`): the
values sentinel could report. None goes into a query; the answers' labels are compared
with them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .._config import is_valid_location, unmet_requirement
from ..mixin import _promql
from ..mixin._config import (
    MonitoringConfig,
    MonitoringConfigError,
    format_duration,
    parse_duration,
)
from ._model import TRAFFIC_MIN_SAMPLES, Counts, EnvironmentMismatch, Traffic
from ._prometheus import PrometheusError, Sample

VERSION_LABEL = _promql.VERSION
ENVIRONMENT_LABEL = "environment"
"""The label of ``sentinel_build_info`` that holds the deployment environment."""
CODE_LABEL = "code"
_SUCCESS_RE = re.compile(r"[123]\d\d")
_CLIENT_ERROR_RE = re.compile(r"4\d\d")
_SERVER_ERROR_RE = re.compile(r"5\d\d|invalid")
_SUBQUERY_STEPS = 100
_LONGEST_SUBQUERY_STEP = 300.0
"""Prometheus's default lookback delta: a subquery whose steps are further apart than it
misses the samples between them."""
MOST_REQUESTS = 10**12
"""More requests than this in one location and release are no count (a garbage counter):
judged, their statistics would take minutes (they cost the square root of the count)."""
GONE_AFTER_INTERVALS = 2.5
"""A new release's process whose last sample is this many scrape intervals before the
decision is taken for down (one failed scrape is not enough)."""
LONGEST_PERIOD = "30d"
"""The longest window or lookback the gate counts (its subqueries step at most 5m: a month
is some 9,000 steps per process)."""


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


def check_window(value: str, option: str = "--window") -> str:
    """``value`` if the gate can count a period that long: a duration from 1s to
    :data:`LONGEST_PERIOD` (whether it spans two scrape intervals is only known from the
    answers: :meth:`Observation.counts` says so)."""
    problem = _period_problem(value, f'"{option}"')
    if problem is not None:
        raise GateInputError(problem)
    return value


def _period_problem(period: str, name: str) -> str | None:
    """Why ``period`` cannot be counted, naming it ``name``; None when it can."""
    try:
        seconds = parse_duration(period)
    except MonitoringConfigError as error:
        return f"{name} {error}"
    if not 0 < seconds <= parse_duration(LONGEST_PERIOD):
        return f"{name} must be a duration from 1s to {LONGEST_PERIOD}: {period!r}"
    return None


class Querier(Protocol):
    """What answers instant queries: :class:`PrometheusClient`, or a stand-in in tests."""

    def query(self, expression: str, at: float | None = None) -> list[Sample]: ...


# -- the queries ----------------------------------------------------------------------------


def _process_labels(config: MonitoringConfig) -> str:
    return f"{config.job_label}, {config.instance_label}"


def responses_query(config: MonitoringConfig, period: str) -> str:
    """Responses over ``period`` per job, instance, location and status code, a series that
    counts from 0 within it counted from 0."""
    requests = _promql.series(config, _promql.REQUESTS)
    by = f"{_promql.instance_location_labels(config)}, {CODE_LABEL}"
    return f"sum by ({by}) ({_promql.recent_increase_expr(requests, period, config)})"


def failed_mid_stream_query(config: MonitoringConfig, period: str) -> str:
    """Responses that started but failed while streaming, over ``period`` per job, instance
    and location: server errors the status code does not show."""
    failed = _promql.series(config, _promql.EXCEPTIONS, _promql.FAILED_MID_STREAM)
    by = _promql.instance_location_labels(config)
    return f"sum by ({by}) ({_promql.recent_increase_expr(failed, period, config)})"


def _step(seconds: float) -> str:
    """A subquery's step over ``seconds``: a hundredth of them, from 1s to 5m."""
    return format_duration(min(_LONGEST_SUBQUERY_STEP, max(1.0, seconds / _SUBQUERY_STEPS)))


def build_info_query(config: MonitoringConfig, period: str) -> str:
    """When each process last reported each release and environment within ``period`` (Unix
    seconds): its latest sample, the one the counters are read at; else, for one no longer
    reported at the end, a subquery of ``sentinel_build_info``'s sample timestamps (whose
    steps need not fall after the latest sample)."""
    info = _promql.series(config, _promql.BUILD_INFO)
    by = f"{_process_labels(config)}, {VERSION_LABEL}, {ENVIRONMENT_LABEL}"
    step = _step(parse_duration(period))
    latest = f"max by ({by}) (timestamp({info}))"
    return f"{latest} or max by ({by}) (max_over_time(timestamp({info})[{period}:{step}]))"


def first_seen_query(config: MonitoringConfig, period: str) -> str:
    """When each process first reported each release and environment within ``period`` and
    the period before it (Unix seconds; at or before that start for one scraped then: the
    subquery's first step reads the sample before it): when its exposure begins, and since
    when Prometheus has scraped the scope."""
    info = _promql.series(config, _promql.BUILD_INFO)
    by = f"{_process_labels(config)}, {VERSION_LABEL}, {ENVIRONMENT_LABEL}"
    twice = format_duration(2 * parse_duration(period))
    step = _step(2 * parse_duration(period))
    return f"min by ({by}) (min_over_time(timestamp({info})[{twice}:{step}]))"


def scrapes_query(config: MonitoringConfig, period: str) -> str:
    """How many times each process was scraped within ``period``, per release and
    environment (with the first and last sample, its scrape interval)."""
    info = _promql.series(config, _promql.BUILD_INFO)
    by = f"{_process_labels(config)}, {VERSION_LABEL}, {ENVIRONMENT_LABEL}"
    return f"sum by ({by}) (count_over_time({info}[{period}]))"


def started_query(config: MonitoringConfig, period: str) -> str:
    """When each process in scope last said it started, within ``period`` (Unix seconds;
    ``process_start_time_seconds``, which prometheus_client's default registry exports)."""
    started = _promql.series(config, _promql.PROCESS_START)
    return f"max by ({_process_labels(config)}) (last_over_time({started}[{period}]))"


def scraped_before_query(config: MonitoringConfig, period: str) -> str:
    """The processes in scope Prometheus scraped in the hour before ``period``'s start
    (:func:`sentinel.mixin._promql.scraped_before_expr`, what the counts rely on to tell a
    new series from one Prometheus had not seen): none at all means Prometheus cannot
    count the period."""
    return _promql.scraped_before_expr(config, period)


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
    first_seen: float | None = None
    """When it first reported this release in the period (Unix seconds; at or before the
    period's start when it was scraped then); None: not known."""


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
    releases, what each served in each location, and which processes Prometheus scraped
    before the period (None: not asked)."""

    period: str
    at: float
    processes: tuple[Process, ...] = ()
    served: tuple[Served, ...] = ()
    scraped_before: frozenset[tuple[str, str]] | None = None
    """The processes (job, instance) with a sample in the hour before the period's start."""
    started: Mapping[tuple[str, str], float] = field(default_factory=dict, hash=False)
    """When each process (job, instance) that exports it said it started (Unix seconds)."""
    problems: tuple[str, ...] = ()
    """Why the period could not be asked about at all (a period the gate cannot count)."""

    @property
    def start(self) -> float:
        """When the period began (Unix seconds)."""
        return self.at - parse_duration(self.period)

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

    def exposures(self) -> dict[tuple[str, str], float]:
        """How long each process (job, instance) was up in the period, in seconds: from its
        first sample in the period (the period's start for one scraped before it) to its
        last, plus one scrape interval (the time its first sample counts and its last one
        stands for), at most the period; 0 when not known. A process first scraped within
        the period that says it started there (``process_start_time_seconds``, at or before
        that first sample) is up from its start to its last sample, which is what its
        counters hold: no scrape interval guessed. In seconds, not scrapes, so that targets
        scraped at different intervals compare; every release of a process together, since
        its requests count for the release it reported last."""
        spans = self._spans()
        scrapes = self._samples()
        start, length = self.start, parse_duration(self.period)
        intervals = self._intervals()
        exposures = {}
        for key, (first, last) in spans.items():
            if math.isnan(first) or scrapes[key] == 0 or last < start:
                exposures[key] = 0.0
                continue
            started = self.started.get(key)
            # A start within a second after the first sample is the same start on a clock a
            # little ahead of Prometheus's; a later one is a restart after it, in place.
            if first > start and started is not None and start <= started <= first + 1.0:
                exposures[key] = min(length, last - min(started, first))
                continue
            interval = self._interval(key, intervals)
            exposures[key] = min(length, last - max(first, start) + interval)
        return exposures

    def _intervals(self) -> dict[tuple[str, str], float]:
        """Each process's scrape interval in the period, where it has two samples in it."""
        scrapes, start = self._samples(), self.start
        intervals: dict[tuple[str, str], float] = {}
        for key, (first, last) in self._spans().items():
            if scrapes[key] >= 2 and last > max(first, start):
                intervals[key] = (last - max(first, start)) / (scrapes[key] - 1)
        return intervals

    @staticmethod
    def _interval(key: tuple[str, str], intervals: Mapping[tuple[str, str], float]) -> float:
        """``key``'s scrape interval; for one with a single sample, its job's others'."""
        interval = intervals.get(key)
        if interval is None:
            interval = _median(
                [value for other, value in intervals.items() if other[0] == key[0]]
                or list(intervals.values())
            )
        return interval

    def _gone(self, new_version: str, environment: str | None = None) -> list[str]:
        """Where the new release's processes went silent (none of their samples in the last
        :data:`GONE_AFTER_INTERVALS` scrape intervals before the decision) and are not made
        up for: every one of the release, or every one serving a location, or more of them
        there than report on, none of which started after it went silent (a crash loop, not
        a replacement). Each one's exposure ends at its last sample, so its rate looked
        whole and the rollout widened. One replaced, or scaled away while at least as many
        report on, is no such thing: their traffic is judged. With an ``environment``, only
        the release's processes that report it make up for one (a staging pod of the
        release does not stand in for a production canary)."""
        intervals = self._intervals()
        processes = {
            key: process
            for key, process in self.current().items()
            if process.version == new_version
        }
        silent = {
            key
            for key, process in processes.items()
            if (interval := self._interval(key, intervals)) > 0
            and self.at - process.last_seen > GONE_AFTER_INTERVALS * interval
        }
        if not silent:
            return []
        served_in: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for served in self.served:
            key = (served.job, served.instance)
            if key in processes and sum(served.responses.values()) + served.failed_mid_stream:
                served_in[served.location].add(key)
        down: set[tuple[str, str]] = set(silent) if silent == set(processes) else set()
        for keys in served_in.values():
            reporting = {
                key
                for key in keys - silent
                if environment is None or processes[key].environment == environment
            }
            lost = [
                key
                for key in keys & silent
                if not any(
                    (processes[other].first_seen or 0.0) >= processes[key].last_seen
                    for other in reporting
                )
            ]
            if lost and (not reporting or len(lost) > len(reporting)):
                down.update(lost)
        if not down:
            return []
        names = ", ".join(
            f"{key[1]} (job {key[0]}, last scraped {self.at - processes[key].last_seen:.0f}s "
            "before)"
            for key in sorted(down)
        )
        return [
            f"{new_version}: {len(down)} instance{'s' if len(down) > 1 else ''} stopped "
            f"reporting before the decision and not replaced: {names}: a canary that is "
            "down serves nothing and is judged by nothing; decide again once it reports "
            "again or is replaced"
        ]

    def _spans(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Each process's first and last sample in the period (NaN: its first not known),
        every release of it together."""
        spans: dict[tuple[str, str], tuple[float, float]] = {}
        for process in self.processes:
            key = (process.job, process.instance)
            if process.first_seen is None:
                spans[key] = (math.nan, math.nan)
                continue
            first, last = spans.get(key, (math.inf, -math.inf))
            spans[key] = (min(first, process.first_seen), max(last, process.last_seen))
        return spans

    def _samples(self) -> dict[tuple[str, str], int]:
        """How many times each process was scraped in the period, every release together."""
        samples: dict[tuple[str, str], int] = defaultdict(int)
        for process in self.processes:
            samples[(process.job, process.instance)] += process.scrapes
        return samples

    def young(self) -> frozenset[tuple[str, str]]:
        """The processes (job, instance) first scraped within the period and fewer than
        :data:`TRAFFIC_MIN_SAMPLES` times: their requests per second are not judged yet."""
        samples, start = self._samples(), self.start
        return frozenset(
            key
            for key, (first, _) in self._spans().items()
            if first > start and 0 < samples[key] < TRAFFIC_MIN_SAMPLES
        )

    def counts(
        self, new_version: str, environment: str | None = None, *, at_decision: bool = True
    ) -> Traffic:
        """Counts per (location, version). The new version's are every instance's in scope
        that runs it; another version's only those of instances that report
        ``environment`` (when given), since only they can be its baseline.

        Requests with a location value sentinel could not have reported are left out, and
        an instance that served no request anywhere in the period counts, with none, in
        every location its release served (sentinel reports a process's location only with
        its requests, so the location whose share it lacks is not known: counting it in each
        keeps a black hole from passing, and the reason names it), one of the new version in
        every location any release in scope served (where none of its others serve, or
        nowhere, it is no less a black hole); both are said in the notes. Problems (the
        counts cannot be judged): a period the gate cannot count, an ``environment`` no
        process in scope reports (a typo, or the wrong scope), a period shorter than two
        scrape intervals, and a Prometheus that scraped none of the processes in scope in
        the hour before the period, with processes that do not say when they started
        (their counts cannot tell what they served in it from their lifetime), more requests
        than :data:`MOST_REQUESTS` in one location and release, and, for a period that ends
        at the decision (``at_decision``), a new release none of whose processes reports
        any more."""
        if self.problems:
            return Traffic(problems=self.problems)
        processes = self.current()
        exposures = self.exposures()
        young = self.young()
        by_key: dict[tuple[str, str], list[tuple[Process, Served]]] = defaultdict(list)
        active: set[tuple[str, str]] = set()
        skipped: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for served in self.served:
            total = sum(served.responses.values()) + served.failed_mid_stream
            if total > 0:
                active.add((served.job, served.instance))
            if not is_valid_location(served.location):
                if total > 0:
                    skipped[served.location][served.instance] += total
                continue
            process = processes.get((served.job, served.instance))
            if process is None:
                continue  # no build info: its release is unknown
            if not self._in_scope(process, new_version, environment):
                continue
            by_key[(served.location, process.version)].append((process, served))
        counts = {key: _counts(rows, exposures, young) for key, rows in by_key.items()}
        notes = [_skipped_note(value, where) for value, where in sorted(skipped.items())]
        idle: dict[str, list[Process]] = defaultdict(list)
        for key, process in sorted(processes.items()):
            if (
                key not in active
                and exposures.get(key, 0.0) > 0
                and self._in_scope(process, new_version, environment)
            ):
                idle[process.version].append(process)
        for version, quiet in sorted(idle.items()):
            # The new version's in every location served in scope: its idle instance is no
            # less a black hole where none of its others serve.
            served_in = sorted(
                {
                    location
                    for (location, each), found in counts.items()
                    if (each == version or version == new_version) and found.requests > 0
                }
            )
            if not served_in:
                continue
            fresh = {p.instance for p in quiet if (p.job, p.instance) in young}
            for location in served_in:
                found = counts.get((location, version), Counts(0, 0))
                counts[(location, version)] = dataclasses.replace(
                    found,
                    instances={**found.instances, **{p.instance: 0 for p in quiet}},
                    exposure=found.exposure + sum(exposures[(p.job, p.instance)] for p in quiet),
                    young=tuple(sorted({*found.young, *fresh})),
                )
            names = ", ".join(f"{p.instance} (job {p.job})" for p in quiet)
            notes.append(
                f"{version}: {len(quiet)} instance{'s' if len(quiet) > 1 else ''} in scope "
                f"served no requests anywhere in the last {self.period}: {names}; counted "
                f"with none in {', '.join(served_in)} (an instance reports its location only "
                "with its requests)"
            )
        problems = [
            *self._unknown_environment(environment),
            *self._too_short(),
            *self._problems(new_version, environment),
            *(self._gone(new_version, environment) if at_decision else ()),
            *_implausible(counts),
        ]
        return Traffic(counts, notes, problems)

    def _unknown_environment(self, environment: str | None) -> list[str]:
        """``environment`` when no process in scope reports it: a typo, or a selector that
        covers another environment, never a reason to stop the rollout."""
        if environment is None or not self.processes:
            return []
        seen = {process.environment for process in self.processes}
        if environment in seen:
            return []
        return [
            f"no instance in scope reports the environment {environment!r} (environments "
            f"seen: {', '.join(sorted(seen))})"
        ]

    def _too_short(self) -> list[str]:
        """The jobs none of whose processes scraped since before the period has two samples
        in it: the period is shorter than two of their scrape intervals, too short to count
        what they served."""
        samples, start = self._samples(), self.start
        by_job: dict[str, int] = {}
        for (job, instance), (first, _) in self._spans().items():
            if first <= start:
                by_job[job] = max(by_job.get(job, 0), samples[(job, instance)])
        short = sorted(job for job, most in by_job.items() if most < 2)
        if not short:
            return []
        jobs = ", ".join(short)
        return [
            f"the last {self.period} holds fewer than two samples of each process of job "
            f"{jobs} that was scraped before it: a window must span at least two scrape "
            "intervals to count what they served"
        ]

    def _problems(self, new_version: str, environment: str | None) -> list[str]:
        """Why the counts cannot be judged: processes in scope that Prometheus first
        scraped within the period and that do not say when they started, while it has
        scraped the scope for less than half a period before it (it started on empty
        storage, or the targets are new to it): whether such a process started within the
        period (its counters count from 0 in it) or long before (they hold its lifetime)
        cannot be told. Where Prometheus scraped the scope for longer, a process first
        scraped within the period is taken for a new one; one that says it started before
        the period counts from its first sample (see
        :func:`sentinel.mixin._promql.recent_increase_expr`)."""
        if self.scraped_before is None:
            return []
        length = parse_duration(self.period)
        since = min(
            (p.first_seen for p in self.processes if p.first_seen is not None),
            default=self.at,
        )
        if since <= self.start - length / 2:
            return []
        unknown = sorted(
            key
            for key, process in self.current().items()
            if self._in_scope(process, new_version, environment)
            and key not in self.scraped_before
            and key not in self.started
        )
        if not unknown:
            return []
        names = ", ".join(f"{instance} (job {job})" for job, instance in unknown[:5])
        if len(unknown) > 5:
            names += f" and {len(unknown) - 5} more"
        lead = self.start - since
        when = (
            f"only since {lead:.0f}s before the last {self.period}"
            if lead > 0
            else f"only since {-lead:.0f}s into the last {self.period}"
        )
        again = format_duration(1.5 * length)
        some = "1 process" if len(unknown) == 1 else f"{len(unknown)} processes"
        verb = "exports" if len(unknown) == 1 else "export"
        return [
            f"Prometheus has scraped the instances in scope {when} (it started on empty "
            f"storage, or they are new to it), and {some} first scraped within it {verb} no "
            f"{_promql.PROCESS_START} ({names}): whether such a process started within the "
            f"last {self.period} or long before (its counters then hold what it served "
            f"before) cannot be told; ask again once Prometheus has scraped them for {again}"
        ]

    @staticmethod
    def _in_scope(process: Process, new_version: str, environment: str | None) -> bool:
        """Whether ``process`` counts: the new version everywhere, another only when it
        reports ``environment`` (when given)."""
        return (
            environment is None
            or process.version == new_version
            or process.environment == environment
        )

    def mismatches(self, new_version: str, environment: str) -> tuple[EnvironmentMismatch, ...]:
        """The instances in scope running ``new_version`` that report another environment,
        with the locations they served in the period."""
        found = []
        served_by: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for served in self.served:
            total = sum(served.responses.values())
            if total > 0 and is_valid_location(served.location):
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


def _skipped_note(value: str, instances: Mapping[str, float]) -> str:
    what = "no location label" if value == "" else f"location {value!r}"
    names = ", ".join(sorted(instances))
    return (
        f"left out {round(sum(instances.values()))} requests with {what} from {names}: not a "
        "location sentinel reports"
    )


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _counts(
    rows: Iterable[tuple[Process, Served]],
    exposures: Mapping[tuple[str, str], float],
    young: frozenset[tuple[str, str]] = frozenset(),
) -> Counts:
    """The counts of one version in one location, from its processes' answers (summed, then
    rounded: the increases are extrapolated, so fractional)."""
    codes: dict[str, float] = defaultdict(float)
    failed = exposure = 0.0
    instances: dict[str, float] = defaultdict(float)
    fresh: set[str] = set()
    for process, served in rows:
        for code, value in served.responses.items():
            codes[code] += value
        failed += served.failed_mid_stream
        total = sum(served.responses.values())
        if total > 0:
            instances[process.instance] += total
            exposure += exposures.get((process.job, process.instance), 0.0)
            if (process.job, process.instance) in young:
                fresh.add(process.instance)
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
        young=tuple(sorted(fresh)),
    )


def observe(client: Querier, config: MonitoringConfig, period: str, at: float) -> Observation:
    """Ask ``client`` about ``period`` ending at ``at`` (Unix seconds); every query is
    evaluated at the same instant. A period the gate cannot count (shorter than 1s, longer
    than :data:`LONGEST_PERIOD`, or no duration) is asked nothing: the observation's
    problem says why. Raises PrometheusError."""
    problem = _period_problem(period, "the period to count")
    if problem is not None:
        return Observation(period, at, problems=(problem,))
    job, instance, location = config.job_label, config.instance_label, config.location_label

    def ask(expression: str) -> list[Sample]:
        samples = client.query(expression, at)
        for sample in samples:
            if not math.isfinite(sample.value):
                labels = ", ".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                msg = (
                    f"Prometheus answered {sample.value} for {{{labels}}} to {expression!r}: "
                    "a count or a time that is not a finite number cannot be judged (does a "
                    "target export NaN or +Inf?)"
                )
                raise PrometheusError(msg)
        return samples

    last_seen: dict[tuple[str, str, str, str], float] = {}
    for sample in ask(build_info_query(config, period)):
        key = _process_key(sample.labels, job, instance)
        if key is not None:
            last_seen[key] = max(last_seen.get(key, 0.0), sample.value)
    first_seen: dict[tuple[str, str, str, str], float] = {}
    for sample in ask(first_seen_query(config, period)):
        key = _process_key(sample.labels, job, instance)
        if key is not None:
            first_seen[key] = min(first_seen.get(key, math.inf), sample.value)
    scrapes: dict[tuple[str, str, str, str], int] = {}
    for sample in ask(scrapes_query(config, period)):
        key = _process_key(sample.labels, job, instance)
        if key is not None:
            scrapes[key] = scrapes.get(key, 0) + round(sample.value)
    scraped_before = frozenset(
        (sample.labels.get(job, ""), sample.labels.get(instance, ""))
        for sample in ask(scraped_before_query(config, period))
    )
    started = {
        (sample.labels.get(job, ""), sample.labels.get(instance, "")): sample.value
        for sample in ask(started_query(config, period))
    }
    processes = tuple(
        Process(
            *key,
            last_seen=seen,
            scrapes=scrapes.get(key, 0),
            first_seen=min(first_seen.get(key, seen), seen),
        )
        for key, seen in sorted(last_seen.items())
    )
    responses: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for sample in ask(responses_query(config, period)):
        labels = sample.labels
        where = (labels.get(job, ""), labels.get(instance, ""), labels.get(location, ""))
        code = labels.get(CODE_LABEL, "")
        responses[where][code] = responses[where].get(code, 0.0) + sample.value
    failed: dict[tuple[str, str, str], float] = defaultdict(float)
    for sample in ask(failed_mid_stream_query(config, period)):
        labels = sample.labels
        where = (labels.get(job, ""), labels.get(instance, ""), labels.get(location, ""))
        failed[where] += sample.value
    served = tuple(
        Served(*where, responses=codes, failed_mid_stream=failed.get(where, 0.0))
        for where, codes in sorted(responses.items())
    )
    return Observation(period, at, processes, served, scraped_before, started)


def _implausible(counts: Mapping[tuple[str, str], Counts]) -> list[str]:
    """Why counts past :data:`MOST_REQUESTS` cannot be judged."""
    return [
        f"{version} counted {found.requests:.3g} requests in {location}: more than "
        f"{MOST_REQUESTS:.0e} is no count (does a target export a garbage counter?)"
        for (location, version), found in sorted(counts.items())
        if found.requests > MOST_REQUESTS
    ]


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

"""What the gate reasons about: the counts of one version in one location, the thresholds,
one check's verdict, a location's decision and the whole decision (with the exit status the
``sentinel gate`` command returns for it)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..mixin._config import MonitoringConfig

ERRORS_CHECK = "5xx ratio"
TRAFFIC_CHECK = "traffic per instance"
ENVIRONMENT_CHECK = "environment"
TRAFFIC_MIN_SAMPLES = 3
"""The scrapes in the period a process first scraped within it needs before its requests per
second are judged: with fewer, when it started is known to a scrape interval at best."""


def share_check(code: str) -> str:
    """The name of the check of one 4xx code's share, e.g. ``401 share``."""
    return f"{code} share"


class Verdict(enum.Enum):
    """A decision, with the exit status the ``sentinel gate`` command returns for it."""

    CONTINUE = "continue"
    STOP = "stop"
    UNDECIDED = "undecided"

    @property
    def exit_code(self) -> int:
        return {"continue": 0, "stop": 1, "undecided": 2}[self.value]


@dataclass(frozen=True)
class Counts:
    """What one version served in one location over a period: requests, server errors (5xx,
    invalid statuses, responses that failed mid-stream) and, when known, responses per 4xx
    code, successful responses and the instances that served them."""

    requests: int
    errors: int
    codes: Mapping[str, int] = field(default_factory=dict, hash=False)
    """Responses per 4xx status code, e.g. ``{"401": 12}``."""
    successes: int | None = None
    """Successful (1xx to 3xx) responses; None: the requests that were neither a server
    error nor a 4xx."""
    instances: Mapping[str, int] = field(default_factory=dict, hash=False)
    """Requests per instance (the instance label) here."""
    exposure: float = 0.0
    """How long those instances were up over the period, in seconds of an instance, summed
    (0: not known, and the traffic per instance is not judged)."""
    young: tuple[str, ...] = ()
    """Instances here first scraped within the period, fewer than :data:`TRAFFIC_MIN_SAMPLES`
    times: how long they were up is too rough yet for the traffic per instance."""

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            msg = f"counts need 0 <= errors <= requests: {self.errors!r}, {self.requests!r}"
            raise ValueError(msg)
        for code, count in self.codes.items():
            if not 0 <= count <= self.requests:
                msg = f"counts need 0 <= responses <= requests for code {code}: {count!r}"
                raise ValueError(msg)
        if self.successes is not None and not 0 <= self.successes <= self.requests:
            msg = f"counts need 0 <= successes <= requests: {self.successes!r}"
            raise ValueError(msg)
        if not (math.isfinite(self.exposure) and self.exposure >= 0):
            msg = f"the exposure must be a number of seconds >= 0: {self.exposure!r}"
            raise ValueError(msg)

    @property
    def ratio(self) -> float | None:
        """Server errors per request, or None without requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def healthy(self) -> int:
        """Successful responses: what makes a version a baseline."""
        if self.successes is not None:
            return self.successes
        return max(0, self.requests - self.errors - sum(self.codes.values()))

    def share(self, code: str) -> float | None:
        """Responses with ``code`` per request, or None without requests."""
        return self.codes.get(code, 0) / self.requests if self.requests else None

    @property
    def per_instance(self) -> float | None:
        """Requests per instance here (those that served none anywhere included), or None
        when the instances are unknown."""
        return self.requests / len(self.instances) if self.instances else None


class Traffic(dict[tuple[str, str], Counts]):
    """Counts per (location, version) as the gate read them, with what it could not count:
    ``notes`` (requests left out, instances counted without requests: said in the output)
    and ``problems`` (why the counts of the window cannot be judged at all: the gate cannot
    decide)."""

    def __init__(
        self,
        counts: Mapping[tuple[str, str], Counts] | None = None,
        notes: Iterable[str] = (),
        problems: Iterable[str] = (),
    ) -> None:
        super().__init__(counts or {})
        self.notes = tuple(notes)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Thresholds:
    """What counts as a regression and how sure the gate must be (from the config)."""

    factor: float = 5.0
    min_ratio: float = 0.002
    min_requests: int = 200
    confidence: float = 0.99
    shift_min_ratio: float = 0.02
    """The floor of a 4xx code's share (``status_shift_min_ratio``)."""
    traffic_ratio: float = 0.5
    """The new version's requests per instance below this share of the baseline's is a drop
    (``traffic_drop_ratio``; 0 turns the traffic check off)."""
    min_errors: int = 10
    """The events (errors, or responses with one 4xx code) the new version needs before it
    is stopped (``regression_min_errors``): the alert's guard, so that one error is never
    a regression."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 1):
            msg = f'"factor" must be a number > 1: {self.factor!r}'
            raise ValueError(msg)
        for name in ("min_ratio", "shift_min_ratio", "traffic_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                msg = f'"{name}" must be a ratio from 0 to 1: {value!r}'
                raise ValueError(msg)
        if not 0.5 < self.confidence < 1:
            msg = f'"confidence" must be in (0.5, 1): {self.confidence!r}'
            raise ValueError(msg)
        if isinstance(self.min_errors, bool) or not (
            isinstance(self.min_errors, int) and self.min_errors >= 0
        ):
            msg = f'"min_errors" must be a whole number >= 0: {self.min_errors!r}'
            raise ValueError(msg)

    @classmethod
    def from_config(cls, config: MonitoringConfig) -> Thresholds:
        """The thresholds of ``SentinelReleaseErrorRatioRegression`` (5xx ratio and 4xx
        shift) and of ``SentinelTrafficDrop`` (the drop ratio)."""
        return cls(
            factor=config.regression_factor,
            min_ratio=config.regression_min_ratio,
            min_requests=config.regression_min_requests,
            confidence=config.regression_confidence,
            shift_min_ratio=config.status_shift_min_ratio,
            traffic_ratio=config.traffic_drop_ratio,
            min_errors=config.regression_min_errors,
        )

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


@dataclass(frozen=True)
class Check:
    """One comparison of the new version with the baseline in one location."""

    name: str
    """``5xx ratio``, ``<code> share`` or ``traffic per instance``."""
    verdict: Verdict
    reason: str
    new_value: float | None = None
    """The new version's ratio, share, or requests per instance."""
    baseline_value: float | None = None
    p_worse: float | None = None
    """p-value of "no worse than the baseline" (adjusted for the checks judged)."""
    p_regression: float | None = None
    """p-value of "a regression" (adjusted for its ways out)."""
    needed_requests: int | None = None
    """Requests on each version that would tell the configured factor from noise."""


@dataclass(frozen=True)
class EnvironmentMismatch:
    """An instance in scope running the new version that reports another environment."""

    instance: str
    job: str
    version: str
    environment: str
    """The environment it reports (``sentinel_build_info{environment}``)."""
    expected: str
    locations: tuple[str, ...] = ()
    """Where it served requests in the window."""
    requests: int = 0

    def describe(self) -> str:
        """One sentence naming the instance, where it serves and both environments."""
        where = (
            f"serves {self.expected} traffic in {', '.join(self.locations)}"
            if self.locations
            else f"is in the {self.expected} scope (no requests in the window yet)"
        )
        return (
            f"{self.instance} (job {self.job}) {where} on {self.version} but reports "
            f"environment {self.environment!r}, not {self.expected!r}"
        )


@dataclass(frozen=True)
class LocationDecision:
    """The verdict for one location and the evidence behind it."""

    location: str
    verdict: Verdict
    reason: str
    new_version: str
    new: Counts
    baseline_version: str | None = None
    baseline: Counts | None = None
    checks: tuple[Check, ...] = ()
    baseline_reason: str = ""
    """Which baseline was chosen and why."""
    baseline_period: str | None = None
    """``window`` (compared over the same window) or ``lookback`` (the new version had
    replaced it: its counts are from the lookback before the window)."""
    notes: tuple[str, ...] = ()
    """What was not judged, and why."""

    def check(self, name: str) -> Check | None:
        """The check called ``name``, if it was made."""
        return next((check for check in self.checks if check.name == name), None)

    @property
    def needed_requests(self) -> int | None:
        """The most requests any undecided check asks for."""
        needed = [
            check.needed_requests
            for check in self.checks
            if check.verdict is Verdict.UNDECIDED and check.needed_requests is not None
        ]
        return max(needed) if needed else None


@dataclass(frozen=True)
class GateDecision:
    """The decision over every location, and one line that says it."""

    verdict: Verdict
    summary: str
    new_version: str
    locations: tuple[LocationDecision, ...] = ()
    mismatches: tuple[EnvironmentMismatch, ...] = ()
    environment: str | None = None
    notes: tuple[str, ...] = ()
    """What the gate left out or counted specially (requests with a location value sentinel
    could not have reported, instances that served nothing), said in the output."""

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    @property
    def stopped(self) -> tuple[str, ...]:
        """The locations where the new version regressed or a mismatched instance serves."""
        names = [d.location for d in self.locations if d.verdict is Verdict.STOP]
        for mismatch in self.mismatches:
            names.extend(location for location in mismatch.locations if location not in names)
        return tuple(names)


def undecided(
    new_version: str,
    summary: str,
    environment: str | None = None,
    notes: Iterable[str] = (),
) -> GateDecision:
    """A decision that could not be made (no data, Prometheus down, bad input)."""
    return GateDecision(
        Verdict.UNDECIDED, summary, new_version, environment=environment, notes=tuple(notes)
    )


def format_ratio(ratio: float | None) -> str:
    """An error ratio as a percentage with enough digits for sub-percent values."""
    if ratio is None:
        return "-"
    if ratio == 0:
        return "0%"
    percent = ratio * 100
    if percent < 0.001:
        return f"{percent:.1e}%"
    return f"{percent:.{max(1, 1 - math.floor(math.log10(percent)))}f}%"

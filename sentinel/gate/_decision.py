"""The rollout decision: per location, is the new version's error proportion a regression
against the baseline version's, judged as counts rather than as two noisy ratios.

A regression is what ``SentinelReleaseErrorRatioRegression`` calls one: the new version's
error ratio is at least ``regression_factor`` times the baseline's *and* at least
``regression_min_ratio``. Errors are rare events, so the errors of the two versions in a
location are two Poisson counts, and given their total the new version's share is
binomial; that gives exact one-sided tests of the rate ratio (the conditional test of two
Poisson rates) at ``regression_confidence``, with alpha = 1 - confidence:

- *worse*: the new version fails more often than the baseline (ratio 1 rejected, one-sided,
  alpha split over the locations judged, so that a healthy rollout is stopped at most
  alpha of the time however many locations it spans);
- *ruled out*: a regression is excluded, because the ratio is below ``regression_factor``
  or the new version's error ratio is below ``regression_min_ratio`` (either test at
  alpha / 2, so that a regression slips through at most alpha of the time).

Ruled out: continue. Worse and not ruled out: stop. Neither: too little traffic to tell
the configured factor from noise; the decision says how many requests it would take. A
location whose new version served fewer than ``regression_min_requests`` requests is not
judged at all (the alert's own guard: real error streams come in bursts that a handful of
requests cannot average out).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..mixin._config import MonitoringConfig
from ._stats import binomial_lower_tail, binomial_upper_tail, requests_to_tell_apart


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
    """Requests and server errors of one version in one location over the window."""

    requests: int
    errors: int

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            msg = f"counts need 0 <= errors <= requests: {self.errors!r}, {self.requests!r}"
            raise ValueError(msg)

    @property
    def ratio(self) -> float | None:
        """Errors per request, or None without requests."""
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class Thresholds:
    """What counts as a regression and how sure the gate must be (from the config)."""

    factor: float = 5.0
    min_ratio: float = 0.01
    min_requests: int = 200
    confidence: float = 0.99

    @classmethod
    def from_config(cls, config: MonitoringConfig) -> Thresholds:
        """The thresholds of ``SentinelReleaseErrorRatioRegression``."""
        return cls(
            factor=config.regression_factor,
            min_ratio=config.regression_min_ratio,
            min_requests=config.regression_min_requests,
            confidence=config.regression_confidence,
        )

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


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
    p_worse: float | None = None
    """p-value of "no worse than the baseline" (adjusted for the locations judged)."""
    p_regression: float | None = None
    """p-value of "a regression" (adjusted for its two ways out)."""
    needed_requests: int | None = None
    """Requests on each version that would tell the configured factor from noise."""


@dataclass(frozen=True)
class GateDecision:
    """The decision over every location, and one line that says it."""

    verdict: Verdict
    summary: str
    new_version: str
    locations: tuple[LocationDecision, ...] = ()

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    @property
    def stopped(self) -> tuple[str, ...]:
        """The locations where the new version regressed."""
        return tuple(d.location for d in self.locations if d.verdict is Verdict.STOP)


def undecided(new_version: str, summary: str) -> GateDecision:
    """A decision that could not be made (no data, Prometheus down, bad input)."""
    return GateDecision(Verdict.UNDECIDED, summary, new_version)


def decide(
    traffic: Mapping[tuple[str, str], Counts],
    new_version: str,
    thresholds: Thresholds,
    *,
    versions: Iterable[str] = (),
    baseline_version: str | None = None,
    locations: Iterable[str] = (),
) -> GateDecision:
    """Judge ``new_version`` in every location it served (or in ``locations``) against
    ``baseline_version``, or, when None, against the other version that served the most
    requests in that location. ``traffic`` maps (location, version) to counts; ``versions``
    are the versions the instances in scope reported in the window."""
    known = set(versions) | {version for _, version in traffic}
    for role, version in (("new", new_version), ("baseline", baseline_version)):
        if version is not None and version not in known:
            listed = ", ".join(sorted(known)) or "none"
            return undecided(
                new_version,
                f"cannot decide: no instance in scope reported the {role} version "
                f"{version!r} in the window (versions seen: {listed})",
            )
    if baseline_version == new_version:
        return undecided(
            new_version, f"cannot decide: the baseline is the new version {new_version!r}"
        )
    wanted = list(dict.fromkeys(locations)) or sorted(
        {location for location, version in traffic if version == new_version}
    )
    if not wanted:
        return undecided(
            new_version, f"cannot decide: {new_version!r} served no requests in the window"
        )
    sides = []
    for location in wanted:
        baseline = baseline_version or _busiest_other(traffic, location, new_version)
        sides.append(
            (
                location,
                traffic.get((location, new_version), Counts(0, 0)),
                baseline,
                traffic.get((location, baseline), Counts(0, 0)) if baseline else None,
            )
        )
    # The locations that reach the test share its false-stop probability.
    judged = sum(
        1
        for _, new, _, baseline_counts in sides
        if baseline_counts is not None
        and baseline_counts.requests > 0
        and new.requests >= max(thresholds.min_requests, 1)
    )
    results = tuple(
        _judge(location, new_version, new, baseline, counts, thresholds, max(judged, 1))
        for location, new, baseline, counts in sides
    )
    return GateDecision(_overall(results), _summary(results, new_version), new_version, results)


def _busiest_other(
    traffic: Mapping[tuple[str, str], Counts], location: str, new_version: str
) -> str | None:
    others = [
        (-counts.requests, version)
        for (where, version), counts in traffic.items()
        if where == location and version != new_version and counts.requests > 0
    ]
    return min(others)[1] if others else None


def _judge(
    location: str,
    new_version: str,
    new: Counts,
    baseline_version: str | None,
    baseline: Counts | None,
    thresholds: Thresholds,
    comparisons: int,
) -> LocationDecision:
    def verdict(
        kind: Verdict,
        reason: str,
        p_worse: float | None = None,
        p_regression: float | None = None,
        needed_requests: int | None = None,
    ) -> LocationDecision:
        return LocationDecision(
            location,
            kind,
            reason,
            new_version,
            new,
            baseline_version,
            baseline,
            p_worse,
            p_regression,
            needed_requests,
        )

    if new.requests == 0:
        return verdict(Verdict.UNDECIDED, f"{new_version} served no requests here")
    if baseline_version is None or baseline is None or baseline.requests == 0:
        if baseline_version is None:
            return verdict(
                Verdict.UNDECIDED, "no other version served requests here to compare with"
            )
        return verdict(
            Verdict.UNDECIDED, f"the baseline {baseline_version} served no requests here"
        )
    needed = _needed_requests(baseline, thresholds, comparisons)
    if new.requests < thresholds.min_requests:
        more = f"; about {needed} on each version" if needed > thresholds.min_requests else ""
        return verdict(
            Verdict.UNDECIDED,
            f"too little traffic: {new.requests} requests on {new_version}, fewer than the "
            f"{thresholds.min_requests} the config requires{more}",
            needed_requests=needed,
        )
    p_worse = min(1.0, comparisons * _p_not_worse(new, baseline))
    p_regression, excluded_by = _p_regression(new, baseline, thresholds)
    ratio_text = _ratio_text(new, baseline, baseline_version)
    if p_regression <= thresholds.alpha:
        if p_worse <= thresholds.alpha:
            reason = f"worse than {baseline_version} ({ratio_text}) but {excluded_by}"
        else:
            reason = f"no regression ({ratio_text})"
        return verdict(Verdict.CONTINUE, reason, p_worse=p_worse, p_regression=p_regression)
    if p_worse <= thresholds.alpha:
        return verdict(
            Verdict.STOP,
            f"regression: {ratio_text}",
            p_worse=p_worse,
            p_regression=p_regression,
        )
    if needed > min(new.requests, baseline.requests):
        wanted = f"needs about {needed} requests on each version"
    else:
        wanted = "the ratio sits between a healthy one and a regression, needs more requests"
    return verdict(
        Verdict.UNDECIDED,
        f"too little traffic to tell a {thresholds.factor:g}x regression from noise "
        f"({ratio_text}): {wanted}",
        p_worse=p_worse,
        p_regression=p_regression,
        needed_requests=needed,
    )


def _p_not_worse(new: Counts, baseline: Counts) -> float:
    """One-sided p-value of "the new version's error rate is no higher than the
    baseline's": given all errors of both, how often the new version's share or more."""
    share = new.requests / (new.requests + baseline.requests)
    return binomial_upper_tail(new.errors, new.errors + baseline.errors, share)


def _p_regression(new: Counts, baseline: Counts, thresholds: Thresholds) -> tuple[float, str]:
    """One-sided p-value of "a regression": the smaller of the two ways to exclude it,
    doubled (Bonferroni) when both apply; and which way that is, in words."""
    factor_share = (
        thresholds.factor * new.requests / (thresholds.factor * new.requests + baseline.requests)
    )
    below_factor = binomial_lower_tail(new.errors, new.errors + baseline.errors, factor_share)
    under_factor = f"under {thresholds.factor:g}x"
    if thresholds.min_ratio <= 0:
        return below_factor, under_factor
    below_floor = binomial_lower_tail(new.errors, new.requests, thresholds.min_ratio)
    if below_floor < below_factor:
        return min(1.0, 2.0 * below_floor), f"under the {format_ratio(thresholds.min_ratio)} floor"
    return min(1.0, 2.0 * below_factor), under_factor


def _needed_requests(baseline: Counts, thresholds: Thresholds, comparisons: int) -> int:
    """Requests on each version that tell a regression of the configured size over the
    baseline's ratio from noise (the baseline's ratio estimated with half an error added,
    so that a clean baseline still needs a finite number)."""
    healthy = (baseline.errors + 0.5) / (baseline.requests + 1)
    regressed = min(1.0, max(thresholds.factor * healthy, thresholds.min_ratio))
    if regressed <= healthy:
        return thresholds.min_requests
    planned = requests_to_tell_apart(
        healthy, regressed, thresholds.alpha / comparisons, thresholds.alpha / 2
    )
    return max(planned, thresholds.min_requests)


def _ratio_text(new: Counts, baseline: Counts, baseline_version: str | None) -> str:
    new_ratio, base_ratio = new.errors / new.requests, baseline.errors / baseline.requests
    text = (
        f"{format_ratio(new_ratio)} errors against {format_ratio(base_ratio)} on {baseline_version}"
    )
    if base_ratio > 0:
        text += f", {new_ratio / base_ratio:.3g}x"
    return text


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


def _overall(results: tuple[LocationDecision, ...]) -> Verdict:
    kinds = {result.verdict for result in results}
    if Verdict.STOP in kinds:
        return Verdict.STOP
    if Verdict.UNDECIDED in kinds or not kinds:
        return Verdict.UNDECIDED
    return Verdict.CONTINUE


def _summary(results: tuple[LocationDecision, ...], new_version: str) -> str:
    stopped = [r for r in results if r.verdict is Verdict.STOP]
    if stopped:
        where = ", ".join(r.location for r in stopped)
        return f"stop: {new_version} regressed in {where}"
    waiting = [r for r in results if r.verdict is Verdict.UNDECIDED]
    if waiting:
        where = ", ".join(r.location for r in waiting)
        return f"cannot decide: {new_version} cannot be judged yet in {where}"
    where = ", ".join(r.location for r in results)
    return f"continue: no regression of {new_version} in {where}"

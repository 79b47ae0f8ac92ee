"""The checks of one location, new release against baseline, each an exact one-sided test on
counts (see :mod:`sentinel.gate._decision` for the error probabilities they keep):

- *5xx ratio*: server errors (5xx, invalid statuses, responses that failed mid-stream) per
  request; a regression is what ``SentinelReleaseErrorRatioRegression`` calls one: odds of
  failing (errors / successes) at least ``regression_factor`` times the baseline's (for a
  ratio of a few percent, that many times the ratio) *and* a ratio above
  ``regression_min_ratio``.
- *<code> share*, per 4xx code the new version answered (a deploy that answers 401): that
  code's share of the responses, its odds at least ``regression_factor`` times the
  baseline's and above ``status_shift_min_ratio``.

Given both versions' events, the new version's part follows Fisher's noncentral
hypergeometric distribution with the odds ratio as its parameter: exact tests of "no worse"
(odds ratio 1, Fisher's exact test) and of "a regression" (the factor). A check stops only
past the alert's own guards too: the new version's ratio above the floor, and at least
``regression_min_errors`` events; one error, or a ratio the config calls no regression,
never stops a rollout the alert would let through.
- *traffic per instance*: requests per second of an instance (so that an instance started
  within the window is not short of traffic, and targets scraped at different intervals
  compare; an instance that served nothing anywhere counts, with none) below
  ``traffic_drop_ratio`` times the baseline's: requests that never reach the new version
  raise no error. Binomial tests given both versions' requests: it stops only when fewer
  than the baseline's rate is significant *and* the rate seen is under the drop ratio (the
  alert's own guard), continues when a drop under it is ruled out, and cannot decide in
  between, or while an instance of the new version first scraped within the window has
  fewer than :data:`TRAFFIC_MIN_SAMPLES` samples (how long it was up is too rough yet).
- *environment*: an instance on the new version serving here reports another environment.

Below ``regression_min_requests`` requests on the new version (the alert's own guard: real
error streams come in bursts that a handful of requests cannot average out) the error
checks never continue: they stop only a release that fails most of what it serves (past the
guards, at least the factor's odds seen, and "no worse" rejected at alpha /
:data:`FEW_REQUESTS_STRICTNESS`), and the 5xx ratio cannot decide otherwise. The traffic
check is judged when the baseline's rate would have brought the new version's instances
that many, a new version that served nothing included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..mixin._promql import shifted_share
from ._baseline import Choice
from ._model import (
    ENVIRONMENT_CHECK,
    ERRORS_CHECK,
    TRAFFIC_CHECK,
    TRAFFIC_MIN_SAMPLES,
    Check,
    Counts,
    EnvironmentMismatch,
    LocationDecision,
    Thresholds,
    Verdict,
    format_ratio,
    share_check,
)
from ._stats import (
    binomial_lower_tail,
    binomial_upper_tail,
    odds_ratio_lower_tail,
    odds_ratio_upper_tail,
    requests_to_tell_apart,
    requests_under_floor,
)

FEW_REQUESTS_STRICTNESS = 10_000
"""Below ``regression_min_requests`` requests a check stops only when "no worse than the
baseline" is rejected at alpha divided by this (1e-6 at 99% confidence): a release that
fails most of what it serves, not a burst."""


@dataclass(frozen=True)
class _Proportion:
    """A check of events per request: 5xx errors, or one 4xx code's responses."""

    name: str
    noun: str
    new: tuple[int, int]
    baseline: tuple[int, int]
    floor: float
    events: str
    """What the events are called in a count (``errors``, ``401 responses``)."""
    few: bool = False
    """Fewer requests than ``regression_min_requests``: only a stop can come of it."""


@dataclass(frozen=True)
class _Traffic:
    new: Counts
    baseline: Counts


@dataclass
class Plan:
    """One location's checks: those already decided and the tests still to run."""

    location: str
    new_version: str
    new: Counts
    choice: Choice
    tests: list[_Proportion | _Traffic]
    fixed: list[Check]
    notes: list[str]

    def judge(self, thresholds: Thresholds, comparisons: int) -> LocationDecision:
        checks = list(self.fixed)
        for test in self.tests:
            if isinstance(test, _Traffic):
                checks.append(_judge_traffic(test, self, thresholds, comparisons))
            elif not test.few:
                checks.append(_judge_proportion(test, self, thresholds, comparisons))
            else:
                found = _judge_few(test, self, thresholds, comparisons)
                if found is not None:
                    checks.append(found)
        return _location(self, tuple(checks))


def plan_location(
    location: str,
    new_version: str,
    new: Counts,
    choice: Choice,
    thresholds: Thresholds,
    mismatches: Sequence[EnvironmentMismatch] = (),
) -> Plan:
    """The checks of one location: what ``new`` (the new version's counts) and the chosen
    baseline's counts allow, and the instances of another environment serving here."""
    plan = Plan(location, new_version, new, choice, [], [], [])
    for mismatch in mismatches:
        plan.fixed.append(
            Check(
                ENVIRONMENT_CHECK,
                Verdict.STOP,
                f"{mismatch.instance} (job {mismatch.job}) runs {new_version} here but reports "
                f"environment {mismatch.environment!r}, not {mismatch.expected!r}",
            )
        )
    baseline = choice.counts
    if choice.version is None or baseline is None or baseline.requests == 0:
        return plan
    if new.requests == 0 and not new.instances:
        return plan
    if new.requests > 0:
        _plan_proportions(plan, new, baseline, thresholds)
    traffic_note = _traffic_not_judged(new, baseline, choice, thresholds)
    if traffic_note is None and new.young:
        names = ", ".join(new.young)
        plan.fixed.append(
            Check(
                TRAFFIC_CHECK,
                Verdict.UNDECIDED,
                f"not judged yet: {names} first scraped within the window, fewer than "
                f"{TRAFFIC_MIN_SAMPLES} times (when an instance started is known to a scrape "
                "interval at best): ask again after a few more scrapes",
                new.per_instance,
                baseline.per_instance,
            )
        )
    elif traffic_note is None:
        plan.tests.append(_Traffic(new, baseline))
    elif thresholds.traffic_ratio > 0:
        plan.notes.append(f"{TRAFFIC_CHECK} not judged: {traffic_note}")
    return plan


def _plan_proportions(plan: Plan, new: Counts, baseline: Counts, thresholds: Thresholds) -> None:
    """The 5xx ratio and the share of each 4xx code the new version answered; below
    ``regression_min_requests`` requests, tests that can only stop (:func:`_judge_few`)."""
    few = new.requests < thresholds.min_requests
    plan.tests.append(
        _Proportion(
            ERRORS_CHECK,
            "errors",
            (new.errors, new.requests),
            (baseline.errors, baseline.requests),
            thresholds.min_ratio,
            "errors",
            few,
        )
    )
    for code in sorted(code for code, count in new.codes.items() if count > 0):
        plan.tests.append(
            _Proportion(
                share_check(code),
                "of responses",
                (new.codes[code], new.requests),
                (baseline.codes.get(code, 0), baseline.requests),
                thresholds.shift_min_ratio,
                f"{code} responses",
                few,
            )
        )


def _traffic_not_judged(
    new: Counts, baseline: Counts, choice: Choice, thresholds: Thresholds
) -> str | None:
    """Why the traffic per instance cannot be compared here, or None when it can."""
    if thresholds.traffic_ratio <= 0:
        return "turned off"
    if choice.period != "window":
        return "the baseline's requests are from before the window"
    if new.exposure <= 0 or baseline.exposure <= 0:
        return "how long the instances were up is not known"
    expected = baseline.requests / baseline.exposure * new.exposure
    if expected < max(thresholds.min_requests, 1):
        return (
            f"at the baseline's rate {choice.version}'s instances would have served "
            f"{expected:.0f} requests, fewer than the {thresholds.min_requests} the config "
            "requires"
        )
    return None


def _judge_proportion(
    test: _Proportion, plan: Plan, thresholds: Thresholds, comparisons: int
) -> Check:
    new_events, new_trials = test.new
    base_events, base_trials = test.baseline
    baseline_version = plan.choice.version
    new_ratio, base_ratio = new_events / new_trials, base_events / base_trials

    def check(
        verdict: Verdict,
        reason: str,
        p_worse: float,
        p_regression: float,
        needed: int | None = None,
    ) -> Check:
        return Check(
            test.name, verdict, reason, new_ratio, base_ratio, p_worse, p_regression, needed
        )

    p_worse = min(
        1.0,
        comparisons * odds_ratio_upper_tail(new_events, new_trials, base_events, base_trials),
    )
    p_regression, excluded_by = _p_regression(test, thresholds.factor)
    text = _ratio_text(new_ratio, base_ratio, baseline_version, test.noun)
    if p_regression <= thresholds.alpha:
        if p_worse <= thresholds.alpha:
            reason = f"worse than {baseline_version} ({text}) but {excluded_by}"
        else:
            reason = f"no regression ({text})"
        return check(Verdict.CONTINUE, reason, p_worse, p_regression)
    # The alert's guards: what it would not call a regression never stops the rollout.
    short = []
    if new_ratio <= test.floor:
        short.append(f"not above the {format_ratio(test.floor)} floor")
    if new_events < thresholds.min_errors:
        events = test.events.removesuffix("s") if new_events == 1 else test.events
        short.append(
            f"{new_events} {events}, fewer than the {thresholds.min_errors} the config requires"
        )
    if p_worse <= thresholds.alpha and not short:
        return check(Verdict.STOP, f"regression: {text}", p_worse, p_regression)
    needed = _needed_requests(base_events, base_trials, test.floor, comparisons, thresholds)
    if needed > min(new_trials, base_trials):
        wanted = f"needs about {needed} requests on each version"
    else:
        wanted = "the ratio sits between a healthy one and a regression, needs more requests"
    if p_worse <= thresholds.alpha:
        return check(
            Verdict.UNDECIDED,
            f"worse than {baseline_version} ({text}) but no regression yet ("
            f"{' and '.join(short)}), nor ruled out: {wanted}",
            p_worse,
            p_regression,
            needed,
        )
    return check(
        Verdict.UNDECIDED,
        f"too little traffic to tell a {thresholds.factor:g}x regression from noise "
        f"({text}): {wanted}",
        p_worse,
        p_regression,
        needed,
    )


def _judge_few(
    test: _Proportion, plan: Plan, thresholds: Thresholds, comparisons: int
) -> Check | None:
    """A check below ``regression_min_requests`` requests, where bursts a handful of
    requests cannot average out make the exact test too sure: never a continue, and a stop
    only past the alert's guards, with at least ``regression_factor`` times the baseline's
    odds seen, and "no worse" rejected at alpha / :data:`FEW_REQUESTS_STRICTNESS` (a
    release that fails most of its few requests). Otherwise the 5xx ratio is undecided (too
    little traffic, with the requests it would take) and a 4xx code's share not judged."""
    new_events, new_trials = test.new
    base_events, base_trials = test.baseline
    new_ratio, base_ratio = new_events / new_trials, base_events / base_trials
    p_worse = min(
        1.0,
        comparisons * odds_ratio_upper_tail(new_events, new_trials, base_events, base_trials),
    )
    strict = thresholds.alpha / FEW_REQUESTS_STRICTNESS
    seen = (
        new_events * (base_trials - base_events)
        >= thresholds.factor * base_events * (new_trials - new_events)
        and new_events > base_events * new_trials / base_trials
    )
    if seen and new_ratio > test.floor and new_events >= thresholds.min_errors and p_worse < strict:
        text = _ratio_text(new_ratio, base_ratio, plan.choice.version, test.noun)
        return Check(
            test.name,
            Verdict.STOP,
            f"regression: {text}, on {new_trials} requests (fewer than the "
            f"{thresholds.min_requests} the config requires, but p < {strict:g})",
            new_ratio,
            base_ratio,
            p_worse,
        )
    if test.name != ERRORS_CHECK:
        return None
    needed = _needed_requests(base_events, base_trials, thresholds.min_ratio, 1, thresholds)
    more = f"; about {needed} on each version" if needed > thresholds.min_requests else ""
    return Check(
        ERRORS_CHECK,
        Verdict.UNDECIDED,
        f"too little traffic: {new_trials} requests on {plan.new_version}, fewer than the "
        f"{thresholds.min_requests} the config requires{more}",
        new_ratio,
        base_ratio,
        p_worse,
        needed_requests=needed,
    )


def _p_regression(test: _Proportion, factor: float) -> tuple[float, str]:
    """One-sided p-value of "a regression": the smaller of the two ways to exclude it,
    doubled (each way at alpha / 2); and which way that is, in words."""
    (new_events, new_trials), (base_events, base_trials) = test.new, test.baseline
    below_factor = odds_ratio_lower_tail(new_events, new_trials, base_events, base_trials, factor)
    under_factor = f"under {factor:g}x"
    if test.floor <= 0:
        # Doubled all the same: a floor of 0 decides like one too low to matter, and a
        # regression of exactly the factor is caught 1 - alpha / 2 of the time either way.
        return min(1.0, 2.0 * below_factor), under_factor
    below_floor = binomial_lower_tail(new_events, new_trials, test.floor)
    if below_floor < below_factor:
        return min(1.0, 2.0 * below_floor), f"under the {format_ratio(test.floor)} floor"
    return min(1.0, 2.0 * below_factor), under_factor


def _judge_traffic(test: _Traffic, plan: Plan, thresholds: Thresholds, comparisons: int) -> Check:
    """Requests per second of an instance, new against baseline: given both versions'
    requests, the new version's part is binomial with its share of the exposure (seconds
    its instances were up, those that served nothing anywhere included)."""
    new, baseline = test.new, test.baseline
    drop = thresholds.traffic_ratio
    total = new.requests + baseline.requests
    equal_share = new.exposure / (new.exposure + baseline.exposure)
    drop_share = drop * new.exposure / (drop * new.exposure + baseline.exposure)
    p_worse = min(1.0, comparisons * binomial_lower_tail(new.requests, total, equal_share))
    p_drop = binomial_upper_tail(new.requests, total, drop_share)
    rate_ratio = (new.requests / new.exposure) / (baseline.requests / baseline.exposure)
    new_value, base_value = new.per_instance, baseline.per_instance
    text = (
        f"{_count(new_value)} requests per instance against {_count(base_value)} on "
        f"{plan.choice.version}: {rate_ratio:.2g}x its rate"
    )
    idle = sorted(name for name, served in new.instances.items() if served == 0)
    idle_text = (
        f" ({len(idle)} of {plan.new_version}'s {len(new.instances)} instances here served no "
        f"requests anywhere: {', '.join(idle)})"
        if idle
        else ""
    )

    def check(verdict: Verdict, reason: str) -> Check:
        return Check(
            TRAFFIC_CHECK, verdict, reason + idle_text, new_value, base_value, p_worse, p_drop
        )

    if p_drop <= thresholds.alpha:
        return check(Verdict.CONTINUE, f"no drop ({text})")
    # The alert's own guard: a rate it would not call a drop never stops the rollout.
    if p_worse <= thresholds.alpha and rate_ratio < drop:
        return check(
            Verdict.STOP,
            f"drop: {text}, under {drop:g}x: requests are not reaching {plan.new_version}",
        )
    if p_worse <= thresholds.alpha:
        return check(
            Verdict.UNDECIDED,
            f"fewer requests than on {plan.choice.version} ({text}) but not under {drop:g}x, "
            "nor a drop under it ruled out: needs more requests",
        )
    return check(
        Verdict.UNDECIDED,
        f"too little traffic to tell a drop under {drop:g}x from noise ({text}): "
        "needs more requests",
    )


def _needed_requests(
    base_events: int, base_trials: int, floor: float, comparisons: int, thresholds: Thresholds
) -> int:
    """Requests on each version that tell a regression of the configured size over the
    baseline's ratio from noise (the baseline's ratio estimated with half an event added,
    so that a clean baseline still needs a finite number), and in which such a regression
    shows the ``min_errors`` events a stop needs."""
    healthy = (base_events + 0.5) / (base_trials + 1)
    shifted = shifted_share(thresholds.factor, healthy)
    regressed = max(shifted, floor)
    if not healthy < regressed < 1.0:
        return thresholds.min_requests
    if shifted < floor:
        # The floor decides: a healthy version is ruled out by staying under it, whatever
        # the baseline's ratio (which may be 0, where the factor can never be ruled out).
        planned = requests_under_floor(healthy, floor, thresholds.alpha / 2)
    else:
        planned = requests_to_tell_apart(
            healthy, regressed, thresholds.alpha / comparisons, thresholds.alpha / 2
        )
    shows = math.ceil(thresholds.min_errors / regressed)
    return max(planned, shows, thresholds.min_requests)


def _ratio_text(
    new_ratio: float, base_ratio: float, baseline_version: str | None, noun: str
) -> str:
    text = (
        f"{format_ratio(new_ratio)} {noun} against {format_ratio(base_ratio)} on {baseline_version}"
    )
    if base_ratio > 0:
        text += f", {new_ratio / base_ratio:.3g}x"
        # The odds decide; they part from the ratio (by (1 - base) / (1 - new)) for shares
        # of more than a few percent, and then the text shows them too.
        if (
            max(new_ratio, base_ratio) < 1.0
            and not 0.9 < (1.0 - base_ratio) / (1.0 - new_ratio) < 1.1
        ):
            odds_ratio = new_ratio / (1.0 - new_ratio) / (base_ratio / (1.0 - base_ratio))
            text += f" (odds {odds_ratio:.3g}x)"
    return text


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _location(plan: Plan, checks: tuple[Check, ...]) -> LocationDecision:
    choice, new_version = plan.choice, plan.new_version

    def result(verdict: Verdict, reason: str) -> LocationDecision:
        return LocationDecision(
            plan.location,
            verdict,
            reason,
            new_version,
            plan.new,
            choice.version,
            choice.counts,
            checks,
            choice.reason,
            choice.period,
            tuple(plan.notes),
        )

    kinds = {check.verdict for check in checks}
    if Verdict.STOP in kinds:
        return result(Verdict.STOP, _reasons(checks, Verdict.STOP))
    if plan.new.requests == 0:
        return result(Verdict.UNDECIDED, f"{new_version} served no requests here")
    if choice.version is None or choice.counts is None:
        return result(Verdict.UNDECIDED, f"no baseline: {choice.reason}")
    if Verdict.UNDECIDED in kinds:
        return result(Verdict.UNDECIDED, _reasons(checks, Verdict.UNDECIDED))
    return result(Verdict.CONTINUE, _reasons(checks, Verdict.CONTINUE))


def _reasons(checks: tuple[Check, ...], verdict: Verdict) -> str:
    """The reasons of the checks with ``verdict``; a lone 5xx check speaks for itself."""
    chosen = [check for check in checks if check.verdict is verdict]
    if len(chosen) == 1 and chosen[0].name == ERRORS_CHECK:
        return chosen[0].reason
    return "; ".join(f"{check.name}: {check.reason}" for check in chosen)

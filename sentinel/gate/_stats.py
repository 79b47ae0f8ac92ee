"""Exact binomial tails and the traffic a comparison needs: the arithmetic of the gate's
test, with the standard library only.

Tails are summed term by term from the requested count outwards, where the terms shrink
geometrically, and stop once the rest cannot change the sum; the far side is taken as the
complement. The cost is a few standard deviations of terms, not ``trials`` terms.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_NEGLIGIBLE = 1e-17
_DISCRETENESS_ERRORS = 3.0


def binomial_upper_tail(successes: int, trials: int, probability: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, probability)."""
    _check(successes, trials, probability)
    if successes <= 0:
        return 1.0
    if successes > trials or probability == 0.0:
        return 0.0
    if probability == 1.0:
        return 1.0
    if successes <= trials * probability:
        return max(0.0, 1.0 - binomial_lower_tail(successes - 1, trials, probability))
    odds = probability / (1.0 - probability)
    term = math.exp(_log_pmf(successes, trials, probability))
    total = term
    for count in range(successes, trials):  # the terms shrink from here on
        term *= (trials - count) / (count + 1) * odds
        total += term
        if term <= total * _NEGLIGIBLE:
            break
    return min(1.0, total)


def binomial_lower_tail(successes: int, trials: int, probability: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, probability)."""
    _check(successes, trials, probability)
    if successes < 0:
        return 0.0
    if successes >= trials or probability == 0.0:
        return 1.0
    if probability == 1.0:
        return 0.0
    if successes >= trials * probability:
        return max(0.0, 1.0 - binomial_upper_tail(successes + 1, trials, probability))
    inverse_odds = (1.0 - probability) / probability
    term = math.exp(_log_pmf(successes, trials, probability))
    total = term
    for count in range(successes, 0, -1):  # the terms shrink from here down
        term *= count / (trials - count + 1) * inverse_odds
        total += term
        if term <= total * _NEGLIGIBLE:
            break
    return min(1.0, total)


def requests_to_tell_apart(
    healthy_ratio: float, regressed_ratio: float, false_alarm: float, miss: float
) -> int:
    """Requests on each of two versions that tell an error ratio of ``regressed_ratio``
    from ``healthy_ratio``: a one-sided test that calls the healthy ratio regressed with
    probability ``false_alarm`` detects the regressed one, and one that excludes the
    regressed ratio at ``miss`` excludes it for the healthy one, each with probability
    1 - ``miss``. Errors are counted as Poisson events and the rate ratio is judged on the
    log scale (the normal approximation, with a margin for the exact tests' coarseness at a
    handful of errors: a planning figure, not a guarantee)."""
    if not 0.0 < healthy_ratio < regressed_ratio:
        msg = (
            "the regressed ratio must be above a healthy ratio above 0: "
            f"{healthy_ratio!r}, {regressed_ratio!r}"
        )
        raise ValueError(msg)
    for name, value in (("false_alarm", false_alarm), ("miss", miss)):
        if not 0.0 < value < 0.5:
            msg = f'"{name}" must be a probability in (0, 0.5): {value!r}'
            raise ValueError(msg)
    factor = regressed_ratio / healthy_ratio
    # Variance of log(errors_new / errors_baseline) per expected baseline error: 1 + 1/1
    # when the versions fail alike, 1 + 1/factor when the new one fails factor times more.
    spread_healthy, spread_regressed = math.sqrt(2.0), math.sqrt(1.0 + 1.0 / factor)
    z_alarm = NormalDist().inv_cdf(1.0 - false_alarm)
    z_miss = NormalDist().inv_cdf(1.0 - miss)
    detect = (z_alarm * spread_healthy + z_miss * spread_regressed) ** 2
    exclude = (z_miss * spread_regressed + z_miss * spread_healthy) ** 2
    baseline_errors = max(detect, exclude) / math.log(factor) ** 2
    # Exact tests on a handful of errors are coarser than the normal approximation: three
    # errors more bring it back (simulated: >= 94% of healthy versions are decided at the
    # figure, for factors 2 to 10).
    return math.ceil((baseline_errors + _DISCRETENESS_ERRORS) / healthy_ratio)


def _log_pmf(successes: int, trials: int, probability: float) -> float:
    return (
        math.lgamma(trials + 1)
        - math.lgamma(successes + 1)
        - math.lgamma(trials - successes + 1)
        + successes * math.log(probability)
        + (trials - successes) * math.log1p(-probability)
    )


def _check(successes: int, trials: int, probability: float) -> None:
    if trials < 0 or not 0.0 <= probability <= 1.0:
        msg = (
            f"a binomial needs trials >= 0 and a probability in [0, 1]: {trials!r}, {probability!r}"
        )
        raise ValueError(msg)

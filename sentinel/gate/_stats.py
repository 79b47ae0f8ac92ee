"""Exact tails and the traffic a comparison needs: the arithmetic of the gate's tests, with
the standard library only.

- Binomial tails (:func:`binomial_upper_tail`, :func:`binomial_lower_tail`): the traffic
  check, requests per instance.
- Tails of one group's events given both groups' total when its odds are a multiple of the
  other's (Fisher's noncentral hypergeometric distribution;
  :func:`odds_ratio_upper_tail`, :func:`odds_ratio_lower_tail`): the error and 4xx share
  checks. At an odds ratio of 1 the upper tail is Fisher's exact test.

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


def odds_ratio_upper_tail(
    events: int, trials: int, other_events: int, other_trials: int, odds_ratio: float = 1.0
) -> float:
    """P(X >= ``events``) for X, the first group's events among both groups' ``events +
    other_events``, when its odds of an event are ``odds_ratio`` times the other group's
    (Fisher's noncentral hypergeometric distribution)."""
    table = _Table(events, trials, other_events, other_trials, odds_ratio)
    if events <= table.low:
        return 1.0
    if events > table.mode:
        return min(1.0, table.sum_up(events) / table.total)
    return max(0.0, 1.0 - table.sum_down(events - 1) / table.total)


def odds_ratio_lower_tail(
    events: int, trials: int, other_events: int, other_trials: int, odds_ratio: float = 1.0
) -> float:
    """P(X <= ``events``) for X as in :func:`odds_ratio_upper_tail`."""
    table = _Table(events, trials, other_events, other_trials, odds_ratio)
    if events >= table.high:
        return 1.0
    if events < table.mode:
        return min(1.0, table.sum_down(events) / table.total)
    return max(0.0, 1.0 - table.sum_up(events + 1) / table.total)


class _Table:
    """The conditional distribution of a 2x2 table's first cell given its margins, its terms
    relative to the largest (the mode's), so that no term overflows."""

    def __init__(
        self, events: int, trials: int, other_events: int, other_trials: int, odds_ratio: float
    ) -> None:
        if not (0 <= events <= trials and 0 <= other_events <= other_trials):
            msg = (
                "events must be between 0 and their trials: "
                f"{events!r} of {trials!r}, {other_events!r} of {other_trials!r}"
            )
            raise ValueError(msg)
        if not 0.0 < odds_ratio < math.inf:
            msg = f"an odds ratio must be positive and finite: {odds_ratio!r}"
            raise ValueError(msg)
        self.first, self.second = trials, other_trials
        self.events = events + other_events
        self.odds_ratio = odds_ratio
        self.low = max(0, self.events - other_trials)
        self.high = min(trials, self.events)
        self.mode = self._mode()
        self._log_mode = self._log_term(self.mode)
        self.total = self.sum_up(self.mode) + self.sum_down(self.mode) - 1.0

    def _ratio(self, count: int) -> float:
        """term(count + 1) / term(count)."""
        return (
            (self.first - count)
            * (self.events - count)
            * self.odds_ratio
            / ((count + 1) * (self.second - self.events + count + 1))
        )

    def _mode(self) -> int:
        # The ratio of consecutive terms falls as the count rises: the mode is the first
        # count whose next term is smaller.
        low, high = self.low, self.high
        while low < high:
            middle = (low + high) // 2
            if self._ratio(middle) < 1.0:
                high = middle
            else:
                low = middle + 1
        return low

    def _log_term(self, count: int) -> float:
        return (
            _log_comb(self.first, count)
            + _log_comb(self.second, self.events - count)
            + count * math.log(self.odds_ratio)
        )

    def sum_up(self, start: int) -> float:
        """The terms from ``start`` (at or past the mode) to the highest count."""
        term = math.exp(self._log_term(start) - self._log_mode)
        total = term
        for count in range(start, self.high):
            term *= self._ratio(count)
            total += term
            if term <= total * _NEGLIGIBLE:
                break
        return total

    def sum_down(self, start: int) -> float:
        """The terms from ``start`` (at or before the mode) down to the lowest count."""
        term = math.exp(self._log_term(start) - self._log_mode)
        total = term
        for count in range(start, self.low, -1):
            term /= self._ratio(count - 1)
            total += term
            if term <= total * _NEGLIGIBLE:
                break
        return total


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def requests_to_tell_apart(
    healthy_ratio: float, regressed_ratio: float, false_alarm: float, miss: float
) -> int:
    """Requests on each of two versions that tell an error ratio of ``regressed_ratio``
    from ``healthy_ratio``: a one-sided test that calls the healthy ratio regressed with
    probability ``false_alarm`` detects the regressed one, and one that excludes the
    regressed ratio at ``miss`` excludes it for the healthy one, each with probability
    1 - ``miss``. The odds ratio is judged on the log scale (the normal approximation, with
    a margin for the exact tests' coarseness at a handful of errors: a planning figure, not
    a guarantee)."""
    if not 0.0 < healthy_ratio < regressed_ratio < 1.0:
        msg = (
            "the regressed ratio must be above a healthy ratio above 0, and below 1: "
            f"{healthy_ratio!r}, {regressed_ratio!r}"
        )
        raise ValueError(msg)
    for name, value in (("false_alarm", false_alarm), ("miss", miss)):
        if not 0.0 < value < 0.5:
            msg = f'"{name}" must be a probability in (0, 0.5): {value!r}'
            raise ValueError(msg)
    healthy_spread = 1.0 / (healthy_ratio * (1.0 - healthy_ratio))
    regressed_spread = 1.0 / (regressed_ratio * (1.0 - regressed_ratio))
    log_odds_ratio = math.log(
        regressed_ratio / (1.0 - regressed_ratio) / (healthy_ratio / (1.0 - healthy_ratio))
    )
    # Variance of the log odds ratio times the requests on each version: the sum of the
    # spreads of both versions' ratios.
    spread_healthy = math.sqrt(2.0 * healthy_spread)
    spread_regressed = math.sqrt(healthy_spread + regressed_spread)
    z_alarm = NormalDist().inv_cdf(1.0 - false_alarm)
    z_miss = NormalDist().inv_cdf(1.0 - miss)
    detect = (z_alarm * spread_healthy + z_miss * spread_regressed) ** 2
    exclude = (z_miss * spread_regressed + z_miss * spread_healthy) ** 2
    requests = max(detect, exclude) / log_odds_ratio**2
    # Exact tests on a handful of errors are coarser than the normal approximation: three
    # errors more bring it back (simulated: >= 94% of healthy versions are decided at the
    # figure, for factors 2 to 10).
    return math.ceil(requests + _DISCRETENESS_ERRORS / healthy_ratio)


def requests_under_floor(healthy_ratio: float, floor: float, miss: float) -> int:
    """Requests that put a version failing ``healthy_ratio`` of them below ``floor``: a
    one-sided test of its ratio against the floor at ``miss`` (the binomial lower tail)
    rejects it with probability 1 - ``miss``. What rules a regression out where the floor,
    not the factor, decides (a baseline that hardly fails: ``factor`` times its ratio is
    below the floor). The normal approximation, with the margin of
    :func:`requests_to_tell_apart` at the floor: a planning figure, not a guarantee."""
    if not 0.0 <= healthy_ratio < floor < 1.0:
        msg = (
            "the floor must be above a healthy ratio of 0 or more, and below 1: "
            f"{healthy_ratio!r}, {floor!r}"
        )
        raise ValueError(msg)
    if not 0.0 < miss < 0.5:
        msg = f'"miss" must be a probability in (0, 0.5): {miss!r}'
        raise ValueError(msg)
    z_miss = NormalDist().inv_cdf(1.0 - miss)
    spread = math.sqrt(floor * (1.0 - floor)) + math.sqrt(healthy_ratio * (1.0 - healthy_ratio))
    requests = (z_miss * spread / (floor - healthy_ratio)) ** 2
    return math.ceil(requests + _DISCRETENESS_ERRORS / floor)


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

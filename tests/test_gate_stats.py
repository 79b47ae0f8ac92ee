"""The gate's arithmetic: exact binomial tails and tails of the odds ratio's conditional
distribution (against sums with exact integers) at any size and quickly, and the planning
figure of how many requests a comparison needs."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest

from sentinel.gate._stats import (
    binomial_lower_tail,
    binomial_upper_tail,
    odds_ratio_lower_tail,
    odds_ratio_upper_tail,
    requests_to_tell_apart,
    requests_under_floor,
)


def _exact_upper(successes: int, trials: int, probability: Fraction) -> Fraction:
    return sum(
        (
            math.comb(trials, count) * probability**count * (1 - probability) ** (trials - count)
            for count in range(max(successes, 0), trials + 1)
        ),
        Fraction(0),
    )


@pytest.mark.parametrize("probability", ["0", "1/1000", "1/10", "1/3", "1/2", "9/10", "1"])
def test_tails_match_exact_sums(probability: str) -> None:
    """Both tails equal the sums of exact binomial terms for every count of up to 40 trials,
    past both ends included."""
    exact_probability = Fraction(probability)
    for trials in (0, 1, 2, 7, 40):
        for successes in range(-1, trials + 2):
            upper = _exact_upper(successes, trials, exact_probability)
            lower = 1 - _exact_upper(successes + 1, trials, exact_probability)
            assert binomial_upper_tail(successes, trials, float(exact_probability)) == (
                pytest.approx(float(upper), rel=1e-9, abs=1e-15)
            ), (successes, trials)
            assert binomial_lower_tail(successes, trials, float(exact_probability)) == (
                pytest.approx(float(lower), rel=1e-9, abs=1e-15)
            ), (successes, trials)


def test_tails_of_large_counts_are_exact_and_fast() -> None:
    """Ten million trials: P(X <= 0) is (1 - p)**n, P(X >= 1) its complement, the tails of
    one count add up to 1, a tail far out is tiny but not 0, and all of it takes
    milliseconds (the sums stop once the terms stop mattering)."""
    trials, probability = 10_000_000, 1e-6
    started = time.perf_counter()
    assert binomial_lower_tail(0, trials, probability) == pytest.approx(
        (1 - probability) ** trials, rel=1e-9
    )
    assert binomial_upper_tail(1, trials, probability) == pytest.approx(
        1 - (1 - probability) ** trials, rel=1e-9
    )
    trials, probability = 10_000_000, 0.01  # mean 100,000, standard deviation 315
    for successes in (99_000, 100_000, 100_500, 101_500):
        total = binomial_upper_tail(successes, trials, probability) + binomial_lower_tail(
            successes - 1, trials, probability
        )
        assert total == pytest.approx(1.0, abs=1e-9)
    far = binomial_upper_tail(102_000, trials, probability)  # 6.3 standard deviations
    assert 1e-11 < far < 1e-9
    assert time.perf_counter() - started < 0.5


def test_tails_refuse_impossible_arguments() -> None:
    """A probability outside [0, 1] or negative trials is an error that shows the values."""
    with pytest.raises(ValueError, match=r"1\.5"):
        binomial_upper_tail(1, 10, 1.5)
    with pytest.raises(ValueError, match="-3"):
        binomial_lower_tail(1, -3, 0.5)


def _exact_odds_tails(
    events: int, trials: int, other_events: int, other_trials: int, odds_ratio: Fraction
) -> tuple[Fraction, Fraction]:
    """P(X >= events), P(X <= events): each table with both margins, weighted by
    C(trials, x) C(other_trials, total - x) odds_ratio**x."""
    total = events + other_events
    weights = {
        count: math.comb(trials, count) * math.comb(other_trials, total - count) * odds_ratio**count
        for count in range(max(0, total - other_trials), min(trials, total) + 1)
    }
    whole = sum(weights.values(), Fraction(0))
    upper = sum((w for count, w in weights.items() if count >= events), Fraction(0))
    lower = sum((w for count, w in weights.items() if count <= events), Fraction(0))
    return upper / whole, lower / whole


@pytest.mark.parametrize("odds_ratio", ["1", "5", "1/5", "21/10"])
def test_odds_ratio_tails_match_exact_sums(odds_ratio: str) -> None:
    """Both tails equal the exact sums for every table of up to 25 and 30 trials, empty and
    full groups included."""
    exact_ratio = Fraction(odds_ratio)
    for trials in (0, 1, 3, 25):
        for other_trials in (0, 1, 4, 30):
            for events in range(trials + 1):
                for other_events in range(other_trials + 1):
                    counts = (events, trials, other_events, other_trials)
                    upper, lower = _exact_odds_tails(*counts, exact_ratio)
                    assert odds_ratio_upper_tail(*counts, float(exact_ratio)) == pytest.approx(
                        float(upper), rel=1e-9, abs=1e-15
                    ), counts
                    assert odds_ratio_lower_tail(*counts, float(exact_ratio)) == pytest.approx(
                        float(lower), rel=1e-9, abs=1e-15
                    ), counts


def test_odds_ratio_tails_of_large_counts_are_exact_and_fast() -> None:
    """A million requests on each version with 30% of them one code: the tails of one table
    add up to 1 on either side of the middle, 301,000 against 300,000 (1.5 standard
    deviations of the first version's part) has the normal approximation's p of about 0.06,
    a far one is tiny but not 0, and all of it takes milliseconds."""
    started = time.perf_counter()
    million = 1_000_000
    for events in (298_000, 300_000, 301_000):
        # The same table: both versions' events add up to 600,000 in both calls.
        total = odds_ratio_upper_tail(
            events, million, 600_000 - events, million
        ) + odds_ratio_lower_tail(events - 1, million, 600_001 - events, million)
        assert total == pytest.approx(1.0, abs=1e-9)
    assert odds_ratio_upper_tail(301_000, million, 300_000, million) == pytest.approx(
        0.0615, abs=0.001
    )
    assert 0.0 < odds_ratio_upper_tail(310_000, million, 300_000, million) < 1e-40
    # 90% against 30%, odds 21x: 5x the odds is excluded without doubt the other way.
    assert odds_ratio_lower_tail(900_000, million, 300_000, million, 5.0) == 1.0
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        ((5, 4, 0, 10, 1.0), "5 of 4"),
        ((1, 4, -1, 10, 1.0), "-1 of 10"),
        ((1, 4, 0, 10, 0.0), "0.0"),
        ((1, 4, 0, 10, math.inf), "inf"),
        ((1, 4, 0, 10, math.nan), "nan"),
    ],
)
def test_odds_ratio_tails_refuse_impossible_arguments(
    arguments: tuple[int, int, int, int, float], shown: str
) -> None:
    """More events than trials, a negative count, or an odds ratio that is not positive
    and finite is an error that shows the values."""
    for tail in (odds_ratio_upper_tail, odds_ratio_lower_tail):
        with pytest.raises(ValueError, match=shown):
            tail(*arguments)


def test_requests_needed_for_common_shares_are_few() -> None:
    """A code at 30% against one at 68% (5x the odds) takes about a hundred requests per
    version, where 0.1% against 0.5% takes about 19,000."""
    assert 50 < requests_to_tell_apart(0.3, 0.68, 0.01, 0.005) < 200


def test_requests_needed_grow_as_the_difference_shrinks() -> None:
    """Telling 0.5% from 0.1% takes about 19,000 requests per version at 1% / 0.5% error
    probabilities; a subtler factor or a rarer baseline takes more, looser probabilities
    fewer."""
    needed = requests_to_tell_apart(0.001, 0.005, 0.01, 0.005)
    assert 18_000 < needed < 20_000
    assert requests_to_tell_apart(0.001, 0.002, 0.01, 0.005) > needed
    assert requests_to_tell_apart(0.0001, 0.0005, 0.01, 0.005) == pytest.approx(
        10 * needed, rel=0.01
    )
    assert requests_to_tell_apart(0.001, 0.005, 0.05, 0.05) < needed


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        ((0.005, 0.001, 0.01, 0.01), "0.005, 0.001"),
        ((0.0, 0.01, 0.01, 0.01), "0.0, 0.01"),
        ((0.3, 1.0, 0.01, 0.01), "0.3, 1.0"),
        ((0.001, 0.005, 0.5, 0.01), "0.5"),
        ((0.001, 0.005, 0.01, 0.0), "0.0"),
    ],
)
def test_requests_needed_refuse_impossible_arguments(
    arguments: tuple[float, float, float, float], shown: str
) -> None:
    """A regressed ratio not above a positive healthy one or not below 1, or a probability
    outside (0, 0.5), is refused with the values in the message."""
    with pytest.raises(ValueError, match=shown):
        requests_to_tell_apart(*arguments)


@pytest.mark.parametrize(
    ("healthy", "floor"), [(0.0, 0.002), (0.0005, 0.002), (0.001, 0.002), (0.0, 0.02), (0.01, 0.02)]
)
def test_the_floor_rules_a_healthy_version_out_at_the_planned_traffic(
    healthy: float, floor: float
) -> None:
    """At the requests planned for the floor test, a version failing ``healthy`` of them is
    put below the floor at 0.5% with probability 99% or more, by the exact tails (99.5%,
    the plan's aim, give or take its normal approximation); and for one that never fails
    (a baseline that never fails, where the factor can never be ruled out) the figure is a
    few thousand requests at a 0.2% floor, not the millions of a two-version plan."""
    miss = 0.005
    planned = requests_under_floor(healthy, floor, miss)
    rejected = [
        events
        for events in range(planned + 1)
        if binomial_lower_tail(events, planned, floor) <= miss
    ]
    assert rejected, planned
    assert binomial_lower_tail(max(rejected), planned, healthy) >= 1 - 2 * miss
    if healthy == 0:
        assert planned < 10 / floor


def test_the_floor_plan_refuses_what_it_cannot_plan() -> None:
    for healthy, floor, miss in ((0.002, 0.002, 0.005), (-0.1, 0.002, 0.005), (0.0, 0.002, 0.5)):
        with pytest.raises(ValueError):
            requests_under_floor(healthy, floor, miss)

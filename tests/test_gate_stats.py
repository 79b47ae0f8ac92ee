"""The gate's arithmetic: exact binomial tails (against sums with exact integers) at any
size and quickly, and the planning figure of how many requests a comparison needs."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest

from sentinel.gate._stats import (
    binomial_lower_tail,
    binomial_upper_tail,
    requests_to_tell_apart,
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
        ((0.001, 0.005, 0.5, 0.01), "0.5"),
        ((0.001, 0.005, 0.01, 0.0), "0.0"),
    ],
)
def test_requests_needed_refuse_impossible_arguments(
    arguments: tuple[float, float, float, float], shown: str
) -> None:
    """A regressed ratio not above a positive healthy one, or a probability outside
    (0, 0.5), is refused with the values in the message."""
    with pytest.raises(ValueError, match=shown):
        requests_to_tell_apart(*arguments)

"""The gate's decision from counts alone (no server): a regression confined to one location
stops the rollout and is named, a healthy one continues, too little traffic is "cannot
decide" with the requests it would take, and the error probabilities hold over many
simulated rollouts."""

from __future__ import annotations

import math
import random

import pytest

from sentinel.gate import Counts, Thresholds, Verdict, decide
from sentinel.mixin import MonitoringConfig

DEFAULT = Thresholds()  # factor 5, floor 1%, 200 requests, 99% confidence
NO_FLOOR = Thresholds(min_ratio=0.0)


def test_thresholds_come_from_the_regression_alerts_config() -> None:
    """The gate reads the same factor, floor, guard and confidence as the alert."""
    config = MonitoringConfig(
        regression_factor=3.0,
        regression_min_ratio=0.002,
        regression_min_requests=50,
        regression_confidence=0.995,
    )
    assert Thresholds.from_config(config) == Thresholds(3.0, 0.002, 50, 0.995)
    assert Thresholds.from_config(MonitoringConfig()) == DEFAULT


def test_a_regression_in_one_location_stops_and_names_it() -> None:
    """fra fails 20% on v2 against 0.05% on v1 while iad is clean: stop (exit 1), fra is
    named and only fra; iad's own verdict is continue."""
    traffic = {
        ("fra", "v2"): Counts(1_000, 200),
        ("fra", "v1"): Counts(20_000, 10),
        ("iad", "v2"): Counts(5_000, 2),
        ("iad", "v1"): Counts(90_000, 45),
    }
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is Verdict.STOP and decision.exit_code == 1
    assert decision.stopped == ("fra",)
    assert decision.summary == "stop: v2 regressed in fra"
    fra, iad = decision.locations
    assert fra.reason.startswith("regression: 20.0% errors against 0.050% on v1, 400x")
    assert fra.p_worse is not None and fra.p_worse < 1e-100
    assert iad.verdict is Verdict.CONTINUE


def test_a_healthy_rollout_continues() -> None:
    """Both locations on v2 fail as rarely as on v1, with traffic enough: continue (exit 0)
    with the baseline found by itself in each location."""
    traffic = {
        ("fra", "v2"): Counts(20_000, 21),
        ("fra", "v1"): Counts(20_000, 19),
        ("iad", "v2"): Counts(30_000, 28),
        ("iad", "v1"): Counts(60_000, 61),
    }
    decision = decide(traffic, "v2", NO_FLOOR)
    assert decision.verdict is Verdict.CONTINUE and decision.exit_code == 0
    assert [d.baseline_version for d in decision.locations] == ["v1", "v1"]
    assert decision.summary == "continue: no regression of v2 in fra, iad"
    assert all(d.reason.startswith("no regression") for d in decision.locations)


def test_counts_decide_what_ratios_cannot() -> None:
    """1 error in 20 requests and 5,000 in 100,000 are both 5%: the first cannot be told
    from noise (exit 2, with the requests it would take), the second is a regression."""
    thresholds = Thresholds(min_requests=0)
    few = decide({("fra", "v2"): Counts(20, 1), ("fra", "v1"): Counts(20, 0)}, "v2", thresholds)
    many = decide(
        {("fra", "v2"): Counts(100_000, 5_000), ("fra", "v1"): Counts(100_000, 100)},
        "v2",
        thresholds,
    )
    assert few.verdict is Verdict.UNDECIDED and few.exit_code == 2
    (location,) = few.locations
    assert location.needed_requests is not None and location.needed_requests > 20
    assert f"needs about {location.needed_requests} requests on each version" in location.reason
    assert many.verdict is Verdict.STOP


def test_below_the_request_guard_nothing_is_judged() -> None:
    """Fewer requests on the new version than regression_min_requests: cannot decide,
    whatever the errors (the alert's own guard; real errors come in bursts)."""
    traffic = {("fra", "v2"): Counts(150, 150), ("fra", "v1"): Counts(10_000, 0)}
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is Verdict.UNDECIDED
    (location,) = decision.locations
    assert location.reason.startswith(
        "too little traffic: 150 requests on v2, fewer than the 200 the config requires; about "
    )
    assert location.p_worse is None


def test_what_the_alert_would_not_call_a_regression_continues() -> None:
    """The alert needs factor x the baseline *and* the floor: 0.3% against 0.01% (30x, but
    far below the 1% floor) continues, and so does 2x the baseline at 3%; both are
    reported as worse than the baseline."""
    below_floor = decide(
        {("fra", "v2"): Counts(100_000, 300), ("fra", "v1"): Counts(100_000, 10)}, "v2", DEFAULT
    )
    below_factor = decide(
        {("fra", "v2"): Counts(100_000, 3_000), ("fra", "v1"): Counts(100_000, 1_500)},
        "v2",
        DEFAULT,
    )
    assert below_floor.verdict is Verdict.CONTINUE
    assert below_floor.locations[0].reason == (
        "worse than v1 (0.30% errors against 0.010% on v1, 30x) but under the 1.0% floor"
    )
    assert below_factor.verdict is Verdict.CONTINUE
    assert below_factor.locations[0].reason == (
        "worse than v1 (3.0% errors against 1.5% on v1, 2x) but under 5x"
    )


def test_the_baseline_is_the_busiest_other_version_in_each_location() -> None:
    """Without --baseline, each location compares with the other version that served the
    most requests there (ties broken by name, so the choice is stable)."""
    traffic = {
        ("fra", "v3"): Counts(1_000, 0),
        ("fra", "v1"): Counts(5_000, 0),
        ("fra", "v2"): Counts(9_000, 0),
        ("iad", "v3"): Counts(1_000, 0),
        ("iad", "v2"): Counts(4_000, 0),
        ("iad", "v1"): Counts(4_000, 0),
    }
    decision = decide(traffic, "v3", DEFAULT)
    assert [(d.location, d.baseline_version) for d in decision.locations] == [
        ("fra", "v2"),
        ("iad", "v1"),
    ]
    given = decide(traffic, "v3", DEFAULT, baseline_version="v1")
    assert [d.baseline_version for d in given.locations] == ["v1", "v1"]


@pytest.mark.parametrize(
    ("arguments", "summary"),
    [
        ({"new_version": "v9"}, "no instance in scope reported the new version 'v9'"),
        ({"baseline_version": "v0"}, "reported the baseline version 'v0' in the window"),
        ({"baseline_version": "v2"}, "the baseline is the new version 'v2'"),
        ({"new_version": "v3"}, "'v3' served no requests in the window"),
    ],
)
def test_versions_that_cannot_be_compared_cannot_be_decided(
    arguments: dict[str, str], summary: str
) -> None:
    """An unknown new or baseline version, a baseline equal to the new one, a version that
    is known but served nothing: exit 2, never 0, with the reason."""
    traffic = {("fra", "v2"): Counts(1_000, 0), ("fra", "v1"): Counts(1_000, 0)}
    new_version = arguments.pop("new_version", "v2")
    decision = decide(traffic, new_version, DEFAULT, versions={"v1", "v2", "v3"}, **arguments)
    assert decision.verdict is Verdict.UNDECIDED and decision.exit_code == 2
    assert summary in decision.summary
    assert decision.locations == ()


def test_a_location_asked_for_without_traffic_cannot_be_decided() -> None:
    """--location names a location the new version (or any other) did not serve: that
    location is undecided with the reason, and so is the decision."""
    traffic = {("fra", "v2"): Counts(1_000, 0), ("fra", "v1"): Counts(1_000, 0)}
    decision = decide(traffic, "v2", DEFAULT, locations=["fra", "syd"])
    assert decision.verdict is Verdict.UNDECIDED
    assert decision.summary == "cannot decide: v2 cannot be judged yet in syd"
    assert decision.locations[1].reason == "v2 served no requests here"
    only_new = decide({("syd", "v2"): Counts(1_000, 0)}, "v2", DEFAULT)
    assert only_new.locations[0].reason == "no other version served requests here to compare with"


def test_counts_must_be_possible() -> None:
    """More errors than requests, or negative counts, are refused with the values."""
    with pytest.raises(ValueError, match="5, 3"):
        Counts(3, 5)
    with pytest.raises(ValueError, match="-1"):
        Counts(10, -1)


def _binomial(rng: random.Random, trials: int, probability: float) -> int:
    """A binomial draw by skipping geometric gaps between successes (rare errors: fast)."""
    count, position, log_miss = 0, 0, math.log1p(-probability)
    while True:
        position += int(math.log(1.0 - rng.random()) / log_miss) + 1
        if position > trials:
            return count
        count += 1


def _simulate(
    rollouts: int, requests: int, new_ratio: float, thresholds: Thresholds, seed: int
) -> tuple[dict[Verdict, int], int]:
    """Rollouts over three locations at a 0.1% baseline, the new version at ``new_ratio``
    in fra and at the baseline elsewhere, ``requests`` per version: how many ended in each
    verdict, and how many stopped naming fra."""
    rng = random.Random(seed)
    outcomes = dict.fromkeys(Verdict, 0)
    fra_stopped = 0
    for _ in range(rollouts):
        traffic = {}
        for location in ("fra", "iad", "syd"):
            ratio = new_ratio if location == "fra" else 0.001
            traffic[(location, "v2")] = Counts(requests, _binomial(rng, requests, ratio))
            traffic[(location, "v1")] = Counts(requests, _binomial(rng, requests, 0.001))
        decision = decide(traffic, "v2", thresholds)
        outcomes[decision.verdict] += 1
        fra_stopped += "fra" in decision.stopped
    return outcomes, fra_stopped


def test_healthy_rollouts_are_rarely_stopped() -> None:
    """Over 1,000 simulated healthy rollouts across three locations (0.1% errors on both
    versions, 20,000 requests each), at most 1% are stopped (the alpha is shared by the
    locations), and most continue."""
    outcomes, _ = _simulate(1_000, 20_000, 0.001, NO_FLOOR, seed=12)
    assert outcomes[Verdict.STOP] <= 10
    assert outcomes[Verdict.CONTINUE] >= 900


def test_a_five_fold_regression_is_detected() -> None:
    """Over 1,000 simulated rollouts where the new version fails 0.5% in one location
    against a 0.1% baseline (5x, the configured factor; no floor), at 20,000 requests per
    version, at least 99% are stopped naming that location."""
    outcomes, fra_stopped = _simulate(1_000, 20_000, 0.005, NO_FLOOR, seed=18)
    assert fra_stopped >= 990
    assert outcomes[Verdict.STOP] >= fra_stopped


def test_at_the_requests_it_asks_for_the_gate_decides() -> None:
    """The requests an undecided location says it needs are enough: at that traffic, a
    healthy version continues in at least 90% of 500 simulated rollouts of one location,
    and a 5x regression is stopped in at least 95%."""
    small = decide(
        {("fra", "v2"): Counts(1_000, 1), ("fra", "v1"): Counts(100_000, 100)}, "v2", NO_FLOOR
    )
    needed = small.locations[0].needed_requests
    assert needed is not None and 15_000 < needed < 25_000
    rng = random.Random(7)
    healthy = stopped = 0
    for _ in range(500):
        baseline = Counts(needed, _binomial(rng, needed, 0.001))
        same = Counts(needed, _binomial(rng, needed, 0.001))
        worse = Counts(needed, _binomial(rng, needed, 0.005))
        for new, counter in ((same, "healthy"), (worse, "stopped")):
            verdict = decide({("fra", "v2"): new, ("fra", "v1"): baseline}, "v2", NO_FLOOR).verdict
            if counter == "healthy":
                healthy += verdict is Verdict.CONTINUE
            else:
                stopped += verdict is Verdict.STOP
    assert healthy >= 450
    assert stopped >= 475

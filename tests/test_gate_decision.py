"""The gate's decision from counts alone (no server): a regression confined to one location
(in the 5xx ratio, one 4xx code's share or the traffic per instance) stops the rollout and
is named, a healthy one continues, an instance of another environment stops it, the
baseline is found (in the lookback when the new version replaced it), too little traffic
is "cannot decide" with the requests it would take, and the error probabilities hold over
many simulated rollouts."""

from __future__ import annotations

import math
import random

import pytest

from sentinel.gate import (
    Counts,
    EnvironmentMismatch,
    Thresholds,
    Traffic,
    Verdict,
    decide,
    needs_history,
)
from sentinel.mixin import MonitoringConfig

DEFAULT = Thresholds()  # factor 5, floor 0.2%, 200 requests, 99% confidence, 4xx floor 2%
NO_FLOOR = Thresholds(min_ratio=0.0)


def test_thresholds_come_from_the_regression_alerts_config() -> None:
    """The gate reads the same factor, floors, guard and confidence as the alerts (the
    release regression's, the status shift's floor, the traffic drop's ratio)."""
    config = MonitoringConfig(
        regression_factor=3.0,
        regression_min_ratio=0.005,
        regression_min_requests=50,
        regression_confidence=0.995,
        status_shift_min_ratio=0.05,
        traffic_drop_ratio=0.3,
    )
    assert Thresholds.from_config(config) == Thresholds(3.0, 0.005, 50, 0.995, 0.05, 0.3)
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
    assert decision.summary == "stop: v2 regressed in fra (5xx ratio)"
    fra, iad = decision.locations
    assert fra.reason.startswith("regression: 20.0% errors against 0.050% on v1, 400x")
    check = fra.check("5xx ratio")
    assert check is not None and check.p_worse is not None and check.p_worse < 1e-100
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


def test_below_the_request_guard_nothing_continues() -> None:
    """Fewer requests on the new version than regression_min_requests: never continue (the
    alert's own guard; real errors come in bursts), however clean; 1 error in 50, or 10 in
    150 where the baseline fails 1% (a burst, p = 5e-6), cannot decide, with the requests
    it would take."""
    for new in (Counts(150, 0), Counts(50, 1), Counts(150, 10)):
        baseline = Counts(10_000, 100 if new.errors == 10 else 0)
        decision = decide({("fra", "v2"): new, ("fra", "v1"): baseline}, "v2", DEFAULT)
        assert decision.verdict is Verdict.UNDECIDED, (new, decision.summary)
        (location,) = decision.locations
        assert location.reason.startswith(
            f"too little traffic: {new.requests} requests on v2, fewer than the 200 the config "
            "requires; about "
        )
        (check,) = location.checks
        assert check.verdict is Verdict.UNDECIDED and check.needed_requests is not None


@pytest.mark.parametrize(
    ("new", "check", "reason"),
    [
        (
            Counts(50, 50),
            "5xx ratio",
            "regression: 100.0% errors against 0.10% on v1, 1e+03x, on 50 requests (fewer "
            "than the 200 the config requires, but p < 1e-06)",
        ),
        (
            Counts(150, 0, codes={"401": 150}),
            "401 share",
            "regression: 100.0% of responses against 0% on v1, on 150 requests (fewer than the "
            "200 the config requires, but p < 1e-06)",
        ),
        (
            Counts(199, 100),
            "5xx ratio",
            "regression: 50.3% errors against 0.10% on v1, 503x (odds 1.01e+03x), on 199 "
            "requests (fewer than the 200 the config requires, but p < 1e-06)",
        ),
    ],
    ids=["all-fail", "all-401", "half-fail"],
)
def test_below_the_request_guard_a_broken_release_stops(
    new: Counts, check: str, reason: str
) -> None:
    """A low-traffic location can still stop a release that fails most of what it serves:
    below regression_min_requests a check stops past the alert's guards (floor, 10 events)
    with at least the factor's odds seen and p_worse at most alpha / 10,000, and only the
    checks that stop are shown besides the 5xx ratio."""
    traffic = {("fra", "v2"): new, ("fra", "v1"): Counts(10_000, 10)}
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is Verdict.STOP, decision.summary
    assert decision.summary == f"stop: v2 regressed in fra ({check})"
    stopped = decision.locations[0].check(check)
    assert stopped is not None and stopped.verdict is Verdict.STOP
    assert stopped.reason == reason
    assert stopped.p_worse is not None and stopped.p_worse <= DEFAULT.alpha / 10_000


def test_what_the_alert_would_not_call_a_regression_continues() -> None:
    """The alert needs factor x the baseline *and* the floor: 0.3% against 0.01% (30x, but
    far below a 1% floor) continues, and so does 2x the baseline at 3%; both are reported
    as worse than the baseline."""
    floor = Thresholds(min_ratio=0.01)
    below_floor = decide(
        {("fra", "v2"): Counts(100_000, 300), ("fra", "v1"): Counts(100_000, 10)}, "v2", floor
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


@pytest.mark.parametrize("floor", [0.0, 1e-9])
def test_a_regression_is_ruled_out_at_half_alpha_with_or_without_a_floor(floor: float) -> None:
    """6 errors in 20,000 requests on each version: a 5x regression is excluded only at
    p = 0.0079 (under alpha = 1%, not under alpha / 2), so the gate cannot decide yet,
    with a floor of 0 as with one too low to matter; p_regression is that p doubled."""
    traffic = {("fra", "v2"): Counts(20_000, 6), ("fra", "v1"): Counts(20_000, 6)}
    decision = decide(traffic, "v2", Thresholds(min_ratio=floor))
    (check,) = decision.locations[0].checks
    assert check.verdict is Verdict.UNDECIDED, check.reason
    assert check.p_regression == pytest.approx(2 * 0.007931952332363306)


def test_the_baseline_is_the_busiest_other_version_in_each_location() -> None:
    """Without --baseline, each location compares with the other version that served the
    most successful responses there (ties broken by name, so the choice is stable), and
    says so."""
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
    assert decision.locations[0].baseline_reason == (
        "v2, the other version with the most successful responses here in the window "
        "(9000 of 9000 requests); also here: v1 (5000)"
    )
    given = decide(traffic, "v3", DEFAULT, baseline_version="v1")
    assert [d.baseline_version for d in given.locations] == ["v1", "v1"]
    assert given.locations[0].baseline_reason == "v1, given with --baseline"


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
    traffic = {("fra", "v2"): Counts(10_000, 0), ("fra", "v1"): Counts(10_000, 0)}
    decision = decide(traffic, "v2", DEFAULT, locations=["fra", "syd"])
    assert decision.verdict is Verdict.UNDECIDED
    assert decision.summary == "cannot decide: v2 cannot be judged yet in syd"
    assert decision.locations[1].reason == "v2 served no requests here"
    only_new = decide({("syd", "v2"): Counts(1_000, 0)}, "v2", DEFAULT, window="10m")
    assert only_new.locations[0].reason == (
        "no baseline: no other version served successful responses here in the last 10m"
    )


def test_counts_must_be_possible() -> None:
    """More errors than requests, or negative counts, are refused with the values."""
    with pytest.raises(ValueError, match="5, 3"):
        Counts(3, 5)
    with pytest.raises(ValueError, match="-1"):
        Counts(10, -1)


def test_a_deploy_that_answers_401_stops_naming_the_location_and_code() -> None:
    """v2 answers 401 to 30% of fra's requests (v1 never did; no 5xx moves): stop, naming
    fra and the 401 share; iad, where both versions answer 8% 404s, continues."""
    traffic = {
        ("fra", "v2"): Counts(10_000, 5, codes={"401": 3_000}),
        ("fra", "v1"): Counts(20_000, 10, codes={"404": 40}),
        ("iad", "v2"): Counts(5_000, 2, codes={"404": 400}),
        ("iad", "v1"): Counts(50_000, 30, codes={"404": 4_000}),
    }
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is Verdict.STOP and decision.stopped == ("fra",)
    assert decision.summary == "stop: v2 regressed in fra (401 share)"
    fra, iad = decision.locations
    shift = fra.check("401 share")
    assert shift is not None and shift.verdict is Verdict.STOP
    assert shift.reason == "regression: 30.0% of responses against 0% on v1"
    assert fra.reason == "401 share: regression: 30.0% of responses against 0% on v1"
    errors = fra.check("5xx ratio")
    assert errors is not None and errors.verdict is Verdict.CONTINUE
    assert iad.verdict is Verdict.CONTINUE
    same_404 = iad.check("404 share")
    assert same_404 is not None and same_404.reason.startswith("no regression (8.0% of responses")


@pytest.mark.parametrize(
    ("new_401s", "new_errors", "verdict", "reason"),
    [
        (
            9_000,
            2_500,
            Verdict.STOP,
            "401 share: regression: 90.0% of responses against 30.0% on v1, 3x (odds 21x)",
        ),
        (
            3_000,
            9_000,
            Verdict.STOP,
            "regression: 90.0% errors against 25.0% on v1, 3.6x (odds 27x)",
        ),
        (
            4_500,
            3_500,
            Verdict.CONTINUE,
            "5xx ratio: worse than v1 (35.0% errors against 25.0% on v1, 1.4x (odds 1.62x)) "
            "but under 5x; 401 share: worse than v1 (45.0% of responses against 30.0% on v1, "
            "1.5x (odds 1.91x)) but under 5x",
        ),
    ],
    ids=["401-takes-over", "fails-most", "smaller-rises"],
)
def test_common_codes_and_high_error_ratios_are_judged_on_their_odds(
    new_401s: int, new_errors: int, verdict: Verdict, reason: str
) -> None:
    """Where v1 answers 30% 401 and fails 25% (a location mid-incident), a regression of
    factor 5 is judged on the odds, as the alerts do: 90% 401 (21x the odds; a plain 5x of
    30% is 150%, which no share reaches) or 90% failed requests stop; 45% 401 and 35% failed
    are worse but under 5x the odds, so they continue. The reasons show the odds where they
    part from the ratio."""
    traffic = {
        ("fra", "v2"): Counts(10_000, new_errors, codes={"401": new_401s}),
        ("fra", "v1"): Counts(10_000, 2_500, codes={"401": 3_000}),
    }
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is verdict
    assert decision.locations[0].reason == reason


def test_a_new_code_under_the_floor_continues() -> None:
    """A 401 the baseline never answered, at 0.5% of the responses: worse than the baseline,
    but under the 2% floor of a 4xx shift, so no reason to stop."""
    traffic = {
        ("fra", "v2"): Counts(10_000, 0, codes={"401": 50}),
        ("fra", "v1"): Counts(20_000, 0),
    }
    decision = decide(traffic, "v2", DEFAULT)
    assert decision.verdict is Verdict.CONTINUE
    shift = decision.locations[0].check("401 share")
    assert shift is not None
    assert (
        shift.reason
        == "worse than v1 (0.50% of responses against 0% on v1) but under the 2.0% floor"
    )


def test_traffic_that_does_not_reach_the_new_version_stops() -> None:
    """The new version's instance got 300 requests in 40 scrapes while each baseline
    instance got 10,000 in 40: requests are not reaching it (no error says so): stop on the
    traffic per instance, though its errors cannot be judged on so few requests. An instance
    up for half the window with half the requests is no drop."""
    baseline = Counts(
        20_000, 10, instances={"10.0.0.1:8000": 10_000, "10.0.0.3:8000": 10_000}, exposure=80.0
    )
    starved = Counts(300, 0, instances={"10.0.0.2:8000": 300}, exposure=40.0)
    decision = decide({("fra", "v2"): starved, ("fra", "v1"): baseline}, "v2", DEFAULT)
    assert decision.verdict is Verdict.STOP
    assert decision.summary == "stop: v2 regressed in fra (traffic per instance)"
    (fra,) = decision.locations
    traffic = fra.check("traffic per instance")
    assert traffic is not None and traffic.verdict is Verdict.STOP
    assert traffic.reason == (
        "drop: 300 requests per instance against 10000 on v1: 0.03x its rate, under 0.5x: "
        "requests are not reaching v2"
    )
    assert traffic.new_value == 300 and traffic.baseline_value == 10_000
    late = Counts(5_000, 5, instances={"10.0.0.2:8000": 5_000}, exposure=20.0)
    healthy = decide({("fra", "v2"): late, ("fra", "v1"): baseline}, "v2", DEFAULT)
    check = healthy.locations[0].check("traffic per instance")
    assert check is not None and check.verdict is Verdict.CONTINUE
    assert check.reason.startswith("no drop (5000 requests per instance against 10000 on v1: 1x")
    off = decide(
        {("fra", "v2"): starved, ("fra", "v1"): baseline}, "v2", Thresholds(traffic_ratio=0.0)
    )
    assert off.locations[0].check("traffic per instance") is None
    assert off.verdict is Verdict.UNDECIDED


@pytest.mark.parametrize(("new", "baseline"), [(120, 200), (130, 200), (110, 200), (240, 400)])
def test_a_rate_above_the_drop_ratio_never_stops(new: int, baseline: int) -> None:
    """0.55x to 0.65x the baseline's requests per second, significantly fewer but above the
    0.5x drop ratio (SentinelTrafficDrop's own guard), and a drop under it not ruled out:
    cannot decide, never stop."""
    traffic = {
        ("fra", "v2"): Counts(new, 0, instances={"c": new}, exposure=600.0),
        ("fra", "v1"): Counts(baseline, 0, instances={"b": baseline}, exposure=600.0),
    }
    check = decide(traffic, "v2", DEFAULT, window="10m").locations[0].check("traffic per instance")
    assert check is not None and check.verdict is Verdict.UNDECIDED, check
    assert check.p_worse is not None and check.p_worse <= DEFAULT.alpha
    assert check.reason == (
        f"fewer requests than on v1 ({new} requests per instance against {baseline} on v1: "
        f"{new / baseline:.2g}x its rate) but not under 0.5x, nor a drop under it ruled out: "
        "needs more requests"
    )


def test_the_traffic_verdict_only_eases_as_the_rate_rises() -> None:
    """Against 200 requests per instance, from 0 to 300 on the new version: stop only under
    0.5x its rate, then cannot decide, then continue; never a stop above a rate that was
    not one."""
    severity = {Verdict.CONTINUE: 0, Verdict.UNDECIDED: 1, Verdict.STOP: 2}
    baseline = Counts(200, 0, instances={"b": 200}, exposure=600.0)
    seen = []
    for new in range(0, 301, 5):
        counts = Counts(new, 0, instances={"c": new}, exposure=600.0)
        decision = decide({("fra", "v2"): counts, ("fra", "v1"): baseline}, "v2", DEFAULT)
        check = decision.locations[0].check("traffic per instance")
        assert check is not None
        if check.verdict is Verdict.STOP:
            assert new / 200 < 0.5, check.reason
        seen.append(severity[check.verdict])
    assert seen == sorted(seen, reverse=True)
    assert seen[0] == 2 and seen[-1] == 0


def test_a_release_that_gets_no_traffic_at_all_stops() -> None:
    """v2's instance was up the whole window and served nothing, while each of v1's served
    12,000 (a black hole): its counts (none, with its exposure) are judged where the
    baseline served, with --location as without: stop, naming the idle instance."""
    idle = Counts(0, 0, instances={"c1:1": 0}, exposure=600.0)
    baseline = Counts(24_000, 24, instances={"b1:1": 12_000, "b2:1": 12_000}, exposure=1_200.0)
    traffic = {("fra", "v2"): idle, ("fra", "v1"): baseline}
    for locations in ((), ("fra",)):
        decision = decide(traffic, "v2", DEFAULT, locations=locations, window="10m")
        assert decision.verdict is Verdict.STOP, decision.summary
        assert decision.summary == "stop: v2 regressed in fra (traffic per instance)"
        (fra,) = decision.locations
        assert [check.name for check in fra.checks] == ["traffic per instance"]
        assert fra.reason == (
            "traffic per instance: drop: 0 requests per instance against 12000 on v1: 0x its "
            "rate, under 0.5x: requests are not reaching v2 (1 of v2's 1 instances here "
            "served no requests anywhere: c1:1)"
        )
    quiet = {
        ("fra", "v2"): idle,
        ("fra", "v1"): Counts(100, 0, instances={"b": 100}, exposure=600.0),
    }
    (fra,) = decide(quiet, "v2", DEFAULT).locations
    assert fra.verdict is Verdict.UNDECIDED and fra.reason == "v2 served no requests here"


def test_an_instance_of_another_environment_stops_the_rollout() -> None:
    """A staging build in the production scope serving fra: stop, naming the instance, the
    location and both environments (fra's environment check), though the counts alone
    would continue; one that has served nothing yet stops the rollout as well (a pre-check
    before it gets traffic)."""
    traffic = {("fra", "v2"): Counts(20_000, 20), ("fra", "v1"): Counts(20_000, 20)}
    serving = EnvironmentMismatch(
        "10.0.0.9:8000", "shop", "v2", "staging", "production", ("fra",), 700
    )
    decision = decide(traffic, "v2", DEFAULT, mismatches=[serving], environment="production")
    assert decision.verdict is Verdict.STOP and decision.exit_code == 1
    assert decision.summary == (
        "stop: 10.0.0.9:8000 (job shop) serves production traffic in fra on v2 but reports "
        "environment 'staging', not 'production'"
    )
    assert decision.stopped == ("fra",)
    (fra,) = decision.locations
    assert fra.verdict is Verdict.STOP
    assert [(check.name, check.verdict) for check in fra.checks] == [
        ("environment", Verdict.STOP),
        ("5xx ratio", Verdict.CONTINUE),
    ]
    assert fra.reason == (
        "environment: 10.0.0.9:8000 (job shop) runs v2 here but reports environment "
        "'staging', not 'production'"
    )
    idle = EnvironmentMismatch("10.0.0.9:8000", "shop", "v2", "staging", "production")
    early = decide({}, "v2", DEFAULT, versions={"v1", "v2"}, mismatches=[idle])
    assert early.verdict is Verdict.STOP
    assert "is in the production scope (no requests in the window yet)" in early.summary


def test_the_baseline_is_the_version_with_the_most_successful_responses() -> None:
    """v1 served more requests than v0 but answered 401 to most of them: v0 is the
    baseline (healthy traffic, not any traffic)."""
    traffic = {
        ("fra", "v3"): Counts(1_000, 0),
        ("fra", "v1"): Counts(10_000, 0, codes={"401": 9_000}),
        ("fra", "v0"): Counts(5_000, 0),
    }
    (fra,) = decide(traffic, "v3", DEFAULT).locations
    assert fra.baseline_version == "v0"
    assert fra.baseline_reason.startswith("v0, the other version with the most successful")
    assert fra.baseline_reason.endswith("also here: v1 (1000)")


def test_a_baseline_the_new_version_replaced_is_found_in_the_lookback() -> None:
    """v2 replaced v1 in fra within the window: the gate looks back (needs_history) and
    compares with the version that served the most successful responses in the lookback
    before the window, saying so; v1 draining with a handful of requests is no baseline
    either; a baseline with traffic in the window needs no look back. The traffic per
    instance is not compared with an earlier period."""
    window = {("fra", "v2"): Counts(30_000, 30, exposure=40.0)}
    history = {
        ("fra", "v1"): Counts(500_000, 500, exposure=5_000.0),
        ("fra", "v0"): Counts(9_000, 9),
    }
    assert needs_history(window, "v2", DEFAULT)
    decision = decide(window, "v2", DEFAULT, history=history, window="10m", lookback="1d")
    assert decision.verdict is Verdict.CONTINUE
    (fra,) = decision.locations
    assert (fra.baseline_version, fra.baseline_period) == ("v1", "lookback")
    assert fra.baseline_reason == (
        "v1: v2 replaced every other version here within the last 10m; v1 served the most "
        "successful responses here in the 1d before it (499500 of 500000 requests)"
    )
    assert fra.notes == (
        "traffic per instance not judged: the baseline's requests are from before the window",
    )
    drained = {**window, ("fra", "v1"): Counts(20, 0)}
    assert needs_history(drained, "v2", DEFAULT)
    (again,) = decide(
        drained, "v2", DEFAULT, history=history, window="10m", lookback="1d"
    ).locations
    assert again.baseline_period == "lookback"
    assert again.baseline_reason.startswith(
        "v1: the other versions served fewer than 200 requests here in the last 10m"
    )
    assert not needs_history({**window, ("fra", "v1"): Counts(5_000, 5)}, "v2", DEFAULT)
    given = decide(
        window, "v2", DEFAULT, baseline_version="v0", history=history, window="10m", lookback="1d"
    )
    (fra_given,) = given.locations
    assert fra_given.baseline_version == "v0" and fra_given.baseline_period == "lookback"
    assert fra_given.baseline_reason == (
        "v0 (given with --baseline) served 0 requests here in the last 10m: compared with its "
        "9000 requests in the 1d before it"
    )
    nothing = decide(window, "v2", DEFAULT, history={}, window="10m", lookback="1d")
    assert nothing.verdict is Verdict.UNDECIDED
    assert nothing.locations[0].reason == (
        "no baseline: no other version served successful responses here in the last 10m or the "
        "1d before it"
    )


def test_a_lookback_that_cannot_be_counted_gives_no_baseline() -> None:
    """v2 replaced v1 within the window, and the lookback's counts carry a problem (they
    cannot be told from lifetime counts): no baseline from it (cannot decide, saying why),
    never a comparison with those counts; the lookback's notes are said."""
    window = Traffic({("fra", "v2"): Counts(24_000, 24)})
    problem = "Prometheus has scraped the instances in scope only since 5s before the last 1d"
    history = Traffic({("fra", "v1"): Counts(9_000_000, 9_000)}, ["left out 7 requests"], [problem])
    decision = decide(window, "v2", DEFAULT, history=history, window="10m", lookback="1d")
    assert decision.verdict is Verdict.UNDECIDED, decision.summary
    (fra,) = decision.locations
    assert fra.baseline_version is None and fra.baseline is None
    assert fra.reason == (
        "no baseline: no other version served successful responses here in the last 10m; the "
        f"1d before it cannot be counted: {problem}"
    )
    assert decision.notes == ("in the 1d before the window: left out 7 requests",)


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


def _draw(rng: random.Random, trials: int, probability: float) -> int:
    """A binomial draw: exact for a small mean, the normal approximation for a large one."""
    mean = trials * probability
    if mean < 50:
        return _binomial(rng, trials, probability)
    return min(trials, max(0, round(rng.gauss(mean, math.sqrt(mean * (1 - probability))))))


def test_healthy_rollouts_are_rarely_stopped_by_any_check() -> None:
    """Every check at once, with the default thresholds: over 1,000 simulated healthy
    rollouts across three locations (20,000 requests per version and location on two
    instances each, 0.1% server errors, 5% 404s and 0.5% 401s on both versions), at most 1%
    are stopped, whichever check (5xx ratio, two 4xx shares, traffic per instance)."""
    rng = random.Random(21)
    stopped = 0
    for _ in range(1_000):
        traffic = {}
        for location in ("fra", "iad", "syd"):
            for version in ("v1", "v2"):
                instances = {f"{version}-{i}": round(rng.gauss(10_000, 100)) for i in range(2)}
                total = sum(instances.values())
                codes = {"404": _draw(rng, total, 0.05), "401": _draw(rng, total, 0.005)}
                traffic[(location, version)] = Counts(
                    total,
                    _draw(rng, total, 0.001),
                    codes=codes,
                    instances=instances,
                    exposure=80.0,
                )
        decision = decide(traffic, "v2", DEFAULT)
        stopped += decision.verdict is Verdict.STOP
        assert {check.name for d in decision.locations for check in d.checks} == {
            "5xx ratio",
            "404 share",
            "401 share",
            "traffic per instance",
        }
    assert stopped <= 10


# -- a stop needs the alert's guards too -------------------------------------------------------

CLEAN_BASELINE = Counts(1_000_000, 0, successes=1_000_000)
NO_TRAFFIC_CHECK = Thresholds(traffic_ratio=0)


def test_one_error_on_a_clean_baseline_is_no_stop() -> None:
    """1 error in 600 requests (0.17%) against none in a million: worse at all, and not
    ruled out, but under the 0.2% floor below which the config calls nothing a regression,
    and one error, not the 10 the alert waits for: cannot decide, with the requests that
    would tell (a few thousand), never stop."""
    traffic = {("fra", "v2"): Counts(600, 1, successes=599), ("fra", "v1"): CLEAN_BASELINE}
    decision = decide(traffic, "v2", NO_TRAFFIC_CHECK, window="10m")
    assert decision.verdict is Verdict.UNDECIDED, decision.summary
    check = decision.locations[0].check("5xx ratio")
    assert check is not None and check.verdict is Verdict.UNDECIDED
    assert check.p_worse is not None and check.p_worse <= NO_TRAFFIC_CHECK.alpha
    assert check.reason.startswith(
        "worse than v1 (0.17% errors against 0% on v1) but no regression yet (not above the "
        "0.20% floor and 1 error, fewer than the 10 the config requires), nor ruled out: needs "
        "about "
    )
    assert check.needed_requests is not None and 2_000 < check.needed_requests <= 10_000


def test_a_share_above_its_floor_with_one_response_is_no_stop() -> None:
    """One 500 and one 401 among 302 requests against a clean baseline of 120,000 (what
    SentinelReleaseErrorRatioRegression, with the same thresholds, never fires on): the 5xx
    ratio (0.33%) is above its floor but one error; the 401 share (0.33%) is under the 2%
    floor. Neither stops."""
    new = Counts(302, 1, codes={"401": 1}, successes=300)
    traffic = {("fra", "v2"): new, ("fra", "v1"): Counts(120_000, 0, successes=120_000)}
    decision = decide(traffic, "v2", NO_TRAFFIC_CHECK, window="10m")
    assert decision.verdict is Verdict.UNDECIDED, decision.summary
    for name in ("5xx ratio", "401 share"):
        check = decision.locations[0].check(name)
        assert check is not None and check.verdict is Verdict.UNDECIDED, check
        assert "fewer than the 10 the config requires" in check.reason
    share = decision.locations[0].check("401 share")
    assert share is not None and "not above the 2.0% floor" in share.reason


def test_a_regression_past_the_guards_stops() -> None:
    """12 errors in 600 (2%) against none in a million, and 15 401 responses (2.5%): above
    both floors with the events the config requires: stop, on both checks."""
    new = Counts(600, 12, codes={"401": 15}, successes=573)
    traffic = {("fra", "v2"): new, ("fra", "v1"): CLEAN_BASELINE}
    decision = decide(traffic, "v2", NO_TRAFFIC_CHECK, window="10m")
    assert decision.verdict is Verdict.STOP, decision.summary
    assert decision.summary == "stop: v2 regressed in fra (5xx ratio, 401 share)"


def test_the_guards_come_from_the_config() -> None:
    """regression_min_errors is the gate's guard too; with 0, one error above the floor on a
    clean baseline stops (the exact test alone)."""
    assert Thresholds.from_config(MonitoringConfig(regression_min_errors=3)).min_errors == 3
    traffic = {("fra", "v2"): Counts(300, 1, successes=299), ("fra", "v1"): CLEAN_BASELINE}
    lenient = Thresholds(traffic_ratio=0, min_errors=0)
    assert decide(traffic, "v2", lenient).verdict is Verdict.STOP
    assert decide(traffic, "v2", NO_TRAFFIC_CHECK).verdict is Verdict.UNDECIDED
    with pytest.raises(ValueError, match="min_errors"):
        Thresholds(min_errors=-1)


# -- what the counts could not give -------------------------------------------------------------


def test_problems_of_the_counts_are_cannot_decide_and_notes_are_said() -> None:
    """Counts that carry a problem (Prometheus could not count the window) are "cannot
    decide" with it, whatever they show; their notes are the decision's."""
    healthy = {("fra", "v2"): Counts(20_000, 9), ("fra", "v1"): Counts(20_000, 11)}
    problem = "Prometheus has no sample of the instances in scope from before the window"
    decision = decide(Traffic(healthy, ["a note"], [problem]), "v2", DEFAULT)
    assert decision.verdict is Verdict.UNDECIDED
    assert decision.summary == f"cannot decide: {problem}"
    assert decision.notes == ("a note",)
    decision = decide(Traffic(healthy, ["a note"]), "v2", NO_TRAFFIC_CHECK)
    assert decision.verdict is Verdict.CONTINUE and decision.notes == ("a note",)


@pytest.mark.parametrize("location", ["", "eu west", "fra,iad"])
def test_a_location_sentinel_cannot_report_is_never_judged(location: str) -> None:
    """Counts under a location value sentinel could not have emitted (a series without the
    label, a value with a space) are left out, and said; with nothing else the new version
    cannot be judged (never a continue a state file would record)."""
    traffic = {(location, "v2"): Counts(20_000, 9), (location, "v1"): Counts(20_000, 11)}
    decision = decide(traffic, "v2", NO_TRAFFIC_CHECK, window="10m")
    assert decision.verdict is Verdict.UNDECIDED
    assert decision.summary == (
        "cannot decide: 'v2' served no requests in the window in a location sentinel reports"
    )
    assert decision.notes == (
        f"left out location values sentinel could not have reported: {location!r}",
    )
    traffic |= {("fra", "v2"): Counts(20_000, 9), ("fra", "v1"): Counts(20_000, 11)}
    decision = decide(traffic, "v2", NO_TRAFFIC_CHECK, window="10m")
    assert decision.verdict is Verdict.CONTINUE
    assert [result.location for result in decision.locations] == ["fra"]
    assert decide(traffic, "v2", NO_TRAFFIC_CHECK, locations=[location]).verdict is (
        Verdict.UNDECIDED
    )

"""The per-location tail sampler, driven with an incident-shaped load in simulated time."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter, defaultdict

import pytest
from helpers import record_calls

from sentinel import Config
from sentinel._location import LocationSet
from sentinel._sampling import (
    BURST_ALLOWANCE,
    DROP,
    OVERFLOW_ROUTE,
    KeyCursor,
    Sampler,
    _allocate,
    status_class,
)

SECONDS = 120


def _incident_load(rng: random.Random) -> list[tuple[float, str, int, str, str]]:
    """(time, raw location, status, method, route), sorted by time."""
    events: list[tuple[float, str, int, str, str]] = []

    def stream(location: str, per_second: float, error_ratio: float, routes: list[str]) -> None:
        count = int(per_second * SECONDS)
        for index in range(count):
            moment = index / per_second + rng.random() / per_second
            status = 500 if rng.random() < error_ratio else rng.choice([200, 200, 200, 404])
            events.append(
                (moment, location, status, rng.choice(["GET", "POST"]), rng.choice(routes))
            )

    stream("iad", 2000, 0.002, ["/items/{id}", "/search", "/cart"])  # large, 0.2% 5xx
    stream("fra", 50, 0.20, ["/items/{id}", "/search"])  # small, 20% 5xx
    stream("sin", 2, 0.0, ["/items/{id}"])  # a trickle
    for index in range(SECONDS * 20):  # hostile location values from a header
        raw = "".join(rng.choice("abcxyz-.:\x00\u00e9 ") for _ in range(rng.randrange(1, 80)))
        events.append((index / 20, raw, 200, "GET", "/items/{id}"))
    events.append((100.0, "iad", 200, "GET", "/new-feature"))  # a key appearing late
    events.sort(key=lambda event: event[0])
    return events


def test_incident_replay() -> None:
    """Every 5xx kept everywhere; the big location's 2xx cut >= 100x; the quiet one keeps
    nearly everything; re-weighted counts within 10%; a late new key kept at once; the
    sampler's memory under its bound."""
    rng = random.Random(20261126)
    config = Config(metrics_port=0)
    locations = LocationSet((), config.max_locations)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sampler = Sampler(config)
    truth: Counter[tuple[str, str]] = Counter()
    kept: Counter[tuple[str, str]] = Counter()
    weight: defaultdict[tuple[str, str], float] = defaultdict(float)
    errors_dropped = 0
    late_key_decision = None
    for moment, raw_location, status, method, route in _incident_load(rng):
        location = locations.resolve(raw_location)
        decision = sampler.decide(location, status, method, route, moment)
        key = (location, status_class(status))
        truth[key] += 1
        if decision.keep:
            kept[key] += 1
            weight[key] += decision.sample_rate
        elif status >= 500:
            errors_dropped += 1
        if route == "/new-feature":
            late_key_decision = decision
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    assert errors_dropped == 0
    assert truth[("iad", "2xx")] / kept[("iad", "2xx")] >= 100
    sin_kept = sum(count for (location, _), count in kept.items() if location == "sin")
    sin_truth = sum(count for (location, _), count in truth.items() if location == "sin")
    assert sin_kept >= 0.95 * sin_truth, (sin_kept, sin_truth)
    for key, true_count in truth.items():
        assert abs(weight[key] - true_count) <= 0.10 * true_count, (key, weight[key], true_count)
    assert late_key_decision is not None and late_key_decision.keep
    assert late_key_decision.reason == "new_key"
    held_locations, held_keys = sampler.state_size()
    assert held_locations <= config.max_locations + 2
    assert held_keys <= held_locations * config.max_sampling_keys
    assert memory < 2_000_000, memory


def test_budget_per_location_and_class_is_respected_in_steady_state() -> None:
    """A busy key settles at about its class's target of records per second."""
    sampler = Sampler(Config(metrics_port=0))
    kept = 0
    for index in range(30_000):  # 1,000 requests/s for 30 s
        moment = index / 1000
        if sampler.decide("iad", 200, "GET", "/", moment).keep and moment >= 5:
            kept += 1
    per_second = kept / 25
    assert 1.0 <= per_second <= 4.0, per_second  # the 2xx target is 2/s


def test_a_noisy_location_cannot_starve_a_quiet_one() -> None:
    """Budgets are per location: a flood in one leaves another's sampling untouched."""
    sampler = Sampler(Config(metrics_port=0))
    quiet_kept = quiet_total = 0
    for index in range(60_000):
        moment = index / 2000
        sampler.decide("noisy", 200, "GET", "/", moment)
        if index % 1000 == 0:  # 2 requests/s in the quiet location
            quiet_total += 1
            quiet_kept += sampler.decide("quiet", 200, "GET", "/", moment).keep
    assert quiet_kept == quiet_total


def test_rare_keys_keep_a_higher_rate_than_frequent_ones() -> None:
    """Log-scaled allocation: the rare key's rate is far lower than the busy key's."""
    rates = _allocate([10_000, 10], budget=20)
    assert rates[1] < 3 and rates[0] > 100 * rates[1]
    assert _allocate([5, 5], budget=20) == [1.0, 1.0]


def test_first_occurrence_of_every_key_is_kept() -> None:
    """New keys are kept on their first request, with reason new_key."""
    sampler = Sampler(Config(metrics_port=0))
    for second in range(10):
        for _ in range(1000):
            sampler.decide("iad", 200, "GET", "/busy", second + 0.0001)
    first = sampler.decide("iad", 503, "DELETE", "/rare", 10.5)
    assert first.keep and first.reason == "new_key" and first.sample_rate == 1


def test_every_location_of_a_long_allow_list_has_its_own_budget() -> None:
    """An allow-list longer than max_locations names every value, and the sampler gives
    each its own budget: the first request of each of 100 allowed locations is kept as a
    new key, none folded into a shared ``other``."""
    allowed = tuple(f"loc{n:03d}" for n in range(100))
    sampler = Sampler(Config(metrics_port=0, locations=allowed, location="home"))
    decisions = [sampler.decide(location, 200, "GET", "/", 0.5) for location in allowed]
    assert [d.reason for d in decisions] == ["new_key"] * 100
    assert sampler.decide("home", 200, "GET", "/", 0.5).reason == "new_key"
    assert sampler.state_size()[0] == 101


def test_keys_are_bounded_with_an_overflow_key_and_idle_ones_age_out() -> None:
    """More keys than the bound share the overflow key; unseen keys are forgotten."""
    config = Config(metrics_port=0, max_sampling_keys=10, sampling_idle_seconds=5)
    sampler = Sampler(config)
    decisions = [sampler.decide("iad", 200, "GET", f"/route/{n}", 0.0) for n in range(100)]
    assert sampler.state_size() == (1, 11)  # 10 keys + the overflow key
    assert [d.reason for d in decisions[:11]] == ["new_key"] * 11
    assert all(d.reason != "new_key" for d in decisions[11:])
    assert any(key[2] == OVERFLOW_ROUTE for key in sampler._locations["iad"].keys)
    sampler.decide("iad", 200, "GET", "/route/1", 2.0)  # window rolls; counts reset
    sampler.decide("iad", 200, "GET", "/route/1", 20.0)  # everything else idle > 5 s
    assert sampler.state_size()[1] <= 2


def test_provisional_rate_keeps_errors_and_weights_successes() -> None:
    """Before the first rate computation: every 5xx kept; successes: the first four, then
    powers of two, weighted for the requests in between. (Up to the burst allowance: a key
    busier than that within its first window is rated at once, see the burst tests.)"""
    assert BURST_ALLOWANCE == 16
    sampler = Sampler(Config(metrics_port=0))
    errors = [sampler.decide("iad", 502, "GET", "/", 0.001 * i) for i in range(16)]
    assert all(decision.keep for decision in errors)
    oks = [sampler.decide("iad", 200, "GET", "/ok", 0.001 * i) for i in range(16)]
    assert sum(decision.sample_rate for decision in oks if decision.keep) == 16
    assert sum(decision.keep for decision in oks) == 6  # 1, 2, 3, 4, 8, 16


@pytest.mark.parametrize("status", [200, 301, 404, 503])
def test_status_classes(status: int) -> None:
    """Status codes map to their class."""
    assert status_class(status) == f"{status // 100}xx"


def test_a_lone_error_after_a_storm_and_a_quiet_spell_is_kept() -> None:
    """A rate set during a storm does not outlive it: a key quiet for a window is
    provisional again, so the next 5xx is kept."""
    sampler = Sampler(Config(metrics_port=0))
    for index in range(10_000):  # 5 s of 2,000 errors/s on one key
        sampler.decide("iad", 503, "GET", "/pay", index / 2000)
    lone = [sampler.decide("iad", 503, "GET", "/pay", 35.0 + run) for run in range(10)]
    assert all(decision.keep for decision in lone)


def test_forced_keeps_on_the_overflow_key_keep_estimates_exact() -> None:
    """Force-kept records stand for themselves, also when their key is the overflow key."""
    config = Config(metrics_port=0, max_sampling_keys=5)
    sampler = Sampler(config)
    weight = 0.0
    total = 20_000
    for index in range(total):
        route = f"/r/{index % 50}"  # 50 routes: most share the overflow key
        decision = sampler.decide("iad", 200, "GET", route, index / 1000)
        if index % 2 == 0 and not decision.keep:
            sampler.note_forced("iad", 200, "GET", route)
            weight += 1.0
        elif decision.keep:
            weight += decision.sample_rate
    assert abs(weight - total) <= 0.05 * total, weight


def test_the_first_5xx_of_each_tenant_is_kept_once_within_a_bounded_memory() -> None:
    """first_tenant_error says yes once per tenant, and remembers a bounded number."""
    from sentinel._sampling import MAX_TENANTS_REMEMBERED

    sampler = Sampler(Config())
    assert sampler.first_tenant_error("acme") is True
    assert sampler.first_tenant_error("acme") is False
    for index in range(MAX_TENANTS_REMEMBERED + 10):
        sampler.first_tenant_error(f"t{index}")
    assert len(sampler._tenants_with_error) == MAX_TENANTS_REMEMBERED
    assert sampler.first_tenant_error("acme") is True  # forgotten, oldest first


def test_deciding_a_key_s_requests_together_gives_the_one_by_one_decisions() -> None:
    """kept_among (a batch's requests of one key) keeps exactly the requests one decide()
    per request keeps, with the same decisions: new keys, provisional and sampled rates,
    runs inside one window (credit carried from request to request) and runs a window roll
    cuts, bursts that rate a key again inside its window, keys beyond the bound on the
    overflow key, idle keys forgotten at a roll."""
    rng = random.Random(7)
    config = Config(metrics_port=0, max_sampling_keys=4, sampling_idle_seconds=3)
    one_by_one, together = Sampler(config), Sampler(config)
    bursts = record_calls(together, "_rate_burst")
    now = 0.0
    reasons: Counter[str] = Counter()
    for _ in range(600):
        key = (rng.choice(["iad", "fra"]), rng.choice([200, 500]), "GET", f"/r{rng.randrange(7)}")
        if rng.random() < 0.5:  # a busy run inside one window: sampled hard once rated
            steps, size = [0.0001, 0.001], rng.randrange(1, 200)
        else:  # a run that spans window rolls and idle spells
            steps, size = [0.001, 0.01, 0.2, 1.5], rng.randrange(1, 40)
        ends = []
        for _ in range(size):
            now += rng.choice(steps)
            ends.append(now)
        location, status, method, route = key
        expected = [one_by_one.decide(location, status, method, route, end) for end in ends]
        kept = together.kept_among(location, status, method, route, ends)
        decided = [DROP] * len(ends)
        for index, decision in kept:
            decided[index] = decision
        assert decided == expected
        assert all(decision.keep for _, decision in kept)
        reasons.update(decision.reason for decision in expected)
    assert one_by_one.state_size() == together.state_size()
    assert together.kept_among("iad", 200, "GET", "/r1", []) == []
    # Every kind of decision was compared, and most requests were dropped by a rate.
    assert set(reasons) == {"new_key", "provisional", "sampled", "sampled_out"}
    assert reasons["sampled_out"] > reasons["sampled"] > 100
    assert len(bursts) > 10  # keys rated again inside a window, in both samplers alike


def test_a_key_s_cursor_gives_the_one_by_one_decisions() -> None:
    """A cursor per key (what the middleware keeps for each label set) decides exactly as
    decide() does, with requests of many keys interleaved: rated keys inside a window,
    window rolls another key's request sets off, bursts, new and provisional keys, keys on
    the overflow key, idle keys forgotten at a roll, locations beyond the bound, and
    requests decided after a roll although they ended before it."""
    rng = random.Random(11)
    config = Config(metrics_port=0, max_sampling_keys=6, sampling_idle_seconds=3, max_locations=2)
    one_by_one, cursors = Sampler(config), Sampler(config)
    held: dict[tuple[str, int, str, str], KeyCursor] = {}
    fast = [0]
    now = 0.0
    reasons: Counter[str] = Counter()
    for _ in range(60_000):
        now += rng.choice([0.00005, 0.0002, 0.001, 0.01] if rng.random() < 0.999 else [1.5, 4.0])
        key = (
            rng.choice(["iad", "fra", "sin", "gru"]),
            rng.choice([200, 200, 200, 404, 503]),
            rng.choice(["GET", "POST"]),
            f"/r{min(rng.randrange(12), rng.randrange(12))}",
        )
        cursor = held.get(key)
        if cursor is None:
            cursor = held[key] = cursors.cursor(*key)
        entry = cursor._entry
        # Now and then a request that ended a little before the last one (another thread's,
        # decided after it), so some are decided after a roll their end precedes.
        ended = now - rng.uniform(0, 0.003) if rng.random() < 0.05 else now
        expected = one_by_one.decide(*key, ended)
        assert cursor.decide(ended) == expected
        fast[0] += entry is not None and cursor._entry is entry and expected.reason != "new_key"
        reasons[expected.reason] += 1
    assert one_by_one.state_size() == cursors.state_size()
    assert set(reasons) == {"new_key", "provisional", "sampled", "sampled_out"}
    assert reasons["sampled_out"] > reasons["sampled"] > 100
    assert fast[0] > 30_000  # most requests took the cursor's own path


def test_a_cursor_looks_again_after_a_roll_it_did_not_see() -> None:
    """A key on the overflow key, a roll that forgets idle keys (a slot is free again), then a
    request of that key that ended before the roll but is decided after it (another
    thread's): decide() gives the key its own entry (a new key); a cursor that kept using
    the overflow entry it found would say "sampled"."""
    config = Config(metrics_port=0, max_sampling_keys=3, sampling_idle_seconds=1)
    one_by_one, cursors = Sampler(config), Sampler(config)
    cursor = cursors.cursor("iad", 200, "GET", "/c")
    for sampler in (one_by_one, cursors):
        sampler.decide("iad", 200, "GET", "/idle1", 0.0)
        sampler.decide("iad", 200, "GET", "/idle2", 0.1)
        sampler.decide("iad", 200, "GET", "/a", 1.5)  # a roll; the keys are full
    assert one_by_one.decide("iad", 200, "GET", "/c", 1.6) == cursor.decide(1.6)  # overflow
    for sampler in (one_by_one, cursors):
        sampler.decide("iad", 200, "GET", "/a", 2.7)  # a roll: both idle keys forgotten
    expected = one_by_one.decide("iad", 200, "GET", "/c", 2.4)
    assert expected.reason == "new_key"
    assert cursor.decide(2.4) == expected
    assert one_by_one.state_size() == cursors.state_size()


def _replay(sampler: Sampler, status: int, ends: list[float], batch: int) -> tuple[int, float]:
    """Decide one key's requests ending at ``ends``, one by one (``batch`` 1) or in runs of
    ``batch`` as the middleware's batches do: (records kept from t = 10 s on, the weight of
    every record kept)."""
    kept_late, weight = 0, 0.0
    for start in range(0, len(ends), batch):
        run = ends[start : start + batch]
        if batch == 1:
            decision = sampler.decide("iad", status, "GET", "/", run[0])
            kept = [(0, decision)] if decision.keep else []
        else:
            kept = sampler.kept_among("iad", status, "GET", "/", run)
        for index, decision in kept:
            weight += decision.sample_rate
            kept_late += run[index] >= 10
    return kept_late, weight


BURST = [10 + index / 10_000 for index in range(30_000)]  # 10,000 requests/s for 3 s


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize(
    ("status", "before"),
    [
        (200, [float(second) for second in range(10)]),  # 1/s for 10 s: its rate is 1
        (503, []),  # a new key
    ],
    ids=["2xx-after-a-quiet-spell", "5xx-storm-on-a-new-key"],
)
def test_a_burst_keeps_about_its_target_not_every_record(
    status: int, before: list[float], batch: int
) -> None:
    """A key whose rate was set while it was quiet (keep everything), or a new key
    (provisional: every 5xx kept), does not keep every record of the burst that follows
    until its window ends: past its burst allowance it is rated again at once, and keeps
    about its class's target (2/s for 2xx, 20/s for 5xx) instead of
    10,000 records in the burst's first second. Weights stay exact: what the kept records
    stand for, plus the credit the key holds, is every request."""
    sampler = Sampler(Config(metrics_port=0))
    kept_in_burst, weight = _replay(sampler, status, before + BURST, batch)
    target = 2 if status == 200 else 20
    assert kept_in_burst <= BURST_ALLOWANCE + 3 * target + 8, kept_in_burst
    credit = sampler._locations["iad"].keys[(status, "GET", "/")].credit
    assert weight + credit == pytest.approx(len(before) + len(BURST))


def test_keys_at_a_steady_pace_are_not_taken_for_a_burst() -> None:
    """Many keys, each at a steady pace: their requests per window wander around what
    their rates were set for and stay inside the burst bound, so they are rated once a
    window, as without the guard."""
    sampler = Sampler(Config(metrics_port=0))
    bursts = record_calls(sampler, "_rate_burst")
    rng = random.Random(3)
    kept = 0
    for index in range(4000 * 6):  # 200 keys at 20 requests/s each, for 6 s
        moment = index / 4000
        decision = sampler.decide("iad", 200, "GET", f"/r{rng.randrange(200)}", moment)
        kept += decision.keep and moment >= 2
    assert [moment for _, _, moment in bursts if moment >= 2] == []
    assert kept / 4 < 300, kept / 4  # at least one record per key and window: about 200/s

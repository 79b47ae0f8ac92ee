"""The rollout gate's error rates on simulated rollouts: ``python -m bench.gate``.

Every rollout spans three locations. In each, the baseline release and the new release
serve the same number of requests over the window, on two instances each, with 0.1% server
errors, 5% 404s and 0.5% 401s. A *healthy* rollout's new release behaves exactly like the
baseline; a *regressed* one fails 0.5% (5x the baseline) in one location. Every rollout
goes through the gate's own decision code (``sentinel.gate.decide``: the 5xx ratio, each
4xx code's share and the traffic per instance, in every location) with the thresholds of
the default monitoring config, and the benchmark counts:

- false stops: healthy rollouts stopped (target: at most 1%);
- detection: regressed rollouts stopped naming the regressed location (target: at least
  99%);
- "cannot decide" among the healthy ones (traffic too little to rule a regression out);

at several traffic levels (requests per release and location), and prints the traffic the
gate itself asks for at a 0.1% baseline. A regression of exactly the configured factor is
the boundary the test is built on: its detection levels off near 1 - alpha / 2 (99.5% at
the default 99% confidence), however much traffic there is.

Counts are drawn exactly (binomial by geometric gaps) when their mean is small, from the
normal approximation when it is large; a fixed seed makes a run repeatable. Bounded:
``--seconds`` caps the run (a level stops early, and says how many rollouts it ran).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sentinel.gate import Counts, Thresholds, Verdict, decide
from sentinel.mixin import MonitoringConfig

LOCATIONS = ("fra", "iad", "sin")
REGRESSED_LOCATION = "fra"
INSTANCES = 2
WINDOW_SECONDS = 600.0
"""A 10-minute window: how long each instance is up in it (its exposure)."""
BASELINE_ERRORS = 0.001
REGRESSION = 5.0
CODES = {"404": 0.05, "401": 0.005}
FALSE_STOP_TARGET = 0.01
DETECTION_TARGET = 0.99
_EXACT_BELOW = 50.0


@dataclass
class Level:
    """The outcomes at one traffic level."""

    requests: int
    healthy: int = 0
    false_stops: int = 0
    healthy_undecided: int = 0
    regressed: int = 0
    detected: int = 0

    @property
    def false_stop_rate(self) -> float:
        return self.false_stops / self.healthy if self.healthy else math.nan

    @property
    def undecided_rate(self) -> float:
        return self.healthy_undecided / self.healthy if self.healthy else math.nan

    @property
    def detection_rate(self) -> float:
        return self.detected / self.regressed if self.regressed else math.nan


def draw(rng: random.Random, trials: int, probability: float) -> int:
    """A binomial draw: exact by geometric gaps for a small mean, else the normal
    approximation (rounded and kept within 0..trials)."""
    mean = trials * probability
    if probability <= 0 or trials <= 0:
        return 0
    if mean >= _EXACT_BELOW:
        spread = math.sqrt(mean * (1.0 - probability))
        return min(trials, max(0, round(rng.gauss(mean, spread))))
    count, position, log_miss = 0, 0, math.log1p(-probability)
    while True:
        position += int(math.log(1.0 - rng.random()) / log_miss) + 1
        if position > trials:
            return count
        count += 1


def served(rng: random.Random, requests: int, error_ratio: float) -> Counts:
    """What one release served in one location: ``requests`` on average, spread over its
    instances (Poisson traffic), with the error ratio and the 4xx shares of :data:`CODES`."""
    per_instance = {
        f"instance-{index}": max(
            0, round(rng.gauss(requests / INSTANCES, math.sqrt(requests / INSTANCES)))
        )
        for index in range(INSTANCES)
    }
    total = sum(per_instance.values())
    errors = draw(rng, total, error_ratio)
    codes = {code: draw(rng, total, share) for code, share in CODES.items()}
    successes = max(0, total - errors - sum(codes.values()))
    return Counts(
        total,
        errors,
        codes={code: count for code, count in codes.items() if count},
        successes=successes,
        instances=per_instance,
        exposure=INSTANCES * WINDOW_SECONDS,
    )


def rollout(
    rng: random.Random, requests: int, regressed: bool, thresholds: Thresholds
) -> tuple[Verdict, tuple[str, ...]]:
    """One simulated rollout through the gate's decision: its verdict and the locations
    it stopped."""
    traffic = {}
    for location in LOCATIONS:
        new_ratio = BASELINE_ERRORS
        if regressed and location == REGRESSED_LOCATION:
            new_ratio = BASELINE_ERRORS * REGRESSION
        traffic[(location, "v1")] = served(rng, requests, BASELINE_ERRORS)
        traffic[(location, "v2")] = served(rng, requests, new_ratio)
    decision = decide(traffic, "v2", thresholds, window="10m")
    return decision.verdict, decision.stopped


def asked_for(thresholds: Thresholds) -> int | None:
    """The requests per release the gate says it needs at a 0.1% baseline (a location it
    cannot decide yet: a new release with a few hundred requests, a busy baseline)."""
    baseline = Counts(1_000_000, round(1_000_000 * BASELINE_ERRORS))
    new = Counts(thresholds.min_requests + 100, 0)
    decision = decide({("fra", "v2"): new, ("fra", "v1"): baseline}, "v2", thresholds)
    return decision.locations[0].needed_requests


def run_level(
    requests: int, rollouts: int, thresholds: Thresholds, seed: int, deadline: float
) -> Level:
    """``rollouts`` healthy and as many regressed rollouts at ``requests`` per release and
    location (fewer if ``deadline``, a monotonic time, passes first)."""
    rng = random.Random(seed * 1_000_003 + requests)
    level = Level(requests)
    for _ in range(rollouts):
        if time.monotonic() > deadline:
            break
        verdict, _ = rollout(rng, requests, False, thresholds)
        level.healthy += 1
        level.false_stops += verdict is Verdict.STOP
        level.healthy_undecided += verdict is Verdict.UNDECIDED
        verdict, stopped = rollout(rng, requests, True, thresholds)
        level.regressed += 1
        level.detected += verdict is Verdict.STOP and REGRESSED_LOCATION in stopped
    return level


def main(argv: Sequence[str] | None = None) -> int:
    """Run the levels and print the table; exit 0 when both targets are met at some level."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gate",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--rollouts", type=int, default=5000, help="healthy and regressed rollouts per level"
    )
    parser.add_argument(
        "--traffic",
        default="5000,10000,15000,20000,30000",
        help="requests per release and location, comma-separated",
    )
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--seconds", type=float, default=240.0, help="stop after this long")
    args = parser.parse_args(argv)
    try:
        levels = [int(part) for part in args.traffic.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--traffic must be whole numbers separated by commas: {args.traffic!r}")
    if not levels or min(levels) <= 0 or args.rollouts <= 0 or args.seconds <= 0:
        parser.error("--traffic, --rollouts and --seconds must be positive")
    thresholds = Thresholds.from_config(MonitoringConfig())
    print(
        f"sentinel gate on simulated rollouts: {len(LOCATIONS)} locations, {INSTANCES} "
        f"instances per release and location, {BASELINE_ERRORS:.1%} server errors, "
        + ", ".join(f"{share:.1%} {code}" for code, share in CODES.items())
        + f" on both releases; the regression: {REGRESSION:g}x the server errors in "
        f"{REGRESSED_LOCATION}.\nThresholds (the default config): factor {thresholds.factor:g}, "
        f"floor {thresholds.min_ratio:.2%}, 4xx floor {thresholds.shift_min_ratio:.0%}, "
        f"{thresholds.min_requests} requests, confidence {thresholds.confidence:.0%}, "
        f"traffic ratio {thresholds.traffic_ratio:g}.\n"
    )
    header = (
        f"{'requests per release':>22}  {'rollouts':>8}  {'false stops':>11}  "
        f"{'undecided (healthy)':>19}  {'5x detected':>11}"
    )
    print(header)
    started = time.monotonic()
    deadline = started + args.seconds
    results = []
    for requests in levels:
        level = run_level(requests, args.rollouts, thresholds, args.seed, deadline)
        results.append(level)
        print(
            f"{requests:>22}  {level.healthy:>8}  {level.false_stop_rate:>11.2%}  "
            f"{level.undecided_rate:>19.2%}  {level.detection_rate:>11.2%}",
            flush=True,
        )
    needed = asked_for(thresholds)
    met = [
        level
        for level in results
        if level.healthy
        and level.false_stop_rate <= FALSE_STOP_TARGET
        and level.detection_rate >= DETECTION_TARGET
    ]
    worst = max((level.false_stop_rate for level in results if level.healthy), default=math.nan)
    print(
        f"\nThe gate asks for about {needed} requests per release and location at a "
        f"{BASELINE_ERRORS:.1%} baseline."
    )
    print(f"False stops: at most {worst:.2%} at any level (target <= {FALSE_STOP_TARGET:.0%}).")
    if met:
        first = met[0]
        print(
            f"Detection of a {REGRESSION:g}x regression of a {BASELINE_ERRORS:.1%} baseline: "
            f"{first.detection_rate:.2%} at {first.requests} requests per release and "
            f"location (target >= {DETECTION_TARGET:.0%}), with {first.false_stop_rate:.2%} "
            "false stops: both targets met."
        )
    else:
        print("Both targets were not met together at any level tried.")
    print(f"({time.monotonic() - started:.0f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

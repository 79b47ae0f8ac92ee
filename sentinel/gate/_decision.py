"""The rollout decision: in every location, is the new release a regression against the
baseline release, judged as counts rather than as noisy ratios (:mod:`._checks`), and does
every instance on it report the expected environment?

Events are counted as Poisson counts, so given the total of both versions the new version's
part is binomial, which gives exact one-sided tests of the rate ratio at
``regression_confidence`` (alpha = 1 - confidence):

- *worse*: the new version is worse than the baseline (ratio 1 rejected, one-sided), with
  alpha split over every check that reaches the test in every location, so that a healthy
  rollout is stopped at most alpha of the time however many locations and codes it spans;
- *ruled out*: a regression is excluded (ratio below the factor, or below the floor: either
  test at alpha / 2; for the traffic, above the drop ratio at alpha), so that a regression
  slips through at most alpha of the time per location (a regression of exactly the
  factor is caught at least 1 - alpha / 2 of the time, with traffic enough; a drop of
  exactly the drop ratio is stopped about half the time, and cannot be decided otherwise).

Ruled out everywhere: continue (exit 0). Worse, not ruled out and past the alert's guards
(above the floor, at least ``regression_min_errors`` events; for the traffic, a rate seen
under the drop ratio) anywhere, or an instance on the new version in scope that reports
another environment: stop (exit 1); below ``regression_min_requests`` requests only a
release that fails most of what it serves stops, and nothing continues. Otherwise too
little traffic to tell the configured factor from noise, nothing to compare with, or
counts Prometheus could not give (:class:`Traffic` problems, a lookback's included: then no
baseline from it): cannot decide (exit 2), with the requests it would take. A location
value sentinel could not have reported is never judged (nor recorded in a state file): it
is left out, and the notes say so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .._config import is_valid_location
from ._baseline import choose_baseline, locations_to_judge
from ._checks import plan_location
from ._model import (
    ENVIRONMENT_CHECK,
    Counts,
    EnvironmentMismatch,
    GateDecision,
    LocationDecision,
    Thresholds,
    Traffic,
    Verdict,
    undecided,
)


def decide(
    traffic: Mapping[tuple[str, str], Counts],
    new_version: str,
    thresholds: Thresholds,
    *,
    versions: Iterable[str] = (),
    baseline_version: str | None = None,
    locations: Iterable[str] = (),
    history: Mapping[tuple[str, str], Counts] | None = None,
    window: str | None = None,
    lookback: str | None = None,
    mismatches: Sequence[EnvironmentMismatch] = (),
    environment: str | None = None,
) -> GateDecision:
    """Judge ``new_version`` in every location it served (or in ``locations``) against
    ``baseline_version``, or, when None, the other version with the most successful
    responses in that location. ``traffic`` maps (location, version) to counts over the
    ``window``; ``history`` the same over the ``lookback`` before it, where a baseline is
    looked for when the new version already replaced it in the window. ``versions`` are the
    versions the instances in scope reported; ``mismatches`` the instances on the new
    version that report another ``environment``.

    ``traffic`` read by :meth:`Observation.counts` (a :class:`Traffic`) brings its notes,
    said in the decision, and its problems: any is "cannot decide". A ``history`` with
    problems gives no baseline (each location that needs one says why); its notes are said
    too. Locations sentinel could not have reported (in ``traffic`` or ``locations``) are
    left out, and said."""
    notes = list(traffic.notes) if isinstance(traffic, Traffic) else []
    locations = list(locations)
    if isinstance(traffic, Traffic) and traffic.problems:
        return undecided(
            new_version, "cannot decide: " + "; ".join(traffic.problems), environment, notes
        )
    history_problems: tuple[str, ...] = ()
    if isinstance(history, Traffic):
        before = f"the {lookback} before the window" if lookback else "the lookback"
        notes.extend(f"in {before}: {note}" for note in history.notes)
        history_problems = history.problems
    known = set(versions) | {version for _, version in traffic}
    if history is not None:
        known |= {version for _, version in history}
    unreported = sorted({location for location, _ in traffic if not is_valid_location(location)})
    unreported += [location for location in locations if not is_valid_location(location)]
    if unreported:
        notes.append(
            "left out location values sentinel could not have reported: "
            + ", ".join(repr(location) for location in dict.fromkeys(unreported))
        )
        traffic = {key: counts for key, counts in traffic.items() if is_valid_location(key[0])}
        if history is not None:
            history = {key: c for key, c in history.items() if is_valid_location(key[0])}
        asked = bool(locations)
        locations = [location for location in locations if is_valid_location(location)]
        if asked and not locations:
            return undecided(new_version, "cannot decide: no location to judge", environment, notes)
    for role, version in (("new", new_version), ("baseline", baseline_version)):
        if version is not None and version not in known:
            listed = ", ".join(sorted(known)) or "none"
            return undecided(
                new_version,
                f"cannot decide: no instance in scope reported the {role} version "
                f"{version!r} in the window (versions seen: {listed})",
                environment,
                notes,
            )
    if baseline_version == new_version:
        return undecided(
            new_version,
            f"cannot decide: the baseline is the new version {new_version!r}",
            environment,
            notes,
        )
    wanted = locations_to_judge(traffic, new_version, locations)
    mismatches = tuple(mismatches)
    if not wanted and not mismatches:
        return undecided(
            new_version,
            f"cannot decide: {new_version!r} served no requests in the window"
            + (" in a location sentinel reports" if unreported else ""),
            environment,
            notes,
        )
    period = f"the last {window}" if window else "the window"
    sides = []
    for location in wanted:
        new = traffic.get((location, new_version), Counts(0, 0))
        choice = choose_baseline(
            traffic,
            history,
            location,
            new_version,
            baseline_version,
            thresholds,
            period,
            lookback,
            history_problems,
        )
        sides.append((location, new, choice))
    plans = [
        plan_location(
            location,
            new_version,
            new,
            choice,
            thresholds,
            [mismatch for mismatch in mismatches if location in mismatch.locations],
        )
        for location, new, choice in sides
    ]
    # Every check that reaches the test shares the false-stop probability.
    comparisons = max(1, sum(len(plan.tests) for plan in plans))
    results = tuple(plan.judge(thresholds, comparisons) for plan in plans)
    verdict = _overall(results, mismatches)
    summary = _summary(results, mismatches, new_version)
    return GateDecision(
        verdict, summary, new_version, results, mismatches, environment, tuple(notes)
    )


def _overall(
    results: tuple[LocationDecision, ...], mismatches: tuple[EnvironmentMismatch, ...]
) -> Verdict:
    kinds = {result.verdict for result in results}
    if mismatches or Verdict.STOP in kinds:
        return Verdict.STOP
    if Verdict.UNDECIDED in kinds or not kinds:
        return Verdict.UNDECIDED
    return Verdict.CONTINUE


def _summary(
    results: tuple[LocationDecision, ...],
    mismatches: tuple[EnvironmentMismatch, ...],
    new_version: str,
) -> str:
    stopped = [r for r in results if r.verdict is Verdict.STOP]
    if mismatches or stopped:
        parts = [mismatch.describe() for mismatch in mismatches]
        regressed = []
        for result in stopped:
            names = [
                check.name
                for check in result.checks
                if check.verdict is Verdict.STOP and check.name != ENVIRONMENT_CHECK
            ]
            if names:
                regressed.append(f"{result.location} ({', '.join(names)})")
        if regressed:
            parts.append(f"{new_version} regressed in {', '.join(regressed)}")
        return "stop: " + "; ".join(parts)
    waiting = [r for r in results if r.verdict is Verdict.UNDECIDED]
    if waiting:
        where = ", ".join(r.location for r in waiting)
        return f"cannot decide: {new_version} cannot be judged yet in {where}"
    where = ", ".join(r.location for r in results)
    return f"continue: no regression of {new_version} in {where}"

"""Which release the new one is compared with in each location: ``--baseline``, else the
other release with the most successful (1xx-3xx) responses there in the window, in the
environment the gate judges. When the new release already replaced it there (or it served
fewer requests than the config requires), it is looked for in the lookback before the
window. Each choice says which and why."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._model import Counts, Thresholds

DEFAULT_LOOKBACK = "1d"
"""How far before the window a baseline the new release replaced is looked for (scaled by
the monitoring config's ``time_scale``; ``sentinel gate --lookback``)."""


@dataclass(frozen=True)
class Choice:
    """The baseline of one location: the release, its counts, from which period, and why."""

    version: str | None
    counts: Counts | None
    period: str | None
    reason: str


def needs_history(
    traffic: Mapping[tuple[str, str], Counts],
    new_version: str,
    thresholds: Thresholds,
    *,
    baseline_version: str | None = None,
    locations: Iterable[str] = (),
) -> bool:
    """Whether a location to judge has no baseline in the window with requests enough
    (the new version replaced it): then the lookback before the window is asked for one."""
    for location in locations_to_judge(traffic, new_version, locations):
        if traffic.get((location, new_version), Counts(0, 0)).requests == 0:
            continue
        if _window_candidate(traffic, location, new_version, baseline_version, thresholds) is None:
            return True
    return False


def locations_to_judge(
    traffic: Mapping[tuple[str, str], Counts], new_version: str, locations: Iterable[str]
) -> list[str]:
    """``locations``, or every location where the new version served requests or has
    instances that count with none there (:meth:`Observation.counts`: its instances that
    served nothing anywhere, a black hole)."""
    return list(dict.fromkeys(locations)) or sorted(
        {
            location
            for (location, version), counts in traffic.items()
            if version == new_version and (counts.requests > 0 or counts.instances)
        }
    )


def _candidates(
    traffic: Mapping[tuple[str, str], Counts], location: str, new_version: str
) -> list[tuple[str, Counts]]:
    """The other versions with successful responses here, the most successful first (ties
    by name, so that the choice is stable)."""
    found = [
        (version, counts)
        for (where, version), counts in traffic.items()
        if where == location and version != new_version and counts.healthy > 0
    ]
    return sorted(found, key=lambda item: (-item[1].healthy, item[0]))


def _window_candidate(
    traffic: Mapping[tuple[str, str], Counts],
    location: str,
    new_version: str,
    baseline_version: str | None,
    thresholds: Thresholds,
) -> tuple[str, Counts] | None:
    """The baseline from the window, if it served requests enough to compare with."""
    enough = max(thresholds.min_requests, 1)
    if baseline_version is not None:
        counts = traffic.get((location, baseline_version))
        return (baseline_version, counts) if counts and counts.requests >= enough else None
    candidates = _candidates(traffic, location, new_version)
    if candidates and candidates[0][1].requests >= enough:
        return candidates[0]
    return None


def choose_baseline(
    traffic: Mapping[tuple[str, str], Counts],
    history: Mapping[tuple[str, str], Counts] | None,
    location: str,
    new_version: str,
    given: str | None,
    thresholds: Thresholds,
    period: str,
    lookback: str | None,
    history_problems: Sequence[str] = (),
) -> Choice:
    """The baseline of ``location``: from the window, else from ``history`` (the lookback
    before it), unless ``history_problems`` say its counts cannot be judged; then the
    reason says why no lookback baseline was taken."""
    before = f"the {lookback} before it" if lookback else "the lookback before it"
    unusable = ""
    if history_problems:
        history = None
        unusable = f"; {before} cannot be counted: {'; '.join(history_problems)}"
    found = _window_candidate(traffic, location, new_version, given, thresholds)
    if found is not None:
        version, counts = found
        if given is not None:
            reason = f"{version}, given with --baseline"
        else:
            reason = (
                f"{version}, the other version with the most successful responses here in "
                f"{period} ({counts.healthy} of {counts.requests} requests)"
            )
            others = _candidates(traffic, location, new_version)[1:]
            if others:
                reason += "; also here: " + ", ".join(
                    f"{other} ({other_counts.healthy})" for other, other_counts in others[:3]
                )
        return Choice(version, counts, "window", reason)
    # The new version replaced the baseline here (or it served too little to compare with).
    if given is not None:
        small = traffic.get((location, given))
        served = small.requests if small is not None else 0
        now = f"{given} (given with --baseline) served {served} requests here in {period}"
        past = history.get((location, given)) if history is not None else None
        if past is not None and past.requests > 0:
            reason = f"{now}: compared with its {past.requests} requests in {before}"
            return Choice(given, past, "lookback", reason)
        if small is not None and small.requests > 0:
            reason = (
                f"{now}, fewer than the {thresholds.min_requests} the config requires{unusable}"
            )
            return Choice(given, small, "window", reason)
        searched = f" or {before}" if history is not None else ""
        reason = (
            f"{given} (given with --baseline) served no requests here in {period}{searched}"
            f"{unusable}"
        )
        return Choice(None, None, None, reason)
    small_candidates = _candidates(traffic, location, new_version)
    now = (
        f"the other versions served fewer than {thresholds.min_requests} requests here in {period}"
        if small_candidates
        else f"{new_version} replaced every other version here within {period}"
    )
    past_candidates = _candidates(history, location, new_version) if history is not None else []
    if past_candidates:
        version, counts = past_candidates[0]
        return Choice(
            version,
            counts,
            "lookback",
            f"{version}: {now}; {version} served the most successful responses here in "
            f"{before} ({counts.healthy} of {counts.requests} requests)",
        )
    if small_candidates:
        version, counts = small_candidates[0]
        return Choice(version, counts, "window", f"{version}: {now}, the most of them{unusable}")
    return Choice(
        None,
        None,
        None,
        f"no other version served successful responses here in {period}"
        + (f" or {before}" if history is not None else "")
        + unusable,
    )

"""The gate's decision for people (an aligned plain-text table, readable in any CI log) and
for machines (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._model import (
    Check,
    Counts,
    EnvironmentMismatch,
    GateDecision,
    LocationDecision,
    Verdict,
    format_ratio,
)

_HEADER = (
    "LOCATION",
    "VERSION",
    "ROLE",
    "INSTANCES",
    "REQUESTS",
    "PER INSTANCE",
    "5XX",
    "5XX RATIO",
    "TOP 4XX",
    "VERDICT",
)
_RIGHT = {"INSTANCES", "REQUESTS", "PER INSTANCE", "5XX", "5XX RATIO"}


def render_table(decision: GateDecision, context: Mapping[str, Any]) -> str:
    """The instances on the new version that report another environment; what the gate
    left out or counted specially (``note:`` lines); a table of every
    location judged (the new version and its baseline: requests, per instance, 5xx, the
    4xx code that moved most); per location the baseline chosen and why and each check's
    verdict; and the decision on the last line. ``context`` says what was asked
    (``window``, ``baseline``, ``confidence``, ``prometheus``) and, with a state file,
    ``state`` (``file``, ``recorded``, ``message``)."""
    against = context.get("baseline") or (
        "the other version with the most successful responses in each location"
    )
    scope = f" in {decision.environment}" if decision.environment else ""
    lines = [
        f"sentinel gate: {decision.new_version}{scope} against {against}, over the last "
        f"{context.get('window', '?')} (confidence {_percent(context.get('confidence'))})",
    ]
    if decision.mismatches:
        lines.append("")
        lines.extend(f"environment: {mismatch.describe()}" for mismatch in decision.mismatches)
    if decision.notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in decision.notes)
    if decision.locations:
        rows: list[tuple[str, ...]] = [_HEADER]
        for result in decision.locations:
            code = _top_code(result)
            rows.append(_row(result.location, result.new_version, "new", result.new, code, result))
            if result.baseline_version is not None and result.baseline is not None:
                role = "baseline" if result.baseline_period == "window" else "baseline (earlier)"
                rows.append(_row("", result.baseline_version, role, result.baseline, code, None))
        widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADER))]
        lines.append("")
        for row in rows:
            cells = [
                cell.rjust(width) if _HEADER[column] in _RIGHT else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        for result in decision.locations:
            lines.extend(_explain(result))
    state = context.get("state")
    if isinstance(state, Mapping) and state.get("message"):
        lines.append("")
        lines.append(f"state: {state['message']}")
    lines.append("")
    lines.append(decision.summary)
    return "\n".join(lines) + "\n"


def render_json(
    decision: GateDecision, context: Mapping[str, Any], exit_code: int | None = None
) -> str:
    """The decision as one JSON object (``verdict``, ``exit_code``, ``summary``,
    ``environment``, ``stopped_locations``, ``environment_mismatches``, one entry per
    location with both versions' counts and instances, the baseline and why, every check
    with its p-values, and ``notes``: what the gate left out or counted specially), with
    ``context`` merged in. ``exit_code``: the process's, when it
    is not the decision's (2 for a continue the state file could not record)."""
    document = {
        "verdict": decision.verdict.value,
        "exit_code": decision.exit_code if exit_code is None else exit_code,
        "summary": decision.summary,
        "new_version": decision.new_version,
        "environment": decision.environment,
        **context,
        "stopped_locations": list(decision.stopped),
        "environment_mismatches": [_mismatch_json(m) for m in decision.mismatches],
        "notes": list(decision.notes),
        "locations": [location_json(result) for result in decision.locations],
    }
    return json.dumps(document, indent=2) + "\n"


def location_json(result: LocationDecision) -> dict[str, Any]:
    """One location's verdict and evidence, as JSON-ready values (also what the state file
    keeps as the evidence of a known-good release)."""
    baseline = _counts_json(result.baseline_version, result.baseline)
    if baseline is not None:
        baseline["period"] = result.baseline_period
    return {
        "location": result.location,
        "verdict": result.verdict.value,
        "reason": result.reason,
        "new": _counts_json(result.new_version, result.new),
        "baseline": baseline,
        "baseline_reason": result.baseline_reason,
        "checks": [_check_json(check) for check in result.checks],
        "notes": list(result.notes),
        "needed_requests": result.needed_requests,
    }


def _counts_json(version: str | None, counts: Counts | None) -> dict[str, Any] | None:
    if version is None or counts is None:
        return None
    return {
        "version": version,
        "requests": counts.requests,
        "errors": counts.errors,
        "ratio": counts.ratio,
        "successes": counts.healthy,
        "codes": dict(counts.codes),
        "instances": dict(counts.instances),
        "per_instance": counts.per_instance,
    }


def _check_json(check: Check) -> dict[str, Any]:
    return {
        "name": check.name,
        "verdict": check.verdict.value,
        "reason": check.reason,
        "new": check.new_value,
        "baseline": check.baseline_value,
        "p_worse": check.p_worse,
        "p_regression": check.p_regression,
        "needed_requests": check.needed_requests,
    }


def _mismatch_json(mismatch: EnvironmentMismatch) -> dict[str, Any]:
    return {
        "instance": mismatch.instance,
        "job": mismatch.job,
        "version": mismatch.version,
        "environment": mismatch.environment,
        "expected": mismatch.expected,
        "locations": list(mismatch.locations),
        "requests": mismatch.requests,
        "message": mismatch.describe(),
    }


def _top_code(result: LocationDecision) -> str | None:
    """The 4xx code to show: a stopped one first, else the new version's largest share."""
    shares = [check for check in result.checks if check.name.endswith(" share")]
    if not shares and result.new.codes:
        return max(result.new.codes, key=lambda code: (result.new.codes[code], code))
    if not shares:
        return None
    order = {Verdict.STOP: 0, Verdict.UNDECIDED: 1, Verdict.CONTINUE: 2}
    chosen = min(shares, key=lambda check: (order[check.verdict], -(check.new_value or 0.0)))
    return chosen.name.removesuffix(" share")


def _row(
    location: str,
    version: str,
    role: str,
    counts: Counts,
    code: str | None,
    result: LocationDecision | None,
) -> tuple[str, ...]:
    per_instance = counts.per_instance
    top = f"{code} {format_ratio(counts.share(code))}" if code is not None else "-"
    return (
        location,
        version,
        role,
        str(len(counts.instances)) if counts.instances else "-",
        str(counts.requests),
        "-" if per_instance is None else f"{per_instance:.0f}",
        str(counts.errors),
        format_ratio(counts.ratio),
        top,
        result.verdict.value.upper() if result is not None else "",
    )


def _explain(result: LocationDecision) -> list[str]:
    """The location's verdict, its baseline and why, and each check on its own line."""
    if not result.checks:
        lines = [f"{result.location}: {result.reason}"]
        if result.baseline_version is not None:
            lines.append(f"  baseline: {result.baseline_reason}")
        return lines
    lines = [f"{result.location}: {result.verdict.value}"]
    lines.append(f"  baseline: {result.baseline_reason}")
    lines.extend(f"  {check.name}: {check.reason}" for check in result.checks)
    lines.extend(f"  {note}" for note in result.notes)
    return lines


def _percent(value: object) -> str:
    return f"{value * 100:g}%" if isinstance(value, float) else "?"

"""The gate's decision for people (an aligned plain-text table, readable in any CI log) and
for machines (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._decision import Counts, GateDecision, LocationDecision, format_ratio

_HEADER = ("LOCATION", "VERSION", "ROLE", "REQUESTS", "ERRORS", "RATIO", "VERDICT")
_RIGHT = {"REQUESTS", "ERRORS", "RATIO"}


def render_table(decision: GateDecision, context: Mapping[str, Any]) -> str:
    """A table of every location judged (the new version and its baseline), the reason for
    each verdict, and the decision on the last line. ``context`` says what was asked
    (``window``, ``baseline``, ``confidence``, ``prometheus``)."""
    against = context.get("baseline") or "the busiest other version in each location"
    lines = [
        f"sentinel gate: {decision.new_version} against {against}, over the last "
        f"{context.get('window', '?')} (confidence {_percent(context.get('confidence'))})",
    ]
    if decision.locations:
        rows: list[tuple[str, ...]] = [_HEADER]
        for result in decision.locations:
            rows.append(_row(result.location, result.new_version, "new", result.new, result))
            if result.baseline_version is not None and result.baseline is not None:
                rows.append(_row("", result.baseline_version, "baseline", result.baseline, None))
        widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADER))]
        lines.append("")
        for row in rows:
            cells = [
                cell.rjust(width) if _HEADER[column] in _RIGHT else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        lines.extend(f"{result.location}: {result.reason}" for result in decision.locations)
    lines.append("")
    lines.append(decision.summary)
    return "\n".join(lines) + "\n"


def render_json(decision: GateDecision, context: Mapping[str, Any]) -> str:
    """The decision as one JSON object (``verdict``, ``exit_code``, ``summary``,
    ``stopped_locations``, one entry per location with its counts and p-values), with
    ``context`` merged in."""
    document = {
        "verdict": decision.verdict.value,
        "exit_code": decision.exit_code,
        "summary": decision.summary,
        "new_version": decision.new_version,
        **context,
        "stopped_locations": list(decision.stopped),
        "locations": [_location_json(result) for result in decision.locations],
    }
    return json.dumps(document, indent=2) + "\n"


def _row(
    location: str, version: str, role: str, counts: Counts, result: LocationDecision | None
) -> tuple[str, ...]:
    verdict = result.verdict.value.upper() if result is not None else ""
    return (
        location,
        version,
        role,
        str(counts.requests),
        str(counts.errors),
        format_ratio(counts.ratio),
        verdict,
    )


def _location_json(result: LocationDecision) -> dict[str, Any]:
    def side(version: str | None, counts: Counts | None) -> dict[str, Any] | None:
        if version is None or counts is None:
            return None
        return {
            "version": version,
            "requests": counts.requests,
            "errors": counts.errors,
            "ratio": counts.ratio,
        }

    return {
        "location": result.location,
        "verdict": result.verdict.value,
        "reason": result.reason,
        "new": side(result.new_version, result.new),
        "baseline": side(result.baseline_version, result.baseline),
        "p_worse": result.p_worse,
        "p_regression": result.p_regression,
        "needed_requests": result.needed_requests,
    }


def _percent(value: object) -> str:
    return f"{value * 100:g}%" if isinstance(value, float) else "?"

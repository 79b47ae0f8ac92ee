"""The rollout gate: before a progressive deployment widens a rollout, compare the new
release's server errors with the baseline release's in every location, from Prometheus,
and say continue, stop or cannot decide (``sentinel gate``)."""

from __future__ import annotations

from ._decision import (
    Counts,
    GateDecision,
    LocationDecision,
    Thresholds,
    Verdict,
    decide,
    undecided,
)
from ._prometheus import PrometheusClient, PrometheusError, Sample
from ._report import render_json, render_table
from ._traffic import (
    GateInputError,
    Querier,
    Traffic,
    check_location,
    check_version,
    errors_query,
    fetch_traffic,
    requests_query,
    versions_query,
)

__all__ = [
    "Counts",
    "GateDecision",
    "GateInputError",
    "LocationDecision",
    "PrometheusClient",
    "PrometheusError",
    "Querier",
    "Sample",
    "Thresholds",
    "Traffic",
    "Verdict",
    "check_location",
    "check_version",
    "decide",
    "errors_query",
    "fetch_traffic",
    "render_json",
    "render_table",
    "requests_query",
    "undecided",
    "versions_query",
]

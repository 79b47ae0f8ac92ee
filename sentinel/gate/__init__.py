"""The rollout gate: before a progressive deployment widens a rollout, compare the new
release with the baseline release in every location, from Prometheus (5xx ratio, each 4xx
code's share, traffic per instance), check that every instance on it reports the expected
environment, and say continue, stop or cannot decide (``sentinel gate``); record the last
known-good release in a state file a rollback can read with nothing else running
(``sentinel gate rollback-target``)."""

from __future__ import annotations

from ._baseline import DEFAULT_LOOKBACK, needs_history
from ._decision import decide
from ._model import (
    Check,
    Counts,
    EnvironmentMismatch,
    GateDecision,
    LocationDecision,
    Thresholds,
    Traffic,
    Verdict,
    undecided,
)
from ._prometheus import PrometheusClient, PrometheusError, Sample
from ._report import location_json, render_json, render_table
from ._state import GateState, KnownGood, LocationState, StateError, load_state, record
from ._traffic import (
    GateInputError,
    Observation,
    Process,
    Querier,
    Served,
    build_info_query,
    check_environment,
    check_location,
    check_version,
    check_window,
    failed_mid_stream_query,
    first_seen_query,
    observe,
    responses_query,
    scraped_before_query,
    scrapes_query,
    started_query,
)

__all__ = [
    "DEFAULT_LOOKBACK",
    "Check",
    "Counts",
    "EnvironmentMismatch",
    "GateDecision",
    "GateInputError",
    "GateState",
    "KnownGood",
    "LocationDecision",
    "LocationState",
    "Observation",
    "Process",
    "PrometheusClient",
    "PrometheusError",
    "Querier",
    "Sample",
    "Served",
    "StateError",
    "Thresholds",
    "Traffic",
    "Verdict",
    "build_info_query",
    "check_environment",
    "check_location",
    "check_version",
    "check_window",
    "decide",
    "failed_mid_stream_query",
    "first_seen_query",
    "load_state",
    "location_json",
    "needs_history",
    "observe",
    "record",
    "render_json",
    "render_table",
    "responses_query",
    "scraped_before_query",
    "scrapes_query",
    "started_query",
    "undecided",
]

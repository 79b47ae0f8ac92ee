"""How the gate's decision reads: an aligned table with both versions of every location,
the reason for each verdict and the decision on the last line; and the same as JSON."""

from __future__ import annotations

import json

from sentinel.gate import (
    Counts,
    GateDecision,
    Thresholds,
    decide,
    render_json,
    render_table,
    undecided,
)

CONTEXT = {"prometheus": "http://prom:9090", "window": "10m", "baseline": None, "confidence": 0.99}


def _decision() -> GateDecision:
    traffic = {
        ("fra", "v2"): Counts(1_000, 200),
        ("fra", "v1"): Counts(20_000, 10),
        ("iad", "v2"): Counts(100, 0),
        ("iad", "v1"): Counts(90_000, 45),
    }
    return decide(traffic, "v2", Thresholds())


def test_the_table_shows_both_versions_and_why() -> None:
    """Columns line up (numbers to the right), the baseline row follows the new one, each
    location's reason is spelled out and the decision is the last line."""
    assert render_table(_decision(), CONTEXT) == (
        "sentinel gate: v2 against the busiest other version in each location, over the last "
        "10m (confidence 99%)\n"
        "\n"
        "LOCATION  VERSION  ROLE      REQUESTS  ERRORS   RATIO  VERDICT\n"
        "fra       v2       new           1000     200   20.0%  STOP\n"
        "          v1       baseline     20000      10  0.050%\n"
        "iad       v2       new            100       0      0%  UNDECIDED\n"
        "          v1       baseline     90000      45  0.050%\n"
        "\n"
        "fra: regression: 20.0% errors against 0.050% on v1, 400x\n"
        "iad: too little traffic: 100 requests on v2, fewer than the 200 the config requires; "
        "about 14700 on each version\n"
        "\n"
        "stop: v2 regressed in fra\n"
    )


def test_a_decision_without_locations_is_one_line_after_the_title() -> None:
    """Prometheus down: no table, the reason is the decision."""
    decision = undecided("v2", "cannot decide: cannot reach Prometheus at http://prom:9090")
    context = {**CONTEXT, "baseline": "v1"}
    assert render_table(decision, context) == (
        "sentinel gate: v2 against v1, over the last 10m (confidence 99%)\n"
        "\n"
        "cannot decide: cannot reach Prometheus at http://prom:9090\n"
    )


def test_the_json_has_the_verdict_the_counts_and_the_evidence() -> None:
    """--json: verdict, exit status, stopped locations, and per location both versions'
    counts and ratios, the p-values and the requests still needed."""
    document = json.loads(render_json(_decision(), CONTEXT))
    assert document["verdict"] == "stop" and document["exit_code"] == 1
    assert document["stopped_locations"] == ["fra"]
    assert document["window"] == "10m" and document["prometheus"] == "http://prom:9090"
    fra, iad = document["locations"]
    assert fra["new"] == {"version": "v2", "requests": 1000, "errors": 200, "ratio": 0.2}
    assert fra["baseline"]["version"] == "v1" and fra["baseline"]["ratio"] == 0.0005
    assert fra["verdict"] == "stop" and fra["p_worse"] < 1e-100
    assert iad["verdict"] == "undecided" and iad["p_worse"] is None
    assert iad["needed_requests"] >= 200
    down = json.loads(render_json(undecided("v2", "cannot decide: down"), CONTEXT))
    assert down["verdict"] == "undecided" and down["exit_code"] == 2 and down["locations"] == []

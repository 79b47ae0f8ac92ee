"""How the gate's decision reads: the instances of another environment first, an aligned
table with both versions of every location (instances, requests, per instance, 5xx, the
4xx code that moved most), per location the baseline and why and each check's verdict, the
state file's fate, and the decision on the last line; and the same as JSON."""

from __future__ import annotations

import json

from sentinel.gate import (
    Counts,
    EnvironmentMismatch,
    GateDecision,
    Thresholds,
    Traffic,
    decide,
    render_json,
    render_table,
    undecided,
)

CONTEXT = {
    "prometheus": "http://prom:9090",
    "window": "10m",
    "lookback": "1d",
    "baseline": None,
    "confidence": 0.99,
}
STAGING = EnvironmentMismatch("10.0.0.9:8000", "shop", "v2", "staging", "production", ("fra",), 7)


def _decision() -> GateDecision:
    traffic = {
        ("fra", "v2"): Counts(
            10_000, 5, codes={"401": 3_000}, instances={"10.0.0.2:8000": 10_000}, exposure=40.0
        ),
        ("fra", "v1"): Counts(
            20_000,
            10,
            codes={"404": 40},
            instances={"10.0.0.1:8000": 10_000, "10.0.0.3:8000": 10_000},
            exposure=80.0,
        ),
        ("iad", "v2"): Counts(100, 0, instances={"10.0.1.2:8000": 100}, exposure=40.0),
        ("iad", "v1"): Counts(90_000, 45, instances={"10.0.1.1:8000": 90_000}, exposure=40.0),
    }
    return decide(
        traffic,
        "v2",
        Thresholds(),
        window="10m",
        mismatches=[STAGING],
        environment="production",
    )


def test_the_table_shows_both_versions_every_check_and_why() -> None:
    """The mismatched instance comes first; columns line up (numbers to the right), the
    baseline row follows the new one with its share of the same 4xx code; each location
    says its verdict, its baseline and why, and each check; the decision is the last line."""
    context = {**CONTEXT, "state": {"message": "s.json unchanged: only a decision to continue"}}
    assert render_table(_decision(), context) == (
        "sentinel gate: v2 in production against the other version with the most successful "
        "responses in each location, over the last 10m (confidence 99%)\n"
        "\n"
        "environment: 10.0.0.9:8000 (job shop) serves production traffic in fra on v2 but "
        "reports environment 'staging', not 'production'\n"
        "\n"
        "LOCATION  VERSION  ROLE      INSTANCES  REQUESTS  PER INSTANCE  5XX  5XX RATIO  "
        "TOP 4XX    VERDICT\n"
        "fra       v2       new               1     10000         10000    5     0.050%  "
        "401 30.0%  STOP\n"
        "          v1       baseline          2     20000         10000   10     0.050%  "
        "401 0%\n"
        "iad       v2       new               1       100           100    0         0%  "
        "-          STOP\n"
        "          v1       baseline          1     90000         90000   45     0.050%  -\n"
        "\n"
        "fra: stop\n"
        "  baseline: v1, the other version with the most successful responses here in the "
        "last 10m (19950 of 20000 requests)\n"
        "  environment: 10.0.0.9:8000 (job shop) runs v2 here but reports environment "
        "'staging', not 'production'\n"
        "  5xx ratio: no regression (0.050% errors against 0.050% on v1, 1x)\n"
        "  401 share: regression: 30.0% of responses against 0% on v1\n"
        "  traffic per instance: no drop (10000 requests per instance against 10000 on v1: "
        "1x its rate)\n"
        "iad: stop\n"
        "  baseline: v1, the other version with the most successful responses here in the "
        "last 10m (89955 of 90000 requests)\n"
        "  5xx ratio: too little traffic: 100 requests on v2, fewer than the 200 the config "
        "requires; about 37872 on each version\n"
        "  traffic per instance: drop: 100 requests per instance against 90000 on v1: "
        "0.0011x its rate, under 0.5x: requests are not reaching v2\n"
        "\n"
        "state: s.json unchanged: only a decision to continue\n"
        "\n"
        "stop: 10.0.0.9:8000 (job shop) serves production traffic in fra on v2 but reports "
        "environment 'staging', not 'production'; v2 regressed in fra (401 share), iad "
        "(traffic per instance)\n"
    )


def test_a_baseline_from_before_the_window_is_marked() -> None:
    """A baseline found in the lookback is the "baseline (earlier)" row, and the location
    says why and what it did not judge."""
    decision = decide(
        {("fra", "v2"): Counts(30_000, 30)},
        "v2",
        Thresholds(),
        history={("fra", "v1"): Counts(500_000, 500)},
        window="10m",
        lookback="1d",
    )
    table = render_table(decision, CONTEXT)
    assert "          v1       baseline (earlier)          -    500000" in table
    assert "  baseline: v1: v2 replaced every other version here within the last 10m; " in table
    assert "  traffic per instance not judged: the baseline's requests are from before" in table
    assert table.endswith("\ncontinue: no regression of v2 in fra\n")


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
    """--json: verdict, exit status, environment, stopped locations, the mismatched
    instances, and per location both versions' counts, codes and instances, the baseline and
    why, every check with its p-values and the requests still needed."""
    document = json.loads(render_json(_decision(), CONTEXT))
    assert document["verdict"] == "stop" and document["exit_code"] == 1
    assert document["environment"] == "production"
    assert document["stopped_locations"] == ["fra", "iad"]
    assert document["window"] == "10m" and document["prometheus"] == "http://prom:9090"
    (mismatch,) = document["environment_mismatches"]
    assert mismatch["instance"] == "10.0.0.9:8000" and mismatch["environment"] == "staging"
    assert mismatch["expected"] == "production" and mismatch["locations"] == ["fra"]
    fra, iad = document["locations"]
    assert fra["new"]["codes"] == {"401": 3000}
    assert fra["new"]["instances"] == {"10.0.0.2:8000": 10000}
    assert fra["baseline"]["version"] == "v1" and fra["baseline"]["period"] == "window"
    assert fra["baseline_reason"].startswith("v1, the other version with the most successful")
    checks = {check["name"]: check for check in fra["checks"]}
    assert set(checks) == {"environment", "5xx ratio", "401 share", "traffic per instance"}
    assert checks["environment"]["verdict"] == "stop"
    assert checks["401 share"]["verdict"] == "stop" and checks["401 share"]["p_worse"] < 1e-100
    assert checks["401 share"]["new"] == 0.3 and checks["401 share"]["baseline"] == 0.0
    assert iad["verdict"] == "stop" and iad["needed_requests"] == 37872
    assert {check["name"]: check["verdict"] for check in iad["checks"]} == {
        "5xx ratio": "undecided",
        "traffic per instance": "stop",
    }
    assert iad["checks"][0]["needed_requests"] >= 200
    down = json.loads(render_json(undecided("v2", "cannot decide: down"), CONTEXT))
    assert down["verdict"] == "undecided" and down["exit_code"] == 2 and down["locations"] == []


def test_what_the_gate_left_out_or_counted_specially_is_said() -> None:
    """The notes of the counts (requests under a location sentinel could not have reported,
    instances that served nothing) are ``note:`` lines after the title, and ``notes`` in the
    JSON, also when the gate could not decide."""
    notes = ["left out 600 requests with no location label from b: not a location sentinel"]
    traffic = Traffic({("fra", "v2"): Counts(20_000, 9), ("fra", "v1"): Counts(20_000, 11)}, notes)
    decision = decide(traffic, "v2", Thresholds(traffic_ratio=0))
    table = render_table(decision, CONTEXT)
    assert f"\n\nnote: {notes[0]}\n\nLOCATION " in table
    assert json.loads(render_json(decision, CONTEXT))["notes"] == notes
    waiting = undecided("v2", "cannot decide: no data", notes=notes)
    assert render_table(waiting, CONTEXT).endswith(
        f"\n\nnote: {notes[0]}\n\ncannot decide: no data\n"
    )
    assert json.loads(render_json(waiting, CONTEXT))["notes"] == notes

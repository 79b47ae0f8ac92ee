"""`sentinel demo`: the incident against the example app, ended by itself, summarized."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import clean_env


def test_demo_plays_the_incident_and_counts_exactly_what_it_sent() -> None:
    """A short demo exits 0; sentinel counted exactly the requests sent per location; the
    small location fails at 20% while the service stays under 1%; the exception is reported
    with the app's own code line, its repeats folded."""
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", "--duration", "2", "--json"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    locations = summary["locations"]
    assert set(locations) == {"fra", "iad", "sin"}
    for entry in locations.values():
        assert entry["requests"] == entry["sent"] > 0
    assert 0.15 <= locations["sin"]["error_ratio"] <= 0.25
    assert summary["global"]["error_ratio"] < 0.01
    [exception] = summary["exceptions"].values()
    assert exception["exception_type"] == "sentinel.example.app.BackendUnavailable"
    assert exception["code"].endswith("in boom")
    assert exception["written"] + exception["folded"] == summary["global"]["errors"]

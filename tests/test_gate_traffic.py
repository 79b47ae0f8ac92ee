"""What the gate asks Prometheus and how it reads the answers: the regression alert's join
of the request counters with sentinel_build_info, the config's selector and label names,
counts per (location, version), and the check of the versions and locations it is given."""

from __future__ import annotations

import pytest

from sentinel.gate import (
    Counts,
    GateInputError,
    Sample,
    check_location,
    check_version,
    errors_query,
    fetch_traffic,
    requests_query,
    versions_query,
)
from sentinel.mixin import MonitoringConfig, _promql


class FakeClient:
    """Answers each query kind with canned samples and records (expression, time)."""

    def __init__(self, answers: dict[str, list[Sample]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, float | None]] = []

    def query(self, expression: str, at: float | None = None) -> list[Sample]:
        self.asked.append((expression, at))
        if expression.startswith("count by (version)"):
            return self.answers["versions"]
        kind = "errors" if "5..|invalid" in expression else "requests"
        return self.answers[kind]


def test_the_queries_are_the_alerts_join_over_the_window() -> None:
    """Requests and errors are the shared version-level rates (joined from build info on
    job and instance) times the window's seconds, with the config's selector and labels."""
    config = MonitoringConfig(
        selector='job="shop"', instance_label="pod", location_label="region", time_scale=0.5
    )
    requests = requests_query(config, "10m")
    errors = errors_query(config, "10m")
    assert requests == f"{_promql.version_requests_rate_expr(config, '10m')} * 600"
    assert errors == f"{_promql.version_errors_rate_expr(config, '10m')} * 600"
    for query in (requests, errors):
        assert "* on (job, pod) group_left (version)" in query
        assert 'sentinel_build_info{job="shop"}' in query
        assert "by (job, region, version)" in query
    assert versions_query(config, "5m") == (
        'count by (version) (max_over_time(sentinel_build_info{job="shop"}[5m]))'
    )


def test_answers_become_whole_counts_per_location_and_version() -> None:
    """Extrapolated counts are rounded; errors never exceed requests; a release without an
    error sample has 0 errors; two jobs' counts in one location add up; every query is
    evaluated at the same instant; the versions come from build info."""
    client = FakeClient(
        {
            "requests": [
                Sample({"job": "a", "location": "fra", "version": "v2"}, 1000.4),
                Sample({"job": "b", "location": "fra", "version": "v2"}, 10.0),
                Sample({"job": "a", "location": "fra", "version": "v1"}, 2000.6),
                Sample({"job": "a", "location": "iad", "version": "v2"}, 3.2),
            ],
            "errors": [
                Sample({"job": "a", "location": "fra", "version": "v2"}, 9.6),
                Sample({"job": "a", "location": "iad", "version": "v2"}, 3.7),
            ],
            "versions": [Sample({"version": "v1"}, 3.0), Sample({"version": "v3"}, 1.0)],
        }
    )
    traffic = fetch_traffic(client, MonitoringConfig(), "10m", 1_700_000_000.0)
    assert traffic.counts == {
        ("fra", "v2"): Counts(1010, 10),
        ("fra", "v1"): Counts(2001, 0),
        ("iad", "v2"): Counts(3, 3),
    }
    assert traffic.versions == {"v1", "v3"}
    assert len(client.asked) == 3
    assert {at for _, at in client.asked} == {1_700_000_000.0}


@pytest.mark.parametrize("version", ["v2", "2024.06.1", "1.4.0-rc.1+build.7", "a1b2c3d", "main/42"])
def test_release_names_are_accepted(version: str) -> None:
    """Semantic versions, dates, commit hashes and branch-like names are releases."""
    assert check_version(version) == version


@pytest.mark.parametrize(
    "version", ['v2"} or vector(1) #', "v1\\", "v1\n", "", " v1", "v 1", "-v1", "x" * 129]
)
def test_unsafe_release_names_are_refused(version: str) -> None:
    """Quotes, backslashes, control characters, spaces, an empty or too long value: refused
    with the option and the value in the message."""
    with pytest.raises(GateInputError) as raised:
        check_version(version, "--baseline")
    assert str(raised.value).startswith('"--baseline" must be a release')
    assert repr(version) in str(raised.value)


def test_locations_are_what_sentinel_reports() -> None:
    """A location is accepted exactly when sentinel could have reported it."""
    assert check_location("eu-west-1") == "eu-west-1"
    for bad in ("fra,iad", 'fra"', "", "x" * 64):
        with pytest.raises(GateInputError, match="--location"):
            check_location(bad)

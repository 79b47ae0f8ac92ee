"""What the gate asks Prometheus and how it reads the answers: per process and location the
responses per code and the mid-stream failures (a series new in the window counted whole),
each process's release and environment from sentinel_build_info (the one it reported last),
joined per process here; counts per (location, version) with a baseline only from the
expected environment; the instances of another environment; and the check of the
versions, locations and environments it is given."""

from __future__ import annotations

import pytest

from sentinel._config import Config, ConfigError
from sentinel.gate import (
    Counts,
    EnvironmentMismatch,
    GateInputError,
    Sample,
    build_info_query,
    check_environment,
    check_location,
    check_version,
    failed_mid_stream_query,
    observe,
    responses_query,
    scrapes_query,
)
from sentinel.mixin import MonitoringConfig

AT = 1_700_000_000.0


class FakeClient:
    """Answers each query kind with canned samples and records (expression, time)."""

    def __init__(self, answers: dict[str, list[Sample]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, float | None]] = []

    def query(self, expression: str, at: float | None = None) -> list[Sample]:
        self.asked.append((expression, at))
        if "timestamp(" in expression:
            return self.answers["build_info"]
        if "count_over_time" in expression:
            return self.answers["scrapes"]
        if 'phase="response"' in expression:
            return self.answers.get("failed", [])
        return self.answers["responses"]


def test_the_queries_count_per_process_location_and_code() -> None:
    """Responses and mid-stream failures are increases per job, instance and location (and
    code), a series that appeared in the window counted by its value; build info gives each
    process's last report of each release and environment, and its scrapes; all with the
    config's selector and label names."""
    config = MonitoringConfig(selector='job="shop"', instance_label="pod", location_label="region")
    series = 'sentinel_http_requests_total{job="shop"}'
    before = f"{series} offset 10m or last_over_time({series}[1h] offset 10m) <= {series}"
    assert responses_query(config, "10m") == (
        f"sum by (job, pod, region, code) (({series} unless ({before})) or increase({series}[10m]))"
    )
    failed = 'sentinel_unhandled_exceptions_total{job="shop",phase="response"}'
    before = f"{failed} offset 10m or last_over_time({failed}[1h] offset 10m) <= {failed}"
    assert failed_mid_stream_query(config, "10m") == (
        f"sum by (job, pod, region) (({failed} unless ({before})) or increase({failed}[10m]))"
    )
    assert build_info_query(config, "10m") == (
        "max by (job, pod, version, environment) "
        '(max_over_time(timestamp(sentinel_build_info{job="shop"})[10m:6s]))'
    )
    assert build_info_query(config, "30s").endswith("[30s:1s]))")
    assert scrapes_query(config, "1d") == (
        "sum by (job, pod, version, environment) "
        '(count_over_time(sentinel_build_info{job="shop"}[1d]))'
    )


def _info(instance: str, version: str, environment: str, seen: float) -> Sample:
    labels = {"job": "shop", "instance": instance, "version": version, "environment": environment}
    return Sample(labels, seen)


def _served(instance: str, location: str, code: str, value: float) -> Sample:
    return Sample({"job": "shop", "instance": instance, "location": location, "code": code}, value)


def _client() -> FakeClient:
    """a: v1 in production serving fra and iad; b: restarted from v1 to v2 within the window
    (the later release counts), production; c: v2 reporting staging (in scope); d: v0 in
    staging; e: requests but no build info."""
    return FakeClient(
        {
            "build_info": [
                _info("a", "v1", "production", AT),
                _info("b", "v1", "production", AT - 300),
                _info("b", "v2", "production", AT - 5),
                _info("c", "v2", "staging", AT),
                _info("d", "v0", "staging", AT),
            ],
            "scrapes": [
                Sample({**_info("a", "v1", "production", 0).labels}, 40.0),
                Sample({**_info("b", "v2", "production", 0).labels}, 20.0),
                Sample({**_info("b", "v1", "production", 0).labels}, 20.0),
                Sample({**_info("c", "v2", "staging", 0).labels}, 40.0),
                Sample({**_info("d", "v0", "staging", 0).labels}, 40.0),
            ],
            "responses": [
                _served("a", "fra", "200", 1000.4),
                _served("a", "fra", "503", 2.2),
                _served("a", "iad", "200", 500.0),
                _served("b", "fra", "200", 700.0),
                _served("b", "fra", "401", 299.6),
                _served("b", "fra", "503", 3.0),
                _served("c", "fra", "200", 100.0),
                _served("d", "fra", "200", 5000.0),
                _served("e", "fra", "200", 9000.0),
            ],
            "failed": [
                Sample({"job": "shop", "instance": "b", "location": "fra"}, 1.0),
            ],
        }
    )


def test_answers_become_counts_per_location_and_version() -> None:
    """Per (location, version): requests, server errors (5xx and mid-stream failures), 4xx
    per code, successes, requests per instance and scrapes, summed then rounded; a
    process's requests go to the release it reported last; a process without build info is
    left out; every query is evaluated at the same instant."""
    client = _client()
    observation = observe(client, MonitoringConfig(), "10m", AT)
    assert observation.versions == {"v0", "v1", "v2"}
    counts = observation.counts("v2")
    assert counts[("fra", "v2")] == Counts(
        1103,
        4,
        codes={"401": 300},
        successes=800,
        instances={"b": 1003, "c": 100},
        exposure=60.0,
    )
    assert counts[("fra", "v1")] == Counts(
        1003, 2, successes=1000, instances={"a": 1003}, exposure=40.0
    )
    assert counts[("iad", "v1")].requests == 500
    assert counts[("fra", "v0")].requests == 5000
    assert len(client.asked) == 4 and {at for _, at in client.asked} == {AT}


def test_with_an_environment_only_its_instances_can_be_the_baseline() -> None:
    """Another version's counts come only from instances reporting the environment (v0 runs
    in staging: no baseline for production); the new version's from every instance in
    scope, the staging one included."""
    counts = observe(_client(), MonitoringConfig(), "10m", AT).counts("v2", "production")
    assert ("fra", "v0") not in counts
    assert counts[("fra", "v1")].requests == 1003
    assert counts[("fra", "v2")].instances == {"b": 1003, "c": 100}


def test_instances_on_the_new_version_in_another_environment_are_named() -> None:
    """c runs v2 and reports staging in the production scope: named with where it served;
    b (production) and d (staging, but v0) are not."""
    observation = observe(_client(), MonitoringConfig(), "10m", AT)
    assert observation.mismatches("v2", "production") == (
        EnvironmentMismatch("c", "shop", "v2", "staging", "production", ("fra",), 100),
    )
    assert observation.mismatches("v0", "staging") == ()
    assert observation.mismatches("v1", "production") == ()


@pytest.mark.parametrize(
    "version",
    ["v2", "2024.06.1", "1.4.0-rc.1+build.7", "a1b2c3d", "main/42", "v2 beta", "-v1", "x" * 128],
)
def test_release_names_are_accepted(version: str) -> None:
    """Semantic versions, dates, commit hashes, branch-like names, any release sentinel
    accepts (v2 beta)."""
    assert check_version(version) == version


@pytest.mark.parametrize("version", ["v1\n", "", "v\t1", "v1\x00", "x" * 129])
def test_release_names_sentinel_cannot_report_are_refused(version: str) -> None:
    """Control characters, an empty or too long value: refused with the option and the
    value in the message."""
    with pytest.raises(GateInputError) as raised:
        check_version(version, "--baseline")
    assert str(raised.value) == (
        '"--baseline" must be a release sentinel can report (1 to 128 printable characters): '
        f"{version!r}"
    )


@pytest.mark.parametrize(
    "value",
    ["v2", "v2 beta", 'v2"} or vector(1) #', "prod/eu", "-x", "é", "", "a\nb", "\x7f", "x" * 129],
)
def test_releases_and_environments_are_what_sentinel_reports(value: str) -> None:
    """A release or environment is accepted exactly when sentinel accepts it as its version
    or environment: the gate never puts one in a query, so any value sentinel exports as a
    label is one the gate can judge."""
    try:
        Config(version=value, environment=value)
    except ConfigError:
        reported = False
    else:
        reported = True
    for check in (check_version, check_environment):
        try:
            check(value)
        except GateInputError:
            accepted = False
        else:
            accepted = True
        assert accepted is reported, (check.__name__, value)


def test_no_query_holds_a_release_or_environment() -> None:
    """The queries are built from the config and the period alone."""
    config = MonitoringConfig(selector='job="shop"')
    for build in (responses_query, failed_mid_stream_query, build_info_query, scrapes_query):
        query = build(config, "10m")
        assert "v2" not in query and "production" not in query, query


def test_locations_are_what_sentinel_reports() -> None:
    """A location is accepted exactly when sentinel could have reported it."""
    assert check_location("eu-west-1") == "eu-west-1"
    for bad in ("fra,iad", 'fra"', "", "x" * 64):
        with pytest.raises(GateInputError, match="--location"):
            check_location(bad)


@pytest.mark.parametrize(
    "environment", ["production", "staging", "eu-west.prod_2", "QA1", "prod env", "prod/eu", "-x"]
)
def test_environment_names_are_accepted(environment: str) -> None:
    """Names such as production, staging or eu-west.prod_2, any sentinel accepts."""
    assert check_environment(environment) == environment


@pytest.mark.parametrize("environment", ["", "prod\n", "prod\tenv", "x" * 129])
def test_environment_names_sentinel_cannot_report_are_refused(environment: str) -> None:
    """Control characters, empty or too long: refused with the option and the value."""
    with pytest.raises(GateInputError) as raised:
        check_environment(environment, "SENTINEL_ENVIRONMENT")
    assert str(raised.value) == (
        '"SENTINEL_ENVIRONMENT" must be an environment sentinel can report (1 to 128 printable '
        f"characters): {environment!r}"
    )

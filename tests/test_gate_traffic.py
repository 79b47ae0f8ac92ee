"""What the gate asks Prometheus and how it reads the answers: per process and location the
responses per code and the mid-stream failures (a series new in the window counted whole),
each process's release and environment from sentinel_build_info (the one it reported last),
joined per process here; counts per (location, version) with a baseline only from the
expected environment; the instances of another environment; and the check of the
versions, locations and environments it is given."""

from __future__ import annotations

import math

import pytest

from sentinel._config import Config, ConfigError
from sentinel.gate import (
    Counts,
    EnvironmentMismatch,
    GateInputError,
    Observation,
    Process,
    PrometheusError,
    Sample,
    Served,
    Thresholds,
    Verdict,
    build_info_query,
    check_environment,
    check_location,
    check_version,
    check_window,
    decide,
    failed_mid_stream_query,
    first_seen_query,
    observe,
    responses_query,
    scraped_before_query,
    scrapes_query,
    started_query,
)
from sentinel.mixin import MonitoringConfig
from sentinel.mixin import _promql as promql

AT = 1_700_000_000.0


class FakeClient:
    """Answers each query kind with canned samples and records (expression, time)."""

    def __init__(self, answers: dict[str, list[Sample]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, float | None]] = []

    def query(self, expression: str, at: float | None = None) -> list[Sample]:
        self.asked.append((expression, at))
        if "increase(" in expression:
            if 'phase="response"' in expression:
                return self.answers.get("failed", [])
            return self.answers["responses"]
        if "max_over_time(timestamp(" in expression:
            return self.answers["build_info"]
        if "min_over_time(timestamp(" in expression:
            return self.answers.get("first_seen", [])
        if "process_start_time_seconds" in expression:
            return self.answers.get("started", [])
        if expression.startswith("sum by"):
            return self.answers["scrapes"]
        return self.answers.get("scraped_before", [])


def test_the_queries_count_per_process_location_and_code() -> None:
    """Responses and mid-stream failures are increases per job, instance and location (and
    code), a series that counts from 0 in the window counted from 0, as the alerts count
    (a process scraped late that says it started earlier by its increase); build info
    gives each process's last report of each release and environment (its latest sample,
    the one the counters are read at, else a subquery's), its first, its scrapes, and
    whether it was scraped before the window; all with the config's selector and label
    names."""
    config = MonitoringConfig(selector='job="shop"', instance_label="pod", location_label="region")
    series = 'sentinel_http_requests_total{job="shop"}'
    counted = promql.recent_increase_expr(series, "10m", config)
    assert responses_query(config, "10m") == f"sum by (job, pod, region, code) ({counted})"
    assert 'unless on (job, pod) (max by (job, pod) (process_start_time_seconds{job="shop"})' in (
        counted
    )
    failed = 'sentinel_unhandled_exceptions_total{job="shop",phase="response"}'
    counted = promql.recent_increase_expr(failed, "10m", config)
    assert failed_mid_stream_query(config, "10m") == f"sum by (job, pod, region) ({counted})"
    by = "max by (job, pod, version, environment)"
    assert build_info_query(config, "10m") == (
        f'{by} (timestamp(sentinel_build_info{{job="shop"}})) or '
        f'{by} (max_over_time(timestamp(sentinel_build_info{{job="shop"}})[10m:6s]))'
    )
    assert build_info_query(config, "30s").endswith("[30s:1s]))")
    assert first_seen_query(config, "10m") == (
        "min by (job, pod, version, environment) "
        '(min_over_time(timestamp(sentinel_build_info{job="shop"})[20m:12s]))'
    )
    assert scrapes_query(config, "1d") == (
        "sum by (job, pod, version, environment) "
        '(count_over_time(sentinel_build_info{job="shop"}[1d]))'
    )
    info = 'sentinel_build_info{job="shop"}'
    assert scraped_before_query(config, "10m") == (
        f"max by (job, pod) (count_over_time({info}[1h10m]) > count_over_time({info}[10m]))"
    )
    assert started_query(config, "10m") == (
        'max by (job, pod) (last_over_time(process_start_time_seconds{job="shop"}[10m]))'
    )


def _info(instance: str, version: str, environment: str, seen: float) -> Sample:
    labels = {"job": "shop", "instance": instance, "version": version, "environment": environment}
    return Sample(labels, seen)


def _served(instance: str, location: str, code: str, value: float) -> Sample:
    return Sample({"job": "shop", "instance": instance, "location": location, "code": code}, value)


def _client() -> FakeClient:
    """a: v1 in production serving fra and iad; b: restarted from v1 to v2 within the window
    (the later release counts), production; c: v2 reporting staging (in scope), started 5
    minutes into the window; d: v0 in staging; e: requests but no build info. Scraped every
    15 s; a, b and d before the window too."""
    return FakeClient(
        {
            "build_info": [
                _info("a", "v1", "production", AT),
                _info("b", "v1", "production", AT - 300),
                _info("b", "v2", "production", AT - 5),
                _info("c", "v2", "staging", AT),
                _info("d", "v0", "staging", AT),
            ],
            "first_seen": [
                _info("a", "v1", "production", AT - 1205),
                _info("b", "v1", "production", AT - 1205),
                _info("b", "v2", "production", AT - 290),
                _info("c", "v2", "staging", AT - 300),
                _info("d", "v0", "staging", AT - 1205),
            ],
            "scrapes": [
                Sample({**_info("a", "v1", "production", 0).labels}, 40.0),
                Sample({**_info("b", "v2", "production", 0).labels}, 20.0),
                Sample({**_info("b", "v1", "production", 0).labels}, 20.0),
                Sample({**_info("c", "v2", "staging", 0).labels}, 21.0),
                Sample({**_info("d", "v0", "staging", 0).labels}, 40.0),
            ],
            "scraped_before": [
                Sample({"job": "shop", "instance": name}, 1.0) for name in ("a", "b", "d")
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
    per code, successes, requests per instance and the seconds its instances were up
    (from the first sample in the window, or its start, to the last, plus a scrape
    interval), summed then rounded; a process's requests go to the release it reported
    last; a process without build info is left out; every query is evaluated at the same
    instant."""
    client = _client()
    observation = observe(client, MonitoringConfig(), "10m", AT)
    assert observation.versions == {"v0", "v1", "v2"}
    counts = observation.counts("v2")
    assert counts == {
        ("fra", "v2"): Counts(
            1103,
            4,
            codes={"401": 300},
            successes=800,
            instances={"b": 1003, "c": 100},
            exposure=600.0 + 315.0,
        ),
        ("fra", "v1"): Counts(1003, 2, successes=1000, instances={"a": 1003}, exposure=600.0),
        ("iad", "v1"): Counts(500, 0, successes=500, instances={"a": 500}, exposure=600.0),
        ("fra", "v0"): Counts(5000, 0, successes=5000, instances={"d": 5000}, exposure=600.0),
    }
    assert counts.notes == () and counts.problems == ()
    assert len(client.asked) == 7 and {at for _, at in client.asked} == {AT}


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


# -- what the gate cannot count: said, never silently dropped -----------------------------------

START = AT - 600


def _process(
    instance: str,
    version: str,
    *,
    job: str = "shop",
    environment: str = "production",
    first: float = START - 5,
    last: float = AT,
    scrapes: int = 40,
) -> Process:
    return Process(job, instance, version, environment, last, scrapes, first)


def _requests(instance: str, location: str, requests: float, job: str = "shop") -> Served:
    return Served(job, instance, location, {"200": requests})


def test_exposure_is_in_seconds_so_targets_scraped_at_different_intervals_compare() -> None:
    """v1 in a job scraped every 5 s and v2 in one scraped every second serve the same
    requests per instance: both were up the whole 10 minutes (the first sample after the
    window's start to the last, plus an interval), so their rates are equal; in scrapes v2
    looked five times as exposed, and a drop. A process that started within the window is
    up from its first sample, plus an interval."""
    observation = Observation(
        "10m",
        AT,
        (
            _process("a", "v1", job="slow", first=START - 3, last=AT - 2, scrapes=120),
            _process("b", "v2", job="fast", first=START - 0.5, last=AT - 0.5, scrapes=600),
            _process("c", "v2", job="fast", first=AT - 120.5, last=AT - 0.5, scrapes=121),
        ),
        (
            _requests("a", "fra", 60_000, job="slow"),
            _requests("b", "fra", 60_000, job="fast"),
            _requests("c", "fra", 12_000, job="fast"),
        ),
    )
    exposures = observation.exposures()
    assert exposures[("slow", "a")] == 600.0 and exposures[("fast", "b")] == 600.0
    assert exposures[("fast", "c")] == pytest.approx(121.0)
    counts = observation.counts("v2", "production")
    new, baseline = counts[("fra", "v2")], counts[("fra", "v1")]
    assert new.requests / new.exposure == pytest.approx(baseline.requests / baseline.exposure, 0.01)
    decision = decide(counts, "v2", Thresholds(min_ratio=0.01), window="10m")
    assert decision.locations[0].check("traffic per instance").verdict is Verdict.CONTINUE


def test_an_instance_that_served_nothing_counts_in_every_location_its_release_serves() -> None:
    """Of v2's three instances only c (fra) and d (iad) got requests; e, which reports
    sentinel_build_info but no request series, counts with none in fra and iad (its
    location is only known from its requests), with its exposure, and the notes name it. An
    idle baseline instance counts the same way for its release; one of a release another
    environment runs, or one gone before the window, does not."""
    observation = Observation(
        "10m",
        AT,
        (
            _process("a", "v1"),
            _process("b", "v1"),
            _process("b2", "v1"),
            _process("c", "v2"),
            _process("d", "v2"),
            _process("e", "v2", first=AT - 300, scrapes=21),
            _process("s", "v0", environment="staging"),
            _process("gone", "v2", first=START - 20, last=START - 10, scrapes=0),
        ),
        (
            _requests("a", "fra", 1000),
            _requests("b", "iad", 1000),
            _requests("c", "fra", 1000),
            _requests("d", "iad", 1000),
        ),
    )
    counts = observation.counts("v2", "production")
    assert counts[("fra", "v2")].instances == {"c": 1000, "e": 0}
    assert counts[("iad", "v2")].instances == {"d": 1000, "e": 0}
    assert counts[("fra", "v2")].exposure == 600.0 + 315.0
    assert counts[("fra", "v1")].instances == {"a": 1000, "b2": 0}
    assert counts[("iad", "v1")].instances == {"b": 1000, "b2": 0}
    assert ("fra", "v0") not in counts
    assert counts.notes == (
        "v1: 1 instance in scope served no requests anywhere in the last 10m: b2 (job shop); "
        "counted with none in fra, iad (an instance reports its location only with its "
        "requests)",
        "v2: 1 instance in scope served no requests anywhere in the last 10m: e (job shop); "
        "counted with none in fra, iad (an instance reports its location only with its "
        "requests)",
    )


def test_requests_with_a_location_sentinel_cannot_report_are_left_out_and_said() -> None:
    """Series without a location label (read as "") or with a value sentinel never emits
    ("eu west") are not counted as a location, and the notes say how many requests of which
    instances were left out; the process is not idle, and no mismatch names such a place."""
    observation = Observation(
        "10m",
        AT,
        (_process("a", "v1"), _process("b", "v2"), _process("c", "v2", environment="staging")),
        (
            _requests("a", "fra", 1000),
            _requests("b", "fra", 1000),
            _requests("b", "", 500),
            _requests("b", "eu west", 7),
            _requests("c", "", 100),
        ),
    )
    counts = observation.counts("v2", "production")
    assert set(counts) == {("fra", "v1"), ("fra", "v2")}
    assert counts[("fra", "v2")].instances == {"b": 1000}
    assert counts.notes == (
        "left out 600 requests with no location label from b, c: not a location sentinel reports",
        "left out 7 requests with location 'eu west' from b: not a location sentinel reports",
    )
    assert observation.mismatches("v2", "production") == (
        EnvironmentMismatch("c", "shop", "v2", "staging", "production", (), 0),
    )


def test_processes_prometheus_may_have_seen_late_are_a_problem() -> None:
    """Prometheus has scraped the scope for less than half a window before it (it started
    on empty storage): the counts of a process it first scraped within the window that does
    not say when it started are a problem (a canary started in the window, or a process that
    served for days before Prometheus looked?), naming it; one it scraped before the window,
    or one that says when it started, is none; and where Prometheus has scraped the scope
    for longer, a process first scraped within the window is a new one."""
    served = (_requests("a", "fra", 1000), _requests("b", "fra", 1000))
    fresh = (
        _process("a", "v1", first=START - 5, scrapes=41),
        _process("b", "v2", first=AT - 40, scrapes=41),
    )
    scraped = frozenset({("shop", "a")})
    [problem] = Observation("10m", AT, fresh, served, scraped).counts("v2").problems
    assert problem == (
        "Prometheus has scraped the instances in scope only since 5s before the last 10m (it "
        "started on empty storage, or they are new to it), and 1 process first scraped within "
        "it exports no process_start_time_seconds (b (job shop)): whether such a process "
        "started within the last 10m or long before (its counters then hold what it served "
        "before) cannot be told; ask again once Prometheus has scraped them for 15m"
    )
    empty = Observation("10m", AT, fresh[1:], served[1:], frozenset())
    [problem] = empty.counts("v2").problems
    assert problem.startswith("Prometheus has scraped the instances in scope only since 560s into")
    started = {("shop", "b"): AT - 86_400}
    assert Observation("10m", AT, fresh, served, scraped, started).counts("v2").problems == ()
    assert Observation("10m", AT, fresh, served).counts("v2").problems == ()
    older = (_process("a", "v1", first=START - 400, scrapes=41), fresh[1])
    assert Observation("10m", AT, older, served, scraped).counts("v2").problems == ()


def test_a_process_that_says_when_it_started_is_up_from_then() -> None:
    """c started 5 s before its first scrape, and the window ends on it: its counters hold
    5 s of requests, and it is up 5 s (process_start_time_seconds), not a whole scrape
    interval, which made a healthy canary look a third as busy. Without a start time it is
    up an interval from its one sample; a start after its first sample (a restart in place)
    or before the window (Prometheus found it late) is not its first sample's."""
    processes = (
        _process("b", "v1", scrapes=41),
        _process("c", "v2", first=AT, last=AT, scrapes=1),
        _process("d", "v2", first=AT - 300, scrapes=21),
    )
    served = (_requests("b", "fra", 12_000), _requests("c", "fra", 100))
    started = {("shop", "c"): AT - 5, ("shop", "d"): AT - 100}
    exposures = Observation("10m", AT, processes, served, started=started).exposures()
    assert exposures[("shop", "c")] == 5.0
    assert exposures[("shop", "d")] == pytest.approx(315.0)
    assert Observation("10m", AT, processes, served).exposures()[("shop", "c")] == 15.0
    late = {("shop", "c"): AT - 5_000}
    assert (
        Observation("10m", AT, processes, served, started=late).exposures()[("shop", "c")] == 15.0
    )


def test_a_process_scraped_fewer_than_three_times_is_not_judged_on_its_traffic() -> None:
    """A canary first scraped within the window, once or twice, is too young for its
    requests per second (when it started is known to a scrape interval at best): the
    traffic check cannot decide yet, naming it, instead of stopping a healthy canary that
    looked a third as busy; from its third scrape on it is judged."""
    base = (_process("b1", "v1"), _process("b2", "v1"))
    served = (
        _requests("b1", "fra", 12_000),
        _requests("b2", "fra", 12_000),
        _requests("c", "fra", 99),
    )
    for scrapes, verdict in ((1, Verdict.UNDECIDED), (2, Verdict.UNDECIDED), (3, Verdict.CONTINUE)):
        first = AT - 15 * (scrapes - 1)
        young = _process("c", "v2", first=first, last=AT, scrapes=scrapes)
        started = {("shop", "c"): first - 5}
        requests = round(20 * (AT - first + 5))
        rows = (*served[:2], _requests("c", "fra", requests))
        counts = Observation("10m", AT, (*base, young), rows, started=started).counts("v2")
        assert counts[("fra", "v2")].young == (("c",) if scrapes < 3 else ())
        thresholds = Thresholds(min_requests=50, traffic_ratio=0.5)
        decision = decide(counts, "v2", thresholds, window="10m")
        check = decision.locations[0].check("traffic per instance")
        assert check is not None and check.verdict is verdict, (scrapes, check)
    without_start = Observation(
        "10m", AT, (*base, _process("c", "v2", first=AT, last=AT, scrapes=1)), served
    ).counts("v2")
    check = (
        decide(without_start, "v2", Thresholds(min_requests=50))
        .locations[0]
        .check("traffic per instance")
    )
    assert check is not None and check.verdict is Verdict.UNDECIDED
    assert check.reason.startswith(
        "not judged yet: c first scraped within the window, fewer than 3 times"
    )


def test_a_release_that_served_nothing_anywhere_counts_where_the_others_served() -> None:
    """v2's only instance reports sentinel_build_info the whole window but served no request
    (the load balancer black-holes it): it counts with none, and its exposure, in every
    location the instances in scope served, and the gate stops there naming it, with
    --location as without; an idle instance of v2 beside one that serves fra counts in iad
    too, where it is v2's only one."""
    processes = (_process("b1", "v1"), _process("b2", "v1"), _process("c1", "v2"))
    served = (_requests("b1", "fra", 12_000), _requests("b2", "fra", 12_000))
    counts = Observation("10m", AT, processes, served).counts("v2", "production")
    assert counts[("fra", "v2")] == Counts(0, 0, instances={"c1": 0}, exposure=600.0)
    assert counts.notes == (
        "v2: 1 instance in scope served no requests anywhere in the last 10m: c1 (job shop); "
        "counted with none in fra (an instance reports its location only with its requests)",
    )
    for locations in ((), ("fra",)):
        decision = decide(counts, "v2", Thresholds(), locations=locations, window="10m")
        assert decision.verdict is Verdict.STOP, decision.summary
        assert "served no requests anywhere: c1" in decision.locations[0].reason
    two = Observation(
        "10m",
        AT,
        (*processes, _process("c2", "v2")),
        (*served, _requests("b1", "iad", 6_000), _requests("c2", "fra", 12_000)),
    ).counts("v2", "production")
    assert two[("iad", "v2")].instances == {"c1": 0}
    assert two[("fra", "v2")].instances == {"c1": 0, "c2": 12_000}
    assert two[("fra", "v2")].exposure == 1_200.0
    decision = decide(two, "v2", Thresholds(), window="10m")
    assert decision.stopped == ("iad",)


def test_an_environment_no_instance_reports_cannot_be_decided() -> None:
    """--environment prod where every instance in scope, the baseline's included, reports
    production (a typo, or a scope of another environment): cannot decide, listing the
    environments seen, never a stop naming every instance of a healthy release."""
    processes = (_process("b", "v1"), _process("c", "v2"))
    served = (_requests("b", "fra", 12_000), _requests("c", "fra", 12_000))
    observation = Observation("10m", AT, processes, served)
    counts = observation.counts("v2", "prod")
    assert counts.problems == (
        "no instance in scope reports the environment 'prod' (environments seen: production)",
    )
    decision = decide(
        counts,
        "v2",
        Thresholds(),
        mismatches=observation.mismatches("v2", "prod"),
        environment="prod",
    )
    assert decision.verdict is Verdict.UNDECIDED and decision.exit_code == 2
    assert decision.summary == f"cannot decide: {counts.problems[0]}"
    assert observation.counts("v2", "production").problems == ()


def test_a_period_the_gate_cannot_count_is_refused_or_said() -> None:
    """A window of up to 30d is counted, its subqueries stepping at most 5m (Prometheus's
    lookback: a longer step finds no sample); a longer one, or none, is refused with the
    value (check_window), and observe() asks nothing about it, saying why. A window that
    holds fewer than two samples of every process of a job scraped before it (shorter than
    two scrape intervals) cannot count what they served: a problem, naming the job."""
    config = MonitoringConfig()
    assert build_info_query(config, "1d").endswith("[1d:5m]))")
    assert first_seen_query(config, "1d").endswith("[2d:5m]))")
    assert check_window("30d") == "30d"
    for bad in ("10000d", "31d", "0s", "ten minutes"):
        with pytest.raises(GateInputError, match=f'^"--lookback" .*{bad!r}$'):
            check_window(bad, "--lookback")
    client = _client()
    observation = observe(client, config, "10000d", AT)
    assert client.asked == []
    assert observation.counts("v2").problems == (
        "the period to count must be a duration from 1s to 30d: '10000d'",
    )
    short = Observation(
        "1s",
        AT,
        (
            _process("a", "v1", first=AT - 10, last=AT - 10, scrapes=0),
            _process("b", "v2", first=AT - 5, last=AT - 0.5, scrapes=1),
        ),
        (_requests("a", "fra", 20), _requests("b", "fra", 20)),
    )
    assert short.counts("v2").problems == (
        "the last 1s holds fewer than two samples of each process of job shop that was "
        "scraped before it: a window must span at least two scrape intervals to count what "
        "they served",
    )


@pytest.mark.parametrize(("silent", "gone"), [(0.0, False), (25.0, False), (45.0, True)])
def test_a_canary_that_stopped_reporting_before_the_decision_cannot_be_decided(
    silent: float, gone: bool
) -> None:
    """A canary whose scrapes fail at the end of the window (its process died) kept a whole
    rate: its exposure ended at its last sample. Scraped every 15 s, one missed scrape (25 s
    of silence) is not enough; 45 s is: the gate cannot decide, naming the instance. Not in
    a lookback, which ends where the window starts."""
    last = AT - silent
    scrapes = int((last - START) // 15) + 1
    observation = Observation(
        "10m",
        AT,
        (
            _process("a", "v1", first=START - 5, last=AT, scrapes=41),
            _process("b", "v2", first=START - 5, last=last, scrapes=scrapes),
        ),
        (_requests("a", "fra", 6_000), _requests("b", "fra", 6_000 * (600 - silent) / 600)),
    )
    problems = observation.counts("v2").problems
    said = [problem for problem in problems if "stopped reporting" in problem]
    if gone:
        assert len(said) == 1 and "b (job shop, last scraped 45s before)" in said[0], problems
    else:
        assert not said, problems
    assert observation.counts("v2", at_decision=False).problems == ()


@pytest.mark.parametrize("change", ["replaced", "scaled down"])
def test_a_canary_replaced_or_scaled_down_in_the_window_is_judged(change: str) -> None:
    """One process of the new release stopped reporting while another of it reports on (a
    pod replaced by one with a new name, or two scaled to one): its traffic is judged."""
    successor_first = AT - 300 if change == "replaced" else START - 5
    observation = Observation(
        "10m",
        AT,
        (
            _process("a", "v1", first=START - 5, last=AT, scrapes=41),
            _process("b1", "v2", first=START - 5, last=AT - 300, scrapes=21),
            _process("b2", "v2", first=successor_first, last=AT, scrapes=21),
        ),
        (
            _requests("a", "fra", 6_000),
            _requests("b1", "fra", 3_000),
            _requests("b2", "fra", 3_000 if change == "replaced" else 6_000),
        ),
    )
    assert observation.counts("v2").problems == ()


def test_a_count_that_is_not_a_finite_number_cannot_be_judged() -> None:
    """A target exporting its 5xx counter as NaN or +Inf made Prometheus answer NaN, which
    was left out: the 5xx counted 0 and a regression passed."""
    client = _client()
    client.answers["responses"].append(_served("c", "fra", "503", math.nan))
    with pytest.raises(PrometheusError, match=r'answered nan for \{code="503".*NaN or \+Inf'):
        observe(client, MonitoringConfig(), "10m", AT)


def test_a_garbage_counter_is_no_count_and_costs_no_time() -> None:
    """A target exporting a counter near 1e16: its statistics took minutes (they cost the
    square root of the count) while --timeout bounds only the queries. More than 1e12
    requests in one location and release cannot be decided, at once."""
    import time

    observation = Observation(
        "10m",
        AT,
        (_process("a", "v1"), _process("b", "v2")),
        (_requests("a", "fra", 6_000), Served("shop", "b", "fra", {"200": 1e16, "500": 1e15})),
    )
    started = time.monotonic()
    counts = observation.counts("v2")
    decision = decide(counts, "v2", Thresholds(), window="10m")
    assert time.monotonic() - started < 5
    assert [p for p in counts.problems if "requests in fra: more than 1e+12 is no count" in p]
    assert decision.verdict is Verdict.UNDECIDED


@pytest.mark.parametrize(
    ("live", "silent", "down"),
    [
        # the only one serving nyc went silent while fra's reports on
        ({"b": ("fra", "production")}, {"c": "nyc"}, ["c"]),
        # two of three went silent (a crash loop), none started since
        ({"b": ("fra", "production")}, {"c": "fra", "d": "fra"}, ["c", "d"]),
        # a staging pod of the release stands in for no production canary
        ({"s": ("fra", "staging")}, {"c": "fra"}, ["c"]),
    ],
    ids=["the only one in a location", "two of three", "staging"],
)
def test_canaries_down_where_others_report_on_cannot_be_decided(
    live: dict[str, tuple[str, str]], silent: dict[str, str], down: list[str]
) -> None:
    """The release's process serving nyc went silent while fra's reports on, or two of three
    went silent (a crash loop) with none started since, or the only production one went
    silent beside a staging pod of the release: each location is judged on processes of the
    decided environment that report, so none of these can be decided."""
    processes = (
        _process("a", "v1"),
        *(_process(name, "v2", environment=env) for name, (_, env) in live.items()),
        *(_process(name, "v2", last=AT - 240, scrapes=25) for name in silent),
    )
    served = (
        _requests("a", "fra", 6_000),
        *(_requests(name, location, 6_000) for name, (location, _) in live.items()),
        *(_requests(name, location, 3_600) for name, location in silent.items()),
    )
    observation = Observation("10m", AT, processes, served)
    problems = observation.counts("v2", "production").problems
    said = [problem for problem in problems if "stopped reporting" in problem]
    assert len(said) == 1 and all(f"{name} (job shop" in said[0] for name in down), problems

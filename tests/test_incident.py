"""The incident sentinel comes from, replayed on real servers: the example app under
`sentinel run` (real uvicorn), the real Prometheus and Alertmanager of a LocalStack with the
demo's monitoring config and a webhook receiver, and the traffic plan of the example (three
locations through the location header; sin failing one request in five from a quarter of
the run on, an early failure in a middleware, one environment write, a new exception type).

The run happens once for the module (about 70 s: the minute of traffic `sentinel demo`
plays, plus start-up and shutdown); every process is stopped by pid before the tests read
what it left.

The expected alerts follow from the generated rules and routing (sentinel/mixin) with
demo_config() (SLO 99.5%, windows scaled by 1/60), and the plan's error ratios:

- sin (20% of its requests fail from 25% of the run on, 16% over the run): every burn
  window fires, the two pages (14.4x: 1m/5s, 6x: 6m/30s) and the two tickets (3x: 24m/2m,
  1x: 1h12m/6m); it is an outlier against the rest of the fleet (below 0.5%); and its
  first BackendUnavailable on /boom is a new exception type there.
- The service as a whole (about 0.7% over the run, under 1% in every phase): only the 1x
  ticket (0.5% over 1h12m and 6m, both longer than the run); 3x needs 1.5%.
- fra and iad (0.1% to 0.45%): no burn alert; their first BackendUnavailable on /boom, fra's
  QuotaStoreUnavailable before routing (route <unmatched>), iad's ExportFormatError on
  /export and iad's write to os.environ on /locale are each a ticket, since the Prometheus
  is new and has seen none of them before.
- The Watchdog, always.
- Nothing else: no SentinelStatusShift (the plan answers no 4xx), no release regression (one
  version), and no SentinelTrafficDrop: the traffic is steady, and its end, when every
  location goes quiet at once, is held for a minute (demo_config's traffic_drop_for), longer
  than the alerts take to read.

Routing: pages to /page, tickets to /ticket, the Watchdog to /watchdog; grouped by
alertname, job, slo and severity. Inhibition: sin's page holds back sin's tickets. They all
start within about two seconds of sin's first failures, the tickets first (their thresholds
are lower), so a sin ticket may be notified once before the page starts, and never after it:
which of them are depends on where the groups' ticks fall, so they are the only alerts whose
delivery is not fixed. Nothing holds back anything else (there is no global page).
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import clean_env, free_port

from sentinel._stack import (
    INSTALL_COMMAND,
    DeliveredAlert,
    LocalStack,
    demo_config,
    missing_binaries,
)
from sentinel.example import app as example_app
from sentinel.example import traffic
from sentinel.mixin._alertmanager import (
    PAGE_RECEIVER,
    TICKET_RECEIVER,
    WATCHDOG_RECEIVER,
    alertmanager_config,
)
from sentinel.mixin._rules import (
    ALERTS,
    BURN_ALERT,
    MUTATION_ALERT,
    NEW_EXCEPTION_ALERT,
    OUTLIER_ALERT,
    WATCHDOG_ALERT,
)

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
# The replay (about 75 s alone) runs in the first test's setup; beside other test workers
# on two cores it may take longer than the default 120 s for one test.
pytestmark = pytest.mark.timeout(300)
DURATION = 60.0
"""Seconds of traffic: what `sentinel demo` plays by default."""
SNAPSHOT_AT = 0.9
"""When Alertmanager's view is taken: every burn alert is firing, and every event alert
(held for 10 s) has ended. The service's 1x ticket needs its error ratio over the run so
far above 0.5%: about 0.6% at 85% of a run at a steady rate, less when a busy machine slows
the traffic unevenly; 90% leaves more room."""
JOB = "sentinel"
CONFIG = demo_config()
SLACK = 2.0
"""Seconds from an alert's start (Prometheus's evaluation) to its surely being in
Alertmanager: Prometheus sends it right after the evaluation (milliseconds here)."""

# -- the expected alerts --------------------------------------------------------------------


def _windows(severity: str) -> list[tuple[str, str]]:
    return [
        (CONFIG.window(burn.long), CONFIG.window(burn.short))
        for burn in CONFIG.burn_windows
        if burn.severity == severity
    ]


def _burn(severity: str, window: tuple[str, str], location: str | None) -> dict[str, str]:
    labels = {
        "alertname": BURN_ALERT,
        "severity": severity,
        "slo": CONFIG.slo_label,
        "scope": "location" if location else "global",
        "long_window": window[0],
        "short_window": window[1],
    }
    return labels | ({"location": location} if location else {})


def _new(location: str, route: str, error: type[BaseException]) -> dict[str, str]:
    return {
        "alertname": NEW_EXCEPTION_ALERT,
        "severity": "ticket",
        "location": location,
        "route": route,
        "exception_type": f"{error.__module__}.{error.__qualname__}",
    }


SIN_PAGES = [_burn("page", window, "sin") for window in _windows("page")]
SIN_TICKETS = [
    *(_burn("ticket", window, "sin") for window in _windows("ticket")),
    {"alertname": OUTLIER_ALERT, "severity": "ticket", "slo": CONFIG.slo_label, "location": "sin"},
    _new("sin", "/boom", example_app.BackendUnavailable),
]
SLOWEST_TICKET = CONFIG.burn_windows[-1]
GLOBAL_TICKET = _burn("ticket", _windows("ticket")[-1], None)
EVENTS = [
    _new("fra", "/boom", example_app.BackendUnavailable),
    _new("iad", "/boom", example_app.BackendUnavailable),
    _new("fra", "<unmatched>", example_app.QuotaStoreUnavailable),
    _new("iad", "/export", example_app.ExportFormatError),
    {
        "alertname": MUTATION_ALERT,
        "severity": "ticket",
        "location": "iad",
        "route": "/locale",
        "target": "os.environ",
    },
]
WATCHDOG = {"alertname": WATCHDOG_ALERT, "severity": "ticket"}

Key = frozenset[tuple[str, str]]


def _key(labels: dict[str, str]) -> Key:
    """An alert's identity: its labels but the target's and the series' bookkeeping ones."""
    return frozenset(
        (name, value)
        for name, value in labels.items()
        if name not in ("job", "instance", "alertstate", "__name__")
    )


FIRED = {_key(labels) for labels in [*SIN_PAGES, *SIN_TICKETS, GLOBAL_TICKET, *EVENTS, WATCHDOG]}
HELD_BACK = {_key(labels) for labels in SIN_TICKETS}
"""Held back by sin's page: notified at most before it starts."""
DELIVERED = FIRED - HELD_BACK
"""Notified, whatever the timing."""


def _show(keys: set[Key]) -> list[str]:
    return sorted(", ".join(f"{name}={value}" for name, value in sorted(key)) for key in keys)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Incident:
    """What one replay left, read before every process was stopped."""

    tally: traffic.Tally
    scraped: dict[tuple[str, str], float]
    fired: list[dict[str, str]]
    snapshot: list[dict[str, Any]]
    delivered: list[DeliveredAlert]
    notifications: list[dict[str, Any]]
    records: list[dict[str, Any]]
    output: str
    pids: list[int]
    timings: dict[str, float]


def _sent(tally: traffic.Tally) -> dict[tuple[str, str], float]:
    return {(location, str(status)): count for (location, status), count in tally.responses.items()}


def _scraped(stack: LocalStack) -> dict[tuple[str, str], float]:
    query = f'sum by (location, code) (sentinel_http_requests_total{{job="{JOB}"}})'
    return {
        (sample.labels["location"], sample.labels["code"]): sample.value
        for sample in stack.query(query)
    }


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the server accepts connections (no request: every request is counted)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _json_lines(*texts: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for text in texts for line in text.splitlines() if line.startswith("{")
    ]


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Incident]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on the PATH; install: {INSTALL_COMMAND}")
    directory = tmp_path_factory.mktemp("incident")
    port, metrics_port = free_port(), free_port()
    out_path, err_path = directory / "app.out", directory / "app.err"
    started = time.monotonic()
    timings: dict[str, float] = {}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        app = subprocess.Popen(
            [
                *SENTINEL,
                "run",
                "sentinel.example.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=clean_env(
                SENTINEL_LOCATION_HEADER=traffic.LOCATION_HEADER,
                SENTINEL_LOCATIONS=",".join(traffic.LOCATIONS),
                SENTINEL_METRICS_PORT=str(metrics_port),
                SENTINEL_METRICS_HOST="127.0.0.1",
            ),
            stdout=out,
            stderr=err,
        )
    pids = [app.pid]
    try:
        _wait_for_port(app, port, err_path)
        with LocalStack([f"127.0.0.1:{metrics_port}"], CONFIG, job=JOB) as stack:
            pids += stack.pids.values()
            assert stack.wait_for_scrape(20), stack.log_tail("prometheus")
            timings["stack ready"] = time.monotonic() - started
            tallies: list[traffic.Tally] = []
            sender = threading.Thread(
                target=lambda: tallies.append(
                    traffic.play(f"http://127.0.0.1:{port}", DURATION, timeout=10)
                ),
                name="incident-traffic",
            )
            played = time.monotonic()
            sender.start()
            try:
                _wait(lambda: time.monotonic() - played >= SNAPSHOT_AT * DURATION, DURATION)
                snapshot = stack.alertmanager_alerts()
            finally:
                sender.join(DURATION + 60)
            assert tallies, "the traffic generator failed (see the captured output)"
            tally = tallies[0]
            timings["traffic"] = time.monotonic() - played
            sent = _sent(tally)
            _wait(lambda: _scraped(stack) == sent, 15)
            scraped = _scraped(stack)

            def everything_delivered() -> bool:
                got = {_key(alert["labels"]) for alert in stack.delivered()}
                return got >= DELIVERED

            _wait(everything_delivered, 20)
            since = round(time.monotonic() - started) + 10
            fired = [
                sample.labels
                for sample in stack.query(f'max_over_time(ALERTS{{alertstate="firing"}}[{since}s])')
            ]
            delivered = stack.delivered()
            notifications = stack.notifications()
            timings["alerts read"] = time.monotonic() - started
    finally:
        _stop(app)
    timings["everything stopped"] = time.monotonic() - started
    records = _json_lines(out_path.read_text(), err_path.read_text())
    yield Incident(
        tally=tally,
        scraped=scraped,
        fired=fired,
        snapshot=snapshot,
        delivered=delivered,
        notifications=notifications,
        records=records,
        output=out_path.read_text() + err_path.read_text(),
        pids=pids,
        timings=timings,
    )


# -- the checks ---------------------------------------------------------------------------------


def test_every_process_is_gone(incident: Incident) -> None:
    """The app, Prometheus and Alertmanager were all stopped by pid (and reaped)."""
    assert len(incident.pids) == 3
    for pid in incident.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    print({name: round(seconds, 1) for name, seconds in incident.timings.items()})


def test_prometheus_scraped_exactly_what_was_sent(incident: Incident) -> None:
    """Per location and status code, the requests Prometheus read from sentinel's metrics
    endpoint are exactly those the traffic generator got answers to; every request was
    answered, and the plan's shape held (sin failing, the others healthy)."""
    tally = incident.tally
    assert tally.failed_connections == 0
    assert incident.scraped == _sent(tally)
    assert set(incident.scraped) == {
        ("fra", "200"),
        ("fra", "500"),
        ("iad", "200"),
        ("iad", "500"),
        ("sin", "200"),
        ("sin", "500"),
    }
    assert tally.kinds["mutation"] == 1
    assert tally.kinds["early"] > 0 and tally.kinds["new"] > 0
    errors = sum(count for (_, status), count in tally.responses.items() if status >= 500)
    assert errors / tally.total < 0.01, "the service's error ratio stays under 1%"
    sin_ratio = tally.responses[("sin", 500)] / (
        tally.responses[("sin", 500)] + tally.responses[("sin", 200)]
    )
    assert 0.1 < sin_ratio < 0.2


def test_alerts_that_fired_are_exactly_the_expected_ones(incident: Incident) -> None:
    """Prometheus fired exactly the expected alerts (the module docstring says why each),
    with the target's job on all but the Watchdog; no other alert the rules define."""
    fired = {_key(labels) for labels in incident.fired}
    assert fired == FIRED, {"unexpected": _show(fired - FIRED), "missing": _show(FIRED - fired)}
    assert SLOWEST_TICKET.factor == 1 and SLOWEST_TICKET.severity == "ticket"
    assert {labels["alertname"] for labels in incident.fired} <= set(ALERTS)
    for labels in incident.fired:
        assert labels.get("job") == (None if labels["alertname"] == WATCHDOG_ALERT else JOB)


def test_the_receiver_got_exactly_the_expected_alerts(incident: Incident) -> None:
    """Every alert that is not held back reached the webhook; sin's tickets at most before
    sin's page started; nothing else (the Watchdog included in the expected set)."""
    got = {_key(alert["labels"]) for alert in incident.delivered}
    assert got >= DELIVERED, _show(DELIVERED - got)
    assert got <= DELIVERED | HELD_BACK, _show(got - DELIVERED - HELD_BACK)
    firing = Counter(alert["path"] for alert in incident.delivered if alert["status"] == "firing")
    assert set(firing) == {"/page", "/ticket", "/watchdog"}


def _starts(delivered: list[DeliveredAlert], snapshot: list[dict[str, Any]]) -> dict[Key, float]:
    """When each alert started (Prometheus's evaluation), from what the receiver got and from
    Alertmanager's view (an alert held back all along is only there)."""
    starts = {}
    for labels, at in [
        *((alert["labels"], alert["starts_at"]) for alert in delivered),
        *((alert["labels"], alert["startsAt"]) for alert in snapshot),
    ]:
        starts[_key(labels)] = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    return starts


_MATCHER = re.compile(r'^([a-zA-Z_][a-zA-Z0-9_]*)(=~|!~|!=|=)"(.*)"$')


def _matches(matchers: list[str], labels: dict[str, str]) -> bool:
    """Alertmanager's matcher semantics: a missing label is "", regexes are anchored."""
    for matcher in matchers:
        found = _MATCHER.match(matcher)
        assert found, matcher
        name, operator, value = found.groups()
        actual = labels.get(name, "")
        if operator in ("=~", "!~"):
            if (re.fullmatch(value, actual) is not None) != (operator == "=~"):
                return False
        elif (actual == value) != (operator == "="):
            return False
    return True


def _held_back_but_notified(
    delivered: list[DeliveredAlert], snapshot: list[dict[str, Any]]
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Each (alert, holder) where ``alert`` was notified firing while ``holder``, an alert
    that an inhibit rule says holds it back, had started (``SLACK`` ago) and not resolved."""
    rules = alertmanager_config(CONFIG)["inhibit_rules"]
    starts = _starts(delivered, snapshot)
    labels_of = {_key(alert["labels"]): alert["labels"] for alert in delivered}
    labels_of |= {_key(alert["labels"]): alert["labels"] for alert in snapshot}
    resolved: dict[Key, float] = {}
    for alert in delivered:
        if alert["status"] == "resolved":
            key = _key(alert["labels"])
            resolved[key] = min(resolved.get(key, alert["received_at"]), alert["received_at"])
    violations = []
    for alert in delivered:
        if alert["status"] != "firing":
            continue
        for rule in rules:
            if not _matches(rule["target_matchers"], alert["labels"]):
                continue
            for source, labels in labels_of.items():
                if (
                    _matches(rule["source_matchers"], labels)
                    and all(labels.get(name) == alert["labels"].get(name) for name in rule["equal"])
                    and starts[source] + SLACK < alert["received_at"]
                    and resolved.get(source, float("inf")) > alert["received_at"]
                ):
                    violations.append((dict(alert["labels"]), dict(labels)))
    return violations


def test_notifications_are_routed_grouped_and_inhibited_as_configured(incident: Incident) -> None:
    """Each notification went to its severity's receiver and lists alerts of one group
    (alertname, job, slo, severity); one page notification lists both of sin's pages; a
    group is notified again only after its group interval. No alert was notified firing
    while an alert that the inhibit rules say holds it back had started (and not resolved);
    in Alertmanager's view near the end, sin's tickets are held back by sin's pages and
    nothing else is."""
    receivers = {"/page": PAGE_RECEIVER, "/ticket": TICKET_RECEIVER, "/watchdog": WATCHDOG_RECEIVER}
    by_group: dict[tuple[str, str], list[float]] = {}
    both_pages = {_key(labels) for labels in SIN_PAGES}
    listed_together = False
    for notification in incident.notifications:
        body, path = notification["body"], notification["path"]
        assert body["receiver"] == receivers[path], (path, body["receiver"])
        by_group.setdefault((path, body["groupKey"]), []).append(notification["received_at"])
        group_by = ["alertname", "job"]
        if path != "/watchdog":
            group_by += ["slo", "severity"]
        for alert in body["alerts"]:
            labels = alert["labels"]
            for name in group_by:
                assert labels.get(name) == body["groupLabels"].get(name), (name, body)
            if path == "/watchdog":
                assert labels["alertname"] == WATCHDOG_ALERT
            else:
                assert labels["severity"] == path.strip("/"), body
        firing = {_key(alert["labels"]) for alert in body["alerts"] if alert["status"] == "firing"}
        listed_together = listed_together or both_pages <= firing
    assert listed_together, "sin's two pages were never notified together"
    for (path, group), times in by_group.items():
        interval = CONFIG.seconds("1m") if path == "/watchdog" else CONFIG.seconds("5m")
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap > interval - min(1.0, interval / 2) for gap in gaps), (group, gaps)

    assert _held_back_but_notified(incident.delivered, incident.snapshot) == []
    # The check sees a violation when there is one: a sin ticket notified after the page.
    page_start = min(_starts(incident.delivered, [])[key] for key in both_pages)
    late = DeliveredAlert(
        receiver=TICKET_RECEIVER,
        path="/ticket",
        status="firing",
        labels={"job": JOB, **SIN_TICKETS[0]},
        annotations={},
        starts_at=datetime.fromtimestamp(page_start - 1, UTC).isoformat(),
        ends_at="0001-01-01T00:00:00Z",
        received_at=page_start + 10,
        group_key="",
    )
    assert _held_back_but_notified([*incident.delivered, late], incident.snapshot) != []
    early = {
        ", ".join(f"{name}={value}" for name, value in sorted(alert["labels"].items()))
        for alert in incident.delivered
        if _key(alert["labels"]) in HELD_BACK
    }
    print(f"held back by sin's page, notified before it started: {sorted(early)}")

    # Alertmanager's view near the end (the event alerts, held for 10 s, have ended by then).
    events = (NEW_EXCEPTION_ALERT, MUTATION_ALERT)
    fingerprints = {alert["fingerprint"]: _key(alert["labels"]) for alert in incident.snapshot}
    view = {
        _key(alert["labels"]): {fingerprints.get(fp) for fp in alert["status"]["inhibitedBy"]}
        for alert in incident.snapshot
        if alert["labels"]["alertname"] not in events
    }
    standing = {key for key in FIRED if dict(key)["alertname"] not in events}
    assert set(view) == standing, _show(set(view) ^ standing)
    for key, holders in view.items():
        if key in HELD_BACK:
            assert holders and holders <= both_pages, (_show({key}), holders)
        else:
            assert holders == set(), (_show({key}), holders)


# -- records and reports ------------------------------------------------------------------------


def test_every_5xx_of_the_failing_location_is_kept_and_weights_match_the_truth(
    incident: Incident,
) -> None:
    """The sampled request records contain every 5xx response of sin (one record each, with
    its own request id), and per location and status the records' sample rates add up to
    what was sent within 10%."""
    requests = [record for record in incident.records if record["event"] == "request"]
    sin_5xx = [r for r in requests if r["location"] == "sin" and r["status"] >= 500]
    assert len(sin_5xx) == incident.tally.responses[("sin", 500)]
    assert len({r["request_id"] for r in sin_5xx}) == len(sin_5xx)
    weights: Counter[tuple[str, int]] = Counter()
    for record in requests:
        weights[(record["location"], record["status"])] += record["sample_rate"]
    assert set(weights) == set(incident.tally.responses)
    for key, truth in incident.tally.responses.items():
        assert abs(weights[key] - truth) <= 0.1 * truth, (key, weights[key], truth)
    print(
        {
            f"{location} {status}": (round(weights[(location, status)]), truth)
            for (location, status), truth in sorted(incident.tally.responses.items())
        }
    )


def _line_of(function: Callable[..., Any], text: str) -> tuple[int, str]:
    """The line number in sentinel/example/app.py of the first line of ``function`` that
    contains ``text``, and the function's name as sentinel reports it."""
    lines, first = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return first + offset, function.__qualname__
    raise AssertionError(f"{text!r} not in {function.__qualname__}")


def test_each_exception_and_the_mutation_is_reported_once_with_its_code_line(
    incident: Incident,
) -> None:
    """Every occurrence of each exception type is reported exactly once: in full, or folded
    into an exception_summary that counts it; per type the total is what the plan sent. Each
    full report names the app's line that raised it. The one environment write is one
    global_state_mutated record with the line that wrote it. The server's own
    "Exception in ASGI application" never repeats a report."""
    expected = {
        f"{example_app.__name__}.BackendUnavailable": (
            incident.tally.kinds["boom"],
            _line_of(example_app.boom, "raise BackendUnavailable"),
        ),
        f"{example_app.__name__}.QuotaStoreUnavailable": (
            incident.tally.kinds["early"],
            _line_of(example_app.ReportQuota.__call__, "raise QuotaStoreUnavailable"),
        ),
        f"{example_app.__name__}.ExportFormatError": (
            incident.tally.kinds["new"],
            _line_of(example_app.export, "raise ExportFormatError"),
        ),
    }
    reports = [r for r in incident.records if r["event"] == "unhandled_exception"]
    summaries = [r for r in incident.records if r["event"] == "exception_summary"]
    counted: Counter[str] = Counter()
    for report in reports:
        counted[report["exception_type"]] += 1
        line, function = expected[report["exception_type"]][1]
        app_frames = [f for f in report["frames"] if f["file"].endswith("sentinel/example/app.py")]
        assert app_frames, report
        innermost = app_frames[-1]
        assert (innermost["line"], innermost["function"]) == (line, function), report
        assert innermost["in_app"] is True
    for summary in summaries:
        counted[summary["exception_type"]] += summary["occurrences"]
    assert counted == Counter({name: count for name, (count, _) in expected.items()})
    assert len({r["fingerprint"] for r in reports}) == len(expected)
    assert "Exception in ASGI application" not in incident.output
    [mutation] = [r for r in incident.records if r["event"] == "global_state_mutated"]
    line, function = _line_of(example_app.locale, 'os.environ["LC_ALL"]')
    assert (mutation["target"], mutation["key"], mutation["route"]) == (
        "os.environ",
        "LC_ALL",
        "/locale",
    )
    assert mutation["location"] == "iad"
    assert mutation["file"].endswith("sentinel/example/app.py")
    assert (mutation["line"], mutation["function"]) == (line, function)


# -- spans through the generated collector config -----------------------------------------------

OTELCOL = shutil.which("otelcol-contrib") or shutil.which("otelcol")


@pytest.mark.skipif(
    OTELCOL is None,
    reason="no otelcol-contrib or otelcol on the PATH (the OpenTelemetry Collector is not "
    "packaged for Debian; its releases ship the binary)",
)
def test_spans_reach_the_collector_through_the_generated_config(tmp_path: Path) -> None:
    """A real Collector with the configuration `sentinel collector-config` prints (its
    receivers moved to free loopback ports, the decision wait shortened) receives the app's
    spans over OTLP and its tail sampling keeps every error trace: the debug exporter
    reports at least as many spans as the app answered 5xx."""
    assert OTELCOL is not None
    grpc_port, http_port, exporter_port, port, metrics_port = (free_port() for _ in range(5))
    generated = subprocess.run(
        [
            *SENTINEL,
            "collector-config",
            "--latency-threshold-ms",
            "500",
            "--decision-wait-seconds",
            "1",
            "--exporter-endpoint",
            f"127.0.0.1:{exporter_port}",
        ],
        env=clean_env(SENTINEL_LOCATIONS=",".join(traffic.LOCATIONS)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr
    config = yaml.safe_load(generated.stdout)
    protocols = config["receivers"]["otlp"]["protocols"]
    protocols["grpc"]["endpoint"] = f"127.0.0.1:{grpc_port}"
    protocols["http"]["endpoint"] = f"127.0.0.1:{http_port}"
    # The collector's own metrics would listen on 0.0.0.0:8888.
    config["service"].setdefault("telemetry", {})["metrics"] = {"level": "none"}
    (tmp_path / "otelcol.yaml").write_text(yaml.safe_dump(config))
    collector_log = tmp_path / "otelcol.log"
    app_log = tmp_path / "app.log"
    with collector_log.open("wb") as log:
        collector = subprocess.Popen(
            [OTELCOL, f"--config={tmp_path / 'otelcol.yaml'}"], stdout=log, stderr=log
        )
    try:
        assert _wait(
            lambda: (_accepts(grpc_port) and _accepts(http_port)) or collector.poll() is not None,
            30,
        )
        assert collector.poll() is None, collector_log.read_text()[-3000:]
        with app_log.open("wb") as log:
            app = subprocess.Popen(
                [
                    *SENTINEL,
                    "run",
                    "sentinel.example.app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=clean_env(
                    SENTINEL_LOCATION_HEADER=traffic.LOCATION_HEADER,
                    SENTINEL_LOCATIONS=",".join(traffic.LOCATIONS),
                    SENTINEL_METRICS_PORT=str(metrics_port),
                    SENTINEL_METRICS_HOST="127.0.0.1",
                    OTEL_SERVICE_NAME="sentinel-example",
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{http_port}",
                ),
                stdout=log,
                stderr=log,
            )
        try:
            _wait_for_port(app, port, app_log)
            tally = traffic.play(f"http://127.0.0.1:{port}", 5.0)
            errors = sum(n for (_, status), n in tally.responses.items() if status >= 500)
            assert errors > 0
        finally:
            _stop(app)

        def spans() -> int:
            text = collector_log.read_text(errors="replace")
            return sum(int(n) for n in re.findall(r'"spans": (\d+)', text))

        assert _wait(lambda: spans() >= errors, 30), (
            spans(),
            errors,
            collector_log.read_text()[-3000:],
        )
    finally:
        _stop(collector, signal.SIGTERM)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True

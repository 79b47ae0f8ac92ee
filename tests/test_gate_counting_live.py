"""What the gate counts on a real Prometheus (2.42, scraping stand-in sentinel processes on
loopback), in the cases where a process's counters and its samples do not line up with the
window: a canary that crashes and restarts in place within it, instances the load balancer
sends nothing to, targets scraped at different intervals, a Prometheus that started within
the window (on empty storage), and request series without a location.

One Prometheus serves every scenario, each in its own job (the gate's selector picks it).
The targets' counters follow a schedule from the fixture's start (t0), and each decision is
asked about a window that ends at a fixed time after t0 (``observe`` at that instant), so
the answers do not depend on how fast this machine runs; only the state-file scenario runs
the command, over the last seconds. Every process is stopped at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import clean_env, free_port, stop, wait_for

from sentinel.gate import (
    Counts,
    GateDecision,
    Observation,
    PrometheusClient,
    Thresholds,
    Verdict,
    decide,
    observe,
)
from sentinel.mixin import MonitoringConfig

pytestmark = pytest.mark.timeout(240)
SENTINEL = [sys.executable, "-m", "sentinel.cli"]
AT = 60.0
"""The decisions' windows end this long after t0: Prometheus has scraped the scenarios for
more than half a window before a 30 s window starts."""
WINDOW = "30s"
FRA = "fra"
Rates = Mapping[tuple[str | None, str], float]
"""Requests per second per (location, code); a location of None: no location label."""


@dataclass
class Phase:
    """From ``start`` seconds after t0: the release the process reports (None: its scrapes
    fail, the process is down) and its requests per second; ``reset``: it (re)started then,
    counters from 0."""

    start: float
    version: str | None
    rates: Rates = field(default_factory=dict)
    reset: bool = False


@dataclass(eq=False)
class Target:
    """A stand-in sentinel process: ``sentinel_build_info`` and the request counters of its
    schedule, from ``initial`` (what a long-lived process served before t0); ``started``:
    its process_start_time_seconds, relative to t0 (None: not exported, as sentinel's
    multiprocess sidecar)."""

    job: str
    phases: list[Phase]
    initial: Mapping[tuple[str | None, str], float] = field(default_factory=dict)
    started: float | None = None
    t0: float = 0.0
    port: int = 0

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def exposition(self) -> bytes | None:
        elapsed = time.time() - self.t0
        counters = dict(self.initial)
        current = None
        for index, phase in enumerate(self.phases):
            if phase.start > elapsed:
                break
            end = self.phases[index + 1].start if index + 1 < len(self.phases) else elapsed
            if phase.reset:
                counters = {}
            for key, rate in phase.rates.items():
                counters[key] = counters.get(key, 0.0) + rate * (min(end, elapsed) - phase.start)
            current = phase
        if current is None or current.version is None:
            return None
        lines = [
            "# TYPE sentinel_build_info gauge",
            f'sentinel_build_info{{service="shop",version="{current.version}",'
            'sentinel_version="1",environment="production"} 1',
        ]
        if self.started is not None:
            lines += [
                "# TYPE process_start_time_seconds gauge",
                f"process_start_time_seconds {self.t0 + self.started:.3f}",
            ]
        lines.append("# TYPE sentinel_http_requests_total counter")
        for (location, code), value in sorted(counters.items(), key=str):
            where = "" if location is None else f'location="{location}",'
            lines.append(
                f'sentinel_http_requests_total{{{where}route="/x",method="GET",code="{code}"}} '
                f"{int(value)}"
            )
        return ("\n".join(lines) + "\n").encode()


def _healthy(per_second: float, location: str | None = FRA) -> Rates:
    """``per_second`` requests, one in a thousand a 500."""
    return {(location, "200"): per_second * 0.999, (location, "500"): per_second * 0.001}


def _long_lived(job: str, version: str, per_second: float, started: float | None = None) -> Target:
    """A process up long before t0 (half a million requests served), serving throughout."""
    rates = _healthy(per_second)
    initial = {key: rate * 2_000 for key, rate in rates.items()}
    return Target(job, [Phase(0, version, rates)], initial, started)


def _scenarios() -> dict[str, list[Target]]:
    canary = [
        Phase(0, None),
        # Starts 4 s into the window, fails a fifth of its requests for 8 s, crashes...
        Phase(34, "v2", {(FRA, "200"): 400.0, (FRA, "500"): 100.0}, reset=True),
        Phase(42, None),
        # ... and comes back in place (same instance), counters from 0, healthy.
        Phase(44, "v2", _healthy(500), reset=True),
    ]
    return {
        "crash": [
            _long_lived("crash", "v1", 500),
            _long_lived("crash", "v1", 500),
            Target("crash", canary),
        ],
        "hole": [
            _long_lived("hole", "v1", 300),
            _long_lived("hole", "v1", 300),
            _long_lived("hole", "v2", 300),
            # Two more v2 instances the load balancer sends nothing to.
            Target("hole", [Phase(0, "v2")]),
            Target("hole", [Phase(0, "v2")]),
        ],
        "slow": [_long_lived("slow", "v1", 300), _long_lived("slow", "v1", 300)],
        "fast": [_long_lived("fast", "v2", 300)],
        # Long-lived processes a Prometheus started at t0 sees first: the 90 s window before
        # AT reaches back before its first sample.
        "fresh": [
            _long_lived("fresh", "v1", 300),
            _long_lived("fresh", "v1", 300),
            Target("fresh", [Phase(0, "v2", _healthy(300))], _healthy(300 * 300)),
        ],
        "fresh-started": [
            _long_lived("fresh-started", "v1", 300, started=-86_400.0),
            _long_lived("fresh-started", "v1", 300, started=-86_400.0),
            Target(
                "fresh-started",
                [Phase(0, "v2", _healthy(300))],
                _healthy(300 * 300),
                started=-300.0,
            ),
        ],
        # Clean traffic, and two processes (one per release) whose request series carry no
        # location.
        "noloc": [
            Target("noloc", [Phase(0, version, {(location, "200"): 300.0})], {}, None)
            for version in ("v1", "v2")
            for location in (FRA, None)
        ],
    }


INTERVALS = {"slow": 5}
"""Seconds between scrapes of a job; 1 for the others."""


def _serve(target: Target) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = target.exposition()
            self.send_response(200 if body is not None else 503)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    target.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@dataclass
class Stack:
    url: str
    t0: float
    targets: dict[str, list[Target]]
    directory: Path

    def observe(self, job: str, window: str = WINDOW, at: float = AT) -> Observation:
        config = MonitoringConfig(selector=f'job=~"{job}"')
        client = PrometheusClient(self.url, timeout=20)
        return observe(client, config, window, self.t0 + at)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (tests/run.sh installs it)")
    directory = tmp_path_factory.mktemp("gate-counting")
    targets = _scenarios()
    servers = [_serve(target) for group in targets.values() for target in group]
    jobs = "".join(
        f"  - job_name: {job}\n    scrape_interval: {INTERVALS.get(job, 1)}s\n"
        "    scrape_timeout: 900ms\n"
        f"    static_configs: [{{targets: [{', '.join(repr(t.instance) for t in group)}]}}]\n"
        for job, group in targets.items()
    )
    (directory / "prometheus.yml").write_text(f"scrape_configs:\n{jobs}")
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    for group in targets.values():
        for target in group:
            target.t0 = t0
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert wait_for(lambda: _ready(url), 30), "Prometheus not ready"
        # Every decision's window ends at t0 + AT: wait for it and a scrape after it.
        time.sleep(max(0.0, t0 + AT + 3 - time.time()))
        yield Stack(url, t0, targets, directory)
    finally:
        stop(server)
        for each in servers:
            each.shutdown()
            each.server_close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _decide(counts: Mapping[tuple[str, str], Counts], window: str = WINDOW) -> GateDecision:
    return decide(counts, "v2", Thresholds(), window=window)


def test_a_canary_that_crashes_and_restarts_in_the_window_keeps_its_errors(stack: Stack) -> None:
    """v2 starts 4 s into the 30 s window, fails a fifth of its requests for 8 s (about
    4,000 requests, 800 errors), crashes, and restarts in place (counters from 0), healthy
    for 16 s more: what it served before the restart counts too (not only the 8,000
    requests and 8 errors since), and the gate stops it in fra on the 5xx ratio, as
    SentinelReleaseErrorRatioRegression does."""
    traffic = stack.observe("crash").counts("v2", "production")
    new = traffic[(FRA, "v2")]
    assert 9_000 < new.requests < 14_000, new
    assert 500 < new.errors < 900, new
    decision = _decide(traffic)
    assert decision.verdict is Verdict.STOP, decision.summary
    assert decision.summary == "stop: v2 regressed in fra (5xx ratio)"


def test_instances_that_get_no_traffic_are_a_drop(stack: Stack) -> None:
    """Two of v2's three instances report sentinel_build_info but get no request at all:
    they count in fra with none, so v2 serves a third of v1's rate per instance there, and
    the gate stops it on the traffic check, naming them."""
    idle = sorted(target.instance for target in stack.targets["hole"][3:])
    traffic = stack.observe("hole").counts("v2", "production")
    new = traffic[(FRA, "v2")]
    assert len(new.instances) == 3 and sorted(i for i, n in new.instances.items() if not n) == idle
    decision = _decide(traffic)
    assert decision.verdict is Verdict.STOP, decision.summary
    check = decision.locations[0].check("traffic per instance")
    assert check is not None
    assert check.verdict is Verdict.STOP, check.reason
    assert all(instance in check.reason for instance in idle), check.reason


def test_targets_scraped_at_different_intervals_compare_by_time(stack: Stack) -> None:
    """v1 in a job scraped every 5 s, v2 in one scraped every second, the same traffic per
    instance: the same rate (counted in scrapes v2 looked five times as exposed, and a
    drop to a fifth): no stop, the traffic check continues."""
    traffic = stack.observe("slow|fast").counts("v2", "production")
    new, baseline = traffic[(FRA, "v2")], traffic[(FRA, "v1")]
    rate = (new.requests / new.exposure) / (baseline.requests / baseline.exposure)
    assert 0.8 < rate < 1.25, (new, baseline)
    decision = _decide(traffic)
    assert decision.verdict is Verdict.CONTINUE, decision.summary


def test_a_prometheus_younger_than_the_window_cannot_count_it(stack: Stack) -> None:
    """Asked about the 90 s before AT when Prometheus started at t0, on processes that do
    not say when they started: their counters hold their lifetimes (half a million
    requests each), which the window cannot be told from: cannot decide, saying why (never
    the stop of a baseline counted by its lifetime)."""
    traffic = stack.observe("fresh", "90s").counts("v2", "production")
    decision = _decide(traffic, "90s")
    assert decision.verdict is Verdict.UNDECIDED, decision.summary
    summary = decision.summary
    assert summary.startswith(
        "cannot decide: Prometheus has scraped the instances in scope only since "
    ), summary
    assert "3 processes first scraped within it export no process_start_time_seconds" in summary


def test_processes_that_started_before_prometheus_looked_count_from_its_first_sample(
    stack: Stack,
) -> None:
    """The same, with processes that say when they started (a day and 5 minutes before
    t0): their series count by their increase from Prometheus's first sample, not by their
    lifetime, as the alerts count them, and the gate judges them: the same rate, no stop."""
    traffic = stack.observe("fresh-started", "90s").counts("v2", "production")
    new, baseline = traffic[(FRA, "v2")], traffic[(FRA, "v1")]
    assert baseline.requests < 2 * 300 * (AT + 2), baseline
    assert new.requests < 300 * (AT + 2), new
    decision = _decide(traffic, "90s")
    assert decision.verdict is Verdict.CONTINUE, decision.summary


def test_requests_without_a_location_are_left_out_and_the_state_file_stays_usable(
    stack: Stack, tmp_path: Path
) -> None:
    """Processes whose request series carry no location label: their requests are left out
    (and the output says so), the gate continues in fra alone and records only fra, and the
    file it wrote is one it and rollback-target read: a second run records again, and
    rollback-target prints v2."""
    config = tmp_path / "monitoring.yaml"
    config.write_text("selector: 'job=\"noloc\"'\n")
    state = tmp_path / "gate-state.json"
    command = [
        *SENTINEL, "gate", "--prometheus", stack.url, "--new", "v2", "--window", "20s",
        "--environment", "production", "--state", str(state), "--config", str(config),
    ]  # fmt: skip
    for _ in range(2):
        result = subprocess.run(
            [*command, "--json"], capture_output=True, text=True, env=clean_env(), timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        document = json.loads(result.stdout)
        assert [location["location"] for location in document["locations"]] == [FRA]
        assert any("no location label" in note for note in document["notes"]), document
    assert list(json.loads(state.read_text())["locations"]) == [FRA]
    target = subprocess.run(
        [*SENTINEL, "gate", "rollback-target", "--state", str(state), "--location", FRA],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert (target.returncode, target.stdout) == (0, "v2\n"), target.stderr

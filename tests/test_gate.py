"""`sentinel gate` end to end: the real Prometheus scraping real app instances under
`sentinel run`, the command run as a subprocess; the command's input checks, which refuse a
bad value (a version, a location, an environment name, a window, a state file that cannot
be used) before anything is queried or written; and `sentinel gate rollback-target`.
The environment scenario (a staging build, a 401 rollout, the state file with Prometheus
down) is tests/test_gate_live.py."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, free_port, stop, wait_for

from sentinel.cli import main

SENTINEL = [sys.executable, "-m", "sentinel.cli"]

APP = textwrap.dedent(
    """
    import itertools
    import os

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    FAILING = set(filter(None, os.environ.get("ROLLOUT_FAILING_LOCATIONS", "").split(",")))
    failing_requests = itertools.count()


    async def checkout(request: Request) -> PlainTextResponse:
        # In a failing location every fifth request fails, the first one included.
        if request.headers.get("x-location") in FAILING and next(failing_requests) % 5 == 0:
            return PlainTextResponse("backend misconfigured", status_code=503)
        return PlainTextResponse("ok")


    app = Starlette(routes=[Route("/checkout", checkout)])
    """
)

# Requests per location: v1 (the running release) serves most, so the gate picks it as
# the baseline by itself; 600 clean requests let the gate rule out a regression at a 1%
# floor (CONFIG) and 99% confidence (0.99**600 < 0.005).
TRAFFIC = {"v1": 900, "v2": 650, "v3": 650}
GATE_QUERIES = 7
"""What the gate asks about a window: each release's last and first report, scrapes and
start, which processes were scraped before the window, responses, mid-stream failures."""
CONFIG = "regression_min_ratio: 0.01\n"
LOCATIONS = ("fra", "iad")


@dataclass
class Instance:
    version: str
    port: int
    metrics_port: int


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Prometheus (scraping every second) and three instances of one app under `sentinel
    run`: v1 healthy, v2 answering 503 to every fifth request from fra, v3 healthy; traffic from
    fra and iad sent to each and scraped before the tests run."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (tests/run.sh installs it)")
    directory = tmp_path_factory.mktemp("gate")
    (directory / "rolloutapp.py").write_text(APP)
    (directory / "monitoring.yaml").write_text(CONFIG)
    instances = [Instance(version, free_port(), free_port()) for version in TRAFFIC]
    targets = ", ".join(f'"127.0.0.1:{instance.metrics_port}"' for instance in instances)
    (directory / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: shop\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    (directory / "data").mkdir()
    prometheus_port = free_port()
    url = f"http://127.0.0.1:{prometheus_port}"
    processes: list[subprocess.Popen[str]] = []
    with ExitStack() as logs:
        try:
            # Prometheus first: its first scrapes wait for target discovery (seconds), which
            # overlaps with the apps starting.
            processes.append(
                subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={directory / 'prometheus.yml'}",
                        f"--storage.tsdb.path={directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context((directory / "prometheus.log").open("w")),
                    text=True,
                )
            )
            for instance in instances:
                env = clean_env(
                    PYTHONPATH=str(directory),
                    SENTINEL_SERVICE="shop",
                    SENTINEL_VERSION=instance.version,
                    SENTINEL_ENVIRONMENT="production",
                    SENTINEL_METRICS_PORT=str(instance.metrics_port),
                    SENTINEL_LOCATION="fra",
                    SENTINEL_LOCATION_HEADER="x-location",
                    SENTINEL_LOCATIONS=",".join(LOCATIONS),
                    ROLLOUT_FAILING_LOCATIONS="fra" if instance.version == "v2" else "",
                )
                command = ["run", "rolloutapp:app", "--host", "127.0.0.1"]
                processes.append(
                    subprocess.Popen(
                        [*SENTINEL, *command, "--port", str(instance.port)],
                        cwd=directory,
                        env=env,
                        stdout=logs.enter_context(
                            (directory / f"{instance.version}.log").open("w")
                        ),
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            yield _prepare(directory, url, instances, processes[0])
        finally:
            for process in processes:
                stop(process)


def _prepare(
    directory: Path, url: str, instances: list[Instance], server: subprocess.Popen[str]
) -> dict[str, Any]:
    """Wait for the apps and their scrapes, send the traffic, wait until it is scraped."""
    for instance in instances:
        assert wait_for(partial(_accepts, instance.port), 20), _log(directory, instance)
    assert wait_for(lambda: _query(url, "count(up == 1)") == 3, 30), "targets not up"
    # Two requests per location first (v2 answers one of them in fra with a 503): a counter
    # series starts at its first scrape, what came before would not be counted.
    _send(instances, {version: 2 for version in TRAFFIC})
    series = 'count(sentinel_http_requests_total{job="shop"})'
    assert wait_for(lambda: _query(url, series) == 7, 15), "first requests not scraped"
    _send(instances, {version: count - 2 for version, count in TRAFFIC.items()})
    total = sum(TRAFFIC.values()) * len(LOCATIONS)
    scraped = 'sum(sentinel_http_requests_total{job="shop"})'
    assert wait_for(lambda: _query(url, scraped) == total, 15), "traffic not scraped"
    return {
        "url": url,
        "server": server,
        "directory": directory,
        "config": str(directory / "monitoring.yaml"),
    }


def test_gate_stops_a_release_that_fails_in_one_location(rollout: dict[str, Any]) -> None:
    """v2 answers 503 to a fifth of the requests from fra and serves iad cleanly: the gate
    exits 1 and names fra (and only fra) as the regressed location, in the table and the
    JSON, with the counts Prometheus has (extrapolated to the window's edges, so close to,
    not exactly, what was sent); asked about iad alone, it lets v2 continue there."""
    config = ("--config", rollout["config"])
    result = _gate(rollout["url"], "--new", "v2", "--baseline", "v1", "--window", "2m", *config)
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stop: v2 regressed in fra (5xx ratio)\n" in result.stdout
    rows = _rows(result.stdout)
    assert rows["fra"][9] == "STOP" and rows["iad"][9] == "CONTINUE"
    assert 600 <= int(rows["fra"][4]) <= 800 and 110 <= int(rows["fra"][6]) <= 170
    assert rows["fra"][3] == "1"  # one instance
    document = json.loads(
        _gate(rollout["url"], "--new", "v2", "--window", "2m", "--json", *config).stdout
    )
    assert document["verdict"] == "stop" and document["exit_code"] == 1
    assert document["stopped_locations"] == ["fra"]
    by_location = {entry["location"]: entry for entry in document["locations"]}
    assert by_location["fra"]["baseline"]["version"] == "v1"  # found: the busiest other
    assert 0.17 < by_location["fra"]["new"]["ratio"] < 0.23
    assert by_location["iad"]["verdict"] == "continue"
    only_iad = _gate(rollout["url"], "--new", "v2", "--location", "iad", "--window", "2m", *config)
    assert only_iad.returncode == 0, only_iad.stdout + only_iad.stderr
    assert "continue: no regression of v2 in iad\n" in only_iad.stdout


def test_gate_lets_a_healthy_release_continue(rollout: dict[str, Any], tmp_path: Path) -> None:
    """v3 serves both locations cleanly: exit 0, the baseline found by itself is v1 (the
    most successful), the window comes from the config (10m scaled by time_scale), and the
    traffic per instance is compared as well."""
    config = tmp_path / "monitoring.yaml"
    config.write_text(CONFIG + "time_scale: 0.2\n")  # regression_window 10m -> 2m
    result = _gate(rollout["url"], "--new", "v3", "--config", str(config))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over the last 2m " in result.stdout
    assert "continue: no regression of v3 in fra, iad\n" in result.stdout
    rows = _rows(result.stdout)
    assert rows["fra"][1:3] == ["v3", "new"] and rows["fra"][6] == "0"
    assert rows["fra"][9] == "CONTINUE" and rows["iad"][9] == "CONTINUE"
    assert re.search(r"^ +v1 +baseline ", result.stdout, re.MULTILINE)
    assert "  baseline: v1, the other version with the most successful responses" in result.stdout
    assert "  traffic per instance: no drop (650 requests per instance against 900 on v1" in (
        result.stdout
    )


def test_gate_cannot_decide_on_a_version_no_instance_runs(rollout: dict[str, Any]) -> None:
    """A version no instance reports (a typo, a build never deployed): exit 2, listing the
    versions Prometheus knows."""
    result = _gate(rollout["url"], "--new", "v4", "--window", "2m", "--config", rollout["config"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "reported the new version 'v4' in the window (versions seen: v1, v2, v3)" in (
        result.stdout
    )


def test_gate_cannot_decide_when_prometheus_is_down(rollout: dict[str, Any]) -> None:
    """With Prometheus stopped the gate never reads silence as health: exit 2, saying it
    cannot reach Prometheus at that URL (in the JSON as well)."""
    stop(rollout["server"])
    result = _gate(rollout["url"], "--new", "v3", "--window", "2m")
    print(result.stdout)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot decide: cannot reach Prometheus at {rollout['url']}" in result.stdout
    document = json.loads(_gate(rollout["url"], "--new", "v3", "--json").stdout)
    assert document["verdict"] == "undecided" and document["exit_code"] == 2


# -- input checks, in process against a stand-in that counts the queries ----------------


class _Recorder(BaseHTTPRequestHandler):
    queries: list[str]
    delay = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.queries.append(self.rfile.read(length).decode())
        time.sleep(self.delay)
        body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the gate gave up
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A stand-in Prometheus on loopback that answers every query with an empty vector and
    records the queries."""
    queries: list[str] = []
    handler = type("Handler", (_Recorder,), {"queries": queries})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", queries
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--new", "v2\x1b[2J"], "'v2\\x1b[2J'"),
        (["--new", "v2", "--baseline", "v1\n"], "v1\\n"),
        (
            ["--new", "v2", "--baseline", "v2"],
            "\"--baseline\" must be another release than --new: 'v2'",
        ),
        (["--new", ""], "''"),
        (["--new", "v2", "--location", "fra,iad"], "fra,iad"),
        (["--new", "v2", "--window", "ten minutes"], "ten minutes"),
        # an unset CI variable (--window "$WINDOW") is no window, not the default one
        (["--new", "v2", "--window", ""], '"--window" must be a duration'),
        (["--new", "v2", "--lookback", ""], '"--lookback" must be a duration'),
        (["--new", "v2", "--timeout", "0"], "0.0"),
        (["--new", "v2", "--timeout", "1e308"], "must be at most 3600 seconds (an hour): 1e+308"),
    ],
)
def test_bad_input_is_refused_before_any_query(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    named: str,
) -> None:
    """A version or location sentinel could not report, a baseline that is the new version,
    a bad window or timeout (one longer than an hour, which overflowed a timer thread):
    exit 2 with a message that shows the value, and Prometheus is never asked."""
    url, queries = recorder
    assert main(["gate", "--prometheus", url, *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sentinel gate: ") and named in error
    assert queries == []


def test_a_window_the_gate_cannot_count_is_never_asked_about(
    recorder: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """--window 10000d (its subqueries stepped 100d and found no sample: "no instance in
    scope reported the new version") is refused naming the option and the value, and
    Prometheus is never asked about it."""
    url, queries = recorder
    assert main(["gate", "--prometheus", url, "--new", "v2", "--window", "10000d"]) == 2
    assert capsys.readouterr().err == (
        "sentinel gate: \"--window\" must be a duration from 1s to 30d: '10000d'\n"
    )
    assert queries == []


def test_a_bad_config_is_refused_before_any_query(
    recorder: tuple[str, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A config whose regression_confidence is not in (0.5, 1): exit 2 naming the key and
    the value, nothing queried."""
    url, queries = recorder
    config = tmp_path / "monitoring.yaml"
    config.write_text("regression_confidence: 1.5\n")
    assert main(["gate", "--prometheus", url, "--new", "v2", "--config", str(config)]) == 2
    assert '"regression_confidence" must be in (0.5, 1): 1.5' in capsys.readouterr().err
    assert queries == []


@pytest.mark.parametrize(
    "url", ["prometheus:9090", "http://127.0.0.1:abc", "http://[::1", "http://127.0.0.1:99999"]
)
def test_a_bad_prometheus_url_is_refused(capsys: pytest.CaptureFixture[str], url: str) -> None:
    """--prometheus must be an http(s) URL with a port that is one: exit 2 showing it (not
    a traceback, nor urllib's message without the URL)."""
    assert main(["gate", "--prometheus", url, "--new", "v2"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"sentinel gate: the Prometheus URL must be http(s)://HOST[:PORT][/PATH]: {url!r}\n"
    )


def test_a_server_that_does_not_answer_http_cannot_decide(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--prometheus pointing at another service (an SSH banner comes back): exit 2, cannot
    decide, naming the URL and what it answered; never a traceback and exit 1 ("stop")."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def banner() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
            connection.shutdown(socket.SHUT_WR)
            connection.recv(65536)  # the rest of the request: closing with it unread is a reset

    thread = threading.Thread(target=banner, daemon=True)
    thread.start()
    try:
        assert main(["gate", "--prometheus", url, "--new", "v2"]) == 2
    finally:
        thread.join(5)
        listener.close()
    output = capsys.readouterr().out
    assert output.endswith(
        f"cannot decide: Prometheus at {url} answered no whole HTTP response: "
        "BadStatusLine('SSH-2.0-OpenSSH_8.9\\r\\n')\n"
    )


def test_an_unknown_version_cannot_be_decided(
    recorder: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A version no instance in scope reported is exit 2 (never 0), after asking for the
    counts and the versions with the configured selector."""
    url, queries = recorder
    assert main(["gate", "--prometheus", url, "--new", "v9", "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["verdict"] == "undecided"
    assert "'v9'" in document["summary"] and "versions seen: none" in document["summary"]
    assert len(queries) == GATE_QUERIES
    # The releases' last and first reports, scrapes, and which were scraped before the window
    # (the requests' count asks that too: a new series of a process first scraped within the
    # window that says it started before it is counted by its increase).
    assert sum("sentinel_build_info" in query for query in queries) == 6
    assert sum("sentinel_http_requests_total" in query for query in queries) == 1
    assert sum("process_start_time_seconds" in query for query in queries) == 3


@pytest.mark.parametrize(
    ("new", "environment"), [("v2 beta", "eu west/1"), ('v2"} or vector(1) #', "-prod")]
)
def test_releases_and_environments_sentinel_reports_are_judged_never_queried(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    new: str,
    environment: str,
) -> None:
    """A release or environment sentinel accepts (spaces, quotes, a leading dash) is taken:
    the gate asks Prometheus, none of its queries holds the value, and with no instance
    reporting it the release is unknown (exit 2, named)."""
    url, queries = recorder
    arguments = [f"--new={new}", f"--environment={environment}", "--json"]
    assert main(["gate", "--prometheus", url, *arguments]) == 2
    document = json.loads(capsys.readouterr().out)
    assert f"the new version {new!r} in the window" in document["summary"]
    assert document["environment"] == environment
    assert len(queries) == GATE_QUERIES
    assert not [query for query in queries if new in query or environment in query]


def test_an_undecided_run_leaves_the_state_file_alone(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With --state and the environment from SENTINEL_ENVIRONMENT, a run that cannot decide
    (an unknown version) writes nothing: no file where there was none, and the table says
    the file is unchanged."""
    url, queries = recorder
    monkeypatch.setenv("SENTINEL_ENVIRONMENT", "production")
    state = tmp_path / "gate-state.json"
    assert main(["gate", "--prometheus", url, "--new", "v9", "--state", str(state)]) == 2
    assert not state.exists() and len(queries) == GATE_QUERIES
    output = capsys.readouterr().out
    assert output.startswith("sentinel gate: v9 in production against ")
    assert f"state: {state} unchanged: only a decision to continue records" in output


def test_json_reports_the_exit_status_of_a_continue_that_could_not_be_recorded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A decision to continue whose state file cannot be written exits 2, and --json says
    exit_code 2 as well (a pipeline reading the JSON must not widen), with the verdict, and
    the state not recorded."""
    import sentinel.gate
    from sentinel.gate import Observation, Process, Served, _state

    def healthy(client: object, config: object, period: str, at: float) -> Observation:
        processes = tuple(
            Process("shop", name, version, "production", at, 40)
            for name, version in (("a:1", "v1"), ("b:1", "v2"))
        )
        served = tuple(
            Served("shop", name, "fra", {"200": 30_000.0, "500": errors})
            for name, errors in (("a:1", 30.0), ("b:1", 25.0))
        )
        return Observation(period, at, processes, served)

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sentinel.gate, "observe", healthy)
    monkeypatch.setattr(_state, "record", full_disk)
    state = tmp_path / "gate-state.json"
    arguments = ["--new", "v2", "--environment", "production", "--state", str(state), "--json"]
    assert main(["gate", "--prometheus", "http://127.0.0.1:9", *arguments]) == 2
    document = json.loads(capsys.readouterr().out)
    assert (document["verdict"], document["exit_code"]) == ("continue", 2)
    assert document["state"]["recorded"] is False
    assert "No space left on device" in document["state"]["message"]


@pytest.mark.parametrize(
    ("arguments", "environ", "named"),
    [
        (["--environment", "prod\tenv"], {}, '"--environment" must be an environment sentinel'),
        (["--environment="], {}, "''"),
        ([], {"SENTINEL_ENVIRONMENT": "prod\neu"}, '"SENTINEL_ENVIRONMENT" must be an env'),
        (["--lookback", "yesterday"], {}, "'yesterday'"),
        (["--window", "0s"], {}, "\"--window\" must be a duration from 1s to 30d: '0s'"),
        (["--traffic-ratio", "1.5"], {}, '"--traffic-ratio" must be a ratio'),
        (["--state", "STATE"], {}, '"--state" needs --environment'),
        (
            ["--state", "MISSING/state.json", "--environment", "production"],
            {},
            "does not exist",
        ),
    ],
)
def test_bad_environment_and_state_input_is_refused_before_any_query(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    arguments: list[str],
    environ: dict[str, str],
    named: str,
) -> None:
    """An environment sentinel could not report (from the option or SENTINEL_ENVIRONMENT), a bad
    lookback, window or traffic ratio, a state file without an environment or in a
    directory that does not exist: exit 2 naming the value, nothing queried or written."""
    url, queries = recorder
    monkeypatch.delenv("SENTINEL_ENVIRONMENT", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    arguments = [item.replace("STATE", str(tmp_path / "state.json")) for item in arguments]
    arguments = [item.replace("MISSING", str(tmp_path / "missing")) for item in arguments]
    assert main(["gate", "--prometheus", url, "--new", "v2", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sentinel gate: ") and named in error
    assert queries == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"global:\n  scrape_interval: 1s\n", "not a sentinel gate state file"),
        (b'{"kind": "sentinel-gate-state", "schema": 1, "loc', "corrupt state file"),
        (
            b'{"kind": "sentinel-gate-state", "schema": 1, "environment": "staging", '
            b'"locations": {}}',
            "records environment 'staging', not 'production'",
        ),
    ],
)
def test_a_state_file_that_cannot_be_used_is_refused_before_any_query(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: bytes,
    problem: str,
) -> None:
    """Another tool's file, a corrupt one, another environment's: exit 2 naming the file and
    the problem, nothing queried, the file unchanged."""
    url, queries = recorder
    state = tmp_path / "state.json"
    state.write_bytes(content)
    arguments = ["--new", "v2", "--environment", "production", "--state", str(state)]
    assert main(["gate", "--prometheus", url, *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sentinel gate: {state}: ") and problem in error
    assert queries == [] and state.read_bytes() == content


def test_prometheus_and_the_new_version_are_required_to_decide(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --prometheus or --new (and no sub-command): exit 2 saying what is missing."""
    assert main(["gate", "--new", "v2"]) == 2
    assert capsys.readouterr().err == (
        "sentinel gate: --prometheus required (or: sentinel gate rollback-target --state FILE)\n"
    )
    assert main(["gate"]) == 2
    assert "--prometheus and --new required" in capsys.readouterr().err


# -- rollback-target: the file alone ----------------------------------------------------


def _state_file(path: Path, environment: str = "production") -> Path:
    """A state file with v1 then v2 known good in fra, and v1 in iad."""
    from sentinel.gate import Counts, Thresholds, decide
    from sentinel.gate._state import record

    for version, locations, at in (("v1", ("fra", "iad"), 1.78e9), ("v2", ("fra",), 1.78e9 + 60)):
        traffic = {}
        for location in locations:
            traffic[(location, version)] = Counts(20_000, 10)
            traffic[(location, "base")] = Counts(20_000, 10)
        record(path, environment, decide(traffic, version, Thresholds()), {}, at)
    return path


def test_rollback_target_prints_the_known_good_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per location the release alone (for scripts); --exclude the release being rolled
    back gives the one before it; --json the records with when each was seen healthy; no
    Prometheus is named or needed."""
    state = str(_state_file(tmp_path / "gate-state.json"))
    assert main(["gate", "rollback-target", "--state", state, "--location", "fra"]) == 0
    assert capsys.readouterr().out == "v2\n"
    arguments = ["gate", "rollback-target", "--state", state, "--location", "fra"]
    assert main([*arguments, "--exclude", "v2", "--environment", "production"]) == 0
    assert capsys.readouterr().out == "v1\n"
    assert main(["gate", "rollback-target", "--state", state, "--location", "iad", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "version": "v1",
        "environment": "production",
        "state": state,
        "locations": {"iad": {"version": "v1", "last_seen_healthy": "2026-05-28T20:26:40Z"}},
    }


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ([], "the known-good releases differ by location (fra: v2, iad: v1); name one with"),
        (["--location", "syd"], "no known-good release is recorded for 'syd' (recorded: fra, iad)"),
        (["--environment", "staging"], "records environment 'production', not 'staging'"),
        (["--location", "fra,iad"], '"--location" must be a location'),
        (["--exclude", "v1\n"], '"--exclude" must be a release'),
    ],
)
def test_rollback_target_says_why_it_has_nothing_to_print(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], problem: str
) -> None:
    """Locations that disagree, a location without a record, a file of another environment,
    bad input: exit 2 with the reason, nothing on stdout."""
    state = str(_state_file(tmp_path / "gate-state.json"))
    assert main(["gate", "rollback-target", "--state", state, *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("sentinel gate rollback-target: ") and problem in captured.err


def test_rollback_target_refuses_a_missing_or_foreign_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No such file, or a file that is not the gate's: exit 2 naming it."""
    missing = tmp_path / "nowhere.json"
    assert main(["gate", "rollback-target", "--state", str(missing)]) == 2
    assert f"{missing}: no such state file" in capsys.readouterr().err
    foreign = tmp_path / "alertmanager.yaml"
    foreign.write_text("route:\n  receiver: page\n")
    assert main(["gate", "rollback-target", "--state", str(foreign)]) == 2
    assert f"{foreign}: not a sentinel gate state file" in capsys.readouterr().err


# -- what must never end the gate with a traceback (exit 1 is "stop") ------------------


def test_a_prometheus_trickling_its_answers_cannot_decide_after_the_timeout() -> None:
    """A Prometheus that answers one byte every 0.3 s (each socket read is in time, so the
    socket timeout never trips): `sentinel gate --timeout 1`, a real process, gives up on
    the first query after about a second, exit 2 naming the timeout, not after minutes."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    done = threading.Event()

    def trickle(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):  # the gate cut the connection
            connection.recv(65536)
            for byte in answer:
                if done.is_set():
                    return
                connection.sendall(bytes([byte]))
                time.sleep(0.3)

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed by the test
            while True:
                connection, _ = listener.accept()
                threading.Thread(target=trickle, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*SENTINEL, "gate", "--prometheus", url, "--new", "v2", "--timeout", "1"],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        done.set()
        listener.close()
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 15
    assert result.stdout.endswith(
        f"cannot decide: cannot reach Prometheus at {url}: timed out: no whole answer within "
        "1s, the time all of its queries share (a slower Prometheus needs a longer timeout)\n"
    )


def test_the_timeout_bounds_the_whole_decision(capsys: pytest.CaptureFixture[str]) -> None:
    """A Prometheus that answers each query after 0.6 s: `sentinel gate --timeout 2` gives
    up after about 2 s in all (not 2 s for each of its seven queries, 4 s and more), exit 2
    naming the timeout."""
    handler = type("Slow", (_Recorder,), {"queries": [], "delay": 0.6})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    started = time.monotonic()
    try:
        assert main(["gate", "--prometheus", url, "--new", "v2", "--timeout", "2"]) == 2
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert elapsed < 3, elapsed
    assert capsys.readouterr().out.endswith(
        f"cannot decide: cannot reach Prometheus at {url}: timed out: no whole answer within "
        "2s, the time all of its queries share (a slower Prometheus needs a longer timeout)\n"
    )


@pytest.mark.parametrize("command", ["decide", "rollback-target"])
def test_a_state_file_nested_too_deeply_is_not_sentinels(
    recorder: tuple[str, list[str]], tmp_path: Path, command: str
) -> None:
    """A state file of 100,000 "[" (a RecursionError in the JSON parser): the gate and
    rollback-target, real processes, exit 2 with one line saying it is not sentinel's state
    file, nothing asked or written."""
    url, queries = recorder
    state = tmp_path / "deep.json"
    state.write_bytes(b"[" * 100_000)
    if command == "decide":
        arguments = ["gate", "--prometheus", url, "--new", "v2", "--environment", "production"]
        prefix = "sentinel gate"
    else:
        arguments, prefix = ["gate", "rollback-target"], "sentinel gate rollback-target"
    result = subprocess.run(
        [*SENTINEL, *arguments, "--state", str(state)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"{prefix}: {state}: not a sentinel gate state file: JSON nested too deeply: "
        "b'[[[[[[[[[[[[[[[[[[[['\n"
    )
    assert result.stdout == "" and queries == []
    assert state.read_bytes() == b"[" * 100_000


def test_a_config_that_is_not_utf8_is_refused_before_any_query(
    recorder: tuple[str, list[str]], tmp_path: Path
) -> None:
    """--config saved as UTF-16: exit 2 (not a traceback's 1, "stop") with a sentence naming
    the file and how to fix it, nothing queried."""
    url, queries = recorder
    config = tmp_path / "monitoring.yaml"
    config.write_bytes("slo: 99.5\n".encode("utf-16"))
    result = subprocess.run(
        [*SENTINEL, "gate", "--prometheus", url, "--new", "v2", "--config", str(config)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"sentinel gate: {config}: the monitoring config must be UTF-8 text (byte 0 is not: "
    )
    assert result.stderr.endswith("save it as UTF-8, e.g. with iconv -t UTF-8\n")
    assert queries == []


CRASHING = textwrap.dedent(
    """
    import sys

    import sentinel.gate
    from sentinel.cli import main
    from sentinel.gate import _state


    def crash(*args, **kwargs):
        raise {error}


    sentinel.gate.observe = crash
    _state.rollback_target = crash
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        ('RuntimeError("a bug\\n  on two lines")', "unexpected RuntimeError: a bug on two lines"),
        ("KeyError('fra')", "unexpected KeyError: 'fra'"),
        ("RecursionError()", "unexpected RecursionError ("),
        ("OSError(28, 'No space left on device')", "OSError: [Errno 28] No space left on"),
    ],
)
@pytest.mark.parametrize("command", ["decide", "rollback-target"])
def test_an_unexpected_error_in_the_gate_is_cannot_decide(
    recorder: tuple[str, list[str]], tmp_path: Path, command: str, error: str, shown: str
) -> None:
    """Whatever the gate's code raises that it did not expect (a bug, a full disk), the
    process exits 2, "cannot decide", with one line on stderr naming the error: never 1 (a
    traceback's status, which a pipeline reads as "stop") nor 0."""
    url, _ = recorder
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING.format(error=error))
    state = _state_file(tmp_path / "gate-state.json")
    if command == "decide":
        arguments = ["gate", "--prometheus", url, "--new", "v2"]
        prefix = "sentinel gate: cannot decide: "
    else:
        arguments = ["gate", "rollback-target", "--state", str(state)]
        prefix = "sentinel gate rollback-target: nothing to print: "
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(prefix + shown.split(" (")[0]), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# -- helpers ---------------------------------------------------------------------------


def _gate(url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`sentinel gate` as a subprocess; one that does not finish in 60 s fails the test."""
    return subprocess.run(
        [*SENTINEL, "gate", "--prometheus", url, *arguments],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rows(table: str) -> dict[str, list[str]]:
    """The table's rows of the new version, by location (no 4xx: ten cells)."""
    return {
        line.split()[0]: line.split()
        for line in table.splitlines()
        if len(line.split()) == 10 and line.split()[2] == "new"
    }


def _accepts(port: int) -> bool:
    """Whether the server accepts connections (no request: it would be counted)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _query(url: str, expression: str) -> float | None:
    try:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def _send(instances: list[Instance], per_location: dict[str, int]) -> None:
    """``per_location[version]`` requests from each location to each instance, in parallel."""

    def send(instance: Instance, location: str, count: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{instance.port}", timeout=10) as client:
            for _ in range(count):
                client.get("/checkout", headers={"x-location": location})

    with ThreadPoolExecutor(len(instances) * len(LOCATIONS)) as pool:
        futures = [
            pool.submit(send, instance, location, per_location[instance.version])
            for instance in instances
            for location in LOCATIONS
        ]
        for future in futures:
            future.result(timeout=60)


def _log(directory: Path, instance: Instance) -> str:
    return (directory / f"{instance.version}.log").read_text()[-2000:]

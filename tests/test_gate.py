"""`sentinel gate` end to end: the real Prometheus scraping real app instances under
`sentinel run`, the command run as a subprocess; and the command's input checks, which
refuse a bad value before anything is queried."""

from __future__ import annotations

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
# the baseline by itself; 600 clean requests let the gate rule out a regression at the
# default 1% floor and 99% confidence (0.99**600 < 0.005).
TRAFFIC = {"v1": 900, "v2": 650, "v3": 650}
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
    return {"url": url, "server": server, "directory": directory}


def test_gate_stops_a_release_that_fails_in_one_location(rollout: dict[str, Any]) -> None:
    """v2 answers 503 to a fifth of the requests from fra and serves iad cleanly: the gate
    exits 1 and names fra (and only fra) as the regressed location, in the table and the
    JSON, with the counts Prometheus has (extrapolated to the window's edges, so close to,
    not exactly, what was sent); asked about iad alone, it lets v2 continue there."""
    result = _gate(rollout["url"], "--new", "v2", "--baseline", "v1", "--window", "2m")
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stop: v2 regressed in fra\n" in result.stdout
    rows = _rows(result.stdout)
    assert rows["fra"][6] == "STOP" and rows["iad"][6] == "CONTINUE"
    assert 600 <= int(rows["fra"][3]) <= 800 and 110 <= int(rows["fra"][4]) <= 170
    document = json.loads(_gate(rollout["url"], "--new", "v2", "--window", "2m", "--json").stdout)
    assert document["verdict"] == "stop" and document["exit_code"] == 1
    assert document["stopped_locations"] == ["fra"]
    by_location = {entry["location"]: entry for entry in document["locations"]}
    assert by_location["fra"]["baseline"]["version"] == "v1"  # found: the busiest other
    assert 0.17 < by_location["fra"]["new"]["ratio"] < 0.23
    assert by_location["iad"]["verdict"] == "continue"
    only_iad = _gate(rollout["url"], "--new", "v2", "--location", "iad", "--window", "2m")
    assert only_iad.returncode == 0, only_iad.stdout + only_iad.stderr
    assert "continue: no regression of v2 in iad\n" in only_iad.stdout


def test_gate_lets_a_healthy_release_continue(rollout: dict[str, Any], tmp_path: Path) -> None:
    """v3 serves both locations cleanly: exit 0, the baseline found by itself is v1 (the
    busiest other version), the window comes from the config (10m scaled by time_scale)."""
    config = tmp_path / "monitoring.yaml"
    config.write_text("time_scale: 0.2\n")  # regression_window 10m -> 2m
    result = _gate(rollout["url"], "--new", "v3", "--config", str(config))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over the last 2m " in result.stdout
    assert "continue: no regression of v3 in fra, iad\n" in result.stdout
    rows = _rows(result.stdout)
    assert rows["fra"][1:3] == ["v3", "new"] and rows["fra"][4] == "0"
    assert rows["fra"][6] == "CONTINUE" and rows["iad"][6] == "CONTINUE"
    assert re.search(r"^ +v1 +baseline ", result.stdout, re.MULTILINE)


def test_gate_cannot_decide_on_a_version_no_instance_runs(rollout: dict[str, Any]) -> None:
    """A version no instance reports (a typo, a build never deployed): exit 2, listing the
    versions Prometheus knows."""
    result = _gate(rollout["url"], "--new", "v4", "--window", "2m")
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

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.queries.append(self.rfile.read(length).decode())
        body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
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
        (["--new", 'v2"} or vector(1) #'], 'v2"} or vector(1) #'),
        (["--new", "v2", "--baseline", "v1\n"], "v1\\n"),
        (["--new", ""], "''"),
        (["--new", "v2", "--location", "fra,iad"], "fra,iad"),
        (["--new", "v2", "--window", "ten minutes"], "ten minutes"),
        (["--new", "v2", "--timeout", "0"], "0.0"),
    ],
)
def test_bad_input_is_refused_before_any_query(
    recorder: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    named: str,
) -> None:
    """A version or location that is not safe in a PromQL string, a bad window or timeout:
    exit 2 with a message that shows the value, and Prometheus is never asked."""
    url, queries = recorder
    assert main(["gate", "--prometheus", url, *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sentinel gate: ") and named in error
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


def test_a_bad_prometheus_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--prometheus must be an http(s) URL: exit 2 naming it."""
    assert main(["gate", "--prometheus", "prometheus:9090", "--new", "v2"]) == 2
    assert "'prometheus:9090'" in capsys.readouterr().err


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
    assert len(queries) == 3
    assert all("sentinel_build_info" in query for query in queries)


# -- helpers ---------------------------------------------------------------------------


def _gate(url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [*SENTINEL, "gate", "--prometheus", url, *arguments],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 30
    return result


def _rows(table: str) -> dict[str, list[str]]:
    """The table's rows of the new version, by location."""
    return {
        line.split()[0]: line.split()
        for line in table.splitlines()
        if len(line.split()) == 7 and line.split()[2] == "new"
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

"""The second incident, refused by the gate on real servers: the real Prometheus (scraping
every second) and app instances under `sentinel run` (real uvicorn), `sentinel gate` run as
a subprocess with a config whose time_scale (1/30) makes the decision window 20 s (each
step's traffic, scrape and gate runs must fit in it, also beside other test workers).

Prometheus scrapes two jobs: `shop`, the production scope the gate's selector covers, and
`shop-staging`, staging's own instances, outside it. The scenario, once for the module
(about 80 s alone), every process stopped by its pid at the end:

1. production v1 healthy in fra and iad; v2 reported only by a staging build that a
   production target points at (the seed's deployment tool listing staging and production
   builds together), serving fra and iad: the gate stops (exit 1), naming the instance, the
   locations and both environments, and writes no state;
2. that build stopped; v2 in production answering 401 to a third of fra's requests (no 5xx):
   the gate stops, naming fra and the 401 share, iad continuing; still no state;
3. that one stopped too; v2 in production, healthy: the gate continues (exit 0) and records
   v2 as the known-good release of fra and iad, though staging's own v2 (outside the
   selector) serves traffic all along;
4. Prometheus stopped: the gate cannot decide (exit 2) and leaves the file as it is, and
   `sentinel gate rollback-target` still prints v2 from the file alone.

Between steps the gate's window must have passed over the stopped instance (its series go
stale when its scrapes fail); the scenario waits for that by asking Prometheus.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import clean_env, free_port, stop, wait_for

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
# The scenario (about 80 s alone) runs in the first test's setup; beside other test
# workers on two cores it may take longer than the default 120 s for one test.
pytestmark = pytest.mark.timeout(300)
LOCATIONS = ("fra", "iad")
WINDOW_SECONDS = 20
REQUESTS = 700
"""Per instance and location in each step: 700 clean requests rule a regression out at the
config's 1% floor and 99% confidence (0.99**700 < 0.005)."""
STAGING_REQUESTS = 150
CONFIG = textwrap.dedent(
    """\
    selector: 'job="shop"'
    time_scale: 0.03333333333333333
    regression_min_ratio: 0.01
    """
)
"""The production scope is job="shop"; regression_window 10m scaled by 1/30 is 20s."""

APP = textwrap.dedent(
    """
    import itertools
    import os

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    UNAUTHORIZED = set(filter(None, os.environ.get("ROLLOUT_401_LOCATIONS", "").split(",")))
    requests_seen = itertools.count()


    async def checkout(request: Request) -> PlainTextResponse:
        # In a 401 location every third request is refused, the first one included.
        if request.headers.get("x-location") in UNAUTHORIZED and next(requests_seen) % 3 == 0:
            return PlainTextResponse("token signed for staging", status_code=401)
        return PlainTextResponse("ok")


    app = Starlette(routes=[Route("/checkout", checkout)])
    """
)


@dataclass(eq=False)  # hashed by identity: one key per process in a step's traffic
class Instance:
    name: str
    version: str
    environment: str
    job: str
    unauthorized: str = ""
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"


@dataclass
class Scenario:
    staging: subprocess.CompletedProcess[str]
    staging_json: dict[str, Any]
    unauthorized: subprocess.CompletedProcess[str]
    unauthorized_json: dict[str, Any]
    healthy: subprocess.CompletedProcess[str]
    state_after_stops: bool
    state: dict[str, Any]
    state_text: str
    rollback: subprocess.CompletedProcess[str]
    down: subprocess.CompletedProcess[str]
    state_text_after_down: str
    rollback_after_down: subprocess.CompletedProcess[str]
    rollback_fra_after_down: subprocess.CompletedProcess[str]
    instances: dict[str, Instance]
    seconds: float


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (tests/run.sh installs it)")
    started = time.monotonic()
    directory = tmp_path_factory.mktemp("gate-live")
    (directory / "shopapp.py").write_text(APP)
    (directory / "monitoring.yaml").write_text(CONFIG)
    instances = {
        "v1": Instance("v1", "v1", "production", "shop"),
        "staging-build": Instance("staging-build", "v2", "staging", "shop"),
        "v2-401": Instance("v2-401", "v2", "production", "shop", unauthorized="fra"),
        "v2": Instance("v2", "v2", "production", "shop"),
        "staging-own": Instance("staging-own", "v2", "staging", "shop-staging"),
    }
    jobs: dict[str, list[str]] = {}
    for instance in instances.values():
        jobs.setdefault(instance.job, []).append(instance.target)
    scrape_configs = "".join(
        f"  - job_name: {job}\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        for job, targets in jobs.items()
    )
    (directory / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n{scrape_configs}"
    )
    (directory / "data").mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    server: subprocess.Popen[str] | None = None
    with ExitStack() as logs:

        def start(instance: Instance) -> None:
            env = clean_env(
                PYTHONPATH=str(directory),
                SENTINEL_SERVICE="shop",
                SENTINEL_VERSION=instance.version,
                SENTINEL_ENVIRONMENT=instance.environment,
                SENTINEL_METRICS_PORT=str(instance.metrics_port),
                SENTINEL_LOCATION="fra",
                SENTINEL_LOCATION_HEADER="x-location",
                SENTINEL_LOCATIONS=",".join(LOCATIONS),
                ROLLOUT_401_LOCATIONS=instance.unauthorized,
            )
            log = logs.enter_context((directory / f"{instance.name}.log").open("w"))
            instance.process = subprocess.Popen(
                [
                    *SENTINEL,
                    "run",
                    "shopapp:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(instance.port),
                ],
                cwd=directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

        try:
            server = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address={url.removeprefix('http://')}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=logs.enter_context((directory / "prometheus.log").open("w")),
                text=True,
            )
            for name in ("v1", "staging-build", "staging-own"):
                start(instances[name])
            yield _play(directory, url, instances, server, start, started)
        finally:
            for instance in instances.values():
                if instance.process is not None:
                    stop(instance.process)
            if server is not None:
                stop(server)


def _play(
    directory: Path,
    url: str,
    instances: dict[str, Instance],
    server: subprocess.Popen[str],
    start: Any,
    started: float,
) -> Scenario:
    state = directory / "gate-state.json"
    gate = partial(_gate, url, directory, state)
    v1, staging_build, v2_401, v2, staging_own = instances.values()

    # 1. v2 only in a staging build a production target points at.
    _ready(directory, url, [v1, staging_build, staging_own])
    _step(url, {v1: REQUESTS, staging_build: REQUESTS, staging_own: STAGING_REQUESTS})
    staging = gate()
    staging_json = json.loads(gate("--json").stdout)

    # 2. The staging build replaced by a production v2 that answers 401 in fra.
    _replace(directory, url, staging_build, v2_401, start)
    _step(url, {v1: REQUESTS, v2_401: REQUESTS})
    unauthorized = gate()
    unauthorized_json = json.loads(gate("--json").stdout)
    state_after_stops = state.exists()

    # 3. The 401 build replaced by a healthy v2; staging's own v2 serves as well.
    _replace(directory, url, v2_401, v2, start)
    _step(url, {v1: REQUESTS, v2: REQUESTS, staging_own: STAGING_REQUESTS})
    healthy = gate()
    state_text = state.read_text() if state.exists() else ""
    rollback = _sentinel("gate", "rollback-target", "--state", str(state))

    # 4. The observability stack is down.
    stop(server)
    down = gate()
    return Scenario(
        staging=staging,
        staging_json=staging_json,
        unauthorized=unauthorized,
        unauthorized_json=unauthorized_json,
        healthy=healthy,
        state_after_stops=state_after_stops,
        state=json.loads(state_text) if state_text else {},
        state_text=state_text,
        rollback=rollback,
        down=down,
        state_text_after_down=state.read_text() if state.exists() else "",
        rollback_after_down=_sentinel("gate", "rollback-target", "--state", str(state)),
        rollback_fra_after_down=_sentinel(
            "gate", "rollback-target", "--state", str(state), "--location", "fra", "--json"
        ),
        instances=instances,
        seconds=time.monotonic() - started,
    )


# -- the proof ------------------------------------------------------------------------------


def test_a_staging_build_serving_production_traffic_stops_the_rollout(
    scenario: Scenario,
) -> None:
    """Exit 1, naming the staging build's instance, the locations it served and both
    environments, in the table and the JSON; staging's own v2, outside the selector, is not
    named."""
    result = scenario.staging
    print(f"the scenario took {scenario.seconds:.0f} s")
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    build = scenario.instances["staging-build"]
    message = (
        f"{build.target} (job shop) serves production traffic in fra, iad on v2 but reports "
        "environment 'staging', not 'production'"
    )
    assert f"environment: {message}\n" in result.stdout
    for location in LOCATIONS:
        assert f"{location}: stop\n" in result.stdout
    assert (
        f"  environment: {build.target} (job shop) runs v2 here but reports environment "
        "'staging', not 'production'\n"
    ) in result.stdout
    assert result.stdout.endswith(f"\nstop: {message}\n")
    assert scenario.instances["staging-own"].target not in result.stdout
    document = scenario.staging_json
    assert document["exit_code"] == 1 and document["environment"] == "production"
    (mismatch,) = document["environment_mismatches"]
    assert mismatch["instance"] == build.target and mismatch["locations"] == ["fra", "iad"]
    assert (mismatch["environment"], mismatch["expected"]) == ("staging", "production")
    assert sorted(document["stopped_locations"]) == ["fra", "iad"]


def test_a_release_answering_401_stops_naming_the_location_and_code(scenario: Scenario) -> None:
    """v2 answers 401 to a third of fra's requests and serves iad cleanly, no 5xx: exit 1,
    fra stopped on its 401 share (the code named), iad continuing, v1 the baseline found by
    itself."""
    result = scenario.unauthorized
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.endswith("\nstop: v2 regressed in fra (401 share)\n")
    assert "  401 share: regression: " in result.stdout
    assert "environment:" not in result.stdout  # the staging build left the window
    by_location = {entry["location"]: entry for entry in scenario.unauthorized_json["locations"]}
    fra, iad = by_location["fra"], by_location["iad"]
    assert fra["verdict"] == "stop" and iad["verdict"] == "continue"
    checks = {check["name"]: check for check in fra["checks"]}
    assert checks["401 share"]["verdict"] == "stop"
    assert 0.28 < checks["401 share"]["new"] < 0.39 and checks["401 share"]["baseline"] == 0
    assert checks["5xx ratio"]["verdict"] == "continue"
    assert fra["baseline"]["version"] == "v1" and fra["baseline"]["period"] == "window"
    assert fra["new"]["instances"] == {scenario.instances["v2-401"].target: fra["new"]["requests"]}
    assert not scenario.state_after_stops, "a stop wrote the state file"


def test_a_healthy_rollout_continues_and_is_recorded_as_known_good(scenario: Scenario) -> None:
    """Exit 0 with every check of both locations continuing; the state file records v2 as
    the known-good release of production in fra and iad, when it was seen healthy, and the
    evidence; rollback-target prints v2."""
    result = scenario.healthy
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "continue: no regression of v2 in fra, iad\n" in result.stdout
    assert "state: recorded v2 as the known-good release of production in fra, iad" in (
        result.stdout
    )
    assert scenario.instances["staging-own"].target not in result.stdout
    state = scenario.state
    assert state["kind"] == "sentinel-gate-state" and state["environment"] == "production"
    for location in LOCATIONS:
        entry = state["locations"][location]
        assert entry["known_good"] == "v2"
        assert entry["last_seen_healthy"] == state["updated_at"]
        evidence = entry["evidence"]
        assert evidence["verdict"] == "continue" and evidence["baseline"]["version"] == "v1"
        assert {check["name"] for check in evidence["checks"]} == {
            "5xx ratio",
            "traffic per instance",
        }
        assert evidence["new"]["requests"] >= REQUESTS
        assert evidence["window"] == f"{WINDOW_SECONDS}s"
    assert scenario.rollback.returncode == 0 and scenario.rollback.stdout == "v2\n"


def test_with_prometheus_down_the_gate_cannot_decide_and_the_rollback_target_remains(
    scenario: Scenario,
) -> None:
    """Prometheus stopped: exit 2 saying it cannot reach it, the state file byte for byte as
    it was; rollback-target still prints v2, from the file alone."""
    result = scenario.down
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot decide: cannot reach Prometheus at http://127.0.0.1:" in result.stdout
    assert "unchanged: only a decision to continue records a known-good release" in result.stdout
    assert scenario.state_text_after_down == scenario.state_text != ""
    assert scenario.rollback_after_down.returncode == 0
    assert scenario.rollback_after_down.stdout == "v2\n"
    document = json.loads(scenario.rollback_fra_after_down.stdout)
    assert document["version"] == "v2" and document["environment"] == "production"
    assert document["locations"]["fra"]["last_seen_healthy"] == scenario.state["updated_at"]


# -- helpers --------------------------------------------------------------------------------


def _sentinel(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SENTINEL, *arguments], env=clean_env(), capture_output=True, text=True, timeout=60
    )


def _gate(url: str, directory: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`sentinel gate` for v2 in production, with the scenario's config and state file."""
    return _sentinel(
        "gate",
        "--prometheus",
        url,
        "--new",
        "v2",
        "--environment",
        "production",
        "--config",
        str(directory / "monitoring.yaml"),
        "--state",
        str(state),
        *extra,
    )


def _accepts(port: int) -> bool:
    """Whether the server accepts connections (no request: it would be counted)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _ready(directory: Path, url: str, instances: list[Instance]) -> None:
    """Wait until the instances accept connections and Prometheus scrapes them."""
    for instance in instances:
        assert wait_for(partial(_accepts, instance.port), 20), _log(directory, instance)
    for instance in instances:
        up = f'up{{instance="{instance.target}"}} == 1'
        assert wait_for(lambda up=up: _query(url, up), 20), (
            f"{instance.name} not scraped: {_scrape_error(url, instance)}\n"
            f"{_log(directory, instance)}"
        )


def _replace(directory: Path, url: str, old: Instance, new: Instance, start: Any) -> None:
    """Stop ``old`` (by its pid), start ``new``, and wait until ``old`` has left the gate's
    window (its last sample older than the window, with a second to spare)."""
    assert old.process is not None
    stop(old.process)
    start(new)
    _ready(directory, url, [new])
    gone = f'last_over_time(sentinel_build_info{{instance="{old.target}"}}[{WINDOW_SECONDS + 1}s])'
    assert wait_for(lambda: _query(url, gone) is None, WINDOW_SECONDS + 10), f"{old.name} stays"


def _step(url: str, traffic: dict[Instance, int]) -> None:
    """Send ``traffic[instance]`` requests from each location to each instance in parallel,
    then wait until Prometheus has scraped all of them."""
    before = {instance: _total(url, instance) for instance in traffic}

    def send(instance: Instance, location: str, count: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{instance.port}", timeout=10) as client:
            for _ in range(count):
                client.get("/checkout", headers={"x-location": location})

    with ThreadPoolExecutor(len(traffic) * len(LOCATIONS)) as pool:
        futures = [
            pool.submit(send, instance, location, count)
            for instance, count in traffic.items()
            for location in LOCATIONS
        ]
        for future in futures:
            future.result(timeout=60)
    for instance, count in traffic.items():
        expected = before[instance] + count * len(LOCATIONS)
        assert wait_for(lambda i=instance, e=expected: _total(url, i) == e, 15), (
            f"{instance.name}: {_total(url, instance)} requests scraped, not {expected}"
        )


def _total(url: str, instance: Instance) -> float:
    value = _query(url, f'sum(sentinel_http_requests_total{{instance="{instance.target}"}})')
    return value or 0.0


def _query(url: str, expression: str) -> float | None:
    try:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def _scrape_error(url: str, instance: Instance) -> str:
    """What Prometheus says of its last scrape of ``instance``."""
    try:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return f"no targets from Prometheus ({error!r})"
    for target in targets:
        if target.get("labels", {}).get("instance") == instance.target:
            return f"health {target.get('health')!r}, last error {target.get('lastError')!r}"
    return f"{instance.target} is not among Prometheus's targets"


def _log(directory: Path, instance: Instance) -> str:
    return (directory / f"{instance.name}.log").read_text()[-2000:]

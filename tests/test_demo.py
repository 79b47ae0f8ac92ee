"""`sentinel demo`: the incident against the example app, ended by itself, summarized."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_env

APP = Path(__file__).resolve().parents[1] / "sentinel" / "example" / "app.py"
HAVE_SERVERS = bool(shutil.which("prometheus")) and bool(
    shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
)


def _demo(*arguments: str, path: str | None = None, timeout: float = 90) -> Any:
    env = clean_env()
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _by_type(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        entry["exception_type"].rpartition(".")[2]: entry
        for entry in summary["exceptions"].values()
    }


def test_demo_plays_the_incident_and_counts_exactly_what_it_sent() -> None:
    """A short demo without servers exits 0; sentinel counted exactly what was sent per
    location; sin fails at 20% while the service stays under 1%; each failure is reported
    once per fingerprint with the app's own code line and its repeats counted; the
    environment write is reported with its code location; the records kept stand for the
    requests (within 30% after 15 s: each sampling key holds up to one sample rate of credit
    not yet spent on a record; the 20 s run with the servers holds them to 10%). 15 s: the
    plan's events come at request counts past a share of the run, and must come also at a
    fraction of one core (beside other test workers)."""
    result = _demo("--duration", "15", "--json", "--no-servers")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    locations = summary["locations"]
    assert set(locations) == {"fra", "iad", "sin"}
    for entry in locations.values():
        assert entry["requests"] == entry["sent"] == entry["records_seen"] > 0
        assert entry["records_kept"] <= entry["records_seen"]
        assert abs(entry["estimated_requests"] - entry["requests"]) <= 0.3 * entry["requests"]
    # sin fails one in five from a quarter of the run on
    assert 0.1 <= locations["sin"]["error_ratio"] <= 0.2
    assert locations["sin"]["burn_rate"] >= 14.4
    assert summary["global"]["error_ratio"] < 0.01
    exceptions = _by_type(summary)
    assert set(exceptions) == {"BackendUnavailable", "QuotaStoreUnavailable", "ExportFormatError"}
    assert exceptions["BackendUnavailable"]["code"].endswith("in boom")
    assert exceptions["ExportFormatError"]["code"].endswith("in export")
    assert exceptions["QuotaStoreUnavailable"]["code"].endswith("in ReportQuota.__call__")
    # the staging build's stack has its auth middleware in it: its own fingerprints
    assert (
        sum(entry["count"] for entry in summary["exceptions"].values())
        == (summary["global"]["errors"])
    )
    deploy = summary["deploy"]
    assert (deploy["location"], deploy["environment"]) == ("fra", "staging")
    assert 0.3 <= deploy["codes"]["401"] / deploy["requests"] <= 0.5
    assert locations["fra"]["4xx"] == deploy["codes"]["401"]
    # the failing customer is named among the worst three the summary prints, though far
    # from the top by traffic (in a short run on a loaded machine a small customer with a
    # few of sin's failures can rank beside it)
    shown = {row["tenant"]: row for row in summary["tenants"][:3]}
    acme = shown["acme-logistics"]
    assert acme["error_ratio"] >= 0.1 and acme["share_of_traffic"] < 0.01
    # while its locations look healthy: a tenth of its ratio, burning too slowly to page
    for name in ("fra", "iad"):
        assert locations[name]["error_ratio"] < acme["error_ratio"] / 10, locations[name]
        assert locations[name]["burn_rate"] < 14.4, locations[name]
    [mutation] = summary["mutations"]
    assert (mutation["target"], mutation["key"], mutation["route"]) == (
        "os.environ",
        "LC_ALL",
        "/locale",
    )
    assert Path(mutation["code"].rpartition(":")[0]).resolve() == APP
    assert summary["alerting"]["alerts"] is None
    assert "--no-servers" in summary["alerting"]["note"]
    # plain progress lines when stderr is not a terminal, no escape sequences
    assert "requests" in result.stderr
    assert "\x1b[" not in result.stderr


def test_the_human_summary_reads_at_a_glance() -> None:
    """Without --json: a table per location, the exceptions with their code lines, the
    mutation, and what the burn rates would page (10 s: the plan's events come at request
    counts past a share of the run, and must come also at a fraction of one core)."""
    result = _demo("--duration", "10", "--no-servers")
    assert result.returncode == 0, result.stderr
    for expected in (
        "what sentinel counted, per location",
        "(service)",
        "BackendUnavailable",
        "ExportFormatError",
        "QuotaStoreUnavailable",
        "os.environ 'LC_ALL' by /locale",
        "burn fast enough to page: sin",
    ):
        assert expected in result.stdout, result.stdout


def test_without_the_servers_installed_it_says_how_to_get_alerts(tmp_path: Path) -> None:
    """With Prometheus and Alertmanager absent from PATH the demo still runs, says alerting
    needs them and prints the command that installs them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = _demo("--duration", "2", "--json", path=str(bin_dir))
    assert result.returncode == 0, result.stderr
    note = json.loads(result.stdout)["alerting"]["note"]
    assert "apt-get install -y prometheus prometheus-alertmanager" in note


def test_a_server_that_does_not_start_fails_the_demo_and_leaves_nothing(tmp_path: Path) -> None:
    """A `prometheus` that exits at once: exit status 1, the message names it, and the
    Alertmanager started before it is gone (no process runs a program from this test's
    PATH directory; other tests may run Alertmanagers of their own meanwhile)."""
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if alertmanager is None:
        pytest.skip("prometheus-alertmanager is not installed (tests/run.sh installs it)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prometheus").write_text("#!/bin/sh\necho 'bad flag' >&2\nexit 3\n")
    (bin_dir / "prometheus").chmod(0o755)
    (bin_dir / Path(alertmanager).name).symlink_to(alertmanager)
    result = _demo("--duration", "2", "--json", path=f"{bin_dir}{os.pathsep}{os.defpath}")
    assert result.returncode == 1, result.stdout
    assert "prometheus" in result.stderr.lower()
    assert result.stdout == ""
    assert _processes_started_from(bin_dir) == set()


@pytest.mark.skipif(not HAVE_SERVERS, reason="prometheus and prometheus-alertmanager not on PATH")
def test_with_the_servers_the_failing_location_pages(tmp_path: Path) -> None:
    """With Prometheus and Alertmanager installed, the page for sin (and only sin among the
    locations) is delivered to the demo's webhook receiver within the run, no other
    customer's page than the failing one's, and the servers are stopped afterwards."""
    result = _demo("--duration", "20", "--json", timeout=100)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for entry in summary["locations"].values():
        assert abs(entry["estimated_requests"] - entry["requests"]) <= 0.1 * entry["requests"]
    alerting = summary["alerting"]
    burns = {
        alert["location"]
        for alert in alerting["alerts"]
        if alert["alertname"] == "SentinelErrorBudgetBurn" and alert["severity"] == "page"
    }
    assert burns == {"sin"}  # the failing customer's locations, fra and iad, do not page
    tenants = {
        alert["tenant"]
        for alert in alerting["alerts"]
        if alert["alertname"] == "SentinelTenantErrorBudgetBurn" and alert["severity"] == "page"
    }
    # the failing customer's page, when it comes within the run, is the only customer's
    assert tenants <= {"acme-logistics"}, alerting["alerts"]
    names = {alert["alertname"] for alert in alerting["alerts"]}
    # on failure, what was delivered and held back, and whether the write was recorded
    shown = json.dumps({"alerting": alerting, "mutations": summary["mutations"]}, indent=1)
    assert {"SentinelUnhandledExceptionNew", "SentinelGlobalStateMutated"} <= names, shown
    # the deploy that answers 401: the status shift fires for fra (delivered, or held back by
    # the release regression that names its cause), and the gate refuses the staging build
    shifted = [
        alert
        for alert in [*alerting["alerts"], *alerting["held_back"]]
        if alert["alertname"] in {"SentinelStatusShift", "SentinelReleaseErrorRatioRegression"}
    ]
    assert {alert["location"] for alert in shifted} == {"fra"}
    gate = summary["gate"]
    assert (gate["exit_code"], gate["verdict"], gate["stopped_locations"]) == (1, "stop", ["fra"])
    [mismatch] = gate["environment_mismatches"]
    assert (mismatch["environment"], mismatch["expected"]) == ("staging", "production")
    for url in (alerting["prometheus"], alerting["alertmanager"]):
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/-/ready", timeout=2)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (children, their children...), by /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not HAVE_SERVERS, reason="prometheus and prometheus-alertmanager not on PATH")
@pytest.mark.parametrize(
    ("stop", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGHUP, 129)],
    ids=["ctrl-c", "sigterm", "sighup"],
)
def test_a_stop_signal_stops_every_process_it_started(stop: signal.Signals, status: int) -> None:
    """SIGINT (Ctrl-C), SIGTERM (kill, timeout, a CI runner's cancel) or SIGHUP (a closed
    terminal) in the middle of the run: the demo's exit status says which, no server is left
    listening, and no process it started (Prometheus, Alertmanager, the staging build, in
    sessions of their own) is left running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sentinel.cli", "demo", "--duration", "60"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a runner started in the background by a shell without job
        # control (nohup ... &) passes SIGINT on ignored, and Python keeps it so.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 30
        urls: list[str] = []
        assert process.stderr is not None
        while time.monotonic() < deadline and not urls:
            line = process.stderr.readline()
            if "Prometheus http://" in line:
                urls = [word for word in line.replace(",", " ").split() if "://" in word]
        assert urls, "the demo never said where Prometheus runs"
        time.sleep(2)
        started = _descendants(process.pid)
        assert len(started) >= 3, started  # the staging build, Prometheus, Alertmanager
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, err
    for url in urls:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/-/ready", timeout=2)
    left = {pid for pid in started if _alive(pid)}
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


@pytest.mark.parametrize("duration", ["nan", "inf", "-1", "0"])
def test_a_duration_that_never_ends_is_refused(duration: str) -> None:
    result = _demo("--duration", duration, "--no-servers", timeout=30)
    assert result.returncode == 2
    assert f'"--duration" must be a number > 0: {float(duration)!r}' in result.stderr


@pytest.mark.parametrize("duration", ["1e308", "86401"])
def test_a_duration_beyond_a_day_is_refused(duration: str) -> None:
    """--duration 1e308 overflowed the count bound (an OverflowError traceback, exit 1):
    anything above a day is a usage error showing the value, before anything starts."""
    result = _demo("--duration", duration, "--no-servers", timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f'sentinel demo: "--duration" must be at most 86400 seconds (a day): {float(duration)!r}\n'
    )
    assert result.stdout == ""


def test_the_shells_sentinel_and_otel_variables_do_not_change_the_demo() -> None:
    """A developer's shell exporting a console span exporter and mutation mode off: the
    demo's JSON is still the only thing on stdout, and the environment write is still
    reported (the demo reads no SENTINEL_* or OTEL_* variable)."""
    env = clean_env()
    env.update(
        OTEL_TRACES_EXPORTER="console",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        SENTINEL_MUTATION_MODE="off",
        SENTINEL_LOCATIONS="elsewhere",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", "--duration", "3", "--no-servers", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [m["target"] for m in summary["mutations"]] == ["os.environ"], summary["mutations"]
    assert set(summary["locations"]) == {"fra", "iad", "sin"}


def test_the_count_bound_grows_with_the_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The traffic is bounded by count as well as time, and the count bound is far above
    what a run of that duration sends: a 15-minute run is not cut short after 7 minutes."""
    from sentinel import _demo
    from sentinel.example import traffic

    bounds: list[int] = []
    play = traffic.play

    def recording_play(*args: Any, max_requests: int, **kwargs: Any) -> traffic.Tally:
        bounds.append(max_requests)
        return play(*args, max_requests=max_requests, **kwargs)

    monkeypatch.setattr(traffic, "play", recording_play)
    assert _demo.run_demo(1.0, 0, True, servers=False, out=io.StringIO(), err=io.StringIO()) == 0
    assert bounds == [max(10_000, _demo.MAX_REQUESTS_PER_SECOND)]
    assert _demo.MAX_REQUESTS_PER_SECOND * 900 > 900 * 20_000  # far above one connection


def test_on_a_terminal_it_shows_a_live_table() -> None:
    """stderr on a terminal: rich draws the progress bar and the per-location table in place
    (cursor movement), and the summary still goes to stdout."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sentinel.cli", "demo", "--duration", "3", "--no-servers"],
            env=clean_env(TERM="xterm-256color", COLUMNS="100"),
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = process.communicate(timeout=30)
    finally:
        os.close(controller)
    screen = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, screen
    assert "\x1b[" in screen  # drawn in place, not printed line by line
    for expected in ("burn (10s)", "sin", "requests"):
        assert expected in screen
    assert "what sentinel counted, per location" in out


def _processes_started_from(directory: Path) -> set[int]:
    """The live processes whose program (argv[0]) is in ``directory``."""
    found = set()
    prefix = f"{directory}{os.sep}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def test_the_summary_prints_what_the_app_sent_verbatim() -> None:
    """rich reads "[a...]" as a markup tag: a fingerprint starting with a letter, a route, a
    tenant or a version with brackets in it are printed as they are, not swallowed."""
    import io

    from rich.console import Console

    from sentinel._demo import _render_summary

    row = {"requests": 10, "errors": 1, "error_ratio": 0.1, "burn_rate": 100.0}
    summary: dict[str, Any] = {
        "locations": {
            "[loc]": {**row, "records_seen": 10, "records_kept": 2, "estimated_requests": 10}
        },
        "global": row,
        "slo": 99.9,
        "exceptions": {
            "abcdef0123456789": {
                "count": 3,
                "exception_type": "app.Boom",
                "phase": "request",
                "route": "/x/[id]",
                "code": "app.py:7 in boom",
            }
        },
        "deploy": {
            "location": "fra",
            "version": "[b]2.0",
            "environment": "[staging]",
            "codes": {"401": 4},
            "requests": 8,
        },
        "gate": None,
        "tenants": [
            {
                "tenant": "[red]acme",
                "errors": 1,
                "requests": 10,
                "error_ratio": 0.1,
                "share_of_traffic": 0.01,
            }
        ],
        "mutations": [
            {
                "target": "os.environ",
                "key": "LC_ALL",
                "route": "/[lang]",
                "code": "app.py:9 in locale",
                "attribution": "exact",
            }
        ],
        "alerting": {"alerts": None, "note": "see [docs]", "held_back": None},
    }
    out = io.StringIO()
    _render_summary(summary, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    for shown in (
        "[loc]",
        "[abcdef012345]",
        "/x/[id]",
        "[b]2.0",
        "'[staging]'",
        "[red]acme",
        "by /[lang]",
        "see [docs]",
        "the 1 worst of the 1 the metrics name",
    ):
        assert shown in text, (shown, text)


def test_the_summary_says_what_the_deploy_answered() -> None:
    """The deploy's line counts the 401s and says the 5xx the build served too (the example
    app's own failures): it said "no 5xx" whatever the codes were. The customers' line
    counts the tenants named (the demo's process and the staging build's, each up to
    DEMO_MAX_TENANTS), not the per-process bound."""
    import io

    from rich.console import Console

    from sentinel._demo import DEMO_MAX_TENANTS, _render_summary

    row = {"requests": 10, "errors": 1, "error_ratio": 0.1, "burn_rate": 100.0}
    tenant = {"errors": 1, "requests": 10, "error_ratio": 0.1, "share_of_traffic": 0.01}
    summary: dict[str, Any] = {
        "locations": {},
        "global": row,
        "slo": 99.9,
        "exceptions": {},
        "deploy": {
            "location": "fra",
            "version": "2.0",
            "environment": "staging",
            "codes": {"200": 802, "401": 539, "500": 4, "503": 2},
            "requests": 1347,
        },
        "gate": None,
        "tenants": [{**tenant, "tenant": f"t{n}"} for n in range(DEMO_MAX_TENANTS + 2)],
        "mutations": [],
        "alerting": {"alerts": None, "note": "", "held_back": None},
    }

    def render() -> str:
        out = io.StringIO()
        _render_summary(summary, Console(file=out, width=400, color_system=None))
        return " ".join(out.getvalue().split())

    text = render()
    assert "539 of 1347 requests with 401, which no 5xx SLO counts (and 6 with a 5xx" in text
    assert "no error budget moved" not in text
    assert f"the 3 worst of the {DEMO_MAX_TENANTS + 2} the metrics name" in text
    summary["deploy"]["codes"] = {"200": 4, "401": 4}
    assert "(and none with a 5xx, so no error budget moved)" in render()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_multiprocess_directory_in_the_shell_is_not_used(tmp_path: Path, where: str) -> None:
    """A PROMETHEUS_MULTIPROC_DIR left in the shell made prometheus-client write the demo's
    metrics there: a directory that does not exist ended the demo with a traceback, an
    existing one was left with the demo's files. The demo counts in its own process."""
    directory = tmp_path / "multiproc"
    if where == "empty":
        directory.mkdir()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory))
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", "--duration", "2", "--no-servers", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["global"]["requests"] > 0
    assert not directory.exists() if where == "missing" else not any(directory.iterdir())


def test_the_production_instance_exports_its_start_time_as_a_served_process_does() -> None:
    """The gate judges a process it sees first by process_start_time_seconds, as a process
    `sentinel run` serves exports it: the demo's production instance exports it too, or a
    short run's gate could not decide (a process first scraped within its window)."""
    import io

    from rich.console import Console

    from sentinel import _demo

    with _demo._parts(_demo._free_port(), False, Console(file=io.StringIO())) as parts:
        started = parts.registry.get_sample_value("process_start_time_seconds")
    assert started is not None and 0 < started <= time.time()

"""``sentinel demo``: the incident sentinel comes from, played against the example app.

The bundled example app, wrapped by sentinel, is served by uvicorn on 127.0.0.1 with its
metrics endpoint, and the traffic of :mod:`sentinel.example.traffic` plays the incident for
``duration`` seconds: three locations, one of which starts failing one request in five while
the service stays under 1%, a customer failing one request in five wherever it is served,
an early failure in a middleware, an environment write, a new exception type, and at last
one location pointed at a staging build that answers 401 (served by ``sentinel run`` in a
process of its own). When Prometheus and Alertmanager are installed they are started on
loopback with the generated rules and routing (windows scaled down), the alerts
Alertmanager delivers are shown and the rollout gate is asked about the deploy; without
them each location's burn rate is computed from sentinel's own counters. It ends by itself
with a summary (``--json`` for scripts). SIGINT, SIGTERM and SIGHUP stop it, and every
process it started, early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .example import traffic
from .mixin import MonitoringConfig

DEMO_SERVICE = "sentinel-demo"
PRODUCTION_VERSION = "1.4.2"
DEPLOYED_VERSION = "1.5.0-rc.1"
"""The staging build's version: the one production is pointed at by mistake."""

DEMO_MAX_TENANTS = 10
"""Tenants named in the metrics: few, so the failing customer is far from the top by traffic
and is named for its errors."""

MAX_REQUESTS_PER_SECOND = 100_000
"""The traffic's count bound per second of ``--duration``: beyond what the generator's one
connection sends, so the duration, not the count, ends a run."""

MAX_DURATION = 86_400.0
"""The longest ``--duration``, a day: a demo, not a load test (and far below where the
count bound would overflow)."""

LIVE_BURN_WINDOW = 10.0
"""Seconds over which the live view's burn rate is computed."""


class DemoError(Exception):
    """A part of the demo did not start; the message says which and why."""


@dataclass
class _Snapshot:
    at: float
    counts: dict[str, tuple[int, int, int]]  # location -> (requests, 5xx, 4xx)


@dataclass
class _Progress:
    """What the traffic thread and the scrapes have seen so far (read by the live view)."""

    duration: float
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    snapshots: deque[_Snapshot] = field(default_factory=lambda: deque(maxlen=600))
    alerts: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] | None = None

    def latest(self) -> dict[str, tuple[int, int, int]]:
        return self.snapshots[-1].counts if self.snapshots else {}

    def burn(self, location: str | None, slo: float, window: float) -> float | None:
        """Burn rate over the last ``window`` seconds of ``location`` (None: the service)."""
        if len(self.snapshots) < 2:
            return None
        last = self.snapshots[-1]
        first = next((s for s in self.snapshots if s.at >= last.at - window), self.snapshots[0])
        requests, errors = _delta(first.counts, last.counts, location)
        if not requests:
            return None
        return errors / requests / (1 - slo / 100)


def _delta(
    before: dict[str, tuple[int, int, int]],
    after: dict[str, tuple[int, int, int]],
    location: str | None,
) -> tuple[int, int]:
    """Requests and 5xx between two snapshots, of ``location`` or (None) the service."""
    names = [location] if location is not None else list(after)
    requests = errors = 0
    for name in names:
        a, b = after.get(name, (0, 0, 0)), before.get(name, (0, 0, 0))
        requests += a[0] - b[0]
        errors += a[1] - b[1]
    return requests, errors


Samples = list[tuple[str, dict[str, str], float]]


def _samples(parts: _Parts) -> Samples:
    """Every sample of the demo's own registry and of the staging build's endpoint."""
    samples: Samples = [
        (sample.name, sample.labels, sample.value)
        for metric in parts.registry.collect()
        for sample in metric.samples
    ]
    try:
        with urllib.request.urlopen(parts.deploy.metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return samples  # the staging build's counts are missing from this snapshot
    for family in text_string_to_metric_families(text):
        samples.extend((sample.name, sample.labels, sample.value) for sample in family.samples)
    return samples


def _counts(samples: Samples) -> dict[str, tuple[int, int, int]]:
    """Requests, 5xx and 4xx per location, as sentinel counted them."""
    totals: Counter[tuple[str, str]] = Counter()
    for name, labels, value in samples:
        if name == "sentinel_http_requests_total":
            totals[(labels["location"], labels["code"][0])] += int(value)
    locations = sorted({location for location, _ in totals})
    return {
        location: (
            sum(n for (where, _), n in totals.items() if where == location),
            totals[(location, "5")],
            totals[(location, "4")],
        )
        for location in locations
    }


def _phase(progress: float) -> str:
    if progress < traffic.SIN_FAILS_FROM:
        return "healthy: sub-percent errors everywhere"
    if progress < traffic.EARLY_FAILURES_FROM:
        return "sin fails 1 request in 5"
    if progress < traffic.MUTATION_AT:
        return "+ a middleware fails before routing"
    if progress < traffic.NEW_EXCEPTION_FROM:
        return "+ a handler writes an environment variable"
    if progress < traffic.DEPLOY_AT:
        return "+ a new exception type"
    return f"+ {traffic.DEPLOY_LOCATION} deployed to a staging build (401)"


def _count_in_this_process() -> None:
    """Forget a ``PROMETHEUS_MULTIPROC_DIR`` left in the shell: the demo reads its own
    metrics in one process, and prometheus-client would otherwise write its files there
    (or fail on a directory that does not exist)."""
    names = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    if not any(name in os.environ for name in names):
        return
    for name in names:
        os.environ.pop(name, None)
    from prometheus_client import values

    # prometheus-client chose its value class from the variable when it was imported.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def run_demo(
    duration: float,
    port: int,
    as_json: bool,
    *,
    servers: bool = True,
    max_requests: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Serve the example app, play the incident for ``duration`` seconds, print a summary.

    ``max_requests`` bounds the traffic by count too (default: far beyond what one
    connection sends in ``duration``, so the duration ends the run). Returns 0, 1 when a
    part did not start (everything started is stopped), 130 when interrupted, or 128 plus
    the signal's number when stopped by SIGTERM or SIGHUP (everything started is stopped).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not (math.isfinite(duration) and duration > 0):
        print(f'sentinel demo: "--duration" must be a number > 0: {duration!r}', file=err)
        return 2
    if duration > MAX_DURATION:
        print(
            f'sentinel demo: "--duration" must be at most {MAX_DURATION:.0f} seconds (a day): '
            f"{duration!r}",
            file=err,
        )
        return 2
    if max_requests is None:
        max_requests = max(10_000, math.ceil(duration * MAX_REQUESTS_PER_SECOND))
    _count_in_this_process()
    config = _monitoring_config()
    console = Console(file=err, highlight=False)
    try:
        with _stopped_by_signals(), _parts(port, servers, console) as parts:
            summary = _play(parts, duration, max_requests, config, console)
    except DemoError as error:
        print(f"sentinel demo: {error}", file=err)
        return 1
    except _Signalled as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"sentinel demo: stopped by {name}; every process it started is stopped", file=err)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print("sentinel demo: interrupted; every process it started is stopped", file=err)
        return 130
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True), file=out)
    else:
        width = None if out.isatty() else 120  # a file or pipe: wide enough for the table
        _render_summary(summary, Console(file=out, highlight=False, soft_wrap=True, width=width))
    return 0


class _Signalled(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so every part is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Signalled` in the main thread while inside.

    Prometheus, Alertmanager and the staging build run in sessions of their own (a Ctrl-C
    in the terminal reaches the demo, which stops them in order), so without this a
    ``kill``, a ``timeout`` or a closed terminal would end the demo and leave them running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Signalled(signum)

    wanted = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _monitoring_config() -> MonitoringConfig:
    from ._stack import demo_config

    return demo_config()


@dataclass
class _Parts:
    app: Any
    url: str
    registry: CollectorRegistry
    records: list[dict[str, Any]]
    stack: Any | None  # a running LocalStack, or None
    servers_note: str | None
    deploy: _Deploy


@dataclass
class _Deploy:
    """The staging build, served by ``sentinel run`` in a process of its own, that the
    incident's last phase deploys to production in one location."""

    url: str
    metrics_url: str
    metrics_target: str
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """SIGTERM (``sentinel run`` writes its pending summaries), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _staging_build(directory: Path) -> Iterator[_Deploy]:
    """``sentinel run sentinel.example.app:staging_app`` on loopback, stopped on exit."""
    port, metrics_port = _free_port(), _free_port()
    log = directory / "staging-build.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SENTINEL_", "OTEL_", "PROMETHEUS_"))
    }
    env.update(
        SENTINEL_SERVICE=DEMO_SERVICE,
        SENTINEL_VERSION=DEPLOYED_VERSION,
        SENTINEL_ENVIRONMENT="staging",
        SENTINEL_LOCATION_HEADER=traffic.LOCATION_HEADER,
        SENTINEL_LOCATIONS=",".join(traffic.LOCATIONS),
        SENTINEL_TENANT_HEADER=traffic.TENANT_HEADER,
        SENTINEL_MAX_TENANTS=str(DEMO_MAX_TENANTS),
        SENTINEL_METRICS_HOST="127.0.0.1",
        SENTINEL_METRICS_PORT=str(metrics_port),
        SENTINEL_LOG_FORMAT="json",
    )
    command = [
        sys.executable,
        "-m",
        "sentinel.cli",
        "run",
        "sentinel.example.app:staging_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while not _listening(port) or not _listening(metrics_port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                msg = f"the staging build did not start ({' '.join(command[2:])}):\n{tail}"
                raise DemoError(msg)
            time.sleep(0.1)
        deploy = _Deploy(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            f"127.0.0.1:{metrics_port}",
            log,
            process,
        )
    except BaseException:
        _Deploy("", "", "", log, process).stop()
        raise
    try:
        yield deploy
    finally:
        deploy.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _parts(port: int, servers: bool, console: Console) -> Iterator[_Parts]:
    """The example app under uvicorn with its metrics endpoint, and when asked for and
    installed, Prometheus, Alertmanager and a webhook receiver; everything stopped on exit."""
    from . import _stack
    from ._config import Config
    from ._middleware import instrument
    from ._sidecar import MetricsServer
    from .example.app import app as example_app
    from .testing import serve

    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(record: dict[str, Any]) -> None:
        with lock:
            records.append(record)

    registry = CollectorRegistry()
    # What a served process exports beside sentinel's metrics (the default registry's
    # process collector): the gate reads process_start_time_seconds to judge how long a
    # process it sees first has been serving.
    ProcessCollector(registry=registry)
    # Built from these settings alone, as the staging build's environment is cleaned: a
    # SENTINEL_* or OTEL_* variable in the shell (a mutation mode, a console or OTLP
    # exporter) would change what the demo shows or send its spans elsewhere.
    settings = Config(
        metrics_port=0,
        service=DEMO_SERVICE,
        version=PRODUCTION_VERSION,
        environment="production",
        location_header=traffic.LOCATION_HEADER,
        locations=traffic.LOCATIONS,
        tenant_header=traffic.TENANT_HEADER,
        max_tenants=DEMO_MAX_TENANTS,
    )
    app = instrument(example_app, settings, registry=registry, stream=io.StringIO(), sinks=(sink,))
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(serve(app, port=port, lifespan="off"))
        except (RuntimeError, OSError) as error:
            raise DemoError(f"the example app did not start on port {port}: {error}") from error
        metrics = MetricsServer(registry, "127.0.0.1", 0).start()
        stack.callback(metrics.stop)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sentinel-demo-")))
        deploy = stack.enter_context(_staging_build(directory))
        running = None
        note = None
        if not servers:
            note = "alerting not started (--no-servers)"
        else:
            missing = _stack.missing_binaries()
            if missing:
                note = (
                    f"alerting needs Prometheus and Alertmanager ({', '.join(missing)} not on"
                    f" PATH); install them with: {_stack.INSTALL_COMMAND}"
                )
            else:
                console.print("starting Prometheus and Alertmanager on 127.0.0.1 ...")
                try:
                    running = stack.enter_context(
                        _stack.LocalStack(
                            [f"127.0.0.1:{metrics.port}", deploy.metrics_target],
                            _monitoring_config(),
                        )
                    )
                except _stack.StackError as error:
                    raise DemoError(str(error)) from error
        parts = _Parts(app, url, registry, records, running, note, deploy)
        try:
            yield parts
        finally:
            app.sentinel.flush(final=True)


def _play(
    parts: _Parts, duration: float, max_requests: int, config: MonitoringConfig, console: Console
) -> dict[str, Any]:
    progress = _Progress(duration)
    stop = threading.Event()
    result: list[traffic.Tally] = []
    failure: list[BaseException] = []

    def generate() -> None:
        def count(location: str, status: int, tally: traffic.Tally) -> None:
            progress.sent = tally.total

        try:
            result.append(
                traffic.play(
                    parts.url,
                    duration,
                    deploy_url=parts.deploy.url,
                    tenants=True,
                    max_requests=max_requests,
                    stop=stop,
                    on_response=count,
                )
            )
        except BaseException as error:  # reported by the main thread
            failure.append(error)

    generator = threading.Thread(target=generate, name="sentinel-demo-traffic", daemon=True)
    view = _LiveView(progress, config, parts, console)
    generator.start()
    try:
        with view.showing():
            while generator.is_alive():
                progress.snapshots.append(_Snapshot(time.monotonic(), _counts(_samples(parts))))
                if parts.stack is not None:
                    progress.alerts = _delivered(parts.stack)
                view.update()
                generator.join(timeout=1.0)
            parts.app.sentinel.flush()
            progress.snapshots.append(_Snapshot(time.monotonic(), _counts(_samples(parts))))
            if parts.stack is not None:
                view.note("asking the rollout gate about the deploy ...")
                progress.gate = _ask_the_gate(parts.stack, config)
                view.note("waiting for the last alerts to be delivered ...")
                progress.alerts = _await_alerts(parts.stack, progress, view)
            view.update()
    finally:
        stop.set()
        generator.join(timeout=15)
    if failure:
        raise DemoError(f"the traffic generator failed: {failure[0]!r}")
    tally = result[0]
    parts.app.sentinel.flush(final=True)
    return _summary(parts, tally, progress, config)


def _ask_the_gate(stack: Any, config: MonitoringConfig) -> dict[str, Any]:
    """``sentinel gate`` on the deploy, as a release pipeline would call it: may production
    widen the rollout of the build ``fra`` was pointed at?"""
    defaults = MonitoringConfig()
    changed = {
        item.name: getattr(config, item.name)
        for item in dataclasses.fields(config)
        if getattr(config, item.name) != getattr(defaults, item.name)
    }
    with tempfile.TemporaryDirectory(prefix="sentinel-demo-gate-") as directory:
        config_file = Path(directory) / "monitoring.yaml"
        config_file.write_text(yaml.safe_dump(changed), encoding="utf-8")
        time.sleep(2)  # the last scrape and evaluation
        command = [
            sys.executable,
            "-m",
            "sentinel.cli",
            "gate",
            "--prometheus",
            stack.prometheus_url,
            "--new",
            DEPLOYED_VERSION,
            "--environment",
            "production",
            "--config",
            str(config_file),
            "--json",
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return {"exit_code": 2, "summary": "the gate did not answer within 60 s"}
    try:
        decision: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return {"exit_code": result.returncode, "summary": result.stderr.strip()[-500:]}
    decision["exit_code"] = result.returncode
    return decision


def _delivered(stack: Any) -> list[dict[str, Any]]:
    try:
        return [alert for alert in stack.delivered() if alert.get("status") == "firing"]
    except OSError:
        return []


def _await_alerts(stack: Any, progress: _Progress, view: _LiveView) -> list[dict[str, Any]]:
    """The delivered alerts, once every one the incident raises has arrived: the failing
    location's page, the deploy's status shift (or the regression that names it), the new
    exception type and the environment write (or after a bounded wait: the last scrape,
    one evaluation and one group wait; on a busy machine the one-off write's alert can
    arrive after the pages)."""
    deadline = time.monotonic() + 20
    alerts = _delivered(stack)
    while time.monotonic() < deadline and not (
        _fired(alerts, "SentinelErrorBudgetBurn", "sin")
        and (
            _fired(alerts, "SentinelStatusShift", traffic.DEPLOY_LOCATION)
            or _fired(alerts, "SentinelReleaseErrorRatioRegression", traffic.DEPLOY_LOCATION)
        )
        and _fired(alerts, "SentinelUnhandledExceptionNew", "iad")
        and _fired(alerts, "SentinelGlobalStateMutated", "iad")
    ):
        time.sleep(0.5)
        alerts = _delivered(stack)
        progress.alerts = alerts
        view.update()
    return alerts


def _fired(alerts: list[dict[str, Any]], alertname: str, location: str) -> bool:
    return any(
        alert["labels"].get("alertname") == alertname
        and alert["labels"].get("location") == location
        for alert in alerts
    )


class _LiveView:
    """A progress bar and a table per location while the traffic plays (rich), or a plain
    line every few seconds when the output is not a terminal."""

    def __init__(
        self, progress: _Progress, config: MonitoringConfig, parts: _Parts, console: Console
    ) -> None:
        self.progress = progress
        self.config = config
        self.parts = parts
        self.console = console
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[sent]} requests"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("healthy", total=progress.duration, sent=0)
        self._live: Live | None = None
        self._last_line = 0.0
        self._note = ""

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        self.console.print(f"sentinel demo: the example app on {self.parts.url}", markup=False)
        if self.parts.stack is not None:
            self.console.print(
                f"  Prometheus {self.parts.stack.prometheus_url}, Alertmanager"
                f" {self.parts.stack.alertmanager_url}",
                markup=False,
            )
        elif self.parts.servers_note:
            # Unwrapped: the install command stays on one line, to copy.
            self.console.print(f"  {self.parts.servers_note}", markup=False, soft_wrap=True)
        if not self.console.is_terminal:
            yield
            return
        with Live(self._render(), console=self.console, refresh_per_second=4) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None

    def note(self, text: str) -> None:
        self._note = text
        if self._live is None:
            self.console.print(text, markup=False)

    def update(self) -> None:
        elapsed = min(time.monotonic() - self.progress.started, self.progress.duration)
        phase = _phase(elapsed / self.progress.duration)
        self._bar.update(self._task, completed=elapsed, description=phase, sent=self.progress.sent)
        if self._live is not None:
            self._live.update(self._render())
        elif time.monotonic() - self._last_line >= 5:
            self._last_line = time.monotonic()
            ratios = ", ".join(
                f"{location} {errors}/{requests}"
                for location, (requests, errors, _) in self.progress.latest().items()
            )
            refused = sum(c for _, _, c in self.progress.latest().values())
            print(
                f"  {elapsed:5.1f}s {self.progress.sent} requests ({phase}); 5xx: {ratios};"
                f" 4xx: {refused};"
                + (
                    f" alerts delivered: {len(self.progress.alerts)}"
                    if self.parts.stack is not None
                    else " alerting not started"
                ),
                file=self.console.file,
                flush=True,
            )

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False)
        table.add_column("location", no_wrap=True, min_width=9)
        for name in ("requests", "5xx", "error ratio", "burn (10s)", "4xx"):
            table.add_column(name, justify="right")
        latest = self.progress.latest()
        rows: list[str | None] = [*latest, None]
        for location in rows:
            if location is None:
                requests = sum(r for r, _, _ in latest.values())
                errors = sum(e for _, e, _ in latest.values())
                refused = sum(c for _, _, c in latest.values())
            else:
                requests, errors, refused = latest[location]
            burn = self.progress.burn(location, self.config.slo, LIVE_BURN_WINDOW)
            table.add_row(
                escape(location) if location else "(service)",
                str(requests),
                str(errors),
                f"{errors / requests:.2%}" if requests else "-",
                "-" if burn is None else f"{burn:.1f}x",
                str(refused),
            )
        parts: list[Any] = [self._bar, table]
        if self.parts.stack is not None:
            names = sorted({_alert_line(alert) for alert in self.progress.alerts})
            parts.append(Text("alerts delivered: " + (", ".join(names) if names else "none yet")))
        if self._note:
            parts.append(Text(self._note))
        return Group(*parts)


def _alert_line(alert: dict[str, Any]) -> str:
    labels = alert["labels"]
    where = labels.get("location") or labels.get("scope") or ""
    return f"{labels.get('alertname')}{f' ({where})' if where else ''}"


def _summary(
    parts: _Parts, tally: traffic.Tally, progress: _Progress, config: MonitoringConfig
) -> dict[str, Any]:
    samples = _samples(parts)
    counts = _counts(samples)
    deploy = _deploy_summary(parts)
    # The staging build's process wrote its own records (requests, and the failures of the
    # fra traffic it served) to its log, the folded repeats when it stops.
    parts.deploy.stop()
    records = [*parts.records, *_logged_records(parts.deploy.log)]
    seen, kept = _records_metrics(samples)
    estimates: Counter[str] = Counter()
    for record in records:
        if record.get("event") == "request":
            estimates[record["location"]] += record.get("sample_rate", 1.0)
    sent = tally.by_location()
    first = progress.snapshots[0].counts if progress.snapshots else {}
    locations = {}
    for location, (requests, errors, refused) in counts.items():
        whole_run = _delta(first, counts, location) if first else (requests, errors)
        burn = whole_run[1] / whole_run[0] / (1 - config.slo / 100) if whole_run[0] else 0.0
        locations[location] = {
            "requests": requests,
            "sent": sum(sent.get(location, {}).values()),
            "errors": errors,
            "error_ratio": round(errors / requests, 4) if requests else 0.0,
            "4xx": refused,
            "burn_rate": round(burn, 1),
            "records_seen": seen[location],
            "records_kept": kept[location],
            "estimated_requests": round(estimates[location]),
        }
    total = sum(r for r, _, _ in counts.values())
    total_errors = sum(e for _, e, _ in counts.values())
    alerts = sorted(
        (
            {
                "alertname": alert["labels"].get("alertname"),
                "severity": alert["labels"].get("severity"),
                "location": alert["labels"].get("location"),
                "tenant": alert["labels"].get("tenant"),
                "scope": alert["labels"].get("scope"),
                "detail": alert["labels"].get("exception_type") or alert["labels"].get("target"),
                "receiver": alert.get("receiver"),
            }
            for alert in progress.alerts
        ),
        key=lambda alert: tuple(str(value) for value in alert.values()),
    )
    unique_alerts = [dict(t) for t in dict.fromkeys(tuple(a.items()) for a in alerts)]
    held_back = _held_back(parts.stack) if parts.stack else None
    return {
        "duration_seconds": round(time.monotonic() - progress.started, 1),
        "slo": config.slo,
        "locations": locations,
        "global": {
            "requests": total,
            "errors": total_errors,
            "error_ratio": round(total_errors / total, 4) if total else 0.0,
        },
        "exceptions": _exceptions(records),
        "mutations": _mutations(records),
        "deploy": deploy,
        "tenants": _tenants(samples, counts),
        "gate": _gate_summary(progress.gate),
        "alerting": {
            "prometheus": parts.stack.prometheus_url if parts.stack else None,
            "alertmanager": parts.stack.alertmanager_url if parts.stack else None,
            "note": parts.servers_note,
            "alerts": unique_alerts if parts.stack else None,
            "held_back": held_back,
        },
    }


def _tenants(samples: Samples, counts: dict[str, tuple[int, int, int]]) -> list[dict[str, Any]]:
    """The tracked tenants, worst first, from ``sentinel_tenant_requests_total`` (the demo's
    process and the staging build's, summed by tenant).

    Worst means the most 5xx beyond what the service's own ratio predicts for the tenant's
    traffic: a customer failing one request in five all along outranks a small one that
    met a few of a failing location's errors, and a big one failing at the service's rate.
    """
    requests: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for name, labels, value in samples:
        if name == "sentinel_tenant_requests_total":
            requests[labels["tenant"]] += int(value)
            if labels["status_class"] == "5xx":
                errors[labels["tenant"]] += int(value)
    service_ratio = sum(errors.values()) / (sum(requests.values()) or 1)
    total = sum(r for r, _, _ in counts.values()) or 1
    rows: list[dict[str, Any]] = [
        {
            "tenant": tenant,
            "requests": n,
            "errors": errors[tenant],
            "error_ratio": round(errors[tenant] / n, 4) if n else 0.0,
            "share_of_traffic": round(n / total, 4),
        }
        for tenant, n in requests.items()
        if tenant != "other"
    ]
    rows.sort(
        key=lambda row: (
            -(row["errors"] - row["requests"] * service_ratio),
            -row["error_ratio"],
            row["tenant"],
        )
    )
    return rows


def _gate_summary(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate's answer, trimmed to what a person reads."""
    if decision is None:
        return None
    return {
        "exit_code": decision.get("exit_code"),
        "verdict": decision.get("verdict"),
        "summary": decision.get("summary"),
        "stopped_locations": decision.get("stopped_locations", []),
        "environment_mismatches": decision.get("environment_mismatches", []),
    }


def _held_back(stack: Any) -> list[dict[str, Any]]:
    """Alerts firing but suppressed by Alertmanager's inhibition (not delivered)."""
    try:
        alerts = stack.alertmanager_alerts()
    except OSError:
        return []
    held = {
        (
            alert["labels"].get("alertname"),
            alert["labels"].get("severity"),
            alert["labels"].get("location"),
            alert["labels"].get("code"),
        )
        for alert in alerts
        if alert.get("status", {}).get("state") == "suppressed"
    }
    return [
        {"alertname": name, "severity": severity, "location": location, "code": code}
        for name, severity, location, code in sorted(held, key=lambda item: tuple(map(str, item)))
    ]


def _deploy_summary(parts: _Parts) -> dict[str, Any]:
    """What the staging build served once production traffic was pointed at it."""
    codes: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(parts.deploy.metrics_url, timeout=2) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sentinel_http_requests_total":
                    codes[sample.labels["code"]] += int(sample.value)
    return {
        "version": DEPLOYED_VERSION,
        "environment": "staging",
        "replaces": PRODUCTION_VERSION,
        "location": traffic.DEPLOY_LOCATION,
        "requests": sum(codes.values()),
        "codes": dict(sorted(codes.items())),
    }


def _records_metrics(samples: Samples) -> tuple[Counter[str], Counter[str]]:
    seen: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for name, labels, value in samples:
        if name == "sentinel_records_seen_total":
            seen[labels["location"]] += int(value)
        elif name == "sentinel_records_kept_total":
            kept[labels["location"]] += int(value)
    return seen, kept


def _logged_records(log: Path) -> list[dict[str, Any]]:
    """The JSON records a ``sentinel run`` process wrote to ``log`` (other lines skipped)."""
    records = []
    with contextlib.suppress(OSError), log.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
    return records


def _exceptions(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    exceptions: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("event") == "unhandled_exception":
            entry = exceptions.setdefault(
                record["fingerprint"],
                {
                    "exception_type": record["exception_type"],
                    "phase": record.get("phase"),
                    "route": record.get("route"),
                    "count": 0,
                    "code": _app_line(record),
                    "version": record.get("version"),
                },
            )
            entry["count"] += 1
    for record in records:
        if record.get("event") == "exception_summary" and record["fingerprint"] in exceptions:
            exceptions[record["fingerprint"]]["count"] += record["occurrences"]
    return exceptions


def _mutations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "target": record.get("target"),
            "key": record.get("key"),
            "route": record.get("route"),
            "code": f"{_short(record.get('file'))}:{record.get('line')}",
            "attribution": record.get("attribution"),
        }
        for record in records
        if record.get("event") == "global_state_mutated" and not record.get("summary")
    ]


def _mismatch_line(mismatch: Any) -> str:
    if not isinstance(mismatch, dict):
        return str(mismatch)
    return ", ".join(f"{key} {value}" for key, value in mismatch.items())


def _app_line(record: dict[str, Any]) -> str | None:
    for frame in reversed(record.get("frames", [])):
        if frame.get("in_app"):
            return f"{_short(frame.get('file'))}:{frame.get('line')} in {frame.get('function')}"
    return None


def _short(path: object) -> str:
    """``path`` relative to the working directory when it is below it."""
    text = str(path)
    with contextlib.suppress(ValueError):
        return str(Path(text).relative_to(Path.cwd()))
    return text


def _render_summary(summary: dict[str, Any], console: Console) -> None:
    console.print()
    table = Table(title="what sentinel counted, per location", title_justify="left")
    for name in (
        "location",
        "requests",
        "5xx",
        "error ratio",
        "burn rate",
        "records seen",
        "kept",
        "estimated requests",
    ):
        if name == "location":
            table.add_column(name, no_wrap=True, min_width=9)
        else:
            table.add_column(name, justify="right")
    for location, entry in summary["locations"].items():
        table.add_row(
            escape(location),
            str(entry["requests"]),
            str(entry["errors"]),
            f"{entry['error_ratio']:.2%}",
            f"{entry['burn_rate']:.1f}x",
            str(entry["records_seen"]),
            str(entry["records_kept"]),
            str(entry["estimated_requests"]),
        )
    total = summary["global"]
    table.add_row(
        "(service)", str(total["requests"]), str(total["errors"]), f"{total['error_ratio']:.2%}"
    )
    console.print(table)
    console.print(
        f"The service fails {total['error_ratio']:.2%} of requests, under 1%; the burn rate is"
        f" the error ratio over the error budget of the {summary['slo']:g}% SLO (a page takes"
        " 14.4x). Records are sampled per location; each kept record stands for sample_rate"
        " requests, so 'estimated requests' is the sum of sample_rate beside the truth"
        " (a little low in a short run: each location's sampler still holds the credit of"
        " requests it has not yet written a record for)."
    )
    console.print("\n[bold]exceptions[/bold] (one report per fingerprint, repeats folded):")
    for fingerprint, entry in summary["exceptions"].items():
        console.print(
            f"  {entry['count']:>5} x {entry['exception_type']} [{fingerprint[:12]}]"
            f" ({entry['phase']}, {entry['route']}) at {entry['code']}"
            + (f" in {entry['version']}" if entry.get("version") else ""),
            markup=False,
        )
    deploy = summary["deploy"]
    refused = deploy["codes"].get("401", 0)
    failed = sum(n for code, n in deploy["codes"].items() if code.startswith("5"))
    console.print(
        f"\n[bold]the deploy[/bold]: {escape(deploy['location'])} was pointed at"
        f" {escape(deploy['version'])}, a build that reports environment"
        f" {escape(repr(deploy['environment']))}; it answered"
        f" {refused} of {deploy['requests']} requests with 401, which no 5xx SLO counts"
        + (
            f" (and {failed} with a 5xx, the app's own failures every build has)."
            if failed
            else " (and none with a 5xx, so no error budget moved)."
        )
    )
    gate = summary["gate"]
    if gate is None:
        console.print(
            "  The rollout gate reads Prometheus: with the servers installed the demo asks it"
            " whether this deploy may widen."
        )
    else:
        console.print(
            f"  [bold]sentinel gate[/bold] --new {escape(deploy['version'])} --environment"
            f" production: exit {gate['exit_code']} ({escape(gate['verdict'])}):"
            f" {escape(gate['summary'])}"
        )
        for mismatch in gate["environment_mismatches"]:
            console.print(f"    {_mismatch_line(mismatch)}", markup=False)
    worst = summary["tenants"][:3]
    if worst:
        console.print(
            f"\n[bold]customers[/bold]: the {len(worst)} worst of the"
            f" {len(summary['tenants'])} the metrics name (chosen by traffic and errors, at"
            f" most {DEMO_MAX_TENANTS} per process; everyone else is 'other'):"
        )
        for row in worst:
            console.print(
                f"  {row['tenant']:<16} {row['errors']:>5} of {row['requests']:>6} failed"
                f" ({row['error_ratio']:.1%}), {row['share_of_traffic']:.1%} of all traffic",
                markup=False,
            )
    console.print("\n[bold]global state written by requests[/bold]:")
    for mutation in summary["mutations"] or [{"target": None}]:
        if mutation["target"] is None:
            console.print("  none")
            break
        console.print(
            f"  {mutation['target']} {mutation['key']!r} by {mutation['route']}"
            f" at {mutation['code']} ({mutation['attribution']})",
            markup=False,
        )
    alerting = summary["alerting"]
    console.print("\n[bold]alerts[/bold]:")
    if alerting["alerts"] is None:
        console.print(f"  {alerting['note']}", markup=False)
        paging = [
            location
            for location, entry in summary["locations"].items()
            if entry["burn_rate"] >= 14.4
        ]
        if paging:
            console.print(
                f"  from sentinel's own counters, these locations burn fast enough to page:"
                f" {', '.join(paging)}",
                markup=False,
            )
        return
    for alert in alerting["alerts"]:
        where = f" location={alert['location']}" if alert["location"] else ""
        if alert.get("scope") == "global":
            where += " scope=global"
        if alert["tenant"]:
            where += f" tenant={alert['tenant']}"
        if alert["detail"]:
            where += f" {alert['detail']}"
        console.print(
            f"  {alert['alertname']} ({alert['severity']}){where} -> {alert['receiver']}",
            markup=False,
        )
    if not alerting["alerts"]:
        console.print("  none delivered")
    for alert in alerting["held_back"] or []:
        where = f" location={alert['location']}" if alert["location"] else ""
        code = f" code={alert['code']}" if alert["code"] else ""
        console.print(
            f"  {alert['alertname']} ({alert['severity']}){where}{code}: firing, held back by"
            " an alert that names its cause (inhibition)",
            markup=False,
        )
    if any(alert["alertname"] == "SentinelUnhandledExceptionNew" for alert in alerting["alerts"]):
        console.print(
            "  (the demo's Prometheus starts empty, so every exception type is new to it;"
            " in production only a type not seen within the lookback fires)"
        )

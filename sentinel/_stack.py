"""A local alerting stack: the real Prometheus and Alertmanager on loopback, with the rules
and the routing generated from one :class:`~sentinel.mixin.MonitoringConfig`, delivering to
an in-process webhook receiver. ``sentinel demo`` and the incident test use it::

    with LocalStack(["127.0.0.1:9464"], demo_config()) as stack:
        ...  # traffic
        stack.query("sum by (location) (sentinel_http_requests_total)")
        stack.delivered()  # what Alertmanager notified, one entry per alert

Prometheus scrapes every second, evaluates every second and resends firing alerts every
2 seconds; both servers listen on free 127.0.0.1 ports, keep their data in a temporary
directory and run in their own session (a Ctrl-C in the terminal reaches only this
process), and are stopped by pid when the stack closes, however it closes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypedDict

import yaml

from .example.webhook import WebhookReceiver
from .mixin import MonitoringConfig, Receiver
from .mixin._alertmanager import render_alertmanager
from .mixin._rules import GROUPS, render_rules

INSTALL_COMMAND = "sudo apt-get install -y prometheus prometheus-alertmanager"
"""The one command that installs both servers (Debian and Ubuntu)."""
PROMETHEUS_NAMES = ("prometheus",)
ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")
"""Debian calls the binary ``prometheus-alertmanager``; upstream's release calls it
``alertmanager``."""

SCRAPE_INTERVAL = "1s"
EVALUATION_INTERVAL = "1s"
RESEND_DELAY = "2s"
"""How often Prometheus resends a firing alert (its default, 1m, would hold back the
first notification by up to a minute)."""
RECEIVER_PATHS = {"page": "/page", "ticket": "/ticket", "watchdog": "/watchdog"}
"""The webhook path of each receiver (the docker stack's receiver uses the same paths)."""

_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20


class StackError(RuntimeError):
    """A part of the stack is missing or did not start; the message says which part, why,
    and shows the end of its log."""


class Binaries(NamedTuple):
    """Where the servers' binaries are (``None``: not on the PATH)."""

    prometheus: str | None
    alertmanager: str | None

    @property
    def missing(self) -> list[str]:
        """The names of the missing binaries, as a user would look for them."""
        names = []
        if self.prometheus is None:
            names.append(PROMETHEUS_NAMES[0])
        if self.alertmanager is None:
            names.append(ALERTMANAGER_NAMES[0])
        return names


def find_binaries() -> Binaries:
    """``prometheus`` and ``prometheus-alertmanager`` (or ``alertmanager``) on the PATH."""

    def first(names: Sequence[str]) -> str | None:
        for name in names:
            found = shutil.which(name)
            if found is not None:
                return found
        return None

    return Binaries(first(PROMETHEUS_NAMES), first(ALERTMANAGER_NAMES))


def missing_binaries() -> list[str]:
    """The servers' binaries that are not on the PATH (empty: the stack can start)."""
    return find_binaries().missing


def demo_config() -> MonitoringConfig:
    """The monitoring config of ``sentinel demo`` (and of the test that proves what it shows),
    tuned for a run of about a minute of :mod:`sentinel.example.traffic`.

    - ``time_scale`` 1/60: an hour is a minute, so the 1h/5m page is a 1m/5s page, rules are
      evaluated every second, and Alertmanager's group wait is 1 s (30 s scaled, rounded to
      a whole second) and its group interval 5 s: the page for the failing location, each
      new exception type and the mutation are delivered within seconds of their start.
    - ``slo`` 99.5: the plan's whole-service error ratio ends near 1% per phase and 0.7% over
      the run, and its failing location's at 20% (sin: 3% of the traffic). Against a 0.5%
      budget the failing location pages (40x) while the service as a whole only burns at
      the 1x ticket's rate, and the healthy locations (0.1%-0.45%) stay below every
      threshold with margin, whatever the run's length. Against 99.9% the service's 6x page
      (0.6%) would fire as well, late in the run and not in every run: the plan's 0.7% over
      the run is too close to it.
    - Low-traffic guards of 20 requests in a window: the scaled windows are short (the
      outlier's is 10 s, the status shift's 5 s), and the small location must be judged
      from its first seconds of failures even on a slow machine; likewise a status shift
      there needs 10 responses with its code (the default 20 in 5 s is most of sin's).
    - ``traffic_drop_for`` 1h (a minute, scaled): every run ends with every location going
      quiet at once, which is a traffic drop; held for a minute, it cannot fire before the
      run's alerts are read (the incident test reads them within about 35 s of the end),
      nor on a stall of the traffic generator during the run.
    """
    return MonitoringConfig(
        slo=99.5,
        time_scale=1 / 60,
        min_page_requests=20,
        min_ticket_requests=20,
        status_shift_min_requests=20,
        status_shift_min_responses=10,
        traffic_drop_for="1h",
    )


class Sample(NamedTuple):
    """One series of a Prometheus query result."""

    labels: dict[str, str]
    value: float


class DeliveredAlert(TypedDict):
    """One alert in one notification the webhook receiver got (a plain dict, ready for
    JSON)."""

    receiver: str
    """Alertmanager's receiver name, e.g. ``sentinel-page``."""
    path: str
    """The webhook path it was posted to, e.g. ``/page``."""
    status: str
    """``firing`` or ``resolved``."""
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str
    received_at: float
    """When the notification arrived (seconds since the epoch)."""
    group_key: str
    """Alertmanager's key of the notification group it was sent in."""


@dataclass
class _Part:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    url: str


class LocalStack:
    """Prometheus scraping ``targets`` (``host:port`` of sentinel metrics endpoints) with the
    rules of ``config``, Alertmanager with its routing, and a webhook receiver for the page,
    ticket and watchdog receivers, all on 127.0.0.1.

    A context manager; :meth:`start` and :meth:`close` do the same by hand. Starting waits
    until each server answers ready, Prometheus has loaded every rule group and knows the
    Alertmanager. When a binary is missing or a part does not start, :meth:`start` raises
    one :class:`StackError` (which part, why, the end of its log) after stopping whatever
    it had started. Closing stops every process by its pid (SIGTERM, then SIGKILL after
    ``stop_timeout``), also on KeyboardInterrupt, and removes the temporary directory.

    ``prometheus``/``alertmanager`` name the binaries (default: found on the PATH);
    ``*_port`` fix the ports (default 0: free ones). The receivers of ``config`` are
    replaced by the webhook receiver's.
    """

    def __init__(
        self,
        targets: Sequence[str],
        config: MonitoringConfig | None = None,
        *,
        job: str = "sentinel",
        prometheus: str | None = None,
        alertmanager: str | None = None,
        prometheus_port: int = 0,
        alertmanager_port: int = 0,
        webhook_port: int = 0,
        startup_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if isinstance(targets, str) or not targets:
            msg = f'"targets" must be a list of host:port addresses: {targets!r}'
            raise ValueError(msg)
        for target in targets:
            host, _, port_text = str(target).rpartition(":")
            if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
                msg = f'"targets" must be host:port addresses: {target!r}'
                raise ValueError(msg)
        for name, port in (
            ("prometheus_port", prometheus_port),
            ("alertmanager_port", alertmanager_port),
            ("webhook_port", webhook_port),
        ):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
                msg = f'"{name}" must be a port from 0 to 65535: {port!r}'
                raise ValueError(msg)
        for name, seconds in (("startup_timeout", startup_timeout), ("stop_timeout", stop_timeout)):
            if not isinstance(seconds, int | float) or not 0 < seconds <= 600:
                msg = f'"{name}" must be a number of seconds in (0, 600]: {seconds!r}'
                raise ValueError(msg)
        self.targets = [str(target) for target in targets]
        self.job = job
        self._base_config = config if config is not None else demo_config()
        self.config = self._base_config
        """The config the rules and routing were generated from (receivers: the webhook)."""
        self._binaries = (prometheus, alertmanager)
        self._ports = {
            "prometheus": prometheus_port,
            "alertmanager": alertmanager_port,
            "webhook": webhook_port,
        }
        self._startup_timeout = float(startup_timeout)
        self._stop_timeout = float(stop_timeout)
        self._parts: dict[str, _Part] = {}
        self._webhook: WebhookReceiver | None = None
        self._directory: Path | None = None
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> LocalStack:
        """Start the webhook receiver, Alertmanager and Prometheus, and wait until they are
        ready; on any failure (and on KeyboardInterrupt) stop what was started, then raise."""
        if self._started:
            msg = "this LocalStack was already started (make a new one)"
            raise StackError(msg)
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process this stack started, by pid, and remove its files (idempotent)."""
        parts = list(reversed(self._parts.values()))  # Prometheus first, then Alertmanager
        self._parts = {}
        try:
            for part in parts:
                if part.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        part.process.terminate()
            deadline = time.monotonic() + self._stop_timeout
            for part in parts:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    part.process.wait(max(0.0, deadline - time.monotonic()))
        finally:
            # Also reached on a KeyboardInterrupt while waiting: nothing is left running.
            for part in parts:
                if part.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        part.process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        part.process.wait(5)
                part.log.close()
            if self._webhook is not None:
                self._webhook.close()
                self._webhook = None
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None

    @property
    def pids(self) -> dict[str, int]:
        """The pid of each running server process, by part name."""
        return {name: part.process.pid for name, part in self._parts.items()}

    # -- what the stack exposes ---------------------------------------------------------------

    @property
    def prometheus_url(self) -> str:
        """Prometheus's base URL, e.g. ``http://127.0.0.1:40123``."""
        return self._part("prometheus").url

    @property
    def alertmanager_url(self) -> str:
        """Alertmanager's base URL."""
        return self._part("alertmanager").url

    @property
    def webhook_url(self) -> str:
        """The webhook receiver's base URL (receivers post to its ``/page``, ``/ticket`` and
        ``/watchdog``)."""
        if self._webhook is None:
            msg = "the webhook receiver is not running (start the stack first)"
            raise StackError(msg)
        return self._webhook.url

    def query(self, promql: str, timeout: float = 5.0) -> list[Sample]:
        """Evaluate ``promql`` now; the series of the result (a scalar is one, unlabelled)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = _get_json(url, timeout)
        if not isinstance(answer, dict) or answer.get("status") != "success":
            msg = f"Prometheus refused the query {promql!r}: {answer!r:.500}"
            raise StackError(msg)
        data = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            msg = f"expected an instant vector from {promql!r}: {data['resultType']!r}"
            raise StackError(msg)
        return [Sample(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]

    def notifications(self) -> list[dict[str, Any]]:
        """The notifications the webhook receiver got, oldest first: ``path``,
        ``received_at`` and Alertmanager's ``body``."""
        return self._webhook.notifications() if self._webhook is not None else []

    def delivered(self) -> list[DeliveredAlert]:
        """Every alert of every notification, oldest notification first."""
        delivered = []
        for notification in self.notifications():
            body = notification["body"]
            if not isinstance(body, dict):
                continue
            for alert in body.get("alerts") or []:
                delivered.append(
                    DeliveredAlert(
                        receiver=str(body.get("receiver", "")),
                        path=notification["path"],
                        status=str(alert.get("status", "")),
                        labels=dict(alert.get("labels") or {}),
                        annotations=dict(alert.get("annotations") or {}),
                        starts_at=str(alert.get("startsAt", "")),
                        ends_at=str(alert.get("endsAt", "")),
                        received_at=float(notification["received_at"]),
                        group_key=str(body.get("groupKey", "")),
                    )
                )
        return delivered

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        """Prometheus's pending and firing alerts now (``/api/v1/alerts``)."""
        answer = _get_json(f"{self.prometheus_url}/api/v1/alerts", 5.0)
        return list(answer["data"]["alerts"])

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """Alertmanager's alerts now, each with its ``status`` (``inhibitedBy`` names the
        fingerprints of the alerts that hold it back)."""
        return list(_get_json(f"{self.alertmanager_url}/api/v2/alerts", 5.0))

    def wait_for_scrape(self, timeout: float = 15.0) -> bool:
        """Wait until Prometheus has scraped every target successfully (bounded by
        ``timeout`` seconds); whether it has."""

        def scraped() -> bool:
            answer = _get_json(f"{self.prometheus_url}/api/v1/targets?state=active", 5.0)
            active = answer["data"]["activeTargets"]
            healthy = {item["labels"].get("instance") for item in active if item["health"] == "up"}
            return healthy >= set(self.targets)

        return _poll(scraped, timeout)

    def log_tail(self, part: str, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of a running part's log (``prometheus``/``alertmanager``)."""
        return _tail(self._part(part).log_path, lines)

    # -- starting -----------------------------------------------------------------------------

    def _start(self) -> None:
        prometheus, alertmanager = self._find_binaries()
        self._directory = Path(tempfile.mkdtemp(prefix="sentinel-stack-"))
        try:
            self._webhook = WebhookReceiver("127.0.0.1", self._ports["webhook"]).start()
        except OSError as error:
            msg = (
                f"the webhook receiver could not listen on 127.0.0.1:{self._ports['webhook']}: "
                f"{error}"
            )
            raise StackError(msg) from None
        base = self._webhook.url
        self.config = self._base_config.replace(
            page_receiver=Receiver(url=f"{base}{RECEIVER_PATHS['page']}"),
            ticket_receiver=Receiver(url=f"{base}{RECEIVER_PATHS['ticket']}"),
            watchdog_receiver=Receiver(url=f"{base}{RECEIVER_PATHS['watchdog']}"),
        )
        directory = self._directory
        (directory / "alertmanager.yaml").write_text(render_alertmanager(self.config))
        (directory / "rules.yaml").write_text(render_rules(self.config))

        def alertmanager_arguments(port: int) -> list[str]:
            return [
                alertmanager,
                f"--config.file={directory / 'alertmanager.yaml'}",
                f"--storage.path={directory / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ]

        self._launch("alertmanager", alertmanager_arguments, _ready)
        am_address = self.alertmanager_url.removeprefix("http://")
        (directory / "prometheus.yaml").write_text(self._prometheus_config(am_address))

        def prometheus_arguments(port: int) -> list[str]:
            return [
                prometheus,
                f"--config.file={directory / 'prometheus.yaml'}",
                f"--storage.tsdb.path={directory / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--rules.alert.resend-delay={RESEND_DELAY}",
            ]

        self._launch("prometheus", prometheus_arguments, self._prometheus_ready)

    def _find_binaries(self) -> tuple[str, str]:
        found = find_binaries()
        chosen = []
        for part, given, default in (
            ("prometheus", self._binaries[0], found.prometheus),
            ("alertmanager", self._binaries[1], found.alertmanager),
        ):
            if given is None:
                if default is None:
                    names = " or ".join(
                        PROMETHEUS_NAMES if part == "prometheus" else ALERTMANAGER_NAMES
                    )
                    msg = (
                        f"{part} could not start: {names} is not on the PATH; "
                        f"install it with: {INSTALL_COMMAND}"
                    )
                    raise StackError(msg)
                chosen.append(default)
            else:
                path = shutil.which(given)
                if path is None:
                    msg = f"{part} could not start: no executable at {given!r}"
                    raise StackError(msg)
                chosen.append(path)
        return chosen[0], chosen[1]

    def _prometheus_config(self, alertmanager_address: str) -> str:
        config = {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "evaluation_interval": EVALUATION_INTERVAL,
            },
            "rule_files": [str(self._directory / "rules.yaml")] if self._directory else [],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]
            },
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": list(self.targets)}]}
            ],
        }
        return yaml.safe_dump(config, sort_keys=False)

    def _launch(
        self,
        name: str,
        arguments: Callable[[int], list[str]],
        ready: Callable[[str], bool],
    ) -> None:
        """Start part ``name`` on its port (a free one, tried again if another process took
        it first), and wait until ``ready(url)``."""
        fixed = self._ports[name]
        assert self._directory is not None
        for attempt in range(1 if fixed else _PORT_ATTEMPTS):
            port = fixed or _free_port()
            log_path = self._directory / f"{name}.log"
            log = log_path.open("wb")
            try:
                process = subprocess.Popen(
                    arguments(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._directory,
                    start_new_session=True,
                )
            except OSError as error:
                log.close()
                msg = f"{name} could not start: {error}"
                raise StackError(msg) from None
            part = _Part(name, process, log_path, log, f"http://127.0.0.1:{port}")
            self._parts[name] = part
            outcome = self._wait_ready(part, ready)
            if outcome is None:
                return
            _stop(process, self._stop_timeout)
            del self._parts[name]
            log.close()
            taken = "address already in use" in _tail(log_path, _LOG_TAIL_LINES).lower()
            if not (taken and not fixed and attempt + 1 < _PORT_ATTEMPTS):
                msg = (
                    f"{name} did not start: {outcome}\n"
                    f"--- the last lines of its log ({' '.join(arguments(port))}) ---\n"
                    f"{_tail(log_path, _LOG_TAIL_LINES)}"
                )
                raise StackError(msg)

    def _wait_ready(self, part: _Part, ready: Callable[[str], bool]) -> str | None:
        """None once ``ready``; otherwise why not (it exited, or the time ran out)."""
        deadline = time.monotonic() + self._startup_timeout
        while True:
            status = part.process.poll()
            if status is not None:
                return f"it exited with status {status} before it was ready"
            try:
                if ready(part.url):
                    return None
            except (OSError, ValueError, KeyError, TypeError, StackError):
                pass  # not answering yet, or not with what ready() needs
            if time.monotonic() >= deadline:
                return f"it was not ready within {self._startup_timeout:g} s"
            time.sleep(0.05)

    def _prometheus_ready(self, url: str) -> bool:
        if not _ready(url):
            return False
        rules = _get_json(f"{url}/api/v1/rules", 2.0)["data"]["groups"]
        if {group["name"] for group in rules} != set(GROUPS):
            return False
        managers = _get_json(f"{url}/api/v1/alertmanagers", 2.0)["data"]
        return bool(managers["activeAlertmanagers"])

    def _part(self, name: str) -> _Part:
        part = self._parts.get(name)
        if part is None:
            msg = f"{name} is not running (start the stack first)"
            raise StackError(msg)
        return part


# -- helpers ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/-/ready", timeout=2.0) as response:
        return bool(response.status == 200)


def _get_json(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        # Prometheus answers a bad query with 400 and a JSON error body.
        body = error.read()
        try:
            return json.loads(body)
        except ValueError:
            msg = f"{url}: HTTP {error.code}: {body[:300]!r}"
            raise StackError(msg) from None


def _poll(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except (OSError, ValueError, KeyError, TypeError, StackError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

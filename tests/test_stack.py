"""The local alerting stack (sentinel/_stack.py) and its webhook receiver
(sentinel/example/webhook.py): real Prometheus and Alertmanager on loopback, started and
stopped by pid, one clear error when a part is missing or cannot start, nothing left
running afterwards, also on KeyboardInterrupt."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import clean_env, free_port, wait_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sentinel import instrument
from sentinel._sidecar import MetricsServer
from sentinel._stack import (
    INSTALL_COMMAND,
    LocalStack,
    StackError,
    demo_config,
    find_binaries,
    missing_binaries,
)
from sentinel.example.webhook import MAX_BODY_BYTES, WebhookReceiver
from sentinel.mixin._alertmanager import render_alertmanager
from sentinel.mixin._rules import render_rules
from sentinel.testing import capture_reports, serve

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = find_binaries().alertmanager
needs_servers = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"{' and '.join(missing_binaries())} not on the PATH; install: {INSTALL_COMMAND}",
)

NOTIFICATION = {
    "receiver": "sentinel-page",
    "status": "firing",
    "groupKey": '{}:{alertname="SentinelErrorBudgetBurn"}',
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "SentinelErrorBudgetBurn", "location": "sin"},
            "annotations": {"summary": "burn"},
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
        }
    ],
}


# -- the webhook receiver -----------------------------------------------------------------------


def test_webhook_keeps_prints_and_lists_notifications() -> None:
    """Notifications posted to any path are kept with that path (the receiver's name), printed
    as one JSON line each, and listed oldest first by GET /notifications and notifications()."""
    echo = io.StringIO()
    with WebhookReceiver(echo=echo) as receiver, httpx.Client(base_url=receiver.url) as client:
        assert receiver.url.startswith("http://127.0.0.1:")
        for path in ("/page", "/ticket"):
            response = client.post(path, json=NOTIFICATION | {"receiver": path.strip("/")})
            assert response.status_code == 200
        listed = client.get("/notifications").json()
        assert [entry["path"] for entry in listed] == ["/page", "/ticket"]
        assert listed[0]["body"] == NOTIFICATION | {"receiver": "page"}
        assert listed == receiver.notifications()
        assert [entry["path"] for entry in receiver.notifications("/ticket")] == ["/ticket"]
        assert client.get("/elsewhere").status_code == 404
    lines = [json.loads(line) for line in echo.getvalue().splitlines()]
    assert lines == listed
    assert all(isinstance(entry["received_at"], float) for entry in lines)


def test_webhook_is_bounded_and_refuses_what_is_not_a_notification() -> None:
    """Only the newest max_notifications are kept; a body that is not JSON (400) or is too
    large (413) is refused and not kept; a bound that is not a whole number >= 1 is refused
    with its value."""
    with WebhookReceiver(max_notifications=3) as receiver, httpx.Client() as client:
        for number in range(5):
            client.post(f"{receiver.url}/ticket", json={"number": number})
        assert [entry["body"]["number"] for entry in receiver.notifications()] == [2, 3, 4]
        bad = client.post(f"{receiver.url}/page", content=b"not json")
        assert bad.status_code == 400
        large = client.post(f"{receiver.url}/page", content=b" " * (MAX_BODY_BYTES + 1))
        assert large.status_code == 413
        assert len(receiver.notifications()) == 3
    for bound in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=repr(bound)):
            WebhookReceiver(max_notifications=bound)  # type: ignore[arg-type]


def test_webhook_command_prints_each_notification_and_stops_on_sigterm() -> None:
    """`python -m sentinel.example.webhook --host H --port P` (what the docker stack runs)
    prints one JSON line per notification on stdout and exits 0 on SIGTERM; a bad port is
    refused with its value."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sentinel.example.webhook",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def posted() -> bool:
            try:
                return httpx.post(f"http://127.0.0.1:{port}/watchdog", json=NOTIFICATION).is_success
            except httpx.TransportError:
                return False

        assert wait_for(posted, timeout=20)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    [line] = stdout.splitlines()
    assert json.loads(line)["path"] == "/watchdog"
    assert json.loads(line)["body"] == NOTIFICATION
    refused = subprocess.run(
        [sys.executable, "-m", "sentinel.example.webhook", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "70000" in refused.stderr


# -- binaries and the demo config ---------------------------------------------------------------


def _executable(directory: Path, name: str, body: str = "exit 0") -> Path:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_find_binaries_reads_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus, and prometheus-alertmanager (Debian's name) before alertmanager
    (upstream's); what is missing is named."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_binaries() == (None, None)
    assert missing_binaries() == ["prometheus", "prometheus-alertmanager"]
    upstream = _executable(tmp_path, "alertmanager")
    assert find_binaries().alertmanager == str(upstream)
    debian = _executable(tmp_path, "prometheus-alertmanager")
    prometheus = _executable(tmp_path, "prometheus")
    assert find_binaries() == (str(prometheus), str(debian))
    assert missing_binaries() == []
    assert INSTALL_COMMAND == "sudo apt-get install -y prometheus prometheus-alertmanager"


@pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("amtool") is None,
    reason=f"promtool and amtool are not on the PATH; install: {INSTALL_COMMAND}",
)
def test_demo_config_generates_files_the_real_tools_accept(tmp_path: Path) -> None:
    """The demo's rules and routing (windows scaled to a one-minute run) pass
    `promtool check rules` and `amtool check-config`; the scaled values are the ones the
    demo's timing relies on."""
    config = demo_config()
    assert (config.window("1h"), config.window("5m"), config.window("1m")) == ("1m", "5s", "1s")
    assert config.window("30s") == "1s" and config.window("5m") == "5s"  # group wait, interval
    (tmp_path / "rules.yaml").write_text(render_rules(config))
    (tmp_path / "alertmanager.yaml").write_text(render_alertmanager(config))
    rules = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    routing = subprocess.run(
        ["amtool", "check-config", str(tmp_path / "alertmanager.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert routing.returncode == 0, routing.stdout + routing.stderr


def test_bad_arguments_are_refused_with_their_value() -> None:
    """Targets must be host:port; ports and timeouts must be in range."""
    for targets in ("127.0.0.1:9464", [], ["127.0.0.1"], ["127.0.0.1:99999"]):
        with pytest.raises(ValueError, match="targets"):
            LocalStack(targets)
    with pytest.raises(ValueError, match=re.escape("'127.0.0.1'")):
        LocalStack(["127.0.0.1"])
    with pytest.raises(ValueError, match=r"prometheus_port.*-1"):
        LocalStack(["127.0.0.1:9464"], prometheus_port=-1)
    with pytest.raises(ValueError, match=r"startup_timeout.*0"):
        LocalStack(["127.0.0.1:9464"], startup_timeout=0)


# -- the stack on the real servers ------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class _Recorded:
    """A binary wrapped by a shell script that writes its pid to a file before it execs the
    real one (the same process), so a test knows every process a stack started."""

    def __init__(self, directory: Path, name: str, real: str) -> None:
        self.pid_file = directory / f"{name}.pids"
        self.path = str(
            _executable(directory, name, f'echo $$ >> "{self.pid_file}"\nexec "{real}" "$@"')
        )

    @property
    def pids(self) -> list[int]:
        if not self.pid_file.exists():
            return []
        return [int(line) for line in self.pid_file.read_text().split()]


@pytest.fixture
def metrics_target() -> Iterator[tuple[str, str]]:
    """A sentinel metrics endpoint on loopback (its own registry) and the URL of an app it
    counts, with a route that fails."""

    class LedgerUnavailable(RuntimeError):
        pass

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def fail(request: Request) -> Response:
        raise LedgerUnavailable("ledger did not answer")

    with capture_reports(location="fra") as captured:
        endpoint = MetricsServer(captured.registry, "127.0.0.1", 0).start()
        app = instrument(
            Starlette(routes=[Route("/ok", ok), Route("/fail", fail)]), sentinel=captured.sentinel
        )
        try:
            with serve(app) as url:
                yield f"127.0.0.1:{endpoint.port}", url
        finally:
            endpoint.stop()


@needs_servers
def test_stack_scrapes_evaluates_delivers_and_stops_on_keyboard_interrupt(
    metrics_target: tuple[str, str], tmp_path: Path
) -> None:
    """Started with the demo config: Prometheus scrapes the endpoint (exact counts), the
    generated rules fire (the Watchdog on /watchdog, a first exception on /ticket), and the
    webhook got them. A KeyboardInterrupt in the block stops both servers by pid and frees
    every port; a bad query is one clear error."""
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    target, url = metrics_target
    prometheus = _Recorded(tmp_path, "prometheus", PROMETHEUS)
    alertmanager = _Recorded(tmp_path, "alertmanager", ALERTMANAGER)
    with (
        pytest.raises(KeyboardInterrupt),
        httpx.Client(base_url=url) as client,
        LocalStack(
            [target], demo_config(), prometheus=prometheus.path, alertmanager=alertmanager.path
        ) as stack,
    ):
        pids = stack.pids
        assert set(pids) == {"prometheus", "alertmanager"}
        assert sorted(pids.values()) == sorted(prometheus.pids + alertmanager.pids)
        assert stack.wait_for_scrape(20), stack.log_tail("prometheus")
        for _ in range(7):
            assert client.get("/ok").status_code == 200
        assert client.get("/fail").status_code == 500
        query = 'sum by (code) (sentinel_http_requests_total{job="sentinel"})'

        def counted() -> dict[str, float]:
            return {sample.labels["code"]: sample.value for sample in stack.query(query)}

        assert wait_for(lambda: counted() == {"200": 7.0, "500": 1.0}, timeout=15), counted()

        def delivered() -> set[tuple[str, str, str]]:
            return {
                (alert["path"], alert["receiver"], alert["labels"]["alertname"])
                for alert in stack.delivered()
                if alert["status"] == "firing"
            }

        expected = {
            ("/watchdog", "sentinel-watchdog", "SentinelWatchdog"),
            ("/ticket", "sentinel-ticket", "SentinelUnhandledExceptionNew"),
        }
        assert wait_for(lambda: delivered() >= expected, timeout=20), delivered()
        [new] = [a for a in stack.delivered() if a["labels"]["alertname"].endswith("New")]
        assert new["labels"]["route"] == "/fail" and new["labels"]["location"] == "fra"
        assert new["labels"]["exception_type"].endswith("LedgerUnavailable")
        names = {alert["labels"]["alertname"] for alert in stack.prometheus_alerts()}
        assert {"SentinelWatchdog", "SentinelUnhandledExceptionNew"} <= names
        assert stack.alertmanager_alerts()
        with pytest.raises(StackError, match=re.escape("sum by (((")):
            stack.query("sum by (((")
        ports = [
            int(address.rsplit(":", 1)[1])
            for address in (stack.prometheus_url, stack.alertmanager_url, stack.webhook_url)
        ]
        raise KeyboardInterrupt
    assert all(_gone(pid) for pid in pids.values())
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    with pytest.raises(StackError, match="not running"):
        _ = stack.prometheus_url


@needs_servers
@pytest.mark.parametrize("failing", ["prometheus port", "alertmanager port", "prometheus binary"])
def test_a_part_that_cannot_start_is_one_clear_error_and_nothing_is_left(
    tmp_path: Path, failing: str
) -> None:
    """A server whose port is taken, or a binary that is not the server: one StackError that
    names the part, says why, and shows the end of its log; every process the stack had
    started is stopped (by pid) before it is raised."""
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    prometheus = _Recorded(tmp_path, "prometheus", PROMETHEUS)
    alertmanager = _Recorded(tmp_path, "alertmanager", ALERTMANAGER)
    if failing == "prometheus binary":
        prometheus.path = str(
            _executable(tmp_path, "not-prometheus", 'echo "this is not prometheus" >&2\nexit 3')
        )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {
            "prometheus port": {"prometheus_port": port},
            "alertmanager port": {"alertmanager_port": port},
            "prometheus binary": {},
        }[failing]
        stack = LocalStack(
            ["127.0.0.1:9"],
            prometheus=prometheus.path,
            alertmanager=alertmanager.path,
            startup_timeout=20,
            **ports,
        )
        with pytest.raises(StackError) as raised:
            stack.start()
    message = str(raised.value)
    part = failing.split()[0]
    assert message.startswith(f"{part} did not start: it exited with status ")
    assert "the last lines of its log" in message
    if failing == "prometheus binary":
        assert "status 3" in message and "this is not prometheus" in message
    else:
        assert "address already in use" in message and str(port) in message
    started = prometheus.pids + alertmanager.pids
    assert started, "the stack started no process, so the test proves nothing"
    assert all(_gone(pid) for pid in started)
    assert stack.pids == {}


def test_a_missing_binary_is_one_clear_error_and_nothing_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not on the PATH: the message names the binary and the command that installs it. A
    path that is no executable: the message shows it. Nothing was started either way."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError) as raised:
        LocalStack(["127.0.0.1:9"]).start()
    assert "prometheus is not on the PATH" in str(raised.value)
    assert INSTALL_COMMAND in str(raised.value)
    _executable(tmp_path, "prometheus")
    with pytest.raises(StackError) as raised:
        LocalStack(["127.0.0.1:9"]).start()
    assert "prometheus-alertmanager or alertmanager is not on the PATH" in str(raised.value)
    bogus = str(tmp_path / "no" / "such" / "prometheus")
    with pytest.raises(StackError, match=f"no executable at '{bogus}'"):
        LocalStack(["127.0.0.1:9"], prometheus=bogus, alertmanager=bogus).start()


def test_a_taken_webhook_port_is_one_clear_error(tmp_path: Path) -> None:
    """The webhook receiver's port in use: the error says so with the port."""
    fake = str(_executable(tmp_path, "server"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = LocalStack(["127.0.0.1:9"], prometheus=fake, alertmanager=fake, webhook_port=port)
        with pytest.raises(
            StackError, match=f"webhook receiver could not listen on 127.0.0.1:{port}"
        ):
            stack.start()


@needs_servers
def test_keyboard_interrupt_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) while the stack waits for Prometheus to be ready: the interrupt goes
    on to the caller, and both servers it had started are stopped by pid first."""
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    prometheus = _Recorded(tmp_path, "prometheus", PROMETHEUS)
    alertmanager = _Recorded(tmp_path, "alertmanager", ALERTMANAGER)
    stack = LocalStack(["127.0.0.1:9"], prometheus=prometheus.path, alertmanager=alertmanager.path)
    # Prometheus needs about 5 s to know its Alertmanager (the discovery throttle), so the
    # interrupt arrives while the stack waits for that.
    # Python's own Ctrl-C handler for the test's length: a runner started in the background
    # by a shell without job control (nohup ... &) has SIGINT ignored, and so would this.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            stack.start()
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, handler)
        stack.close()
    started = prometheus.pids + alertmanager.pids
    assert len(started) == 2, started
    assert all(_gone(pid) for pid in started)

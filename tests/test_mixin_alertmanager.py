"""`sentinel alertmanager`: the generated routing checked by the real amtool, and delivered by
a real Alertmanager on loopback to a webhook receiver (grouping, every inhibition, the
watchdog's own receiver); bad input refused by the real CLI with nothing written."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import free_port, stop, wait_for

from sentinel.mixin import MonitoringConfig, MonitoringConfigError, Receiver
from sentinel.mixin._alertmanager import (
    PAGE_RECEIVER,
    TICKET_RECEIVER,
    WATCHDOG_RECEIVER,
    alertmanager_config,
    render_alertmanager,
)
from sentinel.mixin._rules import ALERTS, TENANT_BURN_ALERT, WATCHDOG_ALERT, rule_groups

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docker" / "alertmanager" / "alertmanager.yaml"
SENTINEL = [sys.executable, "-m", "sentinel.cli"]
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (Debian: prometheus-alertmanager)"
)
needs_alertmanager = pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="prometheus-alertmanager is not installed (Debian: prometheus-alertmanager)",
)

RENAMED = MonitoringConfig(
    slo=99.99,
    job_label="service",
    location_label="region",
    tenant_label="customer",
    page_receiver=Receiver(url="https://pager.example/hook", credentials_file="/run/pager-token"),
    ticket_receiver=Receiver(url="http://tickets.example:8080/new"),
)
SCALED = MonitoringConfig(
    slo=99.5,
    time_scale=1 / 60,
    watchdog_receiver=Receiver(url="https://deadman.example/ping/abc"),
)


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=30)


def _write(tmp_path: Path, config: MonitoringConfig, name: str = "alertmanager.yaml") -> Path:
    path = tmp_path / name
    path.write_text(render_alertmanager(config))
    return path


# -- the generated file -------------------------------------------------------------------------


def test_committed_default_is_regenerated_byte_for_byte() -> None:
    """docker/alertmanager/alertmanager.yaml is exactly what `sentinel alertmanager` writes for
    the compose stack's config, docker/sentinel.yaml (the defaults, with the stack's webhook
    receivers)."""
    stack_config = ROOT / "docker" / "sentinel.yaml"
    result = subprocess.run(
        [*SENTINEL, "alertmanager", "--config", str(stack_config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert COMMITTED.read_text(encoding="utf-8") == result.stdout, (
        "regenerate it: sentinel alertmanager --config docker/sentinel.yaml "
        "-o docker/alertmanager/alertmanager.yaml"
    )


@needs_amtool
@pytest.mark.parametrize(
    "config", [MonitoringConfig(), RENAMED, SCALED], ids=["default", "renamed", "scaled"]
)
def test_amtool_check_config_accepts_generated_files(
    tmp_path: Path, config: MonitoringConfig
) -> None:
    """The real amtool accepts the file for the default config and two others: 3 receivers,
    9 inhibit rules."""
    result = _amtool("check-config", str(_write(tmp_path, config)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert " - 9 inhibit rules" in result.stdout and " - 3 receivers" in result.stdout


ROUTES = [
    # (labels, receiver): every route, and the catch-all for a severity nobody set
    ({"alertname": "SentinelUnhandledExceptionNew", "severity": "page"}, PAGE_RECEIVER),
    ({"alertname": "SentinelUnhandledExceptionNew", "severity": "ticket"}, TICKET_RECEIVER),
    ({"alertname": "SentinelWatchdog"}, WATCHDOG_RECEIVER),
    ({"alertname": "SentinelWatchdog", "severity": "page"}, WATCHDOG_RECEIVER),
    (
        {"alertname": "SentinelErrorBudgetBurn", "scope": "location", "@loc": "fra"}
        | {"slo": "@slo", "severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelErrorBudgetBurn", "scope": "global", "slo": "@slo"}
        | {"severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelErrorBudgetBurn", "scope": "location", "@loc": "fra"}
        | {"slo": "@slo", "severity": "ticket"},
        TICKET_RECEIVER,
    ),
    (
        {"alertname": "SentinelErrorRecordsMissing", "@loc": "fra", "severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelErrorRecordsMissing", "@loc": "fra", "severity": "ticket"},
        TICKET_RECEIVER,
    ),
    ({"alertname": "SentinelLocationErrorRatioOutlier", "@loc": "fra"}, TICKET_RECEIVER),
    (
        {"alertname": "SentinelStatusShift", "@loc": "fra", "code": "401", "severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelStatusShift", "@loc": "fra", "code": "404", "severity": "ticket"},
        TICKET_RECEIVER,
    ),
    ({"alertname": "SentinelTrafficDrop", "@loc": "fra", "severity": "page"}, PAGE_RECEIVER),
    (
        {"alertname": "SentinelReleaseErrorRatioRegression", "@loc": "fra", "version": "v2"}
        | {"code": "401", "signal": "status_code", "severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelTenantErrorBudgetBurn", "@tenant": "acme", "slo": "@slo"}
        | {"severity": "page"},
        PAGE_RECEIVER,
    ),
    (
        {"alertname": "SentinelTenantErrorBudgetBurn", "@tenant": "acme", "slo": "@slo"}
        | {"severity": "ticket"},
        TICKET_RECEIVER,
    ),
]


@needs_amtool
@pytest.mark.parametrize("config", [MonitoringConfig(), RENAMED], ids=["default", "renamed"])
def test_amtool_routes_every_alert_to_its_receiver(
    tmp_path: Path, config: MonitoringConfig
) -> None:
    """`amtool config routes test --verify.receivers` for every route: pages, tickets, the
    watchdog (also if it carries a severity), per-location and global pages, records missing,
    a status shift's page and ticket, a traffic drop, a release's 4xx shift, a tenant's page
    and ticket; an alert without a severity still reaches the ticket receiver."""
    path = _write(tmp_path, config)
    for labels, receiver in ROUTES:
        pairs = []
        for name, value in labels.items():
            name = config.location_label if name == "@loc" else name
            name = config.tenant_label if name == "@tenant" else name
            value = config.slo_label if value == "@slo" else value
            pairs.append(f"{name}={value}")
        pairs.append(f"{config.job_label}=api")
        result = _amtool(
            "config",
            "routes",
            "test",
            f"--config.file={path}",
            f"--verify.receivers={receiver}",
            *pairs,
        )
        assert result.returncode == 0, (pairs, result.stdout, result.stderr)
        assert result.stdout.strip() == receiver


@needs_amtool
def test_every_generated_alert_reaches_the_receiver_of_its_severity(tmp_path: Path) -> None:
    """Each alerting rule `sentinel rules` generates, with its own labels plus the series'
    job and location, is routed by amtool to the receiver of its severity (the watchdog to
    its own); and the live test's alerts carry exactly those label names."""
    config = MonitoringConfig()
    path = _write(tmp_path, config)
    generated = [
        rule for group in rule_groups(config) for rule in group["rules"] if "alert" in rule
    ]
    assert {rule["alert"] for rule in generated} == set(ALERTS)
    for rule in generated:
        labels = {"alertname": rule["alert"], "job": "api", **rule["labels"]}
        if rule["alert"] == TENANT_BURN_ALERT:
            labels["tenant"] = "acme"  # the tenant metric has no location
        elif rule["alert"] != WATCHDOG_ALERT and rule["labels"].get("scope") != "global":
            labels["location"] = "fra"
        expected = {"page": PAGE_RECEIVER, "ticket": TICKET_RECEIVER}[labels["severity"]]
        if rule["alert"] == WATCHDOG_ALERT:
            expected = WATCHDOG_RECEIVER
        result = _amtool(
            "config",
            "routes",
            "test",
            f"--config.file={path}",
            f"--verify.receivers={expected}",
            *(f"{name}={value}" for name, value in labels.items()),
        )
        assert result.returncode == 0, (labels, result.stdout, result.stderr)
        live = [
            alert["labels"]
            for alert in LIVE_ALERTS.values()
            if alert["labels"]["alertname"] == rule["alert"]
            and alert["labels"].get("scope") == labels.get("scope")
        ]
        from_series = {"exception_type", "code", "version"}
        assert all(set(live_labels) - from_series <= set(labels) for live_labels in live)


_MATCHER = re.compile(r'^([a-zA-Z_][a-zA-Z0-9_]*)(=~|!~|!=|=)"(.*)"$')


def _matches(matchers: list[str], labels: dict[str, str]) -> bool:
    """Alertmanager's matcher semantics: a missing label is "", regexes are anchored."""
    for matcher in matchers:
        found = _MATCHER.match(matcher)
        assert found, matcher
        name, operator, value = found.groups()
        actual = labels.get(name, "")
        if operator in ("=~", "!~"):
            hit = re.fullmatch(value, actual) is not None
            if hit != (operator == "=~"):
                return False
        elif (actual == value) != (operator == "="):
            return False
    return True


@pytest.mark.parametrize("config", [MonitoringConfig(), RENAMED], ids=["default", "renamed"])
def test_no_inhibit_rule_can_hold_back_records_missing_the_watchdog_or_an_event(
    config: MonitoringConfig,
) -> None:
    """Whatever labels SentinelErrorRecordsMissing, SentinelWatchdog or the event tickets
    (SentinelUnhandledExceptionNew, SentinelGlobalStateMutated: they fire for event_window
    only, so held back by a longer page they would never be sent) carry (any severity,
    scope, slo, location, tenant), no inhibit rule's target matchers match them; the rules do
    match what they are meant to (so this check is not vacuous): a location's burn ticket is
    held back by a global page and by that location's page, a tenant's ticket by a global
    page and by its own page, its page by neither, never by a location's page."""
    rules = alertmanager_config(config)["inhibit_rules"]
    location = config.location_label
    for alertname in (
        "SentinelErrorRecordsMissing",
        "SentinelWatchdog",
        "SentinelUnhandledExceptionNew",
        "SentinelGlobalStateMutated",
    ):
        for severity in ("page", "ticket", "none", ""):
            for scope in ("", "global", "location"):
                for extra in (
                    {},
                    {location: "fra"},
                    {"slo": config.slo_label},
                    {config.tenant_label: "acme"},
                ):
                    labels = {"alertname": alertname, "severity": severity, "scope": scope}
                    labels |= extra
                    for rule in rules:
                        assert not _matches(rule["target_matchers"], labels), (rule, labels)
    burn_ticket = {
        "alertname": "SentinelErrorBudgetBurn",
        "scope": "location",
        location: "fra",
        "severity": "ticket",
    }
    assert [_matches(rule["target_matchers"], burn_ticket) for rule in rules] == [
        True,
        False,
        False,
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    shift = {"alertname": "SentinelStatusShift", location: "fra", "code": "401"}
    assert [_matches(rule["target_matchers"], shift | {"severity": "page"}) for rule in rules] == [
        *[False] * 8,
        True,
    ]
    tenant = {"alertname": TENANT_BURN_ALERT, config.tenant_label: "acme", "slo": "99.9"}
    for severity, held_by in (("page", []), ("ticket", [3, 4])):
        matched = [
            index
            for index, rule in enumerate(rules)
            if _matches(rule["target_matchers"], tenant | {"severity": severity})
        ]
        assert matched == held_by, (severity, matched)
    assert rules[4]["equal"] == [config.job_label, "slo", config.tenant_label]


def _inhibits(rules: list[dict[str, Any]], source: dict[str, str], target: dict[str, str]) -> bool:
    """Whether an inhibit rule holds ``target`` back while ``source`` fires (Alertmanager's
    semantics: both sides' matchers, and the ``equal`` labels alike, a missing one as "")."""
    return any(
        _matches(rule["source_matchers"], source)
        and _matches(rule["target_matchers"], target)
        and all(source.get(name, "") == target.get(name, "") for name in rule["equal"])
        for rule in rules
    )


@pytest.mark.parametrize("config", [MonitoringConfig(), RENAMED], ids=["default", "renamed"])
def test_a_status_code_page_holds_back_only_its_own_code_among_the_code_tickets(
    config: MonitoringConfig,
) -> None:
    """A SentinelStatusShift page for 404 does not hold back the SentinelStatusShift ticket
    for 401 in the same location (another code, another cause), while the 401 page holds
    back the 401 ticket; a location's page without a code (a burn page) still holds back
    every ticket there, a 4xx shift's included, and a code's page the tickets without one;
    nothing crosses locations."""
    rules = alertmanager_config(config)["inhibit_rules"]
    job, location = config.job_label, config.location_label

    def alert(name: str, severity: str, where: str = "fra", **labels: str) -> dict[str, str]:
        return {"alertname": name, job: "api", location: where, "severity": severity, **labels}

    shift = "SentinelStatusShift"
    burn = {"scope": "location", "slo": config.slo_label}
    ticket_401 = alert(shift, "ticket", code="401")
    assert not _inhibits(rules, alert(shift, "page", code="404"), ticket_401)
    assert _inhibits(rules, alert(shift, "page", code="401"), ticket_401)
    assert _inhibits(rules, alert(BURN, "page", **burn), ticket_401)
    assert _inhibits(rules, alert(shift, "page", code="404"), alert(BURN, "ticket", **burn))
    assert _inhibits(rules, alert(BURN, "page", **burn), alert(BURN, "ticket", **burn))
    assert not _inhibits(
        rules, alert(shift, "page", code="401"), alert(shift, "ticket", "iad", code="401")
    )
    regression = alert("SentinelReleaseErrorRatioRegression", "page", code="401", version="v2")
    assert _inhibits(rules, regression, alert(shift, "page", code="401"))
    assert not _inhibits(rules, regression, alert(shift, "ticket", code="403"))


def test_receivers_without_url_are_null_receivers_and_no_secret_is_written() -> None:
    """No URL: a receiver with no webhook (it exists, notifies no one, and the header says
    so). credentials_file and url_file are references Alertmanager reads; only the path is
    written."""
    default = alertmanager_config(MonitoringConfig())
    assert default["receivers"] == [
        {"name": PAGE_RECEIVER},
        {"name": TICKET_RECEIVER},
        {"name": WATCHDOG_RECEIVER},
    ]
    assert "Null receivers" in render_alertmanager(MonitoringConfig())
    config = MonitoringConfig(
        page_receiver=Receiver(url="https://pager.example/hook", credentials_file="/run/token"),
        ticket_receiver=Receiver(url_file="/run/ticket-url"),
    )
    receivers = {entry["name"]: entry for entry in alertmanager_config(config)["receivers"]}
    assert receivers[PAGE_RECEIVER]["webhook_configs"] == [
        {
            "url": "https://pager.example/hook",
            "send_resolved": True,
            "http_config": {"authorization": {"credentials_file": "/run/token"}},
        }
    ]
    assert receivers[TICKET_RECEIVER]["webhook_configs"] == [
        {"url_file": "/run/ticket-url", "send_resolved": True}
    ]
    assert receivers[WATCHDOG_RECEIVER] == {"name": WATCHDOG_RECEIVER}
    text = render_alertmanager(config)
    assert "Null receivers" in text and "sentinel-watchdog" in text.splitlines()[3]
    assert yaml.safe_load(text) == alertmanager_config(config)
    assert "&id" not in text and "*id" not in text, "no YAML aliases in a file people read"


def test_timings_scale_with_time_scale() -> None:
    """group_wait, group_interval and repeat_interval follow time_scale (the demo and the
    live test use 1/60); the watchdog beats every minute, scaled too."""
    routes = alertmanager_config(SCALED)["route"]
    assert (routes["group_wait"], routes["group_interval"]) == ("1s", "5s")
    watchdog, page, ticket = routes["routes"]
    # Flushed twice a beat, resent a tenth short of it: one beat an interval (the live test
    # measures the gaps).
    assert (watchdog["group_interval"], watchdog["repeat_interval"]) == ("500ms", "900ms")
    assert (page["repeat_interval"], ticket["repeat_interval"]) == ("4m", "24m")
    default = alertmanager_config(MonitoringConfig())["route"]
    assert [route["repeat_interval"] for route in default["routes"]] == ["54s", "4h", "1d"]
    assert default["routes"][0]["group_interval"] == "30s"
    assert default["group_by"] == ["alertname", "job", "slo", "severity"]


@pytest.mark.parametrize(
    ("receiver", "key", "shown"),
    [
        ({"url": "hooks.example/x"}, "page_receiver.url", "'hooks.example/x'"),
        ({"url": "ftp://hooks.example/x"}, "page_receiver.url", "'ftp://hooks.example/x'"),
        ({"url": "https://bot:hunter2@pager.example/"}, "page_receiver.url", ":***@"),
        ({"url": "https://a.example/", "url_file": "/run/u"}, "page_receiver", "url_file"),
        ({"credentials_file": "/run/token"}, "page_receiver.credentials_file", "'/run/token'"),
        ({"url_file": ""}, "page_receiver.url_file", "''"),
        ({"uri": "https://a.example/"}, "page_receiver", "'uri'"),
    ],
)
def test_bad_receivers_are_refused_naming_the_key_and_value(
    receiver: dict[str, str], key: str, shown: str
) -> None:
    """A receiver that Alertmanager could not use is refused when the config is read; the
    message names the key and shows the value (a password in a URL is masked)."""
    with pytest.raises(MonitoringConfigError) as caught:
        MonitoringConfig.from_mapping({"page_receiver": receiver}, "monitoring.yaml")
    message = str(caught.value)
    assert key in message and shown in message
    assert "hunter2" not in message


# -- the CLI ------------------------------------------------------------------------------------


@needs_amtool
def test_cli_writes_the_file_with_flags_over_the_config(tmp_path: Path) -> None:
    """`sentinel alertmanager --config F --page-url URL -o OUT` writes what the generator
    returns for that config, the flag replacing the file's url_file; amtool accepts it."""
    config_file = tmp_path / "monitoring.toml"
    config_file.write_text(
        'slo = 99.5\nlocation_label = "region"\n'
        '[page_receiver]\nurl_file = "/run/page-url"\ncredentials_file = "/run/page-token"\n'
    )
    output = tmp_path / "out" / "alertmanager.yaml"
    result = subprocess.run(
        [
            *SENTINEL,
            "alertmanager",
            "--config",
            str(config_file),
            "--page-url",
            "http://127.0.0.1:9/page",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected = MonitoringConfig(
        slo=99.5,
        location_label="region",
        page_receiver=Receiver(url="http://127.0.0.1:9/page", credentials_file="/run/page-token"),
    )
    assert output.read_text() == render_alertmanager(expected)
    assert _amtool("check-config", str(output)).returncode == 0


@pytest.mark.parametrize(
    ("config_text", "flags", "named"),
    [
        ("page_reciever:\n  url: https://a.example/\n", [], ["'page_reciever'"]),
        ("page_receiver:\n  url: hooks.example/x\n", [], ["page_receiver.url", "hooks.example/x"]),
        ("slo: 99.9\n", ["--ticket-url", "http://"], ["--ticket-url", "ticket_receiver.url"]),
        ("slo: 120\n", [], ['"slo"', "120"]),
    ],
    ids=["unknown-key", "bad-url-in-config", "bad-url-flag", "bad-slo"],
)
def test_cli_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, config_text: str, flags: list[str], named: list[str]
) -> None:
    """Bad input through the real CLI: exit status 2, a message naming the key and the
    value, and the output file left exactly as it was (no temporary file left either)."""
    config_file = tmp_path / "monitoring.yaml"
    config_file.write_text(config_text)
    output = tmp_path / "out"
    output.mkdir()
    (output / "alertmanager.yaml").write_text("previous\n")
    result = subprocess.run(
        [
            *SENTINEL,
            "alertmanager",
            "--config",
            str(config_file),
            *flags,
            "-o",
            str(output / "alertmanager.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    for word in named:
        assert word in result.stderr, result.stderr
    assert [path.name for path in output.iterdir()] == ["alertmanager.yaml"]
    assert (output / "alertmanager.yaml").read_text() == "previous\n"


# -- the live test ------------------------------------------------------------------------------


class _Webhook:
    """A webhook receiver on 127.0.0.1 keeping every notification with its arrival time."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, float, dict[str, Any], str | None]] = []
        self.lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with webhook.lock:
                    webhook.notifications.append(
                        (self.path, time.monotonic(), body, self.headers.get("Authorization"))
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def to(self, path: str) -> list[tuple[float, dict[str, Any], str | None]]:
        with self.lock:
            return [
                (at, body, auth) for where, at, body, auth in self.notifications if where == path
            ]


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    receiver = _Webhook()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def _alert(alertname: str, job: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": alertname, "job": job, "severity": severity, **labels},
        "annotations": {"summary": f"{alertname} in {labels.get('location', 'all')}"},
    }


def _key(alert: dict[str, Any]) -> tuple[str, ...]:
    labels = alert["labels"]
    return tuple(
        labels.get(name, "")
        for name in (
            "alertname",
            "job",
            "cluster",
            "slo",
            "scope",
            "location",
            "tenant",
            "severity",
            "code",
            "version",
        )
    )


BURN = "SentinelErrorBudgetBurn"


def _tenant(job: str, severity: str, tenant: str) -> dict[str, Any]:
    windows = {"page": ("1h", "5m"), "ticket": ("1d", "2h")}[severity]
    return _alert(
        TENANT_BURN_ALERT,
        job,
        severity,
        slo="99.9",
        tenant=tenant,
        long_window=windows[0],
        short_window=windows[1],
    )


def _burn(job: str, severity: str, slo: str, location: str | None = None) -> dict[str, Any]:
    windows = {"page": ("1h", "5m"), "ticket": ("1d", "2h")}[severity]
    where = {"scope": "location", "location": location} if location else {"scope": "global"}
    return _alert(
        BURN, job, severity, slo=slo, long_window=windows[0], short_window=windows[1], **where
    )


# One POST; each service (job) is a scenario of its own, since the inhibitions compare the
# job label. Labels as the generated rules set them (test_every_generated_alert_... checks).
LIVE_ALERTS = {
    # checkout: a global page of SLO 99.9
    "global page": _burn("checkout", "page", "99.9"),
    "fra page under global": _burn("checkout", "page", "99.9", "fra"),
    "iad ticket under global": _burn("checkout", "ticket", "99.9", "iad"),
    "global ticket under global": _burn("checkout", "ticket", "99.9"),
    "fra page of another slo": _burn("checkout", "page", "99.5", "fra"),
    "gru outlier under global": _alert(
        "SentinelLocationErrorRatioOutlier", "checkout", "ticket", slo="99.9", location="gru"
    ),
    "records missing page": _alert(
        "SentinelErrorRecordsMissing", "checkout", "page", location="fra"
    ),
    "acme page beside global": _tenant("checkout", "page", "acme"),
    "globex ticket under global": _tenant("checkout", "ticket", "globex"),
    # search: pages in three locations, no global page
    "search fra page": _burn("search", "page", "99.9", "fra"),
    "search iad page": _burn("search", "page", "99.9", "iad"),
    "search syd page": _burn("search", "page", "99.9", "syd"),
    "search fra ticket": _burn("search", "ticket", "99.9", "fra"),
    "search fra new exception": _alert(
        "SentinelUnhandledExceptionNew", "search", "ticket", location="fra", exception_type="E"
    ),
    "search lon ticket": _burn("search", "ticket", "99.9", "lon"),
    "search fra 404 shift ticket": _alert(
        "SentinelStatusShift", "search", "ticket", location="fra", code="404"
    ),
    # search: three tenants page (one notification), one of them with its ticket too
    "search acme page": _tenant("search", "page", "acme"),
    "search globex page": _tenant("search", "page", "globex"),
    "search initech page": _tenant("search", "page", "initech"),
    "search acme ticket": _tenant("search", "ticket", "acme"),
    "search umbrella ticket": _tenant("search", "ticket", "umbrella"),
    # billing: a location page, and records missing as a ticket in that location
    "billing fra page": _burn("billing", "page", "99.9", "fra"),
    "billing fra records missing ticket": _alert(
        "SentinelErrorRecordsMissing", "billing", "ticket", location="fra"
    ),
    # auth: a release answering 401 in fra, the status shifts it causes, a traffic drop
    "auth fra release 401": _alert(
        "SentinelReleaseErrorRatioRegression",
        "auth",
        "page",
        location="fra",
        version="v2",
        code="401",
        signal="status_code",
    ),
    "auth fra 401 shift page": _alert(
        "SentinelStatusShift", "auth", "page", location="fra", code="401"
    ),
    "auth fra 401 shift ticket": _alert(
        "SentinelStatusShift", "auth", "ticket", location="fra", code="401"
    ),
    "auth fra 403 shift page": _alert(
        "SentinelStatusShift", "auth", "page", location="fra", code="403"
    ),
    "auth fra 429 shift ticket": _alert(
        "SentinelStatusShift", "auth", "ticket", location="fra", code="429"
    ),
    "auth iad 401 shift page": _alert(
        "SentinelStatusShift", "auth", "page", location="iad", code="401"
    ),
    "auth syd traffic drop": _alert("SentinelTrafficDrop", "auth", "page", location="syd"),
    "watchdog": _alert("SentinelWatchdog", "prometheus", "ticket"),
}
INHIBITED = {  # what is held back, and by what
    "fra page under global": "global page",
    "iad ticket under global": "global page",
    "global ticket under global": "global page",
    "gru outlier under global": "global page",
    "globex ticket under global": "global page",
    "search acme ticket": "search acme page",
    "search fra ticket": "search fra page",
    "search fra 404 shift ticket": "search fra page",
    "auth fra 401 shift page": "auth fra release 401",
}
HELD_BY_SEVERAL = {"auth fra 401 shift ticket": {"auth fra release 401", "auth fra 401 shift page"}}
"""A ticket that the pages of its code in its location hold back (the release's 4xx shift
and its own page; not the 403 shift's page); Alertmanager names one of them (the first it
finds)."""
# Each expected notification group: its receiver path and exactly the alerts it lists.
EXPECTED_GROUPS = {
    "/page": [
        {"global page"},
        {"acme page beside global"},  # the customer the service may burn for: not held back
        {"fra page of another slo"},
        {"records missing page"},
        {"search fra page", "search iad page", "search syd page"},
        {"search acme page", "search globex page", "search initech page"},
        {"billing fra page"},
        {"auth fra release 401"},
        {"auth fra 403 shift page", "auth iad 401 shift page"},
        {"auth syd traffic drop"},
    ],
    "/ticket": [
        {"search lon ticket"},
        {"billing fra records missing ticket"},
        {"search fra new exception"},  # an event ticket: never held back
        {"search umbrella ticket"},
        {"auth fra 429 shift ticket"},  # the 401 and 403 shifts' pages are other codes
    ],
    "/watchdog": [{"watchdog"}],
}


@contextlib.contextmanager
def _alertmanager(tmp_path: Path, config_file: Path) -> Iterator[httpx.Client]:
    """A real Alertmanager on loopback reading ``config_file`` (no cluster), ready: a client
    on its API; stopped on exit."""
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    assert ALERTMANAGER is not None
    process = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config_file}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            def ready() -> bool:
                try:
                    return client.get("/-/ready").status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_for(ready, timeout=10), (tmp_path / "alertmanager.log").read_text()
            yield client
    finally:
        stop(process)
        log.close()


@needs_alertmanager
def test_live_alertmanager_groups_inhibits_and_routes(webhook: _Webhook, tmp_path: Path) -> None:
    """The real Alertmanager with the generated file (time_scale 1/60: group_wait 1s) and a
    webhook receiver: the per-location pages of one SLO arrive as one notification listing
    the three locations, and the tenants' pages of one SLO as one listing the three tenants;
    a global page holds back the same SLO's location burn alerts, the global ticket, the
    outlier and the tenants' burn tickets, not a tenant's page (it may name the customer the
    service burns for) nor another SLO's page; a location's page holds back that
    location's tickets (of any alert) but not another location's, nor a tenant's alert; a
    tenant's page holds back that tenant's ticket, not another tenant's;
    SentinelErrorRecordsMissing is delivered while both kinds of page fire; a release
    answering 401 in a location holds back that location's SentinelStatusShift of 401 (page
    and ticket), not of 403 nor of another location; a shift's page holds back the shift
    ticket of its own code only (the 401 and 403 pages not the 429 ticket); a traffic drop
    pages; the watchdog beats
    on its own receiver; the page webhook gets the bearer token read from credentials_file.
    When the global page resolves, what it held back is delivered."""
    token_file = tmp_path / "page-token"
    token_file.write_text("page-token-from-file\n")
    base = f"http://127.0.0.1:{webhook.port}"
    config = MonitoringConfig(
        time_scale=1 / 60,
        page_receiver=Receiver(url=f"{base}/page", credentials_file=str(token_file)),
        ticket_receiver=Receiver(url=f"{base}/ticket"),
        watchdog_receiver=Receiver(url=f"{base}/watchdog"),
    )
    config_file = _write(tmp_path, config)
    assert "page-token-from-file" not in config_file.read_text()
    with _alertmanager(tmp_path, config_file) as client:
        started = datetime.now(UTC).isoformat()
        posted = time.monotonic()
        alerts = [alert | {"startsAt": started} for alert in LIVE_ALERTS.values()]
        response = client.post("/api/v2/alerts", json=alerts)
        assert response.status_code == 200, response.text
        names = {_key(alert): name for name, alert in LIVE_ALERTS.items()}
        assert len(names) == len(LIVE_ALERTS), "every live alert is told apart"

        def groups(path: str) -> list[set[str]]:
            return [
                {names[_key(alert)] for alert in body["alerts"]} for _, body, _ in webhook.to(path)
            ]

        def all_arrived() -> bool:
            return (
                all(
                    group in groups(path)
                    for path, expected in EXPECTED_GROUPS.items()
                    for group in expected
                )
                and len(webhook.to("/watchdog")) >= 4
            )

        assert wait_for(all_arrived, timeout=15), {p: groups(p) for p in EXPECTED_GROUPS}
        # The dead man's switch beats once a (scaled) minute, not every other one: a
        # receiver alarming after 1.5 intervals without a beat never alarms falsely.
        beats = [at for at, _, _ in webhook.to("/watchdog")]
        gaps = sorted(later - earlier for earlier, later in itertools.pairwise(beats))
        assert gaps[len(gaps) // 2] < 1.5, gaps
        # Inhibition is decided when a group is flushed, and every group has flushed once
        # by now; wait out the rest of one scaled group_interval (5s) for stragglers.
        time.sleep(1.5)
        for path, expected in EXPECTED_GROUPS.items():
            for group in groups(path):
                assert group in expected, (path, group)
        delivered = {name for path in EXPECTED_GROUPS for group in groups(path) for name in group}
        assert delivered == set(LIVE_ALERTS) - set(INHIBITED) - set(HELD_BY_SEVERAL)
        receivers = {
            path: {body["receiver"] for _, body, _ in webhook.to(path)} for path in EXPECTED_GROUPS
        }
        assert receivers == {
            "/page": {PAGE_RECEIVER},
            "/ticket": {TICKET_RECEIVER},
            "/watchdog": {WATCHDOG_RECEIVER},
        }
        assert {auth for _, _, auth in webhook.to("/page")} == {"Bearer page-token-from-file"}
        assert {auth for _, _, auth in webhook.to("/ticket")} == {None}
        # Alertmanager's own view agrees: exactly these alerts are inhibited, each by the
        # alert the rules say.
        state = client.get("/api/v2/alerts").json()
        by_fingerprint = {alert["fingerprint"]: names[_key(alert)] for alert in state}
        inhibited = {
            names[_key(alert)]: {by_fingerprint[fp] for fp in alert["status"]["inhibitedBy"]}
            for alert in state
            if alert["status"]["inhibitedBy"]
        }
        assert set(inhibited) == set(INHIBITED) | set(HELD_BY_SEVERAL)
        for name, source in INHIBITED.items():
            assert inhibited[name] == {source}, name
        for name, sources in HELD_BY_SEVERAL.items():
            assert inhibited[name] and inhibited[name] <= sources, (name, inhibited[name])
        firsts = {
            path: [round(at - posted, 2) for at, _, _ in webhook.to(path)][:3]
            for path in EXPECTED_GROUPS
        }
        # Held back, not lost: when the global page resolves, what it held back arrives
        # at the groups' next interval (scaled: 5s), with the page marked resolved.
        resolved_at = time.monotonic()
        ended = LIVE_ALERTS["global page"] | {
            "startsAt": started,
            "endsAt": datetime.now(UTC).isoformat(),
        }
        assert client.post("/api/v2/alerts", json=[ended]).status_code == 200
        released = {name for name, source in INHIBITED.items() if source == "global page"}

        def notified_after_resolving() -> set[str]:
            return {
                names[_key(alert)]
                for path in ("/page", "/ticket")
                for at, body, _ in webhook.to(path)
                if at > resolved_at
                for alert in body["alerts"]
                if alert["status"] == "firing"
            }

        assert wait_for(lambda: notified_after_resolving() >= released, timeout=15), (
            notified_after_resolving()
        )
        assert "search fra ticket" not in notified_after_resolving()
        last = max(at for path in ("/page", "/ticket") for at, _, _ in webhook.to(path))
        print(
            f"seconds from POST to notification: {firsts}; from resolving the global page "
            f"to the release of what it held back: {last - resolved_at:.2f}"
        )


@needs_alertmanager
def test_identity_labels_keep_clusters_apart_in_a_shared_alertmanager(
    tmp_path: Path, webhook: _Webhook
) -> None:
    """Two Prometheus servers (external label cluster) send the same job's alerts to one
    Alertmanager. With alert_identity_labels=("cluster",), cluster eu's global page holds
    back eu's location page and ticket but not us's, and the two clusters' location pages
    arrive in notifications of their own."""
    base = f"http://127.0.0.1:{webhook.port}"
    config = MonitoringConfig(
        time_scale=1 / 60,
        alert_identity_labels=("cluster",),
        page_receiver=Receiver(url=f"{base}/page"),
        ticket_receiver=Receiver(url=f"{base}/ticket"),
    )
    burn = "SentinelErrorBudgetBurn"
    alerts = {
        "eu global page": _alert(burn, "api", "page", cluster="eu", scope="global", slo="99.9"),
        "eu location page": _alert(
            burn, "api", "page", cluster="eu", scope="location", slo="99.9", location="fra"
        ),
        "us location page": _alert(
            burn, "api", "page", cluster="us", scope="location", slo="99.9", location="fra"
        ),
        "us outlier": _alert(
            "SentinelLocationErrorRatioOutlier",
            "api",
            "ticket",
            cluster="us",
            location="iad",
            slo="99.9",
        ),
        "eu outlier": _alert(
            "SentinelLocationErrorRatioOutlier",
            "api",
            "ticket",
            cluster="eu",
            location="iad",
            slo="99.9",
        ),
    }
    with _alertmanager(tmp_path, _write(tmp_path, config)) as client:
        started = datetime.now(UTC).isoformat()
        posted = [alert | {"startsAt": started} for alert in alerts.values()]
        assert client.post("/api/v2/alerts", json=posted).status_code == 200
        names = {_key(alert): name for name, alert in alerts.items()}

        def pages() -> list[set[str]]:
            return [
                {names[_key(alert)] for alert in body["alerts"]}
                for _, body, _ in webhook.to("/page")
            ]

        assert wait_for(lambda: len(pages()) >= 2, timeout=15), pages()
        time.sleep(1.5)  # stragglers of the groups' first flush
        state = client.get("/api/v2/alerts").json()
        inhibited = {names[_key(a)] for a in state if a["status"]["inhibitedBy"]}
        assert inhibited == {"eu location page", "eu outlier"}
        assert sorted(map(sorted, pages())) == [["eu global page"], ["us location page"]]

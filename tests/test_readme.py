"""The README and docs/*.md work as written.

Every fenced python and shell block is run (each in a fresh subprocess, in a temporary
directory, with the interpreter running these tests) unless its first line marks it as an
excerpt; the Quick start block is the one exception, run by CI itself. The tables and
examples that describe the code (settings, metrics, alerts, report fields, public names)
are compared with the code, so they cannot drift, and every relative link resolves.

Markers, on a block's first line, where a reader sees them:

- ``# excerpt: <why>``: not run (it needs your app, a server that runs forever, Docker...);
- ``# needs: pip install <package>``: run when the package is importable, skipped (with the
  block's line) when it is not.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import sentinel
from sentinel import testing
from sentinel._config import ENVIRONMENT
from sentinel._vocabulary import Component, DropReason
from sentinel.mixin import MonitoringConfig
from sentinel.mixin._rules import rule_groups, runbook_anchor

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOCUMENTS = (README, *sorted(DOCS.glob("*.md")))

PYTHON = {"python", "py"}
SHELL = {"sh", "shell", "bash", "console"}
DATA = {"json", "text", "yaml", "toml", "promql", "ini"}
"""Languages of blocks that show data or output: read, never run."""
EXCERPT_RE = re.compile(r"# excerpt: \S")
NEEDS_RE = re.compile(r"#\s*needs:\s*pip install\s+(?P<packages>.+)")
BLOCK_TIMEOUT = 90.0
"""Seconds one block may run (the slowest, a pytest run, takes a few)."""

EXPECTED_FAILURES = {
    "test_a_request_cannot_set_the_locale_for_everyone": (
        "os.environ 'LC_ALL' by GET /locale",
        "location sin",
        "'C' -> 'tr_TR'",
    ),
}
"""Test functions in blocks that fail on purpose (the README says so), and what their
failure must show: the seed's frozen location, caught."""

INTERNAL_VARIABLES = {
    "SENTINEL_RUN_TARGET": "set by `sentinel run` for its worker processes",
    "SENTINEL_RUN_FACTORY": "set by `sentinel run` for its worker processes",
    "SENTINEL_RUN_FAILURE_FILE": "set by `sentinel run` for its worker processes",
}
"""Variables sentinel reads that are not settings: they pass state to its own processes."""


# -- reading the documents ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    path: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    section: str
    """The nearest ``## `` heading above the block."""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")

    @property
    def is_excerpt(self) -> bool:
        return EXCERPT_RE.match(self.first_line) is not None

    @property
    def needs(self) -> list[str]:
        """The packages a ``# needs: pip install ...`` block names."""
        match = NEEDS_RE.match(self.first_line)
        return match.group("packages").split() if match else []

    @property
    def is_quick_start(self) -> bool:
        return self.path == README and self.section == "Quick start"

    @property
    def commands(self) -> list[str]:
        """The shell commands: lines that are not comments (``$ `` lines of a console block),
        a trailing backslash joining the next line."""
        lines = self.code.splitlines()
        if self.language == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        commands: list[str] = []
        pending = ""
        for line in lines:
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append(pending + line.strip())
            pending = ""
        return commands


_FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<language>[^`\s]*)\s*$")


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with their indentation (in lists) removed."""
    blocks: list[Block] = []
    section = ""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        opening = _FENCE_RE.match(line)
        if opening is None:
            index += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            text = lines[end]
            body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
            end += 1
        assert end < len(lines), f"{path.relative_to(ROOT)}:{index + 1}: unclosed code block"
        blocks.append(
            Block(path, index + 1, opening.group("language").lower(), "\n".join(body), section)
        )
        index = end + 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in read_blocks(path)]
RUNNABLE_PYTHON = [
    b for b in BLOCKS if b.language in PYTHON and not b.is_excerpt and not b.is_quick_start
]
RUNNABLE_SHELL = [
    b for b in BLOCKS if b.language in SHELL and not b.is_excerpt and not b.is_quick_start
]


def section(path: Path, heading: str) -> str:
    """The text of the ``## heading`` section of ``path`` (up to the next ``## ``)."""
    text = path.read_text(encoding="utf-8")
    marker = f"\n## {heading}\n"
    assert marker in text, f"{path.relative_to(ROOT)} has no section {heading!r}"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


def _cells(row: str) -> list[str]:
    """A table row's cells; a ``|`` inside backticks does not split."""
    cells, current, in_code = [], "", False
    for char in row.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
    cells.append(current.strip())
    return cells


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in ``text`` whose first header is ``first_header``."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|") and _cells(line)[0] == first_header:
            headers = _cells(line)
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, _cells(row), strict=True)))
            return rows
    msg = f"no table whose first header is {first_header!r}"
    raise AssertionError(msg)


def code_spans(text: str) -> list[str]:
    """What is written in backticks in ``text``."""
    return re.findall(r"`([^`\n]+)`", text)


def literal(cell: str) -> Any:
    """The Python value a table cell shows in backticks (``"report"``, ``None``, ``()``)."""
    spans = code_spans(cell)
    assert len(spans) == 1, f"a default is one value in backticks: {cell!r}"
    return ast.literal_eval(spans[0])


# -- running blocks ----------------------------------------------------------------------------


def block_environment() -> dict[str, str]:
    """The environment a block runs in: this one without sentinel's, OTel's and
    prometheus-client's variables (so a block shows the defaults), the metrics endpoint off
    (it would bind every interface on a fixed port), and this interpreter's scripts
    (``sentinel``) first on the PATH."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SENTINEL_", "OTEL_", "PROMETHEUS_"))
    }
    environment["SENTINEL_METRICS_PORT"] = "0"
    scripts = str(Path(sys.executable).parent)
    environment["PATH"] = os.pathsep.join([scripts, environment.get("PATH", "")])
    return environment


DRIVER = """\
import runpy
import sys

namespace = runpy.run_path(sys.argv[1], run_name="__main__")
app = namespace.get("app")
if app is not None:
    from sentinel import testing
    from sentinel._middleware import find_sentinel

    if find_sentinel(app) is None:
        if sys.argv[2] == "must-wrap":
            sys.exit("the block's app is not wrapped with sentinel")
    else:
        with testing.observe(app) as captured:
            status = testing.Client(app).get("/").status_code
        assert status < 500, f"GET / answered {status}"
        assert captured.request_records, "sentinel kept no record of GET /"
        print("the block's app answered", status)
"""
"""Runs a block as a script; an ``app`` it leaves behind must answer a request through
sentinel (and, in "Wrapping an app", must be wrapped)."""


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in ``cwd`` with the blocks' environment, its output captured."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=block_environment(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )


def _defines_tests(code: str) -> list[str]:
    return [
        node.name
        for node in ast.parse(code).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    ]


def _skip_unless_installed(block: Block) -> None:
    for package in block.needs:
        module = package.split("[")[0].replace("-", "_")
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{block.where} needs {package}, which is not installed")


# -- every block is run or marked --------------------------------------------------------------


def test_serving_the_example_yourself_reads_the_headers_its_traffic_sends() -> None:
    """The README's two commands, run (on free ports, the traffic for 3 seconds): the
    example app under `sentinel run` and the traffic against it. Without the demo's header
    settings the traffic lands in one unknown location, and without --tenants no request
    names its customer: the incident would never show."""
    from helpers import clean_env, free_port, stop, wait_for

    from sentinel.example import traffic

    text = " ".join(README.read_text(encoding="utf-8").split())
    (command,) = re.findall(r"`([^`]*sentinel run sentinel\.example\.app:app[^`]*)`", text)
    (play,) = re.findall(r"`([^`]*-m sentinel\.example\.traffic[^`]*)`", text)
    assert f"SENTINEL_LOCATION_HEADER={traffic.LOCATION_HEADER} " in command
    assert f"SENTINEL_LOCATIONS={','.join(traffic.LOCATIONS)} " in command
    assert f"SENTINEL_TENANT_HEADER={traffic.TENANT_HEADER} " in command
    port, metrics_port = free_port(), free_port()
    *assignments, program, _run, app, _port, _8000 = command.split()
    assert (program, _run, _port, _8000) == (".venv/bin/sentinel", "run", "--port", "8000")
    env = clean_env(**dict(a.split("=", 1) for a in assignments))
    env["SENTINEL_METRICS_PORT"] = str(metrics_port)
    server = subprocess.Popen(
        [sys.executable, "-m", "sentinel.cli", "run", app, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:

        def metrics() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    return str(r.read().decode())
            except OSError:
                return ""

        assert wait_for(metrics, timeout=20)
        python, *arguments = play.replace("8000", str(port)).split()
        assert python == ".venv/bin/python"
        sent = subprocess.run(
            [sys.executable, *arguments, "--duration", "3"],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        exposed = metrics()
    finally:
        stop(server)
    locations = set(re.findall(r'sentinel_location_requests_total\{[^}]*location="(\w+)"', exposed))
    assert locations == set(traffic.LOCATIONS)
    tenants = set(re.findall(r'sentinel_tenant_requests_total\{[^}]*tenant="([^"]+)"', exposed))
    assert tenants - {"other"}, "no customer was named"


def test_every_code_block_is_run_or_marked() -> None:
    """A block is run (python, shell), read as data (json, text...), marked as an excerpt,
    or the Quick start; anything else (no language, an unknown one, a console block without
    a ``$`` command) fails, naming its line."""
    unclear = []
    for block in BLOCKS:
        if block.is_excerpt or block.is_quick_start or block.language in DATA | PYTHON:
            continue
        if block.language in SHELL and block.commands:
            continue
        unclear.append(f"{block.where}: a ```{block.language} block is neither run nor marked")
    assert not unclear, "\n".join(unclear)
    assert len(RUNNABLE_PYTHON) >= 5 and len(RUNNABLE_SHELL) >= 2, "the documents lost blocks"


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    """The Quick start is one block of exactly two commands: set-up plus the demo, and the
    tests, which .ci/run runs exactly as written (so CI runs the README's command)."""
    (block,) = [b for b in BLOCKS if b.is_quick_start]
    assert block.language in SHELL
    demo, tests = block.commands
    assert "pip install -e ." in demo and demo.endswith("sentinel demo"), demo
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-1].removeprefix("exec ") == tests, ci


@pytest.mark.parametrize("block", RUNNABLE_PYTHON, ids=lambda b: b.where)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    """The block runs as pasted; one that defines tests runs under pytest, and passes
    unless it is one that fails on purpose, with the failure it is meant to show."""
    _skip_unless_installed(block)
    tests = _defines_tests(block.code)
    if tests:
        (tmp_path / "test_block.py").write_text(block.code, encoding="utf-8")
        result = run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_block.py"],
            tmp_path,
        )
        output = result.stdout + result.stderr
        expected = [EXPECTED_FAILURES[name] for name in tests if name in EXPECTED_FAILURES]
        if expected:
            assert result.returncode == 1, f"{block.where} should fail:\n{output}"
            assert f"{len(expected)} failed" in output, output
            for shown in (text for texts in expected for text in texts):
                assert shown in output, f"{block.where}: the failure does not show {shown!r}"
        else:
            assert result.returncode == 0, f"{block.where} failed:\n{output}"
        return
    (tmp_path / "block.py").write_text(block.code, encoding="utf-8")
    (tmp_path / "driver.py").write_text(DRIVER, encoding="utf-8")
    must_wrap = "must-wrap" if block.section == "Wrapping an app" else "may-wrap"
    result = run([sys.executable, "driver.py", "block.py", must_wrap], tmp_path)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stdout}{result.stderr}"
    if block.path == README and block.section == "What you get":
        printed = result.stdout.splitlines()
        missing = [line for line in _metrics_example().splitlines() if line not in printed]
        assert not missing, f"the script does not print the metrics shown: {missing}"


def _metrics_example() -> str:
    """The README's metrics example: what its "What you get" script prints."""
    (block,) = [
        b
        for b in BLOCKS
        if b.path == README and b.language == "text" and b.section == "What you get"
    ]
    return block.code


@pytest.mark.parametrize("block", RUNNABLE_SHELL, ids=lambda b: b.where)
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    """The block's commands all succeed under ``bash -euo pipefail`` (loopback only: a
    command that serves forever is an excerpt)."""
    for command in block.commands:
        words = [w for w in command.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        if shutil.which(words[0], path=block_environment()["PATH"]) is None:
            pytest.skip(f"{block.where} needs {words[0]}, which is not on the PATH")
    (tmp_path / "block.sh").write_text("\n".join(block.commands) + "\n", encoding="utf-8")
    result = run(["bash", "-euo", "pipefail", "block.sh"], tmp_path)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stdout}{result.stderr}"


# -- the configuration tables ------------------------------------------------------------------

FIELDS = {field.name: field for field in dataclasses.fields(sentinel.Config)}


def test_readme_variables_are_the_ones_the_code_reads_with_their_defaults() -> None:
    """The README's table lists every SENTINEL_* variable Config.from_env reads and no
    other, each with the keyword it sets and that keyword's default."""
    rows = table(section(README, "Configuration"), "variable")
    settings = {row["variable"].strip("`"): row for row in rows}
    read = {v.name: v.field for v in ENVIRONMENT if v.name.startswith("SENTINEL_")}
    assert set(settings) >= set(read), (
        f"missing from the README: {sorted(set(read) - set(settings))}"
    )
    listed = {name for name in settings if name.startswith("SENTINEL_")}
    assert listed == set(read), f"not read by the code: {sorted(listed - set(read))}"
    for name, field_name in read.items():
        row = settings[name]
        assert row["keyword"] == f"`{field_name}`", (name, row["keyword"])
        assert literal(row["default"]) == FIELDS[field_name].default, (name, row["default"])


def test_every_config_field_is_in_the_reference_with_its_default_and_variables() -> None:
    """docs/configuration.md has one row per Config field: its default, and exactly the
    variables that set it."""
    rows = table(section(DOCS / "configuration.md", "Every field"), "keyword")
    keywords = [row["keyword"].strip("`") for row in rows]
    assert sorted(keywords) == sorted(FIELDS), (
        f"missing: {sorted(set(FIELDS) - set(keywords))}, "
        f"not fields: {sorted(set(keywords) - set(FIELDS))}"
    )
    assert len(keywords) == len(set(keywords)), "a field is listed twice"
    for row in rows:
        name = row["keyword"].strip("`")
        assert literal(row["default"]) == FIELDS[name].default, (name, row["default"])
        shown = {span for span in code_spans(row["variable"]) if re.fullmatch(r"[A-Z0-9_]+", span)}
        assert shown == {v.name for v in ENVIRONMENT if v.field == name}, (name, shown)


def _variables_in_source() -> set[str]:
    """Every SENTINEL_*, OTEL_* and PROMETHEUS_* name that sentinel's code spells out."""
    found = set()
    for path in (ROOT / "sentinel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"(SENTINEL|OTEL|PROMETHEUS)_[A-Z0-9_]+", node.value)
            ):
                found.add(node.value)
    return found


def test_every_variable_the_code_reads_is_in_the_readme() -> None:
    """Every environment variable named in sentinel's code is in the README's
    configuration section (but the ones sentinel run passes to its own workers)."""
    spans = set(code_spans(section(README, "Configuration")))
    in_code = _variables_in_source() | {v.name for v in ENVIRONMENT}
    assert "SENTINEL_METRICS_PORT" in in_code and "OTEL_TRACES_EXPORTER" in in_code
    missing = sorted(in_code - spans - set(INTERNAL_VARIABLES))
    assert not missing, f"variables the code reads that the README does not list: {missing}"


def test_every_collaborator_is_documented() -> None:
    """Each keyword of SentinelMiddleware that is not a Config field is in the
    collaborators table of docs/configuration.md, and each row is such a keyword."""
    parameters = inspect.signature(sentinel.SentinelMiddleware.__init__).parameters
    collaborators = {
        name
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    rows = table(section(DOCS / "configuration.md", "Collaborators"), "keyword")
    assert {row["keyword"].strip("`") for row in rows} == collaborators


# -- metrics, vocabulary, alerts, public names -------------------------------------------------


def _families(registry: Any) -> dict[str, str]:
    """Exposition name (counters with ``_total``) to type, of every family in ``registry``."""
    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in registry.collect()
    }


def test_metrics_table_is_every_metric_sentinel_registers() -> None:
    """docs/metrics.md's table names every metric sentinel registers, with its type, and no
    other; the drop reasons and internal-error components it lists are the vocabulary's."""
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    with testing.capture_reports() as captured:
        families = _families(captured.registry)
    rows = table(text, "metric")
    documented = {row["metric"].strip("`"): row["type"] for row in rows}
    assert set(documented) == set(families)
    for name, kind in families.items():
        assert documented[name].startswith(kind), (name, documented[name])
    spans = set(code_spans(text))
    for vocabulary in (DropReason, Component):
        missing = set(typing.get_args(vocabulary)) - spans
        assert not missing, f"docs/metrics.md does not list {sorted(missing)}"


def _alerts() -> dict[str, list[dict[str, Any]]]:
    alerts: dict[str, list[dict[str, Any]]] = {}
    for group in rule_groups(MonitoringConfig()):
        for rule in group["rules"]:
            if "alert" in rule:
                alerts.setdefault(rule["alert"], []).append(rule)
    return alerts


def test_alert_table_is_every_generated_alert() -> None:
    """The README's alert table lists exactly the alerts `sentinel rules` generates, each
    with a severity and the annotations the README promises."""
    rows = table(section(README, "What you get"), "alert")
    assert {row["alert"].strip("`") for row in rows} == set(_alerts())
    for name, rules in _alerts().items():  # what the README says every alert has
        for rule in rules:
            assert rule["labels"]["severity"] in ("page", "ticket"), name
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name


def test_the_alert_example_matches_its_rule() -> None:
    """The webhook notification shown in the README is one of sentinel's alerts: its
    severity, its annotations, and a runbook link to a section that exists."""
    (example,) = [
        json.loads(block.code)
        for block in BLOCKS
        if block.path == README and block.language == "json" and '"receiver"' in block.code
    ]
    runbooks = (DOCS / "runbooks.md").read_text(encoding="utf-8")
    for alert in example["alerts"]:
        labels, annotations = alert["labels"], alert["annotations"]
        (rule,) = _alerts()[labels["alertname"]]
        assert labels["severity"] == rule["labels"]["severity"]
        assert set(annotations) == set(rule["annotations"])
        anchor = runbook_anchor(labels["alertname"])
        assert annotations["runbook_url"].endswith(f"docs/runbooks.md#{anchor}")
        assert anchor in _anchors(runbooks)


def test_every_public_name_is_documented() -> None:
    """Each name sentinel exports appears in the README or docs/ (as ``sentinel.name`` or
    in backticks)."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
    spans = set(code_spans(text))
    for name in sentinel.__all__:
        assert name in spans or f"sentinel.{name}" in text, name


def test_every_testing_name_is_in_the_readme() -> None:
    """Each name ``sentinel.testing`` exports, each public method and property of
    ``Captured`` and each keyword of the clients and of ``capture_reports`` is in the
    README's testing section."""
    import inspect

    from sentinel import testing

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Testing your app") : text.index("## Performance")]
    for name in testing.__all__:
        assert f"testing.{name}" in section or (name == "Captured" and "`Captured`" in section)
    for name in vars(testing.Captured):
        if not name.startswith("_") and name != "sink":  # sink: what the capture writes to
            assert re.search(rf"\b{name}\b", section), name
    for function in (testing.Client.__init__, testing.capture_reports):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                known = parameter.name in {"base_url", "timeout"}  # httpx's own
                assert known or f"{parameter.name}=" in section, parameter.name


def test_every_command_is_listed() -> None:
    """The README's reference names every command `sentinel --help` lists, and no other."""
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listed = set(re.findall(r"^    ([a-z][a-z-]*)\b", result.stdout, flags=re.MULTILINE))
    assert {"run", "demo", "rules"} <= listed, result.stdout
    reference = section(README, "Reference").split("\n\n", 1)[0]
    named = {span for span in code_spans(reference) if re.fullmatch(r"[a-z][a-z-]*", span)}
    assert named == listed


# -- the examples are real ---------------------------------------------------------------------


@dataclass
class Real:
    """What sentinel writes for the README's requests, here and now."""

    records: dict[str, dict[str, Any]]
    """The first record of each event."""
    span_attributes: dict[str, Any]
    samples: dict[str, set[frozenset[str]]]
    """Metric sample name to the label-name sets it was seen with."""


@pytest.fixture(scope="module")
def real() -> Iterator[Real]:
    """The example app behind a real uvicorn on loopback: the README's two requests, and a
    request from sin that writes the environment (undone afterwards)."""
    from sentinel.example.app import app

    exporter = InMemorySpanExporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LC_ALL", "C")
        with testing.capture_reports(
            service="shop",
            version="1.4.2",
            environment="production",
            location="fra",
            location_header="x-location",
            span_exporter=exporter,
        ) as captured:
            wrapped = sentinel.instrument(app, sentinel=captured.sentinel)
            with testing.serve(wrapped) as url:
                urllib.request.urlopen(f"{url}/items/1", timeout=10).read()
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(f"{url}/boom?backend=replica-7&token=hunter2")
                request = urllib.request.Request(
                    f"{url}/locale?lang=tr_TR", headers={"x-location": "sin"}
                )
                urllib.request.urlopen(request, timeout=10).read()
            records: dict[str, dict[str, Any]] = {}
            for record in captured.records:
                records.setdefault(str(record["event"]), record)
            samples: dict[str, set[frozenset[str]]] = {}
            for family in captured.registry.collect():
                for sample in family.samples:
                    samples.setdefault(sample.name, set()).add(frozenset(sample.labels))
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "GET /boom"]
    yield Real(records, dict(span.attributes or {}), samples)


def _json_examples() -> list[tuple[Block, dict[str, Any]]]:
    return [
        (block, json.loads(block.code))
        for block in BLOCKS
        if block.language == "json" and not block.is_excerpt
    ]


def test_record_examples_show_only_real_fields_and_every_field_is_documented(real: Real) -> None:
    """Each record shown (report, request record, mutation) has only fields sentinel
    writes; and every field sentinel writes in those records is named in the documents."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
    documented = set(code_spans(text))
    shown = 0
    for block, example in _json_examples():
        event = example.get("event")
        if event is None:
            continue
        assert event in real.records, f"{block.where}: no {event!r} record was written"
        extra = set(example) - set(real.records[event])
        assert not extra, f"{block.where}: {event} records have no field {sorted(extra)}"
        shown += 1
    assert shown >= 3
    for event in ("unhandled_exception", "request", "global_state_mutated"):
        for name in real.records[event]:
            assert name in documented or f'"{name}"' in text, f"{event} field {name!r}"


def test_record_examples_point_at_the_code_lines_sentinel_names_today(real: Real) -> None:
    """The culprit, the app's frames and the mutation's code line shown are the ones
    sentinel names for the same requests now, so an edit of the example app that moves a
    line cannot leave the examples pointing at the wrong one."""
    checked = 0
    for block, example in _json_examples():
        record = real.records.get(str(example.get("event")))
        if record is None:
            continue
        for field in ("culprit", "line", "function"):
            if field in example:
                assert example[field] == record[field], f"{block.where}: {field}"
                checked += 1
        real_frames = {(frame["function"], frame["line"]) for frame in record.get("frames", ())}
        for frame in example.get("frames", ()):
            if frame["in_app"]:
                assert (frame["function"], frame["line"]) in real_frames, block.where
                checked += 1
    assert checked >= 6


def test_span_example_shows_real_attributes(real: Real) -> None:
    """The span attributes shown are the ones sentinel's server span has."""
    (example,) = [e for _, e in _json_examples() if "http.route" in e]
    assert set(example) <= set(real.span_attributes), set(example) - set(real.span_attributes)
    assert example["http.route"] == real.span_attributes["http.route"]


def test_metric_example_lines_are_real_series(real: Real) -> None:
    """Each line of the README's metrics example is a series sentinel exposes, with the
    same label names."""
    for line in _metrics_example().splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} \S+", line)
        assert match is not None, line
        name, labels = match.groups()
        names = frozenset(re.findall(r'(\w+)="', labels))
        assert names in real.samples.get(name, set()), line


# -- links -------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if _FENCE_RE.match(line):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = _slug(line.lstrip("#"))
        candidate, number = slug, 0
        while candidate in anchors:
            number += 1
            candidate = f"{slug}-{number}"
        anchors.add(candidate)
    return anchors


SECTIONS = [
    "Quick start",
    "Wrapping an app",
    "What you get",
    "Configuration",
    "Operating it",
    "Testing your app",
    "Performance",
    "Reliability",
    "What sentinel deliberately does not do",
    "Reference",
]
"""The README's sections, in the order a newcomer needs them (issue 14)."""


def test_readme_sections_come_in_a_newcomers_order_and_link_every_doc() -> None:
    """What it is (the text before the first section), then the sections in order; every
    file in docs/ is linked from the README."""
    text = README.read_text(encoding="utf-8")
    headings = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    assert "no error goes unseen" in text.split("\n## ", 1)[0]
    for path in DOCS.glob("*.md"):
        assert f"(docs/{path.name})" in text, f"the README does not link docs/{path.name}"


def test_every_relative_link_resolves() -> None:
    """Every relative link in the README and docs/ points to a file that exists, and to a
    heading of it when it names one."""
    broken = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif (
                anchor
                and linked.suffix == ".md"
                and anchor not in _anchors(linked.read_text(encoding="utf-8"))
            ):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)

"""The compose stack in docker/, validated without a Docker engine: the compose file against the
Compose Specification's schema; Prometheus's and Alertmanager's configs by the real promtool
and amtool; the Collector's config as far as it can be checked offline; the generated files
against their generators; what the services mount, publish and point at; the provisioned
dashboards; image pins; the Dockerfile; and its health check against a real `sentinel run`."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from helpers import clean_env, first_response, free_port, stop

from sentinel import Config
from sentinel._config import otlp_protocol
from sentinel.example import traffic
from sentinel.mixin import MonitoringConfig, Receiver
from sentinel.mixin._rules import render_rules

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
STACK_CONFIG = DOCKER / "sentinel.yaml"
COLLECTOR_CONFIG = DOCKER / "otelcol" / "config.yaml"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "compose-spec" / "compose-spec.json"
SENTINEL = [sys.executable, "-m", "sentinel.cli"]
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")

# The Collector components (contrib distribution) a config may name: a misspelt type makes
# the Collector refuse to start, which no Docker-less check would otherwise notice.
KNOWN_COMPONENTS = {
    "receivers": {"otlp", "jaeger", "zipkin", "kafka", "prometheus", "hostmetrics", "filelog"},
    "processors": {
        "batch",
        "memory_limiter",
        "tail_sampling",
        "probabilistic_sampler",
        "attributes",
        "resource",
        "filter",
        "transform",
        "k8sattributes",
        "resourcedetection",
    },
    "exporters": {
        "otlp",
        "otlp_grpc",
        "otlphttp",
        "debug",
        "file",
        "kafka",
        "loadbalancing",
        "prometheus",
        "prometheusremotewrite",
        "zipkin",
    },
}
# tail_sampling's settings and each policy type's fields, from the contrib processor's
# config.go (processor/tailsamplingprocessor).
TAIL_SAMPLING_SETTINGS = {
    "decision_wait",
    "num_traces",
    "expected_new_traces_per_sec",
    "policies",
    "decision_cache",
    "sample_on_first_match",
}
POLICY_FIELDS = {
    "always_sample": set(),
    "latency": {"threshold_ms", "upper_threshold_ms"},
    "numeric_attribute": {"key", "min_value", "max_value", "invert_match"},
    "probabilistic": {"hash_salt", "sampling_percentage"},
    "status_code": {"status_codes"},
    "string_attribute": {
        "key",
        "values",
        "enabled_regex_matching",
        "cache_max_size",
        "invert_match",
    },
    "rate_limiting": {"spans_per_second"},
    "span_count": {"min_spans", "max_spans"},
    "trace_state": {"key", "values"},
    "boolean_attribute": {"key", "value", "invert_match"},
    "ottl_condition": {"error_mode", "span", "spanevent"},
    "and": {"and_sub_policy"},
    "composite": {
        "max_total_spans_per_second",
        "policy_order",
        "composite_sub_policy",
        "rate_allocation",
    },
}
SPAN_STATUS_CODES = {"OK", "ERROR", "UNSET"}


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = _load_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    return {key: str(value) for key, value in environment.items()}


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` (or a URL) as its host and port."""
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    assert parsed.hostname is not None and parsed.port is not None, address
    return parsed.hostname, parsed.port


def _mounts(service: dict[str, Any]) -> list[tuple[Path, PurePosixPath, bool]]:
    """Each bind mount of ``service``: the path in the repository, the path in the container,
    and whether it is read-only."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
        else:
            source, target, *mode = volume.split(":")
            read_only = "ro" in "".join(mode).split(",")
        assert source.startswith("."), f"not a bind mount of a repository path: {volume!r}"
        mounts.append(((DOCKER / source).resolve(), PurePosixPath(target), read_only))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where ``container_path`` of ``service`` comes from in the repository (via its mounts)."""
    path = PurePosixPath(container_path)
    for source, target, _ in _mounts(service):
        if path == target or target in path.parents:
            return source.joinpath(*path.relative_to(target).parts)
    msg = f"{container_path} is not in any of the service's mounts: {service.get('volumes')!r}"
    raise AssertionError(msg)


def _flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` (or ``-name=value``) in ``command``."""
    for argument in command:
        flag, _, value = argument.partition("=")
        if flag.lstrip("-") == name:
            return value
    msg = f"{name} is not set in {command!r}"
    raise AssertionError(msg)


# -- the compose file ----------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    """The Compose Specification's JSON Schema accepts the file (and refuses a misspelt key,
    so the check is not vacuous)."""
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"the Compose Specification schema is not there: {COMPOSE_SCHEMA}")
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose)]
    assert errors == []
    broken = copy.deepcopy(compose)
    broken["services"]["app"]["volumse"] = []
    assert not validator.is_valid(broken)


def test_the_stack_has_every_part_and_the_parts_start_in_order(compose: dict[str, Any]) -> None:
    """The app, its load generator and webhook receiver (one image, built here), Prometheus,
    Alertmanager, Grafana, the Collector and Tempo; every dependency names a service, and the
    load generator waits until the app is healthy."""
    services = _services(compose)
    assert set(services) == {
        "app",
        "loadgen",
        "webhook",
        "prometheus",
        "alertmanager",
        "grafana",
        "otelcol",
        "tempo",
    }
    for name in ("app", "loadgen", "webhook"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert services[name]["image"] == services["app"]["image"]
        assert services[name]["init"] is True, f"{name}: Python must not be PID 1"
    assert (DOCKER / services["app"]["build"]["context"] / "pyproject.toml").is_file()
    for name, service in services.items():
        depends_on = service.get("depends_on", [])
        assert set(depends_on) <= set(services), name
    assert services["loadgen"]["depends_on"]["app"] == {"condition": "service_healthy"}


def test_the_app_honours_the_load_generators_location_header(compose: dict[str, Any]) -> None:
    """sentinel's own parser accepts the app's environment, trusts the header the load
    generator sets, allows exactly its locations, serves metrics on the port Prometheus
    scrapes and exports traces over OTLP/HTTP to the Collector's HTTP receiver."""
    services = _services(compose)
    environment = _environment(services["app"])
    config = Config.from_env(environment)
    assert config.location_header == traffic.LOCATION_HEADER
    assert config.locations == traffic.LOCATIONS
    assert config.service == "example-app"
    assert config.traces
    assert otlp_protocol(environment) == "http/protobuf"
    host, port = _host_port(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    collector = _load_yaml(COLLECTOR_CONFIG)
    assert host == "otelcol"
    assert _host_port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1] == port
    prometheus = _load_yaml(DOCKER / "prometheus" / "prometheus.yaml")
    [job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "example-app"]
    assert job["static_configs"] == [{"targets": [f"app:{config.metrics_port}"]}]


def test_load_generator_plays_the_incident_against_the_app(compose: dict[str, Any]) -> None:
    """The load generator runs the incident on repeat against the app's port (the one the
    image's command serves), naming each request's customer in the header the app reads;
    the webhook receiver listens where Alertmanager posts."""
    from sentinel.example import traffic

    services = _services(compose)
    assert services["loadgen"]["command"] == [
        "python",
        "-m",
        "sentinel.example.traffic",
        "--url",
        "http://app:8000",
        "--duration",
        "60",
        "--tenants",
        "--repeat",
    ]
    environment = services["app"]["environment"]
    assert environment["SENTINEL_TENANT_HEADER"] == traffic.TENANT_HEADER
    assert environment["SENTINEL_LOCATION_HEADER"] == traffic.LOCATION_HEADER
    image_command = json.loads(_instructions(_stages()[-1], "CMD")[0])
    app_port = int(image_command[image_command.index("--port") + 1])
    assert _host_port(services["loadgen"]["command"][4]) == ("app", app_port)
    webhook = services["webhook"]["command"]
    assert webhook[:3] == ["python", "-m", "sentinel.example.webhook"]
    assert importlib.util.find_spec("sentinel.example.webhook") is not None
    port = int(webhook[webhook.index("--port") + 1])
    assert webhook[webhook.index("--host") + 1] == "0.0.0.0"
    assert services["webhook"]["healthcheck"]["test"][-1] == f"tcp://127.0.0.1:{port}"
    receivers = _load_yaml(DOCKER / "alertmanager" / "alertmanager.yaml")["receivers"]
    urls = {r["name"]: [c["url"] for c in r["webhook_configs"]] for r in receivers}
    assert urls == {
        "sentinel-page": [f"http://webhook:{port}/page"],
        "sentinel-ticket": [f"http://webhook:{port}/ticket"],
        "sentinel-watchdog": [f"http://webhook:{port}/watchdog"],
    }


def test_every_mounted_path_exists_and_holds_what_the_command_reads(
    compose: dict[str, Any],
) -> None:
    """Each bind mount's source is in the repository and mounted read-only, and each config
    file a service's command names is in one of its mounts."""
    services = _services(compose)
    for name, service in services.items():
        for source, _, read_only in _mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert ROOT in source.parents, f"{name} mounts {source}, outside the repository"
            assert read_only, f"{name} may write to {source}"
    reads = {
        "prometheus": _flag(services["prometheus"]["command"], "config.file"),
        "alertmanager": _flag(services["alertmanager"]["command"], "config.file"),
        "otelcol": _flag(services["otelcol"]["command"], "config"),
        "tempo": _flag(services["tempo"]["command"], "config.file"),
    }
    expected = {
        "prometheus": DOCKER / "prometheus" / "prometheus.yaml",
        "alertmanager": DOCKER / "alertmanager" / "alertmanager.yaml",
        "otelcol": COLLECTOR_CONFIG,
        "tempo": DOCKER / "tempo" / "tempo.yaml",
    }
    for name, container_path in reads.items():
        assert _host_path(services[name], container_path) == expected[name], name
        assert expected[name].is_file(), name
    grafana = services["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    assert (provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir()
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(grafana, home).is_file()


def _published(service: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(host address, host port, protocol) of each port ``service`` publishes."""
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            host_ip, published, protocol = (
                entry.get("host_ip", ""),
                entry["published"],
                entry.get("protocol", "tcp"),
            )
        else:
            text, _, protocol = str(entry).partition("/")
            parts = text.rsplit(":", 2)
            assert len(parts) == 3, f"publish with an explicit host address: {entry!r}"
            host_ip, published = parts[0], parts[1]
        yield host_ip, int(published), protocol or "tcp"


def test_no_two_services_publish_the_same_host_port_and_all_on_loopback(
    compose: dict[str, Any],
) -> None:
    """Host ports are unique across the stack, and published on 127.0.0.1 only (Grafana lets
    anyone in as a viewer)."""
    seen: dict[tuple[int, str], str] = {}
    for name, service in _services(compose).items():
        for host_ip, port, protocol in _published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on {host_ip or 'all'}"
            assert (port, protocol) not in seen, f"{name} and {seen[(port, protocol)]}: {port}"
            seen[(port, protocol)] = name
    assert {port for port, _ in seen} == {8000, 9464, 9090, 9093, 3000, 3200}


def _tag(image: str) -> str:
    return image.partition("@")[0].rsplit("/", 1)[-1].partition(":")[2]


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    """Every pulled image (the compose file's and the Dockerfile's base) is pinned to a full
    version, major.minor.patch, or a digest; the image built here has a tag, not latest."""
    pulled = [s["image"] for s in _services(compose).values() if "build" not in s]
    pulled += [stage[0][1].split()[0] for stage in _stages() if stage[0][1].split()[0] != "build"]
    assert len(pulled) >= 6
    for image in pulled:
        pinned = "@sha256:" in image or re.fullmatch(r"v?\d+\.\d+\.\d+([.-][\w.-]+)?", _tag(image))
        assert pinned, f"not pinned to a version: {image}"
    for service in _services(compose).values():
        assert _tag(service["image"]) not in ("", "latest"), service["image"]


# -- the generated files -------------------------------------------------------------------------


def test_stack_config_changes_only_the_receivers() -> None:
    """docker/sentinel.yaml is the defaults but for its webhook receivers: the rules it
    generates are the defaults' (the README says so), which the committed dashboards read."""
    stack = MonitoringConfig.load(STACK_CONFIG)
    receivers = {
        f"{kind}_receiver": Receiver(url=f"http://webhook:9095/{kind}")
        for kind in ("page", "ticket", "watchdog")
    }
    assert stack == MonitoringConfig(**receivers)
    assert render_rules(stack) == render_rules(MonitoringConfig())


def _collector_command(compose: dict[str, Any]) -> list[str]:
    """The `sentinel collector-config` arguments for the stack: the app's locations, Tempo."""
    environment = _environment(_services(compose)["app"])
    locations = environment["SENTINEL_LOCATIONS"].split(",")
    return [
        *SENTINEL,
        "collector-config",
        *(argument for location in locations for argument in ("--location", location)),
        "--exporter-endpoint",
        "tempo:4317",
    ]


def test_committed_collector_config_is_what_collector_config_prints(
    compose: dict[str, Any],
) -> None:
    """docker/otelcol/config.yaml is byte for byte `sentinel collector-config` for the app's
    service and locations, exporting to Tempo."""
    service = _environment(_services(compose)["app"])["SENTINEL_SERVICE"]
    command = _collector_command(compose)
    result = subprocess.run(
        command,
        env=clean_env(SENTINEL_SERVICE=service),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown = " ".join(["sentinel", *command[len(SENTINEL) :]])
    assert COLLECTOR_CONFIG.read_text(encoding="utf-8") == result.stdout, (
        f"regenerate it: SENTINEL_SERVICE={service} {shown} > docker/otelcol/config.yaml"
    )


def _check_policy(policy: dict[str, Any], allowed: set[str], where: str) -> None:
    kind = policy["type"]
    assert kind in allowed, f"{where}: unknown policy type {kind!r}"
    assert set(policy) <= {"name", "type", kind}, f"{where}: {sorted(policy)}"
    settings = policy.get(kind, {})
    assert set(settings) <= POLICY_FIELDS[kind], f"{where}: {sorted(settings)}"
    if kind == "status_code":
        assert set(settings["status_codes"]) <= SPAN_STATUS_CODES, where
    if kind == "and":
        for index, sub in enumerate(settings["and_sub_policy"]):
            _check_policy(sub, set(POLICY_FIELDS) - {"and", "composite"}, f"{where}[{index}]")


def test_collector_config_names_only_defined_known_components_and_exports_to_tempo(
    compose: dict[str, Any],
) -> None:
    """Offline, what the Collector would refuse: every component the pipeline names is
    defined and every defined one is used; each is a type the contrib Collector has;
    tail_sampling's policies and their fields are ones the processor knows; the OTLP
    exporter goes, without TLS, to the port Tempo receives OTLP gRPC on."""
    document = _load_yaml(COLLECTOR_CONFIG)
    pipelines = document["service"]["pipelines"]
    assert set(pipelines) == {"traces"}
    for kind, known in KNOWN_COMPONENTS.items():
        named = {component for pipeline in pipelines.values() for component in pipeline[kind]}
        assert named == set(document[kind]), kind
        for component in named:
            assert component.split("/")[0] in known, f"{kind}: {component}"
    tail_sampling = document["processors"]["tail_sampling"]
    assert set(tail_sampling) <= TAIL_SAMPLING_SETTINGS
    assert re.fullmatch(r"\d+(ms|s|m)", tail_sampling["decision_wait"])
    names = [policy["name"] for policy in tail_sampling["policies"]]
    assert len(set(names)) == len(names)
    for policy in tail_sampling["policies"]:
        _check_policy(policy, set(POLICY_FIELDS), policy["name"])
    for protocol in document["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("0.0.0.0:"), "other containers must reach it"
    exporter = document["exporters"]["otlp"]
    host, port = _host_port(exporter["endpoint"])
    assert host == "tempo" and host in _services(compose)
    assert exporter["tls"] == {"insecure": True}
    tempo = _load_yaml(DOCKER / "tempo" / "tempo.yaml")
    tempo_otlp = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert tempo_otlp == f"0.0.0.0:{port}"
    assert tempo["storage"]["trace"]["backend"] == "local"


def test_a_real_collector_validates_the_committed_config() -> None:
    """`otelcol-contrib validate` accepts docker/otelcol/config.yaml, when one is installed."""
    collector = shutil.which("otelcol-contrib") or shutil.which("otelcol")
    if collector is None:
        pytest.skip(
            "no otelcol-contrib or otelcol on PATH (Debian does not package the Collector); "
            "the offline checks above stand in for it"
        )
    result = subprocess.run(
        [collector, "validate", f"--config={COLLECTOR_CONFIG}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_promtool_accepts_the_prometheus_config_and_its_rule_file(
    compose: dict[str, Any],
) -> None:
    """The real promtool checks the config and the generated rules it loads (resolved from the
    config's own directory, as in the container); Prometheus alerts the stack's
    Alertmanager."""
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    config_file = DOCKER / "prometheus" / "prometheus.yaml"
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert re.search(r"SUCCESS: [1-9]\d* rules found", result.stdout), result.stdout
    config = _load_yaml(config_file)
    assert config["rule_files"] == ["sentinel-rules.yaml"]
    [alertmanagers] = config["alerting"]["alertmanagers"]
    host, port = _host_port(alertmanagers["static_configs"][0]["targets"][0])
    assert host == "alertmanager" and host in _services(compose) and port == 9093


def test_amtool_accepts_the_alertmanager_config() -> None:
    """The real amtool accepts the generated routing: 3 receivers, 9 inhibit rules."""
    if AMTOOL is None:
        pytest.skip("amtool is not installed (Debian: prometheus-alertmanager)")
    result = subprocess.run(
        [AMTOOL, "check-config", str(DOCKER / "alertmanager" / "alertmanager.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " - 3 receivers" in result.stdout and " - 9 inhibit rules" in result.stdout


# -- Grafana -------------------------------------------------------------------------------------


def test_grafana_provisions_exactly_the_committed_dashboards(compose: dict[str, Any]) -> None:
    """One file provider, whose path is the repository's dashboards/ directory mounted
    read-only: what Grafana loads (every .json under it) is the committed dashboards."""
    grafana = _services(compose)["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.yaml"))
        for provider in _load_yaml(path)["providers"]
    ]
    assert [provider["type"] for provider in providers] == ["file"]
    source = _host_path(grafana, providers[0]["options"]["path"])
    assert source == ROOT / "dashboards"
    loaded = sorted(path.relative_to(source) for path in source.rglob("*.json"))
    assert loaded == sorted(path.relative_to(source) for path in source.glob("*.json"))
    uids = {json.loads(path.read_text(encoding="utf-8"))["uid"] for path in source.glob("*.json")}
    assert uids == {"sentinel-overview", "sentinel-exceptions", "sentinel-health"}


def test_grafana_data_sources_are_the_stacks_prometheus_and_tempo(
    compose: dict[str, Any],
) -> None:
    """A Prometheus and a Tempo data source (the types the dashboards' variables pick), at the
    stack's services and the ports they listen on."""
    services = _services(compose)
    provisioning = _host_path(services["grafana"], "/etc/grafana/provisioning")
    sources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.yaml"))
        for source in _load_yaml(path)["datasources"]
    ]
    urls = {source["type"]: source["url"] for source in sources}
    assert urls == {"prometheus": "http://prometheus:9090", "tempo": "http://tempo:3200"}
    tempo = _load_yaml(DOCKER / "tempo" / "tempo.yaml")
    assert _host_port(urls["tempo"])[1] == tempo["server"]["http_listen_port"]
    for url in urls.values():
        assert _host_port(url)[0] in services
    assert [source["type"] for source in sources if source.get("isDefault")] == ["prometheus"]


def test_grafana_lets_anonymous_viewers_in_and_has_no_admin_password(
    compose: dict[str, Any],
) -> None:
    """Anonymous Viewer, no login form, and no admin user created, so there is no password
    to set: none is written anywhere in docker/."""
    environment = _environment(_services(compose)["grafana"])
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert environment["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    for path in DOCKER.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").lower()
            assert "admin_password" not in text and "admin_user" not in text, path


# -- the Dockerfile ------------------------------------------------------------------------------


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), FROM first;
    continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, f"an instruction before FROM: {instruction}"
        stages[-1].append(instruction)
    return stages


def _instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def _pip_install_targets(command: str) -> list[str]:
    """What ``pip install`` installs in ``command``, options (such as -e) dropped."""
    match = re.search(r"pip install ((?:\S+ ?)+)", command)
    assert match is not None, command
    words = match.group(1).split("&&")[0].split()
    return [word for word in words if not word.startswith("-")]


def test_dockerfile_installs_the_package_the_way_the_readme_does() -> None:
    """Multi-stage: the build stage copies the repository's package sources and installs them
    with `pip install .`, what the README's Quick start installs (editable there), without
    extras; the runtime stage copies the result from it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    readme_targets = {
        target
        for line in quick_start.splitlines()
        if "pip install" in line
        for target in _pip_install_targets(line)
    }
    assert readme_targets == {"."}
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    alias = build[0][1].split()[-1]
    assert build[0][1].split()[1].upper() == "AS"
    installs = [run for run in _instructions(build, "RUN") if "pip install" in run]
    assert [_pip_install_targets(run) for run in installs] == [["."]]
    copied = {
        source for arguments in _instructions(build, "COPY") for source in arguments.split()[:-1]
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {
        path.name
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
        for path in ROOT.glob(pattern)
        if (path / "__init__.py").is_file()
    }
    assert {"pyproject.toml", pyproject["project"]["readme"], *packages} <= copied
    assert any(arguments.startswith(f"--from={alias} ") for arguments in _copies(runtime))
    assert "pip" not in " ".join(_instructions(runtime, "RUN")), "build in the build stage"


def _copies(stage: list[tuple[str, str]]) -> list[str]:
    return _instructions(stage, "COPY")


def test_dockerfile_copies_only_what_its_dockerignore_lets_through() -> None:
    """Every COPY source exists in the build context (the repository root), and the
    Dockerfile's own ignore file lets exactly those through (no .venv, no caches)."""
    sources = {
        source
        for stage in _stages()
        for arguments in _instructions(stage, "COPY")
        if not arguments.startswith("--from=")
        for source in arguments.split()[:-1]
    }
    for source in sources:
        assert (ROOT / source).exists(), source
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    assert {pattern[1:] for pattern in patterns if pattern.startswith("!")} == sources


def test_image_runs_the_example_app_as_a_non_root_user_with_a_healthcheck() -> None:
    """The runtime stage runs `sentinel run sentinel.example.app:app` on 0.0.0.0:8000 as a
    non-root user, and its HEALTHCHECK runs the health-check script where it was copied."""
    runtime = _stages()[-1]
    [user] = _instructions(runtime, "USER")
    assert user.split(":")[0] not in ("root", "0")
    [command] = _instructions(runtime, "CMD")
    assert json.loads(command) == [
        "sentinel",
        "run",
        "sentinel.example.app:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    [healthcheck] = _instructions(runtime, "HEALTHCHECK")
    options, _, check = healthcheck.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    check_command = json.loads(check)
    assert "docker/healthcheck.py " + check_command[-1] in _copies(runtime)
    assert _instructions(runtime, "EXPOSE") == ["8000 9464"]


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_defaults_to_the_images_own_ports() -> None:
    """Without targets the script checks sentinel's /healthz on SENTINEL_METRICS_PORT (9464
    by default, skipped when 0) and the app's port 8000."""
    healthcheck = _healthcheck_module()
    assert healthcheck.default_targets({}) == [
        "http://127.0.0.1:9464/healthz",
        "tcp://127.0.0.1:8000",
    ]
    assert healthcheck.default_targets({"SENTINEL_METRICS_PORT": "9999"})[0] == (
        "http://127.0.0.1:9999/healthz"
    )
    assert healthcheck.default_targets({"SENTINEL_METRICS_PORT": "0"}) == ["tcp://127.0.0.1:8000"]


def test_healthcheck_passes_on_a_running_app_and_fails_once_it_stops(tmp_path: Path) -> None:
    """Against a real `sentinel run` of the example app: healthy while it serves (the check's
    bare connection is not counted as a request), unhealthy with the reason once stopped."""
    port, metrics_port = free_port(), free_port()
    targets = [f"http://127.0.0.1:{metrics_port}/healthz", f"tcp://127.0.0.1:{port}"]
    check = [sys.executable, str(DOCKER / "healthcheck.py"), *targets]
    process = subprocess.Popen(
        [*SENTINEL, "run", "sentinel.example.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(SENTINEL_METRICS_PORT=str(metrics_port), SENTINEL_METRICS_HOST="127.0.0.1"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first_response(process, targets[0]).status_code == 200
        # sentinel's endpoint answers before uvicorn has bound the app's port: wait for that
        # too, with bare connections like the check's (no request is counted for them).
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert process.poll() is None and time.monotonic() < deadline, "no app port"
            time.sleep(0.05)
        healthy = subprocess.run(check, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
        scrape = first_response(process, f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "sentinel_http_requests_total{" not in scrape
    finally:
        stop(process)
    unhealthy = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert unhealthy.returncode == 1
    assert f"unhealthy: {targets[0]}: no answer" in unhealthy.stderr
    wrong = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "ftp://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode == 1 and "'ftp://x'" in wrong.stderr


def test_healthcheck_says_why_the_sidecar_is_unhealthy(tmp_path: Path) -> None:
    """Against a real `sentinel sidecar` whose multiprocess directory is removed: the check
    fails with sentinel's own reason, the directory named, not a bare status."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    metrics_port = free_port()
    target = f"http://127.0.0.1:{metrics_port}/healthz"
    check = [sys.executable, str(DOCKER / "healthcheck.py"), target]
    sidecar = subprocess.Popen(
        [*SENTINEL, "sidecar"],
        env=clean_env(
            PROMETHEUS_MULTIPROC_DIR=str(directory),
            SENTINEL_METRICS_PORT=str(metrics_port),
            SENTINEL_METRICS_HOST="127.0.0.1",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first_response(sidecar, target).status_code == 200
        healthy = subprocess.run(check, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
        directory.rmdir()
        unhealthy = subprocess.run(check, capture_output=True, text=True, timeout=30)
    finally:
        stop(sidecar)
    assert unhealthy.returncode == 1
    assert unhealthy.stderr == (
        f"unhealthy: {target}: answered 503: the multiprocess directory {str(directory)!r} is "
        "gone, and the workers' metric files with it: recreate it and restart the workers\n"
    )


# -- the README ----------------------------------------------------------------------------------


def test_readme_says_how_to_start_what_to_open_and_how_to_stop(compose: dict[str, Any]) -> None:
    """docker/README.md gives the up and down commands, every published port as an address
    to open, and every service."""
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "docker compose -f docker/compose.yaml up" in readme
    assert "docker compose -f docker/compose.yaml down" in readme
    for name, service in _services(compose).items():
        assert f"`{name}`" in readme, name
        for _, port, _ in _published(service):
            assert f"http://127.0.0.1:{port}" in readme, (name, port)

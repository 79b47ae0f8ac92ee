"""What sentinel's generated rules cost Prometheus: ``python -m bench.rule_cost``.

Starts the real Prometheus (on 127.0.0.1, in a temporary directory) with the rules of the
default monitoring config, scraping a loopback exporter that serves a synthetic fleet:
64 locations x 100 routes x 4 methods x 8 codes of ``sentinel_http_requests_total``
(204,800 series, from 64 scrape targets: a process per location) and, as every sentinel
process serves it, their sums over route and method, ``sentinel_location_requests_total``
(512 series: what the rules read), plus build info, exceptions, mutations and record
counters, and ``sentinel_tenant_requests_total`` of 50 tracked tenants and ``other`` per
process (``--tenants``). Before it starts, the per-process counter records
that the long windows read (``instance_location:*:sum``, 3 days), the per-tenant 5-minute
rates the 2h and 6h tenant windows average (6 hours), the per-tenant 1-hour rates sampled
once an hour that the 1d and 3d ones sum (3 days), the per-process tenant counters of the
other tenant windows (2 hours), and the exception-type records of the 7-day lookback are
backfilled (``promtool tsdb create-blocks-from openmetrics``), so the 1d and 3d windows read
a full history, as they would in production.

It then waits for ``--evaluations`` evaluations of every rule group with the fleet's data,
reads ``prometheus_rule_group_last_duration_seconds`` after each, and prints the cost of a
group evaluation against the evaluation interval (the target: under 1%), with the costliest
rules from ``/api/v1/rules``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import unwind_on_sigterm
from sentinel.mixin import MonitoringConfig, parse_duration
from sentinel.mixin import _promql as promql
from sentinel.mixin._rules import GROUPS, render_rules

CODES = ("200", "201", "204", "304", "400", "404", "500", "503")
TENANT_CLASSES = (("2xx", 1.0), ("3xx", 0.01), ("4xx", 0.05), ("5xx", 0.001))
"""Each tenant's requests per second and process, by status class."""
METHODS = ("GET", "POST", "PUT", "DELETE")
JOB = "api"


@dataclass(frozen=True)
class Fleet:
    locations: int
    routes: int
    instances: int
    tenants: int = 0

    @property
    def series(self) -> int:
        return self.locations * self.routes * len(METHODS) * len(CODES)

    def locations_of(self, instance: int) -> list[int]:
        """Instance k serves locations k, k + instances, ... (with as many instances as
        locations, one each: a process per location, SENTINEL_LOCATION)."""
        return list(range(instance, self.locations, self.instances))


class Exporter:
    """One scrape target: its share of the fleet's series, counters rising with time."""

    def __init__(self, fleet: Fleet, instance: int, started: float) -> None:
        self.started = started
        rng = random.Random(instance)
        self.lines: list[tuple[str, float]] = []
        by_code: dict[tuple[int, str], float] = {}
        for location, route, method, code in itertools.product(
            fleet.locations_of(instance), range(fleet.routes), METHODS, CODES
        ):
            labels = (
                f'location="loc{location:02d}",route="/r{route:03d}/{{id}}",'
                f'method="{method}",code="{code}"'
            )
            per_second = rng.uniform(0.01, 2.0) * (0.002 if code.startswith("5") else 1.0)
            self.lines.append((f"sentinel_http_requests_total{{{labels}}} ", per_second))
            key = (location, code)
            by_code[key] = by_code.get(key, 0.0) + per_second
        # What a sentinel process serves beside them: the sums over route and method.
        for (location, code), per_second in sorted(by_code.items()):
            labels = f'location="loc{location:02d}",code="{code}"'
            self.lines.append((f"{promql.LOCATION_REQUESTS}{{{labels}}} ", per_second))
        for location in fleet.locations_of(instance):
            where = f'location="loc{location:02d}",route="/r000/{{id}}"'
            for series, per_second in (
                (
                    f'sentinel_unhandled_exceptions_total{{{where},exception_type="KeyError",'
                    'phase="request"} ',
                    0.01,
                ),
                (
                    f'sentinel_unhandled_exceptions_total{{{where},exception_type="OSError",'
                    'phase="response"} ',
                    0.005,
                ),
                (f'sentinel_global_mutations_total{{{where},target="os.environ"}} ', 0.001),
            ):
                self.lines.append((series, per_second))
            for status_class in ("2xx", "3xx", "4xx", "5xx"):
                labels = f'location="loc{location:02d}",status_class="{status_class}"'
                self.lines.append((f"sentinel_records_seen_total{{{labels}}} ", 1.0))
                self.lines.append((f"sentinel_records_kept_total{{{labels}}} ", 0.1))
        for tenant in [*(f"t{number:02d}" for number in range(fleet.tenants)), "other"]:
            for status_class, per_second in TENANT_CLASSES:
                labels = f'tenant="{tenant}",status_class="{status_class}"'
                self.lines.append((f"sentinel_tenant_requests_total{{{labels}}} ", per_second))
        self.info = (
            f'sentinel_build_info{{service="{JOB}",version="v{instance % 2 + 1}",'
            'sentinel_version="0.1.0",environment="production"} 1\n'
        )

    def body(self) -> bytes:
        elapsed = 1000.0 + time.time() - self.started
        parts = [f"{prefix}{per_second * elapsed:.3f}" for prefix, per_second in self.lines]
        return (self.info + "\n".join(parts) + "\n").encode()


def serve(exporter: Exporter) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exporter.body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def backfill(fleet: Fleet, config: MonitoringConfig, data: Path, ports: list[int]) -> int:
    """Write the history of the records the long windows read, as the rules would have
    recorded it (one sample per evaluation interval), and import it as blocks (two promtool
    processes at once: it reads its whole input once per 2-hour block). Returns the number
    of samples."""
    step = int(parse_duration(config.evaluation_interval))
    end = int(time.time()) // step * step - 3 * 3600  # clear of the head the scrapes start
    lookback = int(parse_duration(config.window(config.new_exception_lookback)))
    long = int(max(parse_duration(config.window(burn.long)) for burn in config.burn_windows))
    targets = [
        (f"127.0.0.1:{port}", location)
        for instance, port in enumerate(ports)
        for location in fleet.locations_of(instance)
    ]
    counters = {
        "instance_location:sentinel_http_requests_total:sum": 100.0,
        "instance_location:sentinel_http_errors_total:sum": 0.2,
    }
    inputs = [data.parent / "counters.om", data.parent / "exceptions.om"]
    samples = 0
    with inputs[0].open("w") as out:
        for name, per_second in counters.items():
            out.write(f"# TYPE {name} gauge\n")
            for target, location in targets:
                labels = f'instance="{target}",job="{JOB}",location="loc{location:02d}"'
                for timestamp in range(end - long, end, step):
                    value = per_second * (timestamp - end + long)
                    out.write(f"{name}{{{labels}}} {value:.1f} {timestamp}\n")
                    samples += 1
        out.write("# EOF\n")
    with inputs[1].open("w") as out:
        name = "location_route_type:sentinel_unhandled_exceptions_total:sum"
        out.write(f"# TYPE {name} gauge\n")
        for _, location in targets:
            labels = (
                f'exception_type="KeyError",job="{JOB}",location="loc{location:02d}",'
                'route="/r000/{id}"'
            )
            for timestamp in range(end - lookback, end, step):
                out.write(f"{name}{{{labels}}} 1 {timestamp}\n")
                samples += 1
        out.write("# EOF\n")
    inputs.append(data.parent / "codes.om")
    # A day of the per-code 4xx records, so the status shift's 1-day baseline reads what it
    # would read in production.
    day = int(parse_duration(config.window(config.status_shift_baseline_window)))
    with inputs[2].open("w") as out:
        name = "instance_location_code:sentinel_http_requests_total:sum"
        out.write(f"# TYPE {name} gauge\n")
        for target, location in targets:
            for code, per_second in (("400", 20.0), ("404", 20.0)):
                labels = (
                    f'code="{code}",instance="{target}",job="{JOB}",location="loc{location:02d}"'
                )
                for timestamp in range(end - day, end, step):
                    value = per_second * (timestamp - end + day)
                    out.write(f"{name}{{{labels}}} {value:.1f} {timestamp}\n")
                    samples += 1
        out.write("# EOF\n")
    outputs = [
        data.parent / "blocks-counters",
        data.parent / "blocks-exceptions",
        data.parent / "blocks-codes",
    ]
    if fleet.tenants:
        samples += _tenant_history(fleet, config, targets, end, step, inputs, outputs)
    processes = [
        subprocess.Popen(
            ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(path), str(blocks)],
            stdout=subprocess.DEVNULL,
        )
        for path, blocks in zip(inputs, outputs, strict=True)
    ]
    for process in processes:
        if process.wait(timeout=1800) != 0:
            raise RuntimeError(f"promtool tsdb create-blocks-from failed: {process.args!r}")
    for blocks in outputs:
        for block in blocks.iterdir():
            block.rename(data / block.name)
    for path in inputs:
        path.unlink()
    return samples


def _tenant_history(
    fleet: Fleet,
    config: MonitoringConfig,
    targets: list[tuple[str, int]],
    end: int,
    step: int,
    inputs: list[Path],
    outputs: list[Path],
) -> int:
    """Write the tenant records the long tenant windows read: per tenant, the 5-minute rates
    the 2h and 6h windows average, the 1-hour rates sampled once an hour that the 1d and 3d
    windows sum (over the longest window), and per process and tenant the counters the
    shorter ones rate (over 2 hours); add the files to ``inputs`` and ``outputs``."""
    base, coarse = promql.tenant_base_window(config), promql.tenant_step_window(config)
    windows = promql.tenant_recorded_windows(config)
    averaged = [w for w in windows if promql.tenant_window_is_averaged(config, w)]
    longest_averaged = int(max((parse_duration(w) for w in averaged), default=0))
    sampled = [w for w in windows if promql.tenant_window_is_sampled(config, w)]
    longest_sampled = int(max((parse_duration(w) for w in sampled), default=0))
    coarse_step = int(parse_duration(coarse))
    recent = 2 * 3600
    tenants = [f"t{number:02d}" for number in range(fleet.tenants)]
    total = sum(per_second for _, per_second in TENANT_CLASSES)
    errors = dict(TENANT_CLASSES)["5xx"]
    rates = inputs[0].parent / "tenant-rates.om"
    counters = inputs[0].parent / "tenant-counters.om"
    samples = 0
    with rates.open("w") as out:
        for name, per_second, span, every in (
            (promql.tenant_requests_record(base), total, longest_averaged, step),
            (promql.tenant_errors_record(base), errors, longest_averaged, step),
            (
                promql.tenant_sampled_record(promql.tenant_requests_record(coarse), coarse),
                total,
                longest_sampled,
                coarse_step,
            ),
            (
                promql.tenant_sampled_record(promql.tenant_errors_record(coarse), coarse),
                errors,
                longest_sampled,
                coarse_step,
            ),
        ):
            out.write(f"# TYPE {name} gauge\n")
            for tenant in tenants:
                labels = f'job="{JOB}",tenant="{tenant}"'
                value = per_second * fleet.instances
                first = (end - span) // every * every
                for timestamp in range(first, end, every):
                    out.write(f"{name}{{{labels}}} {value:.3f} {timestamp}\n")
                    samples += 1
        out.write("# EOF\n")
    with counters.open("w") as out:
        for name, per_second in (
            (promql.tenant_requests_counter_record(), total),
            (promql.tenant_errors_counter_record(), errors),
        ):
            out.write(f"# TYPE {name} gauge\n")
            for target in sorted({target for target, _ in targets}):
                for tenant in tenants:
                    labels = f'instance="{target}",job="{JOB}",tenant="{tenant}"'
                    for timestamp in range(end - recent, end, step):
                        value = per_second * (timestamp - end + recent)
                        out.write(f"{name}{{{labels}}} {value:.1f} {timestamp}\n")
                        samples += 1
        out.write("# EOF\n")
    inputs += [rates, counters]
    outputs += [rates.parent / "blocks-tenant-rates", counters.parent / "blocks-tenant-counters"]
    return samples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    result: list[dict[str, Any]] = json.loads(get(url))["data"]["result"]
    return result


def group_metrics(base: str) -> dict[str, tuple[float, float]]:
    """Per rule group: (prometheus_rule_group_last_evaluation_timestamp_seconds,
    prometheus_rule_group_last_duration_seconds), from Prometheus' own metrics."""
    text = get(f"{base}/metrics").decode()
    found: dict[str, dict[str, float]] = {}
    pattern = re.compile(
        r"^prometheus_rule_group_last_(evaluation_timestamp|duration)_seconds"
        r'\{rule_group="[^;"]*;([^"]+)"\} (\S+)$',
        re.M,
    )
    for kind, group, value in pattern.findall(text):
        found.setdefault(group, {})[kind] = float(value)
    return {
        group: (values["evaluation_timestamp"], values["duration"])
        for group, values in found.items()
        if len(values) == 2
    }


@contextlib.contextmanager
def prometheus(config_file: Path, data: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config_file}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(data.parent / "prometheus.log").open("wb"),
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=64)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument(
        "--instances", type=int, default=64, help="scrape targets, one process each (default 64)"
    )
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument(
        "--evaluations", type=int, default=4, help="evaluations of every group to wait for"
    )
    parser.add_argument(
        "--tenants", type=int, default=50, help="tracked tenants per process (default 50)"
    )
    parser.add_argument("--no-history", action="store_true", help="skip the backfill")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    for binary in ("prometheus", "promtool"):
        if shutil.which(binary) is None:
            print(f"rule_cost: {binary} is not installed (apt-get install prometheus)")
            return 2
    fleet = Fleet(args.locations, args.routes, args.instances, args.tenants)
    config = MonitoringConfig(selector=f'job="{JOB}"')
    interval = parse_duration(config.evaluation_interval)
    workdir = Path(tempfile.mkdtemp(prefix="sentinel-rule-cost-"))
    servers = []
    try:
        started = time.time()
        ports = []
        for instance in range(fleet.instances):
            server, port = serve(Exporter(fleet, instance, started))
            servers.append(server)
            ports.append(port)
        data = workdir / "data"
        data.mkdir()
        history = 0
        if not args.no_history:
            began = time.monotonic()
            history = backfill(fleet, config, data, ports)
            print(
                f"backfilled {history:,} samples of history in {time.monotonic() - began:.0f} s",
                file=sys.stderr,
            )
        rules = workdir / "sentinel-rules.yaml"
        rules.write_text(render_rules(config))
        prometheus_config = {
            "global": {
                "scrape_interval": args.scrape_interval,
                "evaluation_interval": config.evaluation_interval,
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}],
                }
            ],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(prometheus_config, sort_keys=False))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with prometheus(config_file, data, port) as process:
            return measure(base, process, fleet, config, args.evaluations, interval, history)
    finally:
        for server in servers:
            server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(
    base: str,
    process: subprocess.Popen[bytes],
    fleet: Fleet,
    config: MonitoringConfig,
    evaluations: int,
    interval: float,
    history: int,
) -> int:
    deadline = time.monotonic() + 120 + (evaluations + 2) * interval * 2
    expected = fleet.series
    ready_at = None
    while ready_at is None:
        if process.poll() is not None or time.monotonic() > deadline:
            print("rule_cost: Prometheus did not scrape the fleet in time", file=sys.stderr)
            return 2
        with contextlib.suppress(OSError, KeyError, ValueError):
            found = query(base, 'count(sentinel_http_requests_total{job="api"})')
            if found and int(float(found[0]["value"][1])) == expected:
                ready_at = time.time()
        time.sleep(2)
    print(f"the fleet's {expected:,} request series are scraped; waiting", file=sys.stderr)
    seen: dict[str, dict[float, float]] = {}
    top: dict[str, float] = {}
    rule_times: dict[str, dict[str, float]] = {}
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            print("rule_cost: not enough evaluations in time", file=sys.stderr)
            return 2
        with contextlib.suppress(OSError, KeyError, ValueError):
            for group, (evaluated, duration) in group_metrics(base).items():
                if evaluated > ready_at:
                    seen.setdefault(group, {})[evaluated] = duration
            for group in json.loads(get(f"{base}/api/v1/rules"))["data"]["groups"]:
                per_name: dict[str, float] = {}
                for rule in group["rules"]:
                    name = rule.get("name", "")
                    cost = float(rule.get("evaluationTime", 0.0))
                    per_name[name] = per_name.get(name, 0.0) + cost
                    top[name] = max(top.get(name, 0.0), cost)
                # Per evaluation of the group, keyed by its time: rules of one name summed.
                for name, cost in per_name.items():
                    rule_times.setdefault(name, {})[group.get("lastEvaluation", "")] = cost
        if len(seen) == len(GROUPS) and all(len(times) >= evaluations for times in seen.values()):
            break
        time.sleep(2)
    # For scale: one read of every per-route request series (what a rule over them would
    # cost), and one of the per-location counter the rules read instead.
    floors = [
        min(_timed_query(base, f'count({metric}{{job="api"}})') for _ in "abc")
        for metric in (promql.REQUESTS, promql.LOCATION_REQUESTS)
    ]
    medians = {name: statistics.median(times.values()) for name, times in rule_times.items()}
    report(fleet, config, seen, top, medians, interval, history, floors)
    return 0


def _timed_query(base: str, expr: str) -> float:
    started = time.perf_counter()
    query(base, expr)
    return time.perf_counter() - started


def report(
    fleet: Fleet,
    config: MonitoringConfig,
    seen: dict[str, dict[float, float]],
    top: dict[str, float],
    medians: dict[str, float],
    interval: float,
    history: int,
    floors: list[float],
) -> None:
    lines = [
        f"Rule cost: {fleet.locations} locations x {fleet.routes} routes x {len(METHODS)} "
        f"methods x {len(CODES)} codes = {fleet.series:,} request series over "
        f"{fleet.instances} targets; {fleet.tenants} tracked tenants and other per target; "
        f"{history:,} samples of backfilled history; "
        f"evaluation interval {config.evaluation_interval}; Prometheus "
        f"{_prometheus_version()}, {os.cpu_count()} CPUs.",
        "",
        "| group | evaluations | median (ms) | max (ms) | max / interval |",
        "|---|---|---|---|---|",
    ]
    total = median_total = 0.0
    for name, times in sorted(seen.items()):
        values = list(times.values())
        total += max(values)
        median_total += statistics.median(values)
        lines.append(
            f"| {name} | {len(values)} | {statistics.median(values) * 1000:.1f} | "
            f"{max(values) * 1000:.1f} | {max(values) / interval:.3%} |"
        )
    lines.append(
        f"| all groups | | {median_total * 1000:.1f} ({median_total / interval:.3%}) | "
        f"{total * 1000:.1f} | {total / interval:.3%} |"
    )
    per_route, per_location = floors
    lines += [
        "",
        f"For scale, over the HTTP API (best of 3): one read of every per-route request series "
        f"(`count({promql.REQUESTS})`), which no rule does, {per_route * 1000:.0f} ms = "
        f"{per_route / interval:.3%} of the interval; one read of the per-location counter the "
        f"rules read once per evaluation (`count({promql.LOCATION_REQUESTS})`, "
        f"{fleet.locations * len(CODES)} series), {per_location * 1000:.1f} ms.",
    ]
    lines += ["", "Costliest rules (max evaluationTime seen, ms):", ""]
    for name, cost in sorted(top.items(), key=lambda item: -item[1])[:6]:
        lines.append(f"- {cost * 1000:.1f} {name}")
    lines += ["", "Costliest rules by median over the group's evaluations (ms; one name summed):"]
    lines.append("")
    for name, cost in sorted(medians.items(), key=lambda item: -item[1])[:10]:
        lines.append(f"- {cost * 1000:.1f} {name}")
    # The verdict sums each group's slowest evaluation (on a shared machine, one slow
    # evaluation of each at once); the sum of the medians is what an evaluation usually costs.
    verdict = "PASS" if total / interval < 0.01 else "FAIL"
    usual = "PASS" if median_total / interval < 0.01 else "FAIL"
    lines += [
        "",
        f"Target: all groups under 1% of the evaluation interval: {verdict} by the sum of the "
        f"maxima ({total / interval:.3%}), {usual} by the sum of the medians "
        f"({median_total / interval:.3%})",
    ]
    print("\n".join(lines))


def _prometheus_version() -> str:
    output = subprocess.run(
        ["prometheus", "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"version (\S+)", output)
    return match.group(1) if match else "unknown"


if __name__ == "__main__":
    sys.exit(main())

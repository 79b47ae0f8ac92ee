"""sentinel's benchmark against the bare app and its peers: ``python -m bench.harness``.

Every variant runs in a worker process of its own (``bench.worker``) that builds its app once.
After a warm-up, the harness interleaves rounds: in round r every variant runs N in-process
requests on each route, in an order rotated by r, so machine noise hits every variant alike.
Per-request times are medians over rounds; a variant's overhead is the median over rounds of
its time minus the bare app's time in the same round. Every request carries a tenant header
from a fixed Zipf-like mix; only ``sentinel+tenants`` reads it, and what the tenant dimension
costs is the median over rounds of its time minus plain ``sentinel``'s. A separate process times
``os.environ`` reads with and without sentinel's watch (``bench.environ_reads``). Then,
unless ``--no-server``, each variant is served by uvicorn on loopback and loaded with wrk for
a few seconds.

Writes ``bench/results.md`` (see ``--output``) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import unwind_on_sigterm
from bench.apps import (
    BARE,
    DESCRIPTIONS,
    EXPECTED_STATUS,
    FLOOR,
    INSTRUMENTATOR,
    OTEL,
    PEERS,
    RAISE,
    ROUTE_TEMPLATES,
    ROUTES,
    SENTINEL,
    SENTINEL_NOWATCH,
    SENTINEL_TENANTS,
    SENTINEL_TRACES,
    SENTINEL_VARIANTS,
    SENTRY_ERRORS,
    STARLETTE_EXPORTER,
    TENANT_HEADER,
    TENANTS,
    VARIANTS,
)
from bench.environ_reads import FORMS, STANDARD, WATCHED
from bench.paired import overheads as paired_slice_overheads
from bench.server import WrkResult, find_wrk, paired_share, run_server_benchmarks

ROOT = Path(__file__).resolve().parent.parent
TWO_XX_ROUTES = ("static", "param")
LIGHT_PEERS = (STARLETTE_EXPORTER, INSTRUMENTATOR, OTEL, SENTRY_ERRORS)
# wrk sends no tenant header, so on the real server sentinel+tenants would measure plain
# sentinel with an unused setting: it runs in-process only. So does floor, a reference for the
# in-process overhead, not a product.
IN_PROCESS_ONLY = (SENTINEL_TENANTS, FLOOR)
# The variants that can share one process for the paired run (bench.paired): sentry-sdk
# patches the frameworks globally, so its variants run in processes of their own only.
PAIRED_VARIANTS = (BARE, FLOOR, SENTINEL, SENTINEL_TRACES, STARLETTE_EXPORTER, INSTRUMENTATOR, OTEL)
PAIRED_PEERS = (STARLETTE_EXPORTER, INSTRUMENTATOR, OTEL)
PAIRED_REQUESTS = 200  # per slice and variant
PAIRED_WARMUP = 1000
PACKAGES = (
    "sentinel-asgi",
    "fastapi",
    "starlette",
    "uvicorn",
    "prometheus-client",
    "starlette-exporter",
    "prometheus-fastapi-instrumentator",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "sentry-sdk",
)
REPLY_TIMEOUT_S = 600.0
WATCH_LIMIT_US = 2.0  # target (d): what the default watches may add per request
ENVIRON_MIN_ROUNDS = 15
ENVIRON_READS = 200_000  # per round, read form and state
ENVIRON_TOLERANCE = 0.05  # target (e): a difference below 5 % is not "measurably slower"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    """The environment of workers and servers: no SENTINEL_*, OTEL_* or SENTRY_* settings,
    so every variant runs with its defaults."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SENTINEL_", "OTEL_", "SENTRY_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """One variant's ``bench.worker`` process, spoken to in JSON lines."""

    def __init__(self, variant: str, log_dir: Path) -> None:
        self.variant = variant
        self.log_path = log_dir / f"worker-{variant}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", variant],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )

    def _read(self) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], REPLY_TIMEOUT_S)
        line = stdout.readline() if ready else ""
        if not line:
            msg = f"worker {self.variant} stopped answering; see {self.log_path}"
            raise RuntimeError(msg)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def wait_ready(self) -> None:
        self._read()

    def call(self, **command: Any) -> dict[str, Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._read()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.process.poll() is None and self.process.stdin is not None:
                self.process.stdin.write('{"cmd": "quit"}\n')
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@dataclass
class Samples:
    """Per-round µs/request of one variant on one route."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Settings:
    rounds: int
    requests: int
    raise_requests: int
    warmup: int
    raise_warmup: int
    server: bool
    server_seconds: int
    server_rounds: int
    worker_starts: int
    variants: tuple[str, ...]
    environ_rounds: int
    environ_reads: int
    paired_slices: int

    def n(self, route: str) -> int:
        return self.raise_requests if route == RAISE else self.requests

    def warm(self, route: str) -> int:
        return self.raise_warmup if route == RAISE else self.warmup


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.harness",
        description="Benchmark sentinel against the bare app and its peers.",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15; quick 3)")
    parser.add_argument(
        "--requests", type=int, help="requests per round on each 2xx route (default 1000)"
    )
    parser.add_argument(
        "--raise-requests",
        type=int,
        help="requests per round on the raising route (default 100; sentry takes ~11 ms each)",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--no-server", action="store_true", help="skip the uvicorn + wrk run")
    parser.add_argument(
        "--server-seconds",
        type=int,
        help="wrk duration of one burst per server and route (default 2; quick 1)",
    )
    parser.add_argument(
        "--server-rounds",
        type=int,
        help="rounds of the real-server run, variants rotated (default 8; quick 2)",
    )
    parser.add_argument(
        "--worker-starts",
        type=int,
        help="fresh worker processes this many times, the rounds shared between them, so "
        "that no variant's figures hang on one process's luck (default 3; quick 1)",
    )
    parser.add_argument(
        "--paired-slices",
        type=int,
        help="slices of the paired run in one process, per 2xx route (default 100; quick 10; "
        "0 skips it)",
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (bare is always included)",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results.md", help="markdown output"
    )
    parser.add_argument("--json", type=Path, help="also write the raw per-round numbers here")
    args = parser.parse_args(argv)

    quick = args.quick
    variants = VARIANTS
    if args.variants:
        chosen = {v.strip() for v in args.variants.split(",") if v.strip()}
        unknown = chosen - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
        variants = tuple(v for v in VARIANTS if v in chosen or v == BARE)
    requests = args.requests or (200 if quick else 1000)
    raise_requests = args.raise_requests or (20 if quick else 100)
    settings = Settings(
        rounds=args.rounds or (3 if quick else 15),
        requests=requests,
        raise_requests=raise_requests,
        warmup=max(50, requests // 4),
        raise_warmup=max(10, raise_requests // 4),
        server=not args.no_server,
        server_seconds=args.server_seconds or (1 if quick else 2),
        server_rounds=args.server_rounds or (2 if quick else 8),
        worker_starts=args.worker_starts or (1 if quick else 3),
        variants=variants,
        environ_rounds=max(ENVIRON_MIN_ROUNDS, args.rounds or 0),
        environ_reads=ENVIRON_READS,
        paired_slices=(10 if quick else 100) if args.paired_slices is None else args.paired_slices,
    )
    settings.worker_starts = min(settings.worker_starts, settings.rounds)
    for name in (
        "rounds",
        "requests",
        "raise_requests",
        "server_seconds",
        "server_rounds",
        "worker_starts",
    ):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if settings.paired_slices < 0:
        parser.error(f"--paired-slices must be >= 0: {settings.paired_slices!r}")
    return settings, args


def run_in_process(
    settings: Settings, log_dir: Path
) -> tuple[dict[str, dict[str, Samples]], dict[str, dict[str, Any]]]:
    """Per-round samples per variant and route, and each worker's ``info`` reply at the end
    (what sentinel+tenants' tracker did)."""
    samples = {v: {r: Samples() for r in ROUTES} for v in settings.variants}
    infos: dict[str, dict[str, Any]] = {}
    # A process's own luck (where its objects land, how its code aligns) moves all its
    # figures by up to ~10 µs for its whole life; fresh processes part-way through spread
    # that over every variant instead of leaving it on one.
    starts = settings.worker_starts
    bounds = [settings.rounds * k // starts for k in range(starts + 1)]
    for start in range(starts):
        workers: list[Worker] = []
        try:
            log(
                f"starting {len(settings.variants)} workers (one process per variant)"
                + (f", {start + 1} of {starts} starts" if starts > 1 else "")
            )
            workers = [Worker(v, log_dir) for v in settings.variants]
            for worker in workers:
                worker.wait_ready()
            for worker in workers:
                for route in ROUTES:
                    reply = worker.call(cmd="warmup", route=route, n=settings.warm(route))
                    check_warmup(worker.variant, route, reply)
            log("warm-up done; statuses as expected")
            for r in range(bounds[start], bounds[start + 1]):
                begun = time.monotonic()
                shift = r % len(workers)
                order = workers[shift:] + workers[:shift]
                for route in ROUTES:
                    for worker in order:
                        reply = worker.call(cmd="run", route=route, n=settings.n(route))
                        samples[worker.variant][route].wall.append(reply["us"])
                        samples[worker.variant][route].cpu.append(reply["cpu_us"])
                log(f"round {r + 1}/{settings.rounds} done in {time.monotonic() - begun:.1f} s")
            for worker in workers:
                infos[worker.variant] = worker.call(cmd="info")  # the last start's
        finally:
            for worker in workers:
                worker.stop()
    return samples, infos


def paired_variants(settings: Settings) -> list[str]:
    """The chosen variants that can share one process, bare first."""
    return [v for v in PAIRED_VARIANTS if v in settings.variants]


def run_paired(settings: Settings, log_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Per 2xx route, each shareable variant's µs/request per slice from ``bench.paired``:
    every app built in one fresh process and driven on one event loop, the variants
    interleaved slice by slice, so the process's luck is the same for all of them."""
    variants = paired_variants(settings)
    if settings.paired_slices == 0 or len(variants) < 2:
        return {}
    found: dict[str, dict[str, list[float]]] = {}
    for route in TWO_XX_ROUTES:
        log(f"paired run in one process on {route}: {', '.join(variants)}")
        out = log_dir / f"paired-{route}.json"
        with (log_dir / f"paired-{route}.log").open("w") as log_file:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.paired",
                    "--variants",
                    ",".join(variants),
                    "--route",
                    route,
                    "--slices",
                    str(settings.paired_slices),
                    "--requests",
                    str(PAIRED_REQUESTS),
                    "--warmup",
                    str(PAIRED_WARMUP),
                    "--json",
                    str(out),
                ],
                cwd=ROOT,
                env=child_env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=REPLY_TIMEOUT_S * 2,
                check=True,
            )
        found[route] = json.loads(out.read_text())["us_per_request"]
    return found


def check_warmup(variant: str, route: str, reply: dict[str, Any]) -> None:
    expected = str(EXPECTED_STATUS[route])
    statuses = reply["statuses"]
    raised = reply["raised"]
    expected_raised = {"BenchError"} if route == RAISE else set()
    if set(statuses) != {expected} or set(raised) != expected_raised:
        msg = f"{variant} on {route}: unexpected statuses {statuses} / raised {raised}"
        raise RuntimeError(msg)


def run_environ_reads(settings: Settings) -> dict[str, dict[str, list[float]]]:
    """ns/read per read form, state and round, from one ``bench.environ_reads`` process."""
    log(f"os.environ reads: {settings.environ_rounds} rounds, watch toggled between rounds")
    command = [
        sys.executable,
        "-m",
        "bench.environ_reads",
        f"--rounds={settings.environ_rounds}",
        f"--reads={settings.environ_reads}",
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=REPLY_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        msg = f"bench.environ_reads exited with {done.returncode}:\n{done.stderr[-2000:]}"
        raise RuntimeError(msg)
    samples: dict[str, dict[str, list[float]]] = json.loads(done.stdout)["ns_per_read"]
    return samples


# -- statistics -------------------------------------------------------------------------------


@dataclass
class Row:
    variant: str
    route: str
    median_us: float
    p25_us: float
    p75_us: float
    cpu_us: float
    overhead_us: float | None  # None for the bare app


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(samples: dict[str, dict[str, Samples]]) -> dict[tuple[str, str], Row]:
    rows: dict[tuple[str, str], Row] = {}
    for variant, by_route in samples.items():
        for route, s in by_route.items():
            bare = samples[BARE][route].wall
            overhead = None
            if variant != BARE:
                overhead = statistics.median(a - b for a, b in zip(s.wall, bare, strict=True))
            p25, p75 = quartiles(s.wall)
            rows[variant, route] = Row(
                variant,
                route,
                statistics.median(s.wall),
                p25,
                p75,
                statistics.median(s.cpu),
                overhead,
            )
    return rows


def paired_differences(
    samples: dict[str, dict[str, Samples]],
    variant: str,
    reference: str,
    route: str,
    cpu: bool = False,
) -> list[float] | None:
    """(variant - reference) per round in wall (or with ``cpu``, CPU) µs/request; None if
    one is missing."""
    if variant not in samples or reference not in samples:
        return None
    mine, theirs = samples[variant][route], samples[reference][route]
    pairs = (
        zip(mine.cpu, theirs.cpu, strict=True) if cpu else zip(mine.wall, theirs.wall, strict=True)
    )
    return [a - b for a, b in pairs]


def paired_overhead(
    samples: dict[str, dict[str, Samples]], variant: str, reference: str, route: str
) -> float | None:
    """Median over rounds of (variant - reference) in the same round; None if one is missing."""
    differences = paired_differences(samples, variant, reference, route)
    return None if differences is None else statistics.median(differences)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value <= 0:
        return f"{value:.2f}"
    return f"{value:.2f} (1/{1 / value:.1f})" if value < 1 else f"{value:.2f}"


@dataclass
class Check:
    """One target on one route: ``measured_us`` against ``fraction`` of the reference's
    overhead, or against ``fixed_limit_us`` when that is set. An ``informational`` row has
    no limit and no verdict: it states ``measured_us`` as a share of the reference's."""

    target: str
    route: str
    measured_us: float | None
    reference: str
    reference_us: float | None
    fraction: float = 1.0
    fixed_limit_us: float | None = None
    informational: bool = False

    @property
    def limit_us(self) -> float | None:
        if self.informational:
            return None
        if self.fixed_limit_us is not None:
            return self.fixed_limit_us
        return None if self.reference_us is None else self.reference_us * self.fraction

    @property
    def passed(self) -> bool | None:
        """None when it cannot be judged: a variant is missing, or the reference's overhead
        came out at or below zero (noise swamped the measurement); and for a row that is
        informational."""
        if self.measured_us is None or self.limit_us is None or self.limit_us <= 0:
            return None
        return self.measured_us <= self.limit_us


def overhead(rows: dict[tuple[str, str], Row], variant: str, route: str) -> float | None:
    row = rows.get((variant, route))
    return None if row is None else row.overhead_us


def lightest_peer(rows: dict[tuple[str, str], Row], route: str) -> tuple[float | None, str]:
    """The smallest overhead among the measured light peers on ``route``, and its name."""
    peers = [(overhead(rows, p, route), p) for p in LIGHT_PEERS]
    measured = [(o, p) for o, p in peers if o is not None]
    return min(measured) if measured else (None, "no peer measured")


TENANT_TARGET = "(f) tenant dimension (issue 19), informational"
LIMITS: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
    ("", (("1/3", 1 / 3), ("1/2", 1 / 2), ("1/20", 1 / 20))),
    ("issue 15 raised: ", (("0.20", 0.20), ("0.25", 0.25), ("0.01", 0.01))),
)
"""(a), (b) and (c)'s limits: issue 3's, and the ones issue 15 raised them to."""


def lightest_paired_peer(
    paired: dict[str, tuple[float, float, float]],
) -> tuple[float | None, str]:
    """The smallest paired overhead among the peers that ran in the paired process."""
    measured: list[tuple[float | None, str]] = [
        (paired[p][0], p) for p in PAIRED_PEERS if p in paired
    ]
    return min(measured) if measured else (None, "no peer measured")


PAIRED_TARGETS = "issue 15 raised, paired in one process: "


def paired_targets(paired: dict[str, dict[str, list[float]]]) -> list[Check]:
    """(a) and (b) with issue 15's limits on the paired run's overheads (medians over slices
    of the variant's time minus bare's in the same slice)."""
    checks: list[Check] = []
    by_route = {route: paired_slice_overheads(timings) for route, timings in paired.items()}
    for route, found in by_route.items():
        if SENTINEL not in found:
            continue
        lightest_us, lightest = lightest_paired_peer(found)
        checks.append(
            Check(
                f"(a) {PAIRED_TARGETS}sentinel default <= 0.20 of the lightest peer",
                route,
                found[SENTINEL][0],
                f"lightest peer in the process: {lightest}",
                lightest_us,
                0.20,
            )
        )
    for route, found in by_route.items():
        if SENTINEL_TRACES not in found or OTEL not in found:
            continue
        checks.append(
            Check(
                f"(b) {PAIRED_TARGETS}sentinel with traces <= 0.25 of OTel ASGI",
                route,
                found[SENTINEL_TRACES][0],
                OTEL,
                found[OTEL][0],
                0.25,
            )
        )
    return checks


def paired_table(paired: dict[str, dict[str, list[float]]]) -> list[str]:
    """Per route and variant: median µs/request, the paired overhead with its p25-p75, and
    sentinel's overheads as shares of the peers'."""
    header = [
        "variant",
        "route",
        "µs/request (median)",
        "overhead over bare, paired (µs)",
        "p25-p75",
        *(f"÷ {p}" for p in PAIRED_PEERS),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for route, timings in paired.items():
        found = paired_slice_overheads(timings)
        for variant, values in timings.items():
            overhead_us, p25, p75 = found[variant]
            cells = [
                f"**{variant}**" if variant in SENTINEL_VARIANTS else variant,
                f"`{ROUTE_TEMPLATES[route]}`",
                f"{statistics.median(values):.1f}",
                "—" if variant == BARE else f"{overhead_us:+.1f}",
                "" if variant == BARE else f"{p25:+.1f} to {p75:+.1f}",
            ]
            for peer in PAIRED_PEERS:
                share = None
                if variant in SENTINEL_VARIANTS and peer in found:
                    share = ratio(overhead_us, found[peer][0])
                cells.append("" if share is None else fmt_ratio(share))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(
    rows: dict[tuple[str, str], Row],
    samples: dict[str, dict[str, Samples]],
    paired: dict[str, dict[str, list[float]]],
) -> list[Check]:
    checks: list[Check] = []
    # (a)-(c) with issue 3's limits, then with the ones issue 15 raised them to, judged on
    # the same figures.
    for prefix, (a, b, c) in LIMITS:
        for route in TWO_XX_ROUTES:
            lightest_us, lightest = lightest_peer(rows, route)
            checks.append(
                Check(
                    f"(a) {prefix}sentinel default <= {a[0]} of the lightest peer",
                    route,
                    overhead(rows, SENTINEL, route),
                    f"lightest peer: {lightest}",
                    lightest_us,
                    a[1],
                )
            )
        for route in TWO_XX_ROUTES:
            checks.append(
                Check(
                    f"(b) {prefix}sentinel with traces <= {b[0]} of OTel ASGI",
                    route,
                    overhead(rows, SENTINEL_TRACES, route),
                    OTEL,
                    overhead(rows, OTEL, route),
                    b[1],
                )
            )
        checks.append(
            Check(
                f"(c) {prefix}per exception: sentinel <= {c[0]} of sentry-sdk errors-only",
                RAISE,
                overhead(rows, SENTINEL, RAISE),
                SENTRY_ERRORS,
                overhead(rows, SENTRY_ERRORS, RAISE),
                c[1],
            )
        )
    checks += paired_targets(paired)
    for route in TWO_XX_ROUTES:
        checks.append(
            Check(
                f"(d) default watches add <= {WATCH_LIMIT_US:g} µs",
                route,
                paired_overhead(samples, SENTINEL, SENTINEL_NOWATCH, route),
                f"{SENTINEL_NOWATCH} (fixed limit)",
                overhead(rows, SENTINEL_NOWATCH, route),
                fixed_limit_us=WATCH_LIMIT_US,
            )
        )
    if SENTINEL_TENANTS in samples:
        for route in TWO_XX_ROUTES:
            lightest_us, lightest = lightest_peer(rows, route)
            checks.append(
                Check(
                    TENANT_TARGET,
                    route,
                    paired_overhead(samples, SENTINEL_TENANTS, SENTINEL, route),
                    f"lightest peer: {lightest}",
                    lightest_us,
                    informational=True,
                )
            )
    return checks


@dataclass
class EnvironRead:
    """One read form's ns/read with the standard class and with the watch installed."""

    form: str
    standard: list[float]
    watched: list[float]

    @property
    def standard_ns(self) -> float:
        return statistics.median(self.standard)

    @property
    def watched_ns(self) -> float:
        return statistics.median(self.watched)

    @property
    def difference_ns(self) -> float:
        """Median over rounds of (watched - standard) in the same round."""
        return statistics.median(w - s for w, s in zip(self.watched, self.standard, strict=True))

    @property
    def spread_ns(self) -> float:
        """The wider of the two states' p25-p75 spreads over rounds: the noise floor."""
        return max(q[1] - q[0] for q in (quartiles(self.standard), quartiles(self.watched)))

    @property
    def passed(self) -> bool:
        return (
            self.difference_ns <= self.spread_ns
            or self.difference_ns < ENVIRON_TOLERANCE * self.standard_ns
        )


def environ_reads(samples: dict[str, dict[str, list[float]]]) -> list[EnvironRead]:
    return [EnvironRead(f, samples[f][STANDARD], samples[f][WATCHED]) for f in FORMS]


# -- report -----------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a (missing, or noise)"}[passed]


def _check_result(check: Check) -> str:
    if check.informational:
        share = ratio(check.measured_us, check.reference_us)
        return "info" if share is None else f"info: {fmt_ratio(share)} of the reference"
    return f"**{_verdict(check.passed)}**"


def in_process_table(rows: dict[tuple[str, str], Row], variants: Sequence[str]) -> list[str]:
    peers = [p for p in PEERS if p in variants]
    header = [
        "variant",
        "route",
        "µs/request (median)",
        "p25-p75",
        "overhead over bare (µs)",
        "CPU µs/request",
        *(f"÷ {p}" for p in peers),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for route in ROUTES:
        for variant in variants:
            row = rows[variant, route]
            cells = [
                f"**{variant}**" if variant in SENTINEL_VARIANTS else variant,
                f"`{ROUTE_TEMPLATES[route]}`",
                f"{row.median_us:.1f}",
                f"{row.p25_us:.1f}-{row.p75_us:.1f}",
                "—" if row.overhead_us is None else f"{row.overhead_us:.1f}",
                f"{row.cpu_us:.1f}",
            ]
            for peer in peers:
                if variant in SENTINEL_VARIANTS:
                    cells.append(fmt_ratio(ratio(row.overhead_us, overhead(rows, peer, route))))
                else:
                    cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets_table(checks: list[Check]) -> list[str]:
    lines = [
        "| target | route | measured (µs) | reference | reference overhead (µs) "
        "| limit (µs) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        limit = "—" if c.informational else _us(c.limit_us)
        lines.append(
            f"| {c.target} | `{ROUTE_TEMPLATES[c.route]}` | {_us(c.measured_us)} | {c.reference} "
            f"| {_us(c.reference_us)} | {limit} | {_check_result(c)} |"
        )
    return lines


def tenant_table(
    rows: dict[tuple[str, str], Row], samples: dict[str, dict[str, Samples]]
) -> list[str]:
    """Per route: sentinel+tenants over bare, over plain sentinel (paired per round, with the
    rounds' p25-p75, in wall and in CPU time), and both against the lightest peer's
    overhead."""
    lines = [
        f"| route | {SENTINEL_TENANTS} over bare (µs) | tenant dimension: {SENTINEL_TENANTS} "
        f"- {SENTINEL}, paired (µs) | p25-p75 | the same in CPU µs | p25-p75 "
        f"| lightest peer (overhead µs) | tenant dimension ÷ lightest peer "
        f"| {SENTINEL_TENANTS} ÷ lightest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for route in ROUTES:
        wall = paired_differences(samples, SENTINEL_TENANTS, SENTINEL, route)
        cpu = paired_differences(samples, SENTINEL_TENANTS, SENTINEL, route, cpu=True)
        if wall is None or cpu is None:
            continue
        (p25, p75), (cpu25, cpu75) = quartiles(wall), quartiles(cpu)
        tenant_us = statistics.median(wall)
        total_us = overhead(rows, SENTINEL_TENANTS, route)
        lightest_us, lightest = lightest_peer(rows, route)
        lines.append(
            f"| `{ROUTE_TEMPLATES[route]}` | {_us(total_us)} | {tenant_us:+.1f} "
            f"| {p25:+.1f} to {p75:+.1f} | {statistics.median(cpu):+.1f} "
            f"| {cpu25:+.1f} to {cpu75:+.1f} | {lightest} ({_us(lightest_us)}) "
            f"| {fmt_ratio(ratio(tenant_us, lightest_us))} "
            f"| {fmt_ratio(ratio(total_us, lightest_us))} |"
        )
    return lines


def tenant_tracker_note(infos: dict[str, dict[str, Any]]) -> str:
    tracker = infos.get(SENTINEL_TENANTS, {}).get("tenants")
    if not tracker:
        return ""
    return (
        f"What the tracker did in the last worker process ({tracker['requests']:,} "
        f"requests, warm-up included): {tracker['promotions']:,} promotions, "
        f"{tracker['evictions']:,} evictions, {tracker['tracked']} tenants tracked at the end, "
        f"{tracker['named_share']:.0%} of the requests counted under a tenant's name, "
        f"{tracker['rejected']} values rejected."
    )


def environ_table(reads: list[EnvironRead]) -> list[str]:
    lines = [
        "| read | standard ns/read (median) | p25-p75 | watched ns/read (median) | p25-p75 "
        "| watched - standard (ns) | ratio | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in reads:
        (s25, s75), (w25, w75) = quartiles(e.standard), quartiles(e.watched)
        lines.append(
            f"| `{e.form}` | {e.standard_ns:.1f} | {s25:.1f}-{s75:.1f} | {e.watched_ns:.1f} "
            f"| {w25:.1f}-{w75:.1f} | {e.difference_ns:+.1f} "
            f"| {e.watched_ns / e.standard_ns:.3f} | **{_verdict(e.passed)}** |"
        )
    return lines


ENVIRON_TARGET = "(e) reading os.environ not measurably slower"


def target_summary(checks: list[Check], reads: list[EnvironRead]) -> list[str]:
    by_target: dict[str, list[bool | None]] = {}
    for c in checks:
        if not c.informational:
            by_target.setdefault(c.target, []).append(c.passed)
    by_target[ENVIRON_TARGET] = [e.passed for e in reads]
    lines = []
    for target, results in by_target.items():
        if any(r is False for r in results):
            verdict = "FAIL"
        elif all(r is True for r in results):
            verdict = "PASS"
        else:
            verdict = "n/a"
        lines.append(f"- {target}: **{verdict}**")
    return lines


def server_table(
    results: dict[str, dict[str, list[WrkResult]]], variants: Sequence[str]
) -> list[str]:
    """Medians over rounds, and each variant's share of the bare app's rate paired round by
    round; "capacity" is the bare server's CPU per request over the variant's: the share of
    the bare app's throughput a CPU-bound server keeps."""
    lines = [
        "| variant | route | req/s | share of bare's rate, paired | p25-p75 "
        "| server CPU µs/request | capacity vs bare, paired | latency p50 (ms) "
        "| latency p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def median_of(runs: list[WrkResult], field: str) -> float | None:
        values = [getattr(run, field) for run in runs if getattr(run, field) is not None]
        return statistics.median(values) if values else None

    for route, template in (("static", "GET /static"), ("param", "GET /items/{item_id}")):
        bare_runs = results.get(BARE, {}).get(route) or []
        for variant in variants:
            runs = results.get(variant, {}).get(route)
            if not runs:
                continue
            rps = median_of(runs, "requests_per_second") or 0.0
            cpu = median_of(runs, "server_cpu_us")
            share = paired_share(runs, bare_runs)
            capacity = paired_share(runs, bare_runs, capacity=True)
            share_cells = f"{share[0]:.1%} | {share[1]:.1%} to {share[2]:.1%}" if share else "n/a |"
            cpu_cell = f"{cpu:.0f}" if cpu is not None else "n/a"
            capacity_cell = f"{capacity[0]:.1%}" if capacity else "n/a"
            name = f"**{variant}**" if variant in SENTINEL_VARIANTS else variant
            lines.append(
                f"| {name} | `{template}` | {rps:.0f} | {share_cells} | {cpu_cell} "
                f"| {capacity_cell} | {median_of(runs, 'p50_ms') or 0:.2f} "
                f"| {median_of(runs, 'p99_ms') or 0:.2f} | {sum(run.errors for run in runs)} |"
            )
    return lines


def tenant_section(
    rows: dict[tuple[str, str], Row],
    samples: dict[str, dict[str, Samples]],
    infos: dict[str, dict[str, Any]],
) -> list[str]:
    if SENTINEL_TENANTS not in samples or SENTINEL not in samples:
        return []
    note = tenant_tracker_note(infos)
    return [
        "## The tenant dimension (issue 19)",
        "",
        f'`{SENTINEL_TENANTS}` is `{SENTINEL}` with `tenant_header="{TENANT_HEADER}"`: each '
        "request's tenant is validated, fed to the heavy-hitter tracker and counted in "
        "`sentinel_tenant_requests_total`. The tenant dimension's cost is the median over "
        f"rounds of ({SENTINEL_TENANTS} - {SENTINEL}) in the same round, with that "
        "difference's p25-p75 over rounds, in wall time and in the workers' CPU time (which "
        "a busy machine's preemption disturbs less; a spread wider than the difference means "
        "noise). On the raising route every request is a 5xx, which weighs more in the "
        "tracker's scores.",
        "",
        *tenant_table(rows, samples),
        "",
        *([note, ""] if note else []),
    ]


def versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


def paired_section(settings: Settings, paired: dict[str, dict[str, list[float]]]) -> list[str]:
    if not paired:
        return []
    return [
        "## In-process, paired in one process (`bench.paired`)",
        "",
        f"The variants that can share a process ({', '.join(paired_variants(settings))}; "
        "sentry-sdk patches the frameworks globally, so its variants are left out), every app "
        "built in one fresh process and driven on one event loop in "
        f"{settings.paired_slices} slices of {PAIRED_REQUESTS} requests per variant and route "
        f"(after {PAIRED_WARMUP} of warm-up), the variants' order rotated each slice. "
        "Overhead is the median over slices of (variant - bare) in the same slice, with its "
        "p25-p75. In the table above each variant has a process of its own, whose luck (where "
        "its objects land) moves all of its figures by several µs for the process's life, "
        "bare's included; here that luck is shared, and the spread is a few times narrower.",
        "",
        *paired_table(paired),
        "",
    ]


def report(
    settings: Settings,
    argv: Sequence[str],
    rows: dict[tuple[str, str], Row],
    samples: dict[str, dict[str, Samples]],
    paired: dict[str, dict[str, list[float]]],
    infos: dict[str, dict[str, Any]],
    checks: list[Check],
    reads: list[EnvironRead],
    server: dict[str, dict[str, list[WrkResult]]] | None,
    server_note: str,
    started: float,
    load_before: tuple[float, float, float],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "bash bench/run.sh" + ("" if not argv else " " + shlex.join(argv))
    load_after = os.getloadavg()
    lines = [
        "# sentinel benchmark results",
        "",
        f"Produced by `{command}` on {now} in {time.monotonic() - started:.0f} s.",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min).",
        f"- Packages: {versions()}.",
        f"- In-process: {settings.rounds} interleaved rounds; per round and variant "
        f"{settings.requests} requests on each 2xx route and {settings.raise_requests} on "
        f"the raising route, after a warm-up of {settings.warmup} / {settings.raise_warmup}; "
        f"fresh worker processes {settings.worker_starts} time(s), the rounds shared between "
        "them.",
        f"- Every request of every variant carries an `{TENANT_HEADER}` header: customer ids "
        f"drawn Zipf-like from {TENANTS:,} tenants with a fixed seed (only "
        f"`{SENTINEL_TENANTS}` reads it).",
        f"- os.environ reads: {settings.environ_rounds} rounds of {settings.environ_reads} "
        "reads per read form and state, in one process.",
        "",
        "## In-process (ASGI app driven directly, one worker process per variant)",
        "",
        "µs/request is the median over rounds of the round's wall time per request; p25-p75 "
        "is the spread over rounds; overhead is the median over rounds of (variant - bare) in "
        "the same round; CPU is the worker's process CPU time per request, all its threads "
        "included. A `÷ peer` cell is sentinel's overhead divided by that peer's overhead on "
        "the same route: below 1 means sentinel adds less.",
        "",
        *in_process_table(rows, settings.variants),
        "",
        *paired_section(settings, paired),
        "## Targets",
        "",
        "(a)-(c) are issue 3's, and again with the limits issue 15 raised them to (0.20, "
        "0.25, 0.01), judged on the same figures; (a) and (b) with issue 15's limits once "
        "more on the paired run in one process (rows marked so), whose spread is a few times "
        "narrower; (d) and (e) are the mutation watch's. For "
        "(a)-(c) the measured value is sentinel's overhead over bare; for (d) it is the "
        f"median over rounds of ({SENTINEL} - {SENTINEL_NOWATCH}) in the same round, "
        "against a fixed limit. (f) is informational (issue 19 states the cost, it sets "
        f"no limit): the median over rounds of ({SENTINEL_TENANTS} - {SENTINEL}) in the "
        "same round, as a share of the lightest peer's overhead.",
        "",
        *targets_table(checks),
        "",
        "### Reading `os.environ` (target (e))",
        "",
        "One process reads `os.environ` in a tight loop with the standard `os._Environ` class "
        "and with sentinel's watch installed (a `WatchedEnviron` over the same data), "
        "toggling the watch between rounds. ns/read is net of the loop's own cost; the "
        "difference is the median over rounds of (watched - standard) in the same round. "
        "PASS when that difference is within the wider p25-p75 spread or below "
        f"{ENVIRON_TOLERANCE:.0%} of the standard read.",
        "",
        *environ_table(reads),
        "",
        *target_summary(checks, reads),
        "",
        *tenant_section(rows, samples, infos),
        "## Real server (uvicorn, one worker, loopback; wrk -t1 -c16)",
        "",
    ]
    if server:
        lines += [
            "Every variant served by uvicorn (`--no-access-log`, log level warning) on "
            "127.0.0.1, all at once (an idle server costs nothing), the servers pinned to one "
            "core and wrk to the other where the machine has two; 1 s warm-up per route, then "
            f"{settings.server_rounds} round(s) of `wrk -t1 -c16 -d{settings.server_seconds}s "
            "--latency` on each server and route in turn, the variants' order rotated each "
            "round. A variant's share of the bare app's rate is the median over rounds of its "
            "rate over the bare app's in the same round, seconds apart, with that ratio's "
            "p25-p75 (on this shared machine the rate moves by a quarter from one minute to "
            "the next); the other cells are medians over rounds (errors: the sum). The "
            "path-parameter route gets a distinct id per request. Server CPU is the server "
            'process\'s CPU time (all its threads) per request served; "capacity" (the bare '
            "server's CPU per request over the variant's, paired the same way) is the share "
            "of the bare app's throughput the variant keeps where the server is CPU-bound, as "
            "it is here. "
            f"`{SENTINEL_TENANTS}` is not served: wrk sends no tenant header; nor is "
            f"`{FLOOR}`, a reference, not a product.",
            "",
            *server_table(server, settings.variants),
        ]
    else:
        lines.append(server_note)
    lines += ["", "## Variants", ""]
    lines += [f"- `{v}`: {DESCRIPTIONS[v]}" for v in settings.variants]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, args = parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    unwind_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    log(f"logs of workers and servers: {log_dir} (removed after a run that completes)")
    try:
        status = _run(settings, args, argv, log_dir, started, load_before)
    except BaseException:
        log(f"the run did not complete; its workers' and servers' logs are kept in {log_dir}")
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    return status


def _run(
    settings: Settings,
    args: argparse.Namespace,
    argv: list[str],
    log_dir: Path,
    started: float,
    load_before: tuple[float, float, float],
) -> int:
    samples, infos = run_in_process(settings, log_dir)
    rows = summarize(samples)
    paired = run_paired(settings, log_dir)
    checks = targets(rows, samples, paired)
    environ_samples = run_environ_reads(settings)
    reads = environ_reads(environ_samples)

    server: dict[str, dict[str, list[WrkResult]]] | None = None
    server_note = "Skipped (--no-server)."
    if settings.server:
        if find_wrk() is None:
            server_note = "Skipped: wrk is not installed (install it, e.g. apt-get install wrk)."
            log(server_note)
        else:
            log("real-server run (uvicorn + wrk on 127.0.0.1)")
            served = [v for v in settings.variants if v not in IN_PROCESS_ONLY]
            server = run_server_benchmarks(
                ROOT,
                child_env(),
                served,
                settings.server_seconds,
                log_dir,
                log,
                rounds=settings.server_rounds,
            )

    text = report(
        settings,
        argv,
        rows,
        samples,
        paired,
        infos,
        checks,
        reads,
        server,
        server_note,
        started,
        load_before,
    )
    args.output.write_text(text)
    if args.json:
        raw = {
            "settings": settings.__dict__,
            "samples": {
                v: {r: {"wall_us": s.wall, "cpu_us": s.cpu} for r, s in by_route.items()}
                for v, by_route in samples.items()
            },
            "paired_us_per_request": paired,
            "environ_ns_per_read": environ_samples,
            "worker_info": infos,
            "server": {
                v: {r: [res.__dict__ for res in runs] for r, runs in by_route.items()}
                for v, by_route in (server or {}).items()
            },
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    print(text)
    log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Variants side by side in one process, paired slice by slice: ``python -m bench.paired``.

The harness (``bench/run.sh``) gives each variant a worker process of its own, and a
process's luck (where its objects land in memory) moves all of its figures. Here every
variant's app is built in one process and driven on one event loop, interleaved in
``--slices`` slices of ``--requests`` requests (the order rotated each slice). A variant's
overhead is the median over slices of (its time - the first variant's time in the same
slice), with that difference's p25-p75. Use it to tell a change of a few microseconds from
the noise; quote the harness for the targets. ``--flush-kib N`` copies N KiB of memory after
every request, so each starts with cold caches, as under a server.

Variants are those of :mod:`bench.apps`, plus one for comparisons:

- ``sentinel+traces-sdk-span``: ``sentinel+traces`` with an OpenTelemetry SDK server span
  started at every request, as before the deferred span (``sentinel/_deferred_span.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.apps import ROUTES, SENTINEL_TRACES, STATIC, build_app
from bench.worker import Driver, discard

SDK_SPAN = "sentinel+traces-sdk-span"


def build(variant: str) -> Any:
    """The app of ``variant`` (a :mod:`bench.apps` name or :data:`SDK_SPAN`)."""
    if variant != SDK_SPAN:
        return build_app(variant)
    app = build_app(SENTINEL_TRACES)
    app._tracer._ids = None  # no preset ids: the tracer starts an SDK span per request
    return app


def flushing(app: Any, kib: int) -> Any:
    """``app`` followed, after each request, by a copy of ``kib`` KiB of memory: what the
    request left in the caches is pushed out before the next, as a server's own work between
    two requests does. Every variant pays the same copy; the overheads compare what the
    variants cost with their code and data cold."""
    source, target = bytearray(kib * 1024), bytearray(kib * 1024)

    async def flushed(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            target[:] = source

    return flushed


def measure(
    variants: list[str],
    route: str,
    slices: int,
    requests: int,
    warmup: int,
    flush_kib: int = 0,
) -> dict[str, list[float]]:
    """µs per request of each variant, per slice (the slices interleaved)."""
    loop = asyncio.new_event_loop()
    drivers = {
        variant: Driver(flushing(build(variant), flush_kib) if flush_kib else build(variant))
        for variant in variants
    }
    for driver in drivers.values():
        driver.warmup(loop, route, warmup)
    timings: dict[str, list[float]] = {variant: [] for variant in variants}
    for index in range(slices):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            driver = drivers[variant]
            paths = driver._paths(route, requests)
            start = time.perf_counter()
            loop.run_until_complete(driver._run(paths, discard))
            timings[variant].append((time.perf_counter() - start) / requests * 1e6)
    loop.close()
    return timings


def overheads(timings: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    """Per variant: the median over slices of (its time - the first variant's in the same
    slice), and that difference's p25 and p75, in µs/request."""
    base = next(iter(timings.values()))
    found = {}
    for name, values in timings.items():
        differences = [value - before for value, before in zip(values, base, strict=True)]
        quartiles = statistics.quantiles(differences, n=4)
        found[name] = (statistics.median(differences), quartiles[0], quartiles[2])
    return found


def table(timings: dict[str, list[float]], reference: str | None) -> str:
    """Markdown: per variant the median µs/request and the paired overhead over the first."""
    names = list(timings)
    found = overheads(timings)
    lines = [
        f"| variant | µs/request (median) | overhead over {names[0]}, paired (µs) | p25-p75 "
        f"| ÷ {reference or '-'} |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        overhead, p25, p75 = found[name]
        ratio = ""
        if reference is not None and name != names[0]:
            reference_overhead = found[reference][0]
            ratio = f"{overhead / reference_overhead:.2f}" if reference_overhead > 0 else ""
        lines.append(
            f"| {name} | {statistics.median(timings[name]):.1f} | {overhead:+.1f} "
            f"| {p25:+.1f} to {p75:+.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__)
    parser.add_argument(
        "--variants",
        default=f"bare,sentinel,{SENTINEL_TRACES},{SDK_SPAN},otel-asgi",
        help="comma-separated; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument("--route", choices=ROUTES, default=STATIC)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--requests", type=int, default=200, help="per slice and variant")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--reference", help="a variant to divide every overhead by")
    parser.add_argument("--json", type=Path, help="also write the per-slice µs/request here")
    parser.add_argument(
        "--flush-kib",
        type=int,
        default=0,
        help="copy this many KiB of memory after each request, the caches left cold (0: none)",
    )
    arguments = parser.parse_args()
    variants = arguments.variants.split(",")
    if arguments.reference is not None and arguments.reference not in variants:
        parser.error(f"--reference must be one of --variants: {arguments.reference!r}")
    if arguments.flush_kib < 0:
        parser.error(f"--flush-kib must be >= 0: {arguments.flush_kib!r}")
    timings = measure(
        variants,
        arguments.route,
        arguments.slices,
        arguments.requests,
        arguments.warmup,
        arguments.flush_kib,
    )
    flushed = f", {arguments.flush_kib} KiB copied after each request" * bool(arguments.flush_kib)
    print(
        f"{arguments.slices} slices x {arguments.requests} requests on {arguments.route}, "
        f"one process, the variants interleaved{flushed}\n"
    )
    print(table(timings, arguments.reference))
    if arguments.json is not None:
        raw = {
            "route": arguments.route,
            "slices": arguments.slices,
            "requests": arguments.requests,
            "warmup": arguments.warmup,
            "flush_kib": arguments.flush_kib,
            "us_per_request": timings,
        }
        arguments.json.write_text(json.dumps(raw) + "\n")


if __name__ == "__main__":
    main()

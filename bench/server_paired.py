"""The real-server share, paired burst by burst: ``python -m bench.server_paired``.

The harness's real-server part (``bench.server``) serves each variant alone, one after the
other, for a few seconds a round: on this shared machine the bare app's own rate moves by a
quarter between rounds, more than the few percent compared. Here every variant's uvicorn
server runs at once (an idle server costs nothing), the servers pinned to one core and wrk
(``-t1 -c16``) to the other, so the load generator does not take the server's core. wrk then
loads the servers in short bursts, one after the other, in an order rotated every cycle. A
variant's share of the bare app's rate is the median over cycles of (its rate / the bare
app's rate in the same cycle), with that ratio's p25-p75. The servers are started afresh
``--starts`` times, the cycles shared between the starts, so no figure hangs on one process's
luck. Server CPU per request (all the process's threads, from ``/proc``) is reported the same
way, as "capacity": the bare server's CPU per request over the variant's.

Bounded: starts x (startup + warm-up) + cycles x variants x ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.apps import BARE, INSTRUMENTATOR, SENTINEL
from bench.harness import ROOT, child_env
from bench.server import (
    PARAM_SCRIPT,
    SERVER_ROUTES,
    process_cpu_seconds,
    require_wrk,
    run_wrk,
    running_server,
)

SERVER_CPU = 0
LOAD_CPU = 1


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` to ``cpu`` (a process's affinity is its threads')."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), {cpu})


@contextlib.contextmanager
def servers(variants: list[str], log_dir: Path) -> Iterator[dict[str, tuple[int, int]]]:
    """Every variant's server at once: ``{variant: (port, pid)}``."""
    with contextlib.ExitStack() as stack:
        started = {
            variant: stack.enter_context(running_server(ROOT, child_env(), variant, log_dir))
            for variant in variants
        }
        yield started


def burst(
    wrk: str, server: tuple[int, int], args: argparse.Namespace, script: Path
) -> tuple[float, float | None]:
    """One wrk burst against ``server`` (port, pid): its rate and the server's CPU µs per
    request (None where /proc is missing)."""
    port, pid = server
    before = process_cpu_seconds(pid)
    result = run_wrk(wrk, port, args.route, args.seconds, script, 1, args.connections)
    after = process_cpu_seconds(pid)
    if result.errors or not result.requests:
        msg = f"port {port}: {result.errors} errors, {result.requests} requests"
        raise RuntimeError(msg)
    if before is None or after is None:
        return result.requests_per_second, None
    return result.requests_per_second, (after - before) / result.requests * 1e6


def ratio_row(values: list[float]) -> tuple[float, float, float]:
    """(median, p25, p75) of ``values``."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    quartiles = statistics.quantiles(values, n=4)
    return statistics.median(values), quartiles[0], quartiles[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server_paired", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--variants",
        default=f"{BARE},{SENTINEL},{INSTRUMENTATOR}",
        help="comma-separated; the first is the baseline",
    )
    parser.add_argument("--route", choices=sorted(SERVER_ROUTES), default="static")
    parser.add_argument("--cycles", type=int, default=16, help="bursts per variant, in all")
    parser.add_argument("--starts", type=int, default=2, help="fresh servers this many times")
    parser.add_argument("--seconds", type=int, default=2, help="wrk duration of one burst")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    wrk = require_wrk()
    if wrk is None:
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    can_pin = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    own_cpus = os.sched_getaffinity(0) if can_pin else set()
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    cycle = 0
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "items.lua"
        script.write_text(PARAM_SCRIPT)
        for start in range(args.starts):
            cycles = args.cycles // args.starts + (start < args.cycles % args.starts)
            with servers(variants, Path(tmp)) as started:
                try:
                    if can_pin:
                        for _, pid in started.values():
                            pin(pid, SERVER_CPU)
                        os.sched_setaffinity(0, {LOAD_CPU})  # wrk inherits it
                    for port, _ in started.values():
                        run_wrk(wrk, port, args.route, 1, script, 1, args.connections)
                    for _ in range(cycles):
                        shift = cycle % len(variants)
                        for variant in variants[shift:] + variants[:shift]:
                            rate, cpu_us = burst(wrk, started[variant], args, script)
                            rates[variant].append(rate)
                            if cpu_us is not None:
                                cpu[variant].append(cpu_us)
                        cycle += 1
                        print(
                            f"cycle {cycle}/{args.cycles}: "
                            + "  ".join(f"{v} {rates[v][-1]:.0f}/s" for v in variants),
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    if can_pin:
                        os.sched_setaffinity(0, own_cpus)
    base = variants[0]
    pinning = (
        f"servers pinned to CPU {SERVER_CPU}, wrk to CPU {LOAD_CPU}"
        if can_pin
        else "not pinned (fewer than 2 CPUs)"
    )
    print(
        f"{args.cycles} cycles of {args.seconds} s bursts per variant on "
        f"{SERVER_ROUTES[args.route]} (wrk -t1 -c{args.connections}; {pinning}; "
        f"{args.starts} server starts)\n"
    )
    print(
        f"| variant | req/s (median) | share of {base}'s rate, paired | p25-p75 "
        f"| server CPU µs/request | capacity vs {base}, paired | p25-p75 |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        shares = [v / b for v, b in zip(rates[variant], rates[base], strict=True)]
        share, low, high = ratio_row(shares)
        row = (
            f"| {variant} | {statistics.median(rates[variant]):.0f} | {share:.1%} "
            f"| {low:.1%} to {high:.1%} |"
        )
        if len(cpu[variant]) == len(cpu[base]) and cpu[base]:
            capacity, cap_low, cap_high = ratio_row(
                [b / v for v, b in zip(cpu[variant], cpu[base], strict=True)]
            )
            row += (
                f" {statistics.median(cpu[variant]):.0f} | {capacity:.1%} "
                f"| {cap_low:.1%} to {cap_high:.1%} |"
            )
        else:
            row += " | | |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

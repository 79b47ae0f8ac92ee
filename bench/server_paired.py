"""The real-server share on one route, with many bursts: ``python -m bench.server_paired``.

The harness's real-server part (:func:`bench.server.run_server_benchmarks`) loads every
variant's server in short interleaved bursts, the servers pinned to one core and wrk to the
other, and compares each variant's burst with the bare app's in the same round. This command
runs just that, on one route, with more rounds (``--cycles``) over ``--starts`` fresh starts
of the servers, so no figure hangs on one process's luck: a variant's share of the bare app's
rate is the median over cycles of (its rate / the bare app's rate in the same cycle), with
that ratio's p25-p75; the server's CPU per request the same way, as "capacity".

Bounded: starts x (startup + warm-up) + cycles x variants x ``--seconds``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

from bench import unwind_on_sigterm
from bench.apps import BARE, INSTRUMENTATOR, SENTINEL
from bench.harness import ROOT, child_env
from bench.server import (
    LOAD_CPU,
    SERVER_CPU,
    SERVER_ROUTES,
    STACKS,
    WrkResult,
    can_pin,
    paired_share,
    require_wrk,
    run_server_benchmarks,
    stack_env,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server_paired", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--variants",
        default=f"{BARE},{SENTINEL},{INSTRUMENTATOR}",
        help="comma-separated; the bare app is always the baseline",
    )
    parser.add_argument("--route", choices=sorted(SERVER_ROUTES), default="static")
    parser.add_argument("--cycles", type=int, default=16, help="bursts per variant, in all")
    parser.add_argument("--starts", type=int, default=2, help="fresh servers this many times")
    parser.add_argument("--seconds", type=int, default=2, help="wrk duration of one burst")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--stack",
        choices=sorted(STACKS),
        default="h11",
        help="uvicorn's HTTP parser and loop: h11 and asyncio (plain `pip install uvicorn`, "
        "the harness's), or httptools and uvloop (`uvicorn[standard]`)",
    )
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    if require_wrk() is None:
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [BARE, *(v for v in variants if v != BARE)]
    runs: dict[str, list[WrkResult]] = {v: [] for v in variants}
    with TemporaryDirectory() as log_dir:
        for start in range(args.starts):
            cycles = args.cycles // args.starts + (start < args.cycles % args.starts)
            results = run_server_benchmarks(
                ROOT,
                {**child_env(), **stack_env(args.stack)},
                variants,
                args.seconds,
                Path(log_dir),
                lambda line: print(line, file=sys.stderr, flush=True),
                connections=args.connections,
                rounds=cycles,
                routes=(args.route,),
            )
            for variant in variants:
                runs[variant] += results[variant][args.route]
    pinning = (
        f"servers pinned to CPU {SERVER_CPU}, wrk to CPU {LOAD_CPU}"
        if can_pin()
        else "not pinned (fewer than 2 CPUs)"
    )
    print(
        f"{args.cycles} cycles of {args.seconds} s bursts per variant on "
        f"{SERVER_ROUTES[args.route]} (wrk -t1 -c{args.connections}; {pinning}; "
        f"{args.starts} server starts; uvicorn with {STACKS[args.stack]['http']} and "
        f"{STACKS[args.stack]['loop']})\n"
    )
    print(
        f"| variant | req/s (median) | share of {BARE}'s rate, paired | p25-p75 "
        f"| server CPU µs/request | capacity vs {BARE}, paired | p25-p75 |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        row = f"| {variant} | {statistics.median(r.requests_per_second for r in runs[variant]):.0f}"
        for capacity in (False, True):
            if capacity:
                cpu = [r.server_cpu_us for r in runs[variant] if r.server_cpu_us is not None]
                row += f" | {statistics.median(cpu):.0f}" if cpu else " | n/a"
            share = paired_share(runs[variant], runs[BARE], capacity=capacity)
            row += f" | {share[0]:.1%} | {share[1]:.1%} to {share[2]:.1%}" if share else " | n/a | "
        print(row + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one variant's per-request time goes: ``python -m bench.profile_variant [VARIANT]``.

Runs the same in-process loop as ``bench.worker`` under cProfile (after a warm-up) and prints
the functions of the chosen package (default: sentinel's) by own time, as µs per request,
plus the top functions overall. cProfile inflates every call, so read the shares, not the
absolute numbers; the harness's table has the real cost.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
from pathlib import Path

from bench.apps import RAISE, ROUTES, SENTINEL, VARIANTS, build_app
from bench.worker import Driver, discard


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_variant")
    parser.add_argument("variant", nargs="?", default=SENTINEL, choices=VARIANTS)
    parser.add_argument("--route", default="static", choices=ROUTES)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--package", default="sentinel", help="directory name whose functions are listed"
    )
    parser.add_argument("--save", type=Path, help="write the raw pstats here as well")
    args = parser.parse_args()
    n = args.requests if args.route != RAISE else min(args.requests, 2_000)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    driver = Driver(build_app(args.variant))
    driver.warmup(loop, args.route, min(n, 1_000))
    paths = driver._paths(args.route, n)

    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(driver._run(paths, discard))
    profiler.disable()
    if args.save:
        profiler.dump_stats(str(args.save))

    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    marker = f"/{args.package}/"
    own = [
        (tt, ct, nc, func)
        for func, (_, nc, tt, ct, _) in entries.items()
        if marker in func[0].replace("\\", "/")
    ]
    own.sort(reverse=True)
    own_total = sum(tt for tt, _, _, _ in own)
    print(
        f"{args.variant} on {args.route}: {n} requests, {total / n * 1e6:.1f} µs/request "
        f"under cProfile; {args.package}'s own functions {own_total / n * 1e6:.1f} µs/request "
        f"({own_total / total:.0%})"
    )
    print(f"\nTop {args.package} functions by own time (tottime):")
    print(f"{'tottime µs/req':>15} {'cumtime µs/req':>15} {'calls/req':>10}  function")
    for tt, ct, nc, (file, line, name) in own[: args.top]:
        short = file.replace("\\", "/").split(marker, 1)[-1]
        print(f"{tt / n * 1e6:15.2f} {ct / n * 1e6:15.2f} {nc / n:10.2f}  {short}:{line} {name}")
    called: dict[tuple[str, int, str], tuple[float, float]] = {}
    for func, (_, _, _, _, callers) in entries.items():
        if marker in func[0].replace("\\", "/"):
            continue
        for caller, (_, nc, _, ct) in callers.items():
            if marker in caller[0].replace("\\", "/"):
                calls, cum = called.get(func, (0.0, 0.0))
                called[func] = (calls + nc, cum + ct)
    print(f"\nFunctions outside {args.package} called from it (the wrapped app included):")
    print(f"{'cumtime µs/req':>15} {'calls/req':>10}  function")
    ranked = sorted(called.items(), key=lambda item: item[1][1], reverse=True)
    for (file, line, name), (nc, ct) in ranked[: args.top]:
        short = file.replace("\\", "/").split("site-packages/", 1)[-1]
        print(f"{ct / n * 1e6:15.2f} {nc / n:10.2f}  {short}:{line} {name}")
    print("\nTop functions overall by own time:")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

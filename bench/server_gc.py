"""What a variant makes the garbage collector do on a real server: ``python -m bench.server_gc``.

Each variant is served by uvicorn on loopback (``bench.server``, one worker) and loaded with
``wrk -t1 -c16`` on ``/static``; the server counts its collections per generation while it
serves (``gc.callbacks``) and writes them at exit. Rounds rotate the variants' order. The
output is, per variant, the collections per 1,000 requests of each generation, the time spent
collecting per request, the longest full (generation 2) collection, wrk's p99 and rate. A
request kept alive after it ended (by a batch, or by a handle the server scheduled that
copied its context) shows here as more collections and a p99 above the bare app's;
in-process benchmarks, with no server objects hanging off each request, do not show it.
``--client-headers`` sends a client's dozen headers instead of wrk's one, ``--stack`` picks
uvicorn's parser and loop. Bounded: rounds x variants x (startup + seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench import unwind_on_sigterm
from bench.harness import ROOT, child_env
from bench.server import (
    CLIENT_HEADERS,
    GC_REPORT_ENV,
    STACKS,
    require_wrk,
    run_wrk,
    running_server,
    stack_env,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_gc")
    parser.add_argument("--variants", default="bare,sentinel", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    parser.add_argument(
        "--stack", choices=sorted(STACKS), default="h11", help="uvicorn's parser and loop"
    )
    parser.add_argument(
        "--client-headers",
        action="store_true",
        help="send a client's dozen headers (bench.server.CLIENT_HEADERS), not only Host",
    )
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    wrk = require_wrk()
    if wrk is None:
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "items.lua"
        script.write_text("")  # only /static is loaded
        for round_index in range(args.rounds):
            shift = round_index % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                report = Path(tmp) / f"gc-{variant}-{round_index}.json"
                env = {**child_env(), **stack_env(args.stack), GC_REPORT_ENV: str(report)}
                headers = CLIENT_HEADERS if args.client_headers else ()
                with running_server(ROOT, env, variant, Path(tmp)) as (port, _):
                    warm = run_wrk(wrk, port, "static", 1, script, 1, 16, headers)
                    result = run_wrk(wrk, port, "static", args.seconds, script, 1, 16, headers)
                # Counted from startup to exit: the second of warm-up is in the count and in
                # the requests it is divided by; startup's few collections are in both rows.
                stats = json.loads(report.read_text())
                per_thousand = 1000 / max(1, warm.requests + result.requests)
                runs[variant].append(
                    {
                        "gen0": stats["0"][0] * per_thousand,
                        "gen1": stats["1"][0] * per_thousand,
                        "gen2": stats["2"][0] * per_thousand,
                        "longest_gen2_ms": stats["2"][2] * 1e3,
                        # microseconds of collecting per request, every generation
                        "gc_us": sum(stats[g][1] for g in "012") * 1e3 * per_thousand,
                        "p99_ms": result.p99_ms,
                        "rps": result.requests_per_second,
                    }
                )
                print(f"round {round_index + 1} {variant}: {runs[variant][-1]}", file=sys.stderr)
    print(
        "| variant | gen0 per 1k requests | gen1 per 1k requests | gen2 per 1k requests "
        "| collecting, µs per request | longest gen2 ms | p99 ms | req/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, results in runs.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"| {variant} | {median('gen0'):.1f} | {median('gen1'):.2f} | {median('gen2'):.2f} "
            f"| {median('gc_us'):.2f} | {max(r['longest_gen2_ms'] for r in results):.1f} "
            f"| {median('p99_ms'):.2f} | {median('rps'):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

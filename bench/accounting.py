"""What accounting for a finished request costs, hot: ``python -m bench.accounting``.

Builds the default sentinel (as ``bench.apps`` does), then hands it finished requests of
one label set the way the middleware does (one append each, a settle every batch), 6,400
per round, and prints the median and the fastest round in µs per request. The loop's own
cost (the same appends with the settle replaced by a clear) is printed beside it. Hot
figures are a floor: in a real request the same code also misses the caches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accounting")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--requests", type=int, default=6400, help="per round")
    args = parser.parse_args(argv)

    from prometheus_client import CollectorRegistry

    import sentinel
    from bench.apps import NullStream, make_fastapi_app
    from sentinel._middleware import TenantRequest

    app: Any = sentinel.instrument(
        make_fastapi_app(), metrics_port=0, registry=CollectorRegistry(), stream=NullStream()
    )
    metrics, account = app._metrics, app._account
    settling, batch = metrics.settling, metrics.batch
    scope = {"type": "http", "path": "/static", "method": "GET", "headers": []}
    now = time.perf_counter

    def requests() -> list[Any]:
        made = []
        for _ in range(args.requests):
            request = TenantRequest(scope, "GET", "unknown", now())
            request.route, request.tenant = "/static", None
            made.append(request)
        return made

    def accounted(made: list[Any]) -> None:
        for request in made:
            settling.append((account, request, 200, now()))
            if len(settling) >= batch:
                metrics.settle()

    def loop_only(made: list[Any]) -> None:
        for request in made:
            settling.append((account, request, 200, now()))
            if len(settling) >= batch:
                settling.clear()

    accounted(requests())  # warm-up
    for name, run in (("accounting", accounted), ("the loop alone", loop_only)):
        figures = []
        for _ in range(args.rounds):
            made = requests()
            started = time.perf_counter()
            run(made)
            figures.append((time.perf_counter() - started) / args.requests * 1e6)
        print(
            f"{name}: median {statistics.median(figures):.2f} µs/request, "
            f"fastest round {min(figures):.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Instructions per request, counted: ``python -m bench.instructions``.

Wall time on a shared machine moves by a quarter from run to run; the number of machine
instructions a request executes does not. Each variant's app (``bench.apps``, the same FastAPI
app and drivers as the in-process benchmark) runs under valgrind's cachegrind twice, after the
same warm-up, once with ``--small`` and once with ``--small + --requests`` requests: the
difference divided by ``--requests`` is the instructions one request costs, with the start-up,
the imports and the warm-up cancelled out. ``PYTHONHASHSEED`` is fixed, so what remains of the
run-to-run difference (about 1,500 instructions per request for sentinel, from what its timed
background work does during a run) is small against the overheads compared.

Work done on a timer (sentinel's writer ticks twice a second, its sampler rolls a window every
second) lands on about 50 times fewer requests under valgrind, which runs the app that much
slower: the count overstates it.

Instructions are not time: the same count runs slower where it misses the caches more, and a
middleware's per-request code, run once between two passes through a large app, misses more
than a loop over a batch (see docs/performance.md). Read these figures as the work each
variant adds, next to the harness's wall times, not instead of them.

With ``--server``, each variant is served by uvicorn under valgrind instead (``bench.server``,
one worker, loopback), and eight keep-alive connections send it ``GET /static`` after the
same warm-up; the count is then the whole server's per request (HTTP parsing, the event loop,
the app and the variant), which is what decides how many requests a CPU-bound server
answers. In-process, a variant's work is compared with the app's; under a server, with
everything a request costs.

Needs valgrind (``apt-get install valgrind``); two runs at a time, bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import unwind_on_sigterm
from bench.apps import (
    BARE,
    FLOOR,
    INSTRUMENTATOR,
    OTEL,
    ROUTE_TEMPLATES,
    SENTINEL,
    SENTINEL_TRACES,
    STARLETTE_EXPORTER,
    build_app,
)
from bench.harness import ROOT, child_env
from bench.server import HOST, free_port, stop_process

DEFAULT_VARIANTS = (
    BARE,
    SENTINEL,
    SENTINEL_TRACES,
    FLOOR,
    STARLETTE_EXPORTER,
    INSTRUMENTATOR,
    OTEL,
)
WARMUP = 1000


def drive(variant: str, route: str, requests: int) -> None:
    """In the child: build the app, warm it up, then serve ``requests`` requests."""
    from bench.worker import Driver, discard

    driver = Driver(build_app(variant))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    driver.warmup(loop, route, WARMUP)
    loop.run_until_complete(driver._run(driver._paths(route, requests), discard))


def _cachegrind(valgrind: str, out: Path, module: str, *args: str) -> list[str]:
    """The command running ``python -m module args`` under cachegrind, counts to ``out``."""
    return [
        valgrind,
        "--tool=cachegrind",
        "--cache-sim=no",
        f"--cachegrind-out-file={out}",
        sys.executable,
        "-m",
        module,
        *args,
    ]


def count_instructions(
    valgrind: str, variant: str, route: str, requests: int, out_dir: Path, timeout: float
) -> int:
    """Instructions executed by one child process (all its threads)."""
    out = out_dir / f"cachegrind.{variant}.{route}.{requests}"
    env = {**child_env(), "PYTHONHASHSEED": "0"}
    command = _cachegrind(
        valgrind, out, "bench.instructions", "--child", variant, route, str(requests)
    )
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        msg = (
            f"{variant} on {route} failed under valgrind ({done.returncode}): {done.stderr[-800:]}"
        )
        raise RuntimeError(msg)
    return _summary(out)


def _summary(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    msg = f"no summary line in {out}"
    raise RuntimeError(msg)


SERVER_CONNECTIONS = 8


def _get_static(port: int, requests: int, timeout: float) -> None:
    """``requests`` sequential ``GET /static`` on one keep-alive connection."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        for _ in range(requests):
            connection.request("GET", "/static")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                msg = f"GET /static answered {response.status}"
                raise RuntimeError(msg)
    finally:
        connection.close()


def _load(port: int, requests: int, timeout: float) -> None:
    """``requests`` requests over :data:`SERVER_CONNECTIONS` connections at once."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _get_static(port, requests // SERVER_CONNECTIONS, timeout)
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(SERVER_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def count_server_instructions(
    valgrind: str, variant: str, requests: int, out_dir: Path, timeout: float
) -> int:
    """Instructions executed by a uvicorn server of ``variant`` (all its threads) from its
    start to its stop, having served the warm-up and then ``requests`` requests."""
    out = out_dir / f"cachegrind.server.{variant}.{requests}"
    port = free_port()
    command = _cachegrind(valgrind, out, "bench.server", variant, str(port))
    env = {**child_env(), "PYTHONHASHSEED": "0"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _get_static(port, 1, timeout)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    msg = f"{variant}: the server under valgrind did not answer"
                    raise RuntimeError(msg) from None
                time.sleep(0.5)
        _load(port, WARMUP // 2, timeout)
        if requests:
            _load(port, requests, timeout)
    finally:
        stop_process(process, grace=timeout)
    return _summary(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated")
    parser.add_argument("--routes", default="static,param", help="comma-separated")
    parser.add_argument("--small", type=int, default=500, help="requests of the shorter run")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    parser.add_argument(
        "--server", action="store_true", help="count a uvicorn server's instructions (/static)"
    )
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "ROUTE", "N"), help="internal")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    if args.child:
        variant, route, n = args.child
        drive(variant, route, int(n))
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if BARE not in variants:
        variants.insert(0, BARE)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if args.server:
        routes = ["static"]
    jobs = [
        (variant, route, n)
        for variant in variants
        for route in routes
        for n in (args.small, args.small + args.requests)
    ]
    print(f"{len(jobs)} runs under cachegrind, two at a time", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(
            zip(
                jobs,
                pool.map(
                    lambda job: (
                        count_server_instructions(valgrind, job[0], job[2], Path(tmp), args.timeout)
                        if args.server
                        else count_instructions(valgrind, *job, Path(tmp), args.timeout)
                    ),
                    jobs,
                ),
                strict=True,
            )
        )
    per_request = {
        (variant, route): (
            counts[variant, route, args.small + args.requests] - counts[variant, route, args.small]
        )
        / args.requests
        for variant in variants
        for route in routes
    }
    where = (
        f"a uvicorn server, {SERVER_CONNECTIONS} keep-alive connections"
        if args.server
        else "in-process"
    )
    print(
        f"Instructions per request (cachegrind, {where}; {args.requests} requests counted "
        f"after a warm-up of {WARMUP // 2 if args.server else WARMUP}; PYTHONHASHSEED=0)\n"
    )
    references = [r for r in (INSTRUMENTATOR, STARLETTE_EXPORTER, OTEL) if r in variants]
    print(
        "| variant | route | instructions/request | over bare | "
        + " | ".join(f"÷ {r}" for r in references)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(references))
    for route in routes:
        bare = per_request[BARE, route]
        for variant in variants:
            added = per_request[variant, route] - bare
            cells = []
            for reference in references:
                reference_added = per_request[reference, route] - bare
                shown = variant not in (BARE, reference) and reference_added > 0
                cells.append(f"{added / reference_added:.2f}" if shown else "")
            over = "—" if variant == BARE else f"{added:+,.0f}"
            print(
                f"| {variant} | `{ROUTE_TEMPLATES[route]}` | {per_request[variant, route]:,.0f} "
                f"| {over} | " + " | ".join(cells) + " |"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

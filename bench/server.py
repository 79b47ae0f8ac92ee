"""The real-server run: uvicorn per variant on loopback, wrk against it.

``python -m bench.server VARIANT PORT`` is the server; :func:`run_server_benchmarks` starts
one per variant, all at once, loads them with wrk in short interleaved bursts for a bounded
time, and stops them (also on failure).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, always
SERVER_ROUTES: dict[str, str] = {
    "static": "/static",
    "param": "/items/{i}",
    "work": "/orders/{customer_id}",
}
"""What ``route`` names for the server benchmarks. ``work`` is a list endpoint doing what one
typically does but for its database (20 orders of 3 lines validated by pydantic and
serialised by FastAPI; the bare server spends 2-3.5 times ``/static``'s CPU on it): not in
the harness's runs, which keep ``HARNESS_SERVER_ROUTES``."""
HARNESS_SERVER_ROUTES = ("static", "param")

# Each wrk thread gets its own range of ids, so every request has a distinct path value.
PARAM_SCRIPT = """
local next_thread = 0
function setup(thread)
  thread:set("base", next_thread * 100000000)
  next_thread = next_thread + 1
end
local counter = 0
function request()
  counter = counter + 1
  return wrk.format("GET", "/items/" .. (base + counter))
end
"""


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    server_cpu_us: float | None = None
    """The server process's CPU time (all its threads) per request served, where the OS
    says (Linux): what a request costs the server, which wrk's share of the cores and
    other processes disturb far less than the rate."""


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def find_wrk() -> str | None:
    return shutil.which("wrk")


def require_wrk() -> str | None:
    """wrk's path; None, having said on stderr how to install it, when it is missing."""
    wrk = find_wrk()
    if wrk is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
    return wrk


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _get_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)  # no proxy, by design
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


@contextlib.contextmanager
def running_server(
    root: Path, env: dict[str, str], variant: str, log_dir: Path, python: str = sys.executable
) -> Iterator[tuple[int, int]]:
    """Start the variant's uvicorn server, wait until it answers, yield its port and pid,
    stop it."""
    port = free_port()
    log_path = log_dir / f"server-{variant}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [python, "-m", "bench.server", variant, str(port)],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while _get_status(port, "/static") != 200:
                if process.poll() is not None:
                    msg = f"server for {variant} exited ({process.returncode}); see {log_path}"
                    raise RuntimeError(msg)
                if time.monotonic() > deadline:
                    msg = f"server for {variant} did not answer in 60 s; see {log_path}"
                    raise RuntimeError(msg)
                time.sleep(0.1)
            yield port, process.pid
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop one process we started: SIGINT (uvicorn's graceful stop), then kill."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        msg = f"unreadable wrk duration {text!r}"
        raise ValueError(msg)
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (rps and p50 and p99):
        msg = f"unreadable wrk output:\n{output}"
        raise ValueError(msg)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    served = re.search(r"(\d+) requests in", output)
    return WrkResult(
        float(rps.group(1)),
        _duration_ms(p50.group(1)),
        _duration_ms(p99.group(1)),
        errors,
        int(served.group(1)) if served else 0,
    )


CLIENT_HEADERS = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
    "Accept: application/json, text/plain, */*",
    "Accept-Encoding: gzip, deflate, br",
    "Accept-Language: en-GB,en;q=0.9",
    "Authorization: Bearer bench-placeholder-token",
    "Cookie: session=bench-placeholder; theme=dark",
    "X-Request-Id: 0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "X-Forwarded-For: 10.0.0.1",
    "X-Forwarded-Proto: https",
    "Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "Referer: https://example.test/page",
    "Cache-Control: no-cache",
)
"""The headers of a browser or API client behind a proxy, for ``--client-headers``: wrk
alone sends only ``Host``, and what a finished request holds grows with its headers."""


def run_wrk(
    wrk: str,
    port: int,
    route: str,
    duration_s: int,
    script: Path,
    threads: int,
    connections: int,
    headers: Sequence[str] = (),
) -> WrkResult:
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    if route == "param":
        args += ["-s", str(script)]
    path = {"static": "/static", "param": "/items/0", "work": "/orders/42"}[route]
    args.append(f"http://{HOST}:{port}{path}")
    completed = subprocess.run(
        args, capture_output=True, text=True, timeout=duration_s + 30, check=True
    )
    return parse_wrk(completed.stdout)


SERVER_CPU = 0
LOAD_CPU = 1


def can_pin() -> bool:
    """Whether the servers and wrk can each have a core of their own (Linux, 2+ CPUs)."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` to ``cpu`` (a process's affinity is its threads')."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), {cpu})


@contextlib.contextmanager
def loading_from_another_core(pids: Sequence[int]) -> Iterator[None]:
    """Pin the servers to one core and this process, whose children wrk are, to another;
    nothing where that cannot be done."""
    if not can_pin():
        yield
        return
    own = os.sched_getaffinity(0)
    for pid in pids:
        pin(pid, SERVER_CPU)
    os.sched_setaffinity(0, {LOAD_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def burst(
    wrk: str, server: tuple[int, int], route: str, seconds: int, script: Path, connections: int
) -> WrkResult:
    """One wrk run of ``seconds`` against ``server`` (port, pid), with the server's CPU time
    per request where the OS says."""
    port, pid = server
    before = process_cpu_seconds(pid)
    result = run_wrk(wrk, port, route, seconds, script, 1, connections)
    after = process_cpu_seconds(pid)
    if before is not None and after is not None and result.requests:
        result.server_cpu_us = (after - before) / result.requests * 1e6
    return result


def run_server_benchmarks(
    root: Path,
    env: dict[str, str],
    variants: Sequence[str],
    duration_s: int,
    log_dir: Path,
    progress: Callable[[str], None],
    connections: int = 16,
    rounds: int = 1,
    routes: Sequence[str] = HARNESS_SERVER_ROUTES,
) -> dict[str, dict[str, list[WrkResult]]]:
    """wrk results per variant and route, one per round, the rounds aligned across variants.

    Every variant's server runs at once (an idle server costs nothing), pinned to one core
    with wrk (``-t1``) on the other where the machine allows; each round loads every server
    in turn for ``duration_s`` per route, in an order rotated every round. On a shared
    machine the rate moves by a quarter from one minute to the next: a variant's round is
    compared with the bare app's in the same round, seconds apart (:func:`paired_share`)."""
    wrk = find_wrk()
    if wrk is None:
        raise RuntimeError("wrk not found")
    results: dict[str, dict[str, list[WrkResult]]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        script = Path(tmp) / "items.lua"
        script.write_text(PARAM_SCRIPT)
        servers = {
            variant: stack.enter_context(running_server(root, env, variant, log_dir))
            for variant in variants
        }
        stack.enter_context(loading_from_another_core([pid for _, pid in servers.values()]))
        for server in servers.values():  # a second of warm-up on each route
            for route in routes:
                burst(wrk, server, route, 1, script, connections)
        for round_index in range(rounds):
            shift = round_index % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                for route in routes:
                    result = burst(wrk, servers[variant], route, duration_s, script, connections)
                    results[variant].setdefault(route, []).append(result)
                    cpu = (
                        f"  server CPU {result.server_cpu_us:.0f} us/request"
                        if result.server_cpu_us is not None
                        else ""
                    )
                    progress(
                        f"server round {round_index + 1}/{rounds} {variant:<18} {route:<6}"
                        f" {result.requests_per_second:7.0f} req/s{cpu}"
                        f"  p99 {result.p99_ms:.2f} ms"
                    )
    return results


def paired_share(
    runs: Sequence[WrkResult], bare_runs: Sequence[WrkResult], capacity: bool = False
) -> tuple[float, float, float] | None:
    """(median, p25, p75) over rounds of the variant's rate over the bare app's in the same
    round; with ``capacity``, of the bare server's CPU per request over the variant's."""
    if capacity:
        pairs = [
            (b.server_cpu_us, v.server_cpu_us)
            for v, b in zip(runs, bare_runs, strict=False)
            if v.server_cpu_us and b.server_cpu_us
        ]
    else:
        pairs = [
            (v.requests_per_second, b.requests_per_second)
            for v, b in zip(runs, bare_runs, strict=False)
            if b.requests_per_second
        ]
    ratios = [top / bottom for top, bottom in pairs if bottom]
    if not ratios:
        return None
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[0], quartiles[2]


GC_REPORT_ENV = "BENCH_GC_REPORT"
"""When set, the server counts its garbage collections and writes them there as JSON at exit
(``python -m bench.server_gc``)."""


def count_collections(path: str) -> None:
    """Count this process's collections per generation (and their time) from now on, and
    write ``{"0": [count, seconds, longest], ...}`` to ``path`` at exit."""
    import atexit
    import gc
    import json

    stats = {generation: [0, 0.0, 0.0] for generation in range(3)}
    started: dict[int, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            started[generation] = time.perf_counter()
            return
        took = time.perf_counter() - started.pop(generation, time.perf_counter())
        entry = stats[generation]
        entry[0] += 1
        entry[1] += took
        entry[2] = max(entry[2], took)

    def write() -> None:
        Path(path).write_text(json.dumps(stats))

    gc.callbacks.append(callback)
    atexit.register(write)


STACK_ENV = "BENCH_SERVER_STACK"
"""Which of :data:`STACKS` the server runs (``h11`` when unset)."""
STACKS: dict[str, dict[str, str]] = {
    # What `pip install uvicorn` runs: the HTTP parser and the event loop in Python.
    "h11": {"http": "h11", "loop": "asyncio"},
    # What `pip install "uvicorn[standard]"` (and `fastapi[standard]`) runs: both in C.
    "standard": {"http": "httptools", "loop": "uvloop"},
}


def stack_env(stack: str) -> dict[str, str]:
    """The servers' environment for ``stack`` (one of :data:`STACKS`)."""
    if stack not in STACKS:
        msg = f'"stack" must be one of {sorted(STACKS)}: {stack!r}'
        raise ValueError(msg)
    return {STACK_ENV: stack}


def serve(variant: str, port: int) -> None:
    import uvicorn

    from bench.apps import build_app

    if os.environ.get(GC_REPORT_ENV):
        count_collections(os.environ[GC_REPORT_ENV])
    stack = STACKS[os.environ.get(STACK_ENV) or "h11"]

    uvicorn.run(
        build_app(variant),
        host=HOST,
        port=port,
        workers=1,
        access_log=False,
        log_level="warning",
        http=stack["http"],
        loop=stack["loop"],
    )


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))

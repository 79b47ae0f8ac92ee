"""What one scrape of sentinel's metrics costs, fully populated: ``python -m bench.scrape_cost``.

The app of issue 15: 50 routes (``/r00/{id}`` ...), 64 locations through the location
header, 4 methods (GET, POST, PUT, DELETE), 5% of requests answered 503. "Fully populated"
means every location x route x method has been served with 200 and with 503 (51,200
requests), so every label set the app can produce exists.

Measured, each part in a fresh process (loopback only; nothing listens on a port):

- single process: lines, bytes and series per family of one exposition, and the time of a
  scrape (``generate_latest`` of the registry, what the metrics endpoint serves; the
  median of ``--scrapes``);
- per-request cost of the wrapped app in steady state (every label set already exists),
  with the bare app's cost in the same process, single-process and in multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR`` set: every value is written to the worker's mmap files);
- multiprocess: the size of one worker's ``.db`` files, and the sidecar's scrape
  (``sentinel._sidecar.merged_registry``, what ``sentinel sidecar`` and ``sentinel run
  --workers`` serve) with 1, 4 and 16 worker files: the first scrape and the median of
  the next ones. The worker files are copies of the one populated worker's files under
  other pids: the merge reads the same bytes whichever process wrote them, and populating
  16 real workers would take minutes on 2 cores.

Works against any checkout (``cd CHECKOUT && python -m bench.scrape_cost``), so the same
command measures before and after a change. Every step is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import unwind_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
ROUTES = 50
LOCATIONS = 64
METHODS = ("GET", "POST", "PUT", "DELETE")
ERROR_SHARE = 0.05
WORKER_COUNTS = (1, 4, 16)


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


def build(multiprocess: bool) -> tuple[Any, Any, Any]:
    """(bare app, wrapped app, sentinel) for the benchmark app."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from sentinel import Config, instrument
    from sentinel._runtime import Sentinel

    async def handler(request: Request) -> Response:
        if request.headers.get("x-fail"):
            return PlainTextResponse("unavailable", status_code=503)
        return PlainTextResponse("ok")

    routes = [Route(f"/r{i:02d}/{{id}}", handler, methods=list(METHODS)) for i in range(ROUTES)]
    fields = {field.name for field in dataclasses.fields(Config)}
    options: dict[str, Any] = {
        "location": "static",
        "location_header": "x-location",
        "metrics_port": 0,
    }
    config = Config(**{k: v for k, v in options.items() if k in fields})
    registry = None
    if not multiprocess:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
    sentinel = Sentinel(config, registry=registry, stream=_Discard())
    bare = Starlette(routes=routes)
    wrapped = instrument(Starlette(routes=routes), sentinel=sentinel)
    return bare, wrapped, sentinel


def scope(route: int, method: str, location: int, fail: bool) -> dict[str, Any]:
    path = f"/r{route:02d}/7"
    headers = [(b"x-location", f"loc{location:02d}".encode())]
    if fail:
        headers.append((b"x-fail", b"1"))
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "scheme": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def drive(app: Any, scopes: list[dict[str, Any]]) -> float:
    """CPU seconds of this process (every thread: sentinel's own included) to serve every
    scope, one after the other; CPU time, as other processes share the cores."""
    start = time.process_time()
    for item in scopes:
        await app(item, _receive, _send)
    return time.process_time() - start


def every_label_set() -> list[dict[str, Any]]:
    return [
        scope(route, method, location, fail)
        for location in range(LOCATIONS)
        for route in range(ROUTES)
        for method in METHODS
        for fail in (False, True)
    ]


def steady_load(count: int) -> list[dict[str, Any]]:
    """``count`` requests spread over every label set, 5% of them failing."""
    every = max(1, round(1 / ERROR_SHARE))
    return [
        scope(i % ROUTES, METHODS[(i // ROUTES) % 4], (i * 7) % LOCATIONS, i % every == 0)
        for i in range(count)
    ]


def families(text: str) -> dict[str, dict[str, int]]:
    """Lines, bytes and label sets per family of an exposition."""
    out: dict[str, dict[str, int]] = {}
    current = ""
    label_sets: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
            out.setdefault(current, {"lines": 0, "bytes": 0, "series": 0})
            label_sets.setdefault(current, set())
            continue
        if line.startswith("#") or not current:
            continue
        entry = out[current]
        entry["lines"] += 1
        entry["bytes"] += len(line) + 1
        labels = line[line.find("{") + 1 : line.rfind("}")] if "{" in line else ""
        pairs = sorted(
            pair for pair in re.findall(r'(\w+="[^"]*")', labels) if not pair.startswith("le=")
        )
        label_sets[current].add(",".join(pairs))
    for name, sets in label_sets.items():
        out[name]["series"] = len(sets)
    return out


def worker(mode: str, requests: int, scrapes: int) -> dict[str, Any]:
    """Populate the app in this process and measure; the result as a dict."""
    from prometheus_client import generate_latest

    import sentinel

    bare, wrapped, instance = build(mode == "multiprocess")
    result: dict[str, Any] = {"sentinel": str(Path(sentinel.__file__).parent)}
    asyncio.run(drive(wrapped, every_label_set()))
    load = steady_load(requests)
    asyncio.run(drive(bare, load[:2000]))  # warm both
    asyncio.run(drive(wrapped, load[:2000]))
    bare_s, wrapped_s = [], []
    for _ in range(5):
        bare_s.append(asyncio.run(drive(bare, load)))
        wrapped_s.append(asyncio.run(drive(wrapped, load)))
    result["bare_us"] = min(bare_s) / requests * 1e6
    result["wrapped_us"] = min(wrapped_s) / requests * 1e6
    instance.flush(5.0)
    if mode == "single":
        times, cpu = [], []
        text = b""
        for _ in range(scrapes):
            start, start_cpu = time.perf_counter(), time.process_time()
            text = generate_latest(instance.registry)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        decoded = text.decode()
        result["scrape_s"] = statistics.median(times)
        result["scrape_cpu_s"] = statistics.median(cpu)
        result["bytes"] = len(text)
        result["lines"] = sum(1 for line in decoded.splitlines() if not line.startswith("#"))
        result["created_lines"] = sum(
            1 for line in decoded.splitlines() if "_created" in line and not line.startswith("#")
        )
        result["families"] = families(decoded)
    instance.close()
    return result


def run_worker(mode: str, args: argparse.Namespace, directory: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTINEL_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = str(ROOT)
    if directory is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
    options = ["--worker", mode, "--requests", str(args.requests), "--scrapes", str(args.scrapes)]
    return dict(_run_self(options, env, args.timeout, f"worker {mode}"))


def _run_self(options: list[str], env: dict[str, str], timeout: float, what: str) -> Any:
    """Run this module in a fresh process with ``options``; its last stdout line, as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.scrape_cost", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def copy_workers(source: Path, target: Path, count: int) -> int:
    """``count`` copies of one worker's files under other pids; their total size."""
    target.mkdir()
    total = 0
    for n in range(count):
        pid = str(900000 + n)
        for path in source.iterdir():
            match = re.fullmatch(r"(.*_)(\d+)(\.db)", path.name)
            if match is None:
                if path.name.startswith("sentinel_tenants_") and path.suffix == ".json":
                    document = json.loads(path.read_text())
                    document["process"] = f"{pid}_0"
                    name = f"sentinel_tenants_{pid}_0.json"
                    (target / name).write_text(json.dumps(document))
                continue
            destination = target / f"{match.group(1)}{pid}{match.group(3)}"
            shutil.copyfile(path, destination)
            total += destination.stat().st_size
    return total


def sidecar_scrapes(directory: Path, scrapes: int) -> list[float]:
    """[first scrape s, its CPU s, median of the next, their CPU s, lines, bytes] of the
    merged view."""
    from prometheus_client import generate_latest

    from sentinel._sidecar import merged_registry

    registry = merged_registry(str(directory))
    start, start_cpu = time.perf_counter(), time.process_time()
    text = generate_latest(registry)
    first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    times, cpu = [], []
    for _ in range(scrapes):
        start, start_cpu = time.perf_counter(), time.process_time()
        text = generate_latest(registry)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    lines = sum(1 for line in text.decode().splitlines() if not line.startswith("#"))
    median, median_cpu = statistics.median(times), statistics.median(cpu)
    return [first, first_cpu, median, median_cpu, lines, len(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="steady-state requests")
    parser.add_argument("--scrapes", type=int, default=5, help="scrapes timed (median)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per step")
    parser.add_argument("--worker", choices=("single", "multiprocess"), help=argparse.SUPPRESS)
    parser.add_argument("--sidecar", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    if args.worker:
        print(json.dumps(worker(args.worker, args.requests, args.scrapes)))
        return 0
    if args.sidecar:
        print(json.dumps(sidecar_scrapes(Path(args.sidecar), args.scrapes)))
        return 0

    single = run_worker("single", args, None)
    print(f"sentinel from {single['sentinel']}")
    print("\n## Single process, fully populated\n")
    print(f"scrape {single['scrape_s'] * 1000:.0f} ms wall, ", end="")
    print(f"{single.get('scrape_cpu_s', 0) * 1000:.0f} ms CPU (median of {args.scrapes}); ", end="")
    print(f"{single['lines']:,} lines, {single['bytes']:,} bytes, ", end="")
    print(f"{single['created_lines']:,} _created lines\n")
    print("| family | series | lines | bytes |\n|---|---:|---:|---:|")
    for name, entry in sorted(single["families"].items(), key=lambda kv: -kv[1]["bytes"]):
        if entry["lines"]:
            print(f"| {name} | {entry['series']:,} | {entry['lines']:,} | {entry['bytes']:,} |")

    with tempfile.TemporaryDirectory(prefix="scrape-cost-") as temporary:
        base = Path(temporary)
        one = base / "one"
        one.mkdir()
        multi = run_worker("multiprocess", args, str(one))
        db = sum(p.stat().st_size for p in one.glob("*.db"))
        used = sum(int.from_bytes(p.read_bytes()[:4], "little") for p in one.glob("*.db"))
        print("\n## Per request (steady state, every label set exists)\n")
        print("| mode | bare app µs CPU | wrapped µs CPU | sentinel µs CPU |\n|---|---:|---:|---:|")
        for name, entry in (("single process", single), ("multiprocess", multi)):
            cost = entry["wrapped_us"] - entry["bare_us"]
            print(f"| {name} | {entry['bare_us']:.1f} | {entry['wrapped_us']:.1f} | {cost:.1f} |")
        ratio = (multi["wrapped_us"] - multi["bare_us"]) / max(
            1e-9, single["wrapped_us"] - single["bare_us"]
        )
        print(f"\nmultiprocess / single-process sentinel cost: {ratio:.2f}x")
        print(f"\none worker's .db files: {db:,} bytes ({used:,} bytes used)")
        print("\n## Sidecar scrape (merged view)\n")
        print(
            "| worker files | .db bytes | first scrape ms (CPU) | next scrapes ms (CPU) "
            "| lines | bytes |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
        for count in WORKER_COUNTS:
            directory = base / f"w{count}"
            size = copy_workers(one, directory, count)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
            env["PYTHONPATH"] = str(ROOT)
            options = ["--sidecar", str(directory), "--scrapes", str(args.scrapes)]
            first, first_cpu, median, median_cpu, lines, size_text = _run_self(
                options, env, args.timeout, "sidecar scrape"
            )
            print(
                f"| {count} | {size:,} | {first * 1000:.0f} ({first_cpu * 1000:.0f}) "
                f"| {median * 1000:.0f} ({median_cpu * 1000:.0f}) | {lines:,} | {size_text:,} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a million distinct tenant ids cost a served process: ``python -m bench.tenant_memory``.

One process serves a small ASGI app wrapped by sentinel with ``tenant_header`` set, driven
in-process (no network) with ``--requests`` requests that each carry a tenant id never seen
before, as one client inventing ids would send them: every id is validated, observed by the
heavy-hitter tracker and counted. After ``--warmup`` requests (every bounded structure is
full by then) the resident set size is read, and again at the end: the difference is what
the rest of the ids cost. Also printed: the tracker's state sizes and the tenant values the
scrape exposes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from typing import Any

from prometheus_client import CollectorRegistry

from sentinel import instrument


def rss_kib() -> int:
    """The resident set size now, from /proc (ru_maxrss is the peak)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def app(scope: Any, receive: Any, send: Any) -> None:
    status = 500 if scope["path"] == "/fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def drive(wrapped: Any, start: int, stop: int) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    for index in range(start, stop):
        path = "/fail" if index % 2000 == 0 else "/"
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "query_string": b"",
            "headers": [(b"x-tenant", f"customer-{index}".encode())],
        }
        await wrapped(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tenant_memory", description=__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=100_000)
    arguments = parser.parse_args()
    registry = CollectorRegistry()
    wrapped = instrument(
        app, registry=registry, stream=io.StringIO(), metrics_port=0, tenant_header="x-tenant"
    )
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    loop.run_until_complete(drive(wrapped, 0, arguments.warmup))
    wrapped.sentinel.flush()
    before = rss_kib()
    loop.run_until_complete(drive(wrapped, arguments.warmup, arguments.requests))
    wrapped.sentinel.flush()
    after = rss_kib()
    elapsed = time.perf_counter() - started
    tracker = wrapped.sentinel.tenants
    tracked, candidates, heap = tracker.state_size()
    values = {
        sample.labels["tenant"]
        for metric in registry.collect()
        if metric.name == "sentinel_tenant_requests"
        for sample in metric.samples
        if sample.name == "sentinel_tenant_requests_total"
    }
    print(f"requests: {arguments.requests:,} distinct tenant ids in {elapsed:.0f} s")
    rest = arguments.requests - arguments.warmup
    print(f"RSS after {arguments.warmup:,}: {before / 1024:.1f} MiB, at the end {after / 1024:.1f}")
    print(f"RSS growth over the last {rest:,}: {(after - before) / 1024:.2f} MiB")
    print(f"tracker: {tracked} tracked, {candidates} candidates, heap {heap}")
    print(f"tenant values exposed: {len(values)}")
    wrapped.sentinel.close()


if __name__ == "__main__":
    main()

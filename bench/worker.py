"""One variant's in-process benchmark worker: ``python -m bench.worker VARIANT``.

Builds the variant's app once, then answers JSON-line commands on stdin with JSON lines on
stdout (the only thing written there; anything a library prints goes to stderr):

- ``{"cmd": "warmup", "route": R, "n": N}`` -> ``{"statuses": {...}, "raised": {...}}``
- ``{"cmd": "run", "route": R, "n": N}`` -> ``{"us": wall µs/request, "cpu_us": ...}``
- ``{"cmd": "info"}`` -> ``{"tenants": {...}}`` for an app whose sentinel reads a tenant
  header (what its tracker did: promotions, evictions, tracked, rejected), else ``{}``
- ``{"cmd": "quit"}``

Requests drive the ASGI app directly on one event loop: a prebuilt scope (copied per
request, since apps add keys to it), a ``receive`` that returns an empty body and a ``send``
that discards. An exception the app raises out of the ASGI call is caught here. Every
request carries an ``x-tenant`` header from :func:`bench.apps.tenant_sequence` (request i
of a worker's life gets entry i, so every variant sees the same tenants); only
``sentinel+tenants`` reads it. The headers are built before the clock starts.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from bench.apps import TENANT_HEADER, build_app, route_path, tenant_sequence

BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "root_path": "",
    "query_string": b"",
    "headers": [],  # per request: BASE_HEADERS and the tenant
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
BASE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"sentinel-bench/1"),
    (b"accept", b"*/*"),
)
TENANT_HEADER_NAME = TENANT_HEADER.encode("ascii")

Request = tuple[str, bytes, list[tuple[bytes, bytes]]]
"""path, raw_path, headers"""


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: dict[str, Any]) -> None:
    pass


class Driver:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.next_id = 0  # path parameters never repeat within a worker's life
        self.tenants = tenant_sequence()

    def _paths(self, route: str, n: int) -> list[Request]:
        first, self.next_id = self.next_id, self.next_id + n
        tenants = self.tenants
        requests: list[Request] = []
        for i in range(first, first + n):
            path = route_path(route, i)
            tenant = (TENANT_HEADER_NAME, tenants[i % len(tenants)])
            requests.append((path, path.encode("ascii"), [*BASE_HEADERS, tenant]))
        return requests

    async def _run(self, paths: list[Request], send: Any) -> Counter[str]:
        app = self.app
        base = BASE_SCOPE
        raised: Counter[str] = Counter()
        for path, raw_path, headers in paths:
            scope = {**base, "path": path, "raw_path": raw_path, "headers": headers}
            try:
                await app(scope, receive, send)
            except Exception as exc:
                raised[type(exc).__name__] += 1
        return raised

    def warmup(self, loop: asyncio.AbstractEventLoop, route: str, n: int) -> dict[str, Any]:
        statuses: Counter[int] = Counter()

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] += 1

        raised = loop.run_until_complete(self._run(self._paths(route, n), record))
        return {"statuses": {str(k): v for k, v in statuses.items()}, "raised": dict(raised)}

    def run(self, loop: asyncio.AbstractEventLoop, route: str, n: int) -> dict[str, Any]:
        paths = self._paths(route, n)
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        raised = loop.run_until_complete(self._run(paths, discard))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        return {"us": wall / n * 1e6, "cpu_us": cpu / n * 1e6, "raised": sum(raised.values())}

    def info(self) -> dict[str, Any]:
        """What the tenant tracker did, for an app whose sentinel reads a tenant header."""
        middleware = getattr(self.app, "sentinel", None)
        if middleware is None or not middleware.config.tenant_header:
            return {}
        tracker = middleware.tenants
        counts = tracker.counts()
        named = sum(sum(c) for label, c in counts.items() if label != "other")
        total = sum(sum(c) for c in counts.values())
        return {
            "tenants": {
                "requests": total,
                "named_share": named / total if total else 0.0,
                "tracked": len(tracker.tracked()),
                "promotions": tracker.promotions,
                "evictions": tracker.evictions,
                "rejected": sum(tracker.rejected().values()),
            }
        }


def main() -> None:
    variant = sys.argv[1]
    # The protocol owns the real stdout; whatever else prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    driver = Driver(build_app(variant))
    protocol.write(json.dumps({"ready": variant}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "info":
            result = driver.info()
        else:
            handler = driver.warmup if command["cmd"] == "warmup" else driver.run
            result = handler(loop, command["route"], int(command["n"]))
        protocol.write(json.dumps(result) + "\n")
    loop.close()


if __name__ == "__main__":
    main()

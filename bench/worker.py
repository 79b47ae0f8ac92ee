"""One variant's in-process benchmark worker: ``python -m bench.worker VARIANT``.

Builds the variant's app once, then answers JSON-line commands on stdin with JSON lines on
stdout (the only thing written there; anything a library prints goes to stderr):

- ``{"cmd": "warmup", "route": R, "n": N}`` -> ``{"statuses": {...}, "raised": {...}}``
- ``{"cmd": "run", "route": R, "n": N}`` -> ``{"us": wall µs/request, "cpu_us": ...}``
- ``{"cmd": "quit"}``

Requests drive the ASGI app directly on one event loop: a prebuilt scope (copied per
request, since apps add keys to it), a ``receive`` that returns an empty body and a ``send``
that discards. An exception the app raises out of the ASGI call is caught here.
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

from bench.apps import build_app, route_path

BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "root_path": "",
    "query_string": b"",
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"sentinel-bench/1"),
        (b"accept", b"*/*"),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: dict[str, Any]) -> None:
    pass


class Driver:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.next_id = 0  # path parameters never repeat within a worker's life

    def _paths(self, route: str, n: int) -> list[tuple[str, bytes]]:
        first, self.next_id = self.next_id, self.next_id + n
        paths = [route_path(route, i) for i in range(first, first + n)]
        return [(p, p.encode("ascii")) for p in paths]

    async def _run(self, paths: list[tuple[str, bytes]], send: Any) -> Counter[str]:
        app = self.app
        base = BASE_SCOPE
        raised: Counter[str] = Counter()
        for path, raw_path in paths:
            scope = {**base, "path": path, "raw_path": raw_path}
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
        handler = driver.warmup if command["cmd"] == "warmup" else driver.run
        result = handler(loop, command["route"], int(command["n"]))
        protocol.write(json.dumps(result) + "\n")
    loop.close()


if __name__ == "__main__":
    main()
